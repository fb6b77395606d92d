"""Softmax decode over a static KV cache (the baseline ``lola-chat bench`` compares LoLA with): the
PyTorch reference (``reference.py``, the specification) and a split-KV Triton kernel
(``decode_triton.py``) used on CUDA."""

from __future__ import annotations

import torch
from lola_chat.kernels.softmax import reference

__all__ = ["decode"]


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor | int) -> torch.Tensor:
    """See ``reference.decode``; the Triton kernel runs where every tensor is on a CUDA device and the
    head dimension is a power of two of at least 16 (the kernel's tiles); elsewhere the reference."""
    dim = q.shape[-1]
    if q.is_cuda and k.is_cuda and v.is_cuda and dim >= 16 and dim & (dim - 1) == 0:
        from lola_chat.kernels.softmax import decode_triton

        return decode_triton.decode(q, k, v, length)
    return reference.decode(q, k, v, length)
