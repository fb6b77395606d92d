"""When an op in ``lola_chat.kernels`` runs its Triton kernel instead of its PyTorch reference: one rule
for every op. ``LOLA_CHAT_REFERENCE=1`` in the environment, or ``force_reference()``, forces the
reference everywhere."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

REFERENCE_ENV = "LOLA_CHAT_REFERENCE"
_forced = contextvars.ContextVar("lola_force_reference", default=False)


@contextlib.contextmanager
def force_reference(enabled: bool = True):
    """Within the block, dispatch to the PyTorch reference (``enabled``) or back to the fast path."""
    token = _forced.set(enabled)
    try:
        yield
    finally:
        _forced.reset(token)


@functools.cache
def triton_module(name: str):
    """The Triton implementation module ``name`` (fully qualified), or None where Triton cannot be
    imported. Imported on first use so that nothing touches Triton on machines that never dispatch to it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def fast_path(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors may leave the reference: it is not forced, every tensor is on a
    CUDA device, none is float64, and no autograd graph is being recorded through them (the kernels have
    no backward)."""
    if _forced.get() or os.environ.get(REFERENCE_ENV) == "1":
        return False
    if not all(t.is_cuda for t in tensors):
        return False
    # float64 is the exact path the tests check the reference with; the kernels accumulate in fp32.
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
