"""A linear layer with its neighbours fused in, in PyTorch: the specification of the Triton GEMV and the
unfused path. The composition of the existing references is the spec: an optional prologue on x (the
RMSNorm of ``kernels/rmsnorm/reference.py`` or the SwiGLU gating of ``kernels/swiglu/reference.py``),
``F.linear``, and an optional residual added to the result."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lola_chat.kernels.rmsnorm import reference as rmsnorm_reference
from lola_chat.kernels.swiglu import reference as swiglu_reference


def compose(
    x: torch.Tensor,
    matmul: Callable[[torch.Tensor], torch.Tensor],
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    rms_norm: Callable = rmsnorm_reference.rms_norm,
    swiglu: Callable = swiglu_reference.swiglu,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """residual + matmul(prologue(x)), one op after the other, converted to ``out_dtype`` when given. The
    prologue is ``rms_norm(x, norm_weight, eps)`` with ``norm_weight``, or with ``gated`` ``swiglu(gate,
    up)`` of x = [gate | up] (..., 2K); not both. ``rms_norm`` and ``swiglu`` are the references unless the
    caller passes the dispatched ops."""
    assert norm_weight is None or not gated, "an RMSNorm and a SwiGLU prologue at once are not supported"
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    elif gated:
        x = swiglu(*x.chunk(2, dim=-1))
    y = matmul(x)
    y = y if residual is None else residual + y
    return y if out_dtype is None else y.to(out_dtype)


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """residual + prologue(x) @ weight.T in x's dtype, then converted to ``out_dtype`` when given, with the
    references (see ``compose``). x (..., K), or (..., 2K) with ``gated``; weight (N, K); norm_weight (K,);
    residual (..., N)."""
    return compose(
        x,
        lambda rows: F.linear(rows, weight),
        norm_weight=norm_weight,
        eps=eps,
        gated=gated,
        residual=residual,
        out_dtype=out_dtype,
    )
