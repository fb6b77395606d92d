"""SwiGLU's gating in PyTorch: the specification of the Triton kernel and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate and up of one shape and dtype; silu is rounded to that dtype before
    the product, as the two PyTorch ops round."""
    return F.silu(gate) * up
