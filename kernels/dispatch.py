"""When an op in ``lola_chat.kernels`` runs its Triton kernel instead of its PyTorch reference: one rule
for every op. ``LOLA_CHAT_REFERENCE=1`` in the environment, or ``force_reference()``, forces the
reference everywhere. ``dependent_launch()`` chooses whether the Triton kernels that take a ``PDL``
constexpr (the decode step's fused projections, and LoLA attention for every segment) are launched as
programmatic dependent launches (see ``launch_options``)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

REFERENCE_ENV = "LOLA_CHAT_REFERENCE"
_forced = contextvars.ContextVar("lola_force_reference", default=False)
_dependent = contextvars.ContextVar("lola_dependent_launch", default=True)


@contextlib.contextmanager
def force_reference(enabled: bool = True):
    """Within the block, dispatch to the PyTorch reference (``enabled``) or back to the fast path."""
    token = _forced.set(enabled)
    try:
        yield
    finally:
        _forced.reset(token)


@contextlib.contextmanager
def dependent_launch(enabled: bool = True):
    """Within the block, launch the Triton kernels that take a ``PDL`` constexpr as programmatic dependent
    launches where the GPU has them (``enabled``, the default) or one strictly after another (for
    comparison)."""
    token = _dependent.set(enabled)
    try:
        yield
    finally:
        _dependent.reset(token)


@functools.cache
def _has_dependent_launch(device_index: int) -> bool:
    # Hopper (compute capability 9) and later; Triton's interpreter has no inline assembly.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return not interpreted and torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(tensor: torch.Tensor) -> dict:
    """Launch options for a Triton kernel that works on ``tensor``'s device and takes a ``PDL``
    constexpr. With programmatic dependent launch a kernel may start while the kernel before it in the
    stream is still running (inside a CUDA graph too): it signals its own dependents at once, reads
    first what none of the dependent launches before it writes (weights; memory last written before
    the last ordinary launch, which a dependent one never overlaps: by an earlier decode step, or by the
    eviction between two segments), and waits (``gdc_wait``) for its predecessor to finish before it
    reads anything else or writes. Between the many small kernels of a decode step this hides the
    launch gap and the first memory round trip. ``{"PDL": False}`` off CUDA, before Hopper, under
    Triton's interpreter or outside ``dependent_launch()``."""
    enabled = tensor.is_cuda and _dependent.get() and _has_dependent_launch(tensor.device.index or 0)
    return {"PDL": True, "launch_pdl": True} if enabled else {"PDL": False}


@functools.cache
def triton_module(name: str):
    """The Triton implementation module ``name`` (fully qualified), or None where Triton cannot be
    imported. Imported on first use so that nothing touches Triton on machines that never dispatch to it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def reference_forced() -> bool:
    """Whether ``force_reference()`` or ``LOLA_CHAT_REFERENCE=1`` forces the reference here."""
    return _forced.get() or os.environ.get(REFERENCE_ENV) == "1"


def fast_path(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors may leave the reference: it is not forced, every tensor is on a
    CUDA device, none is float64, and no autograd graph is being recorded through them (the kernels have
    no backward)."""
    if reference_forced():
        return False
    if not all(t.is_cuda for t in tensors):
        return False
    # float64 is the exact path the tests check the reference with; the kernels accumulate in fp32.
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
