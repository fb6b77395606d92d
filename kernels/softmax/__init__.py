"""Softmax decode over a static KV cache (the baseline ``lola-chat bench`` compares LoLA with): the
PyTorch reference (``reference.py``, the specification) and a split-KV Triton kernel
(``decode_triton.py``) used on CUDA."""

from __future__ import annotations

import torch
from lola_chat.kernels.dispatch import fast_path, triton_module
from lola_chat.kernels.softmax import reference

__all__ = ["decode"]


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor | int) -> torch.Tensor:
    """See ``reference.decode``; the Triton kernel runs where ``dispatch.fast_path`` allows it, Triton
    imports and the head dimension is a power of two of at least 16 (the kernel's tiles); elsewhere the
    reference."""
    dim = q.shape[-1]
    if dim >= 16 and dim & (dim - 1) == 0 and fast_path(q, k, v):
        kernel = triton_module("lola_chat.kernels.softmax.decode_triton")
        if kernel is not None:
            return kernel.decode(q, k, v, length)
    return reference.decode(q, k, v, length)
