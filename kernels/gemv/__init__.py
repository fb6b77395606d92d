"""A linear layer with its neighbours fused in (an RMSNorm or SwiGLU prologue, a residual epilogue): the
PyTorch composition (``reference.py``, the specification) and a one-kernel Triton GEMV for decoding
(``gemv_triton.py``), chosen by the rule of ``lola_chat.kernels.dispatch`` and the number of rows."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lola_chat.kernels.dispatch import fast_path, triton_module
from lola_chat.kernels.gemv import reference
from lola_chat.kernels.rmsnorm import rms_norm
from lola_chat.kernels.swiglu import swiglu

__all__ = ["MAX_FUSED_ROWS", "fused_linear"]

# Decoding feeds one token per sequence: a few rows, for which a GEMM reads its whole weight to produce
# one output row and the separate norm, gating and residual kernels cost about as much as the GEMM itself.
# With more rows cuBLAS's tiled GEMM, which reuses each weight tile across rows, wins; the GEMV reads the
# weight once per row.
MAX_FUSED_ROWS = 4


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    matmul: Callable[[torch.Tensor], torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """residual + prologue(x) @ weight.T, computed in x's dtype with fp32 accumulation, then converted to
    ``out_dtype`` when given (the fp32 logits of a bf16 model, in the GEMV's own store).

    x: (..., K); weight: (N, K). Prologue, at most one: with ``norm_weight`` (K,), ``rms_norm(x,
    norm_weight, eps)``; with ``gated``, x is (..., 2K) = [gate | up] and becomes ``swiglu(gate, up)``.
    Epilogue: with ``residual`` (..., N), the sum ``residual + y``. Returns a new (..., N) tensor; nothing
    is written in place.

    The Triton GEMV runs where ``dispatch.fast_path`` allows it for every tensor given, Triton imports, x
    has at most ``MAX_FUSED_ROWS`` rows (the product of its leading dims), every tensor has one dtype and a
    unit stride in its last dim. Elsewhere the ops run one after the other: the dispatched ``rms_norm`` and
    ``swiglu``, then ``matmul(x)`` when given (a module whose forward and hooks should run, say) else
    ``F.linear(x, weight)``, then the residual add."""
    assert norm_weight is None or not gated, "an RMSNorm and a SwiGLU prologue at once are not supported"
    tensors = [t for t in (x, weight, norm_weight, residual) if t is not None]
    fusable = (
        math.prod(x.shape[:-1]) <= MAX_FUSED_ROWS
        and weight.dim() == 2
        and all(t.dtype == x.dtype and t.stride(-1) == 1 for t in tensors)
        and fast_path(*tensors)
    )
    if fusable:
        kernel = triton_module("lola_chat.kernels.gemv.gemv_triton")
        if kernel is not None:
            options = dict(norm_weight=norm_weight, eps=eps, gated=gated, residual=residual)
            return kernel.fused_linear(x, weight, **options, out_dtype=out_dtype)
    return reference.compose(
        x,
        matmul if matmul is not None else lambda rows: F.linear(rows, weight),
        norm_weight=norm_weight,
        eps=eps,
        gated=gated,
        residual=residual,
        rms_norm=rms_norm,
        swiglu=swiglu,
        out_dtype=out_dtype,
    )
