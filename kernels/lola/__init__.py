"""LoLA attention: public functions. The PyTorch reference (``reference.py``) is the specification and
the CPU path; the Triton kernels (``*_triton.py``) run instead when every tensor is on a CUDA device,
Triton imports, no autograd graph is being recorded through a tensor that needs it, and the shapes
suit them. ``LOLA_CHAT_REFERENCE=1`` in the environment, or ``force_reference()``, forces the reference.

The Triton paths update the state tensors in place and return them, so callers that rebind the
returned tensors (as ``lola_chat.memory`` does) work with either path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch
from lola_chat.kernels.lola import reference
from lola_chat.kernels.lola.reference import FrameRotary, KeyFeatures, frame, rotate, self_recall_error

__all__ = [
    "FrameRotary",
    "KeyFeatures",
    "attend",
    "evict",
    "force_reference",
    "frame",
    "hedgehog",
    "rotate",
    "self_recall_error",
    "uses_triton",
]

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
def _triton_module(name: str):
    """The Triton implementation module, or None where Triton cannot be imported. Imported on first
    use so that nothing touches Triton on machines that never dispatch to it."""
    try:
        return importlib.import_module(f"lola_chat.kernels.lola.{name}_triton")
    except ImportError:
        return None


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def uses_triton(*tensors: torch.Tensor, feature_map: torch.Tensor | None = None) -> bool:
    """Whether a call on these tensors goes to the Triton kernels."""
    if _forced.get() or os.environ.get(REFERENCE_ENV) == "1":
        return False
    if not all(t.is_cuda for t in tensors):
        return False
    # float64 is the exact path the tests check the reference with; the kernels accumulate in fp32.
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if feature_map is not None and not (
        _power_of_two(feature_map.shape[1]) and _power_of_two(feature_map.shape[2])
    ):
        return False
    return _triton_module("attend") is not None


def attend(
    q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor, inv_freq, tokens_seen, rotary=None,
    normalizer="shared",
):  # fmt: skip
    """See ``reference.attend``; dispatched as described in this module's docstring. ``rotary``
    (a ``FrameRotary``) serves the reference only; the Triton path forgets what it kept, as it
    writes the window in place."""
    args = (q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor, inv_freq, tokens_seen)
    if uses_triton(q, k, v, win_k, cache_k, h, s, fmap_q, window_factor, feature_map=fmap_q):
        if rotary is not None:
            rotary.forget()
        return _triton_module("attend").attend(*args, normalizer)
    return reference.attend(*args, rotary, normalizer)


def evict(
    win_k, win_v, cache_k, cache_v, h, s, fmap_k, tokens_seen, policy="sre", generator=None, features=None
):
    """See ``reference.evict``; dispatched as described in this module's docstring (Triton runs the
    "sre" policy only). ``features`` (a ``KeyFeatures``) serves the reference only; the Triton path
    forgets what it kept, as it writes the cache in place."""
    args = (win_k, win_v, cache_k, cache_v, h, s, fmap_k, tokens_seen, policy, generator)
    if policy == "sre" and uses_triton(win_k, cache_k, h, s, fmap_k, feature_map=fmap_k):
        if features is not None:
            features.forget()
        return _triton_module("evict").evict(*args)
    return reference.evict(*args, features)


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """See ``reference.hedgehog``; dispatched as described in this module's docstring."""
    if uses_triton(x, weight, feature_map=weight):
        return _triton_module("hedgehog").hedgehog(x, weight)
    return reference.hedgehog(x, weight)
