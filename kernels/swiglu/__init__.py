"""SwiGLU's gating silu(gate) * up: the PyTorch reference (``reference.py``, the specification and the
CPU path) and a one-kernel Triton version (``swiglu_triton.py``), chosen by the rule of
``lola_chat.kernels.dispatch``."""

from __future__ import annotations

import torch
from lola_chat.kernels.dispatch import fast_path, triton_module
from lola_chat.kernels.swiglu import reference

__all__ = ["swiglu"]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, rounded as ``F.silu(gate) * up`` rounds (silu to the dtype, then the product).

    gate, up: (..., N) of one shape and dtype; they may be the two halves of one packed projection's
    output (``gate_up.chunk(2, -1)``): the kernel reads them in place. Returns their shape and dtype,
    contiguous. The Triton kernel runs where ``dispatch.fast_path`` allows it, Triton imports and both
    have one shape and dtype and a unit stride in N; elsewhere the reference (which also broadcasts)."""
    same = gate.shape == up.shape and gate.dtype == up.dtype
    if same and gate.stride(-1) == up.stride(-1) == 1 and fast_path(gate, up):
        kernel = triton_module("lola_chat.kernels.swiglu.swiglu_triton")
        if kernel is not None:
            return kernel.swiglu(gate, up)
    return reference.swiglu(gate, up)
