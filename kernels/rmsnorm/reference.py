"""RMSNorm in PyTorch: the specification of the Triton kernel and the CPU path. The mean square is taken
in fp32; the normalized row is rounded to the input's dtype before the weight multiplies it, as in
Hugging Face's Llama (so results match checkpoints' reference outputs)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N), weight (N,) -> x / sqrt(mean(x^2) + eps) * weight, in x's and weight's promoted dtype."""
    wide = x.float()
    variance = wide.pow(2).mean(-1, keepdim=True)
    return (wide * torch.rsqrt(variance + eps)).to(x.dtype) * weight
