"""The greedy token of each row of logits: the PyTorch reference (``reference.py``, the specification and
the CPU path) and a one-launch Triton version (``argmax_triton.py``), chosen by the rule of
``lola_chat.kernels.dispatch``."""

from __future__ import annotations

import torch
from lola_chat.kernels.argmax import reference
from lola_chat.kernels.dispatch import fast_path, triton_module

__all__ = ["argmax"]


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) float -> (B,) int64: the index of the first largest value of each row, as
    ``torch.argmax``. Written into ``out`` when given ((B,) int64 on logits' device, such as a decode
    step's own token buffer) and returned.

    Logits are assumed finite or -inf. ``torch.argmax`` takes a NaN for the largest value; the kernel
    does not promise to: on a row holding a NaN it returns some valid column, 0 <= index < V. The Triton
    kernel runs where ``dispatch.fast_path`` allows it, Triton imports and V has a unit stride; elsewhere
    the reference, whose result is then copied into ``out``."""
    contiguous_rows = logits.dim() == 2 and (logits.stride(-1) == 1 or logits.shape[-1] == 1)
    if contiguous_rows and fast_path(logits):
        kernel = triton_module("lola_chat.kernels.argmax.argmax_triton")
        if kernel is not None:
            return kernel.argmax(logits, out=out)
    tokens = reference.argmax(logits)
    if out is None:
        return tokens
    return out.copy_(tokens)
