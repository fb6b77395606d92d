"""RMSNorm: the PyTorch reference (``reference.py``, the specification and the CPU path) and a one-kernel
Triton version (``rmsnorm_triton.py``), chosen by the rule of ``lola_chat.kernels.dispatch``."""

from __future__ import annotations

import torch
from lola_chat.kernels.dispatch import fast_path, triton_module
from lola_chat.kernels.rmsnorm import reference

__all__ = ["rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight, the mean in fp32 and the normalized x rounded
    to x's dtype before the weight multiplies it.

    x: (..., N) float, any leading dims; weight: (N,). Returns x's shape in the promoted dtype of x and
    weight. The Triton kernel runs where ``dispatch.fast_path`` allows it, Triton imports and x has a unit
    stride in N; elsewhere the reference."""
    if x.stride(-1) == 1 and fast_path(x, weight):
        kernel = triton_module("lola_chat.kernels.rmsnorm.rmsnorm_triton")
        if kernel is not None:
            return kernel.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)
