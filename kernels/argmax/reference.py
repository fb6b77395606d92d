"""The greedy token of each row of logits in PyTorch: the specification of the Triton kernel and the CPU
path."""

from __future__ import annotations

import torch


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float -> (B,) int64: the index of the first largest value of each row, as
    ``torch.argmax`` gives it (which also takes a NaN for the largest value)."""
    return logits.argmax(dim=-1)
