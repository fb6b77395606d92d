"""LoLA attention: public functions. The PyTorch reference (``reference.py``, and ``evict_reference.py``
for eviction) is the specification and the CPU path; the Triton kernels (``*_triton.py``) run instead
when every tensor is on a CUDA device, Triton imports, no autograd graph is being recorded through a
tensor that needs it, and the shapes suit them. ``LOLA_CHAT_REFERENCE=1`` in the environment, or
``force_reference()``, forces the reference (the rule every op shares, in ``lola_chat.kernels.dispatch``).

The Triton paths update the state tensors in place and return them, so callers that rebind the
returned tensors (as ``lola_chat.memory`` does) work with either path.
"""

from __future__ import annotations

import torch
from lola_chat.kernels.dispatch import (
    REFERENCE_ENV,
    fast_path,
    force_reference,
    reference_forced,
    triton_module,
)
from lola_chat.kernels.lola import decode_cpu, evict_reference, reference
from lola_chat.kernels.lola.decode_cpu import DecodeFrame
from lola_chat.kernels.lola.evict_reference import CacheMemo, self_recall_error
from lola_chat.kernels.lola.reference import FrameRotary, frame, rotate

__all__ = [
    "REFERENCE_ENV",
    "DecodeFrame",
    "TRITON_POLICIES",
    "FrameRotary",
    "CacheMemo",
    "attend",
    "candidate_scores",
    "cpu_decode_applies",
    "evict",
    "force_reference",
    "frame",
    "hedgehog",
    "prepare_decode",
    "rotate",
    "self_recall_error",
    "uses_triton",
]


# The eviction policies the Triton kernel implements; the ablations always run the reference.
TRITON_POLICIES = evict_reference.RECALL_POLICIES


def _triton_module(name: str):
    """The Triton module ``{name}_triton`` of this package, or None where Triton cannot be imported."""
    return triton_module(f"lola_chat.kernels.lola.{name}_triton")


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def uses_triton(*tensors: torch.Tensor, feature_map: torch.Tensor | None = None) -> bool:
    """Whether a call on these tensors goes to the Triton kernels."""
    if not fast_path(*tensors):
        return False
    if feature_map is not None and not (
        _power_of_two(feature_map.shape[1]) and _power_of_two(feature_map.shape[2])
    ):
        return False
    return _triton_module("attend") is not None


def cpu_decode_applies(length: int, *tensors: torch.Tensor) -> bool:
    """Whether an attend call of ``length`` new tokens on these tensors goes to ``decode_cpu``: one token,
    every tensor on the CPU, the reference not forced, no autograd graph recorded through them, and no
    inference tensor outside inference mode (``decode_cpu`` writes the window in place)."""
    if length != 1 or reference_forced() or not all(t.device.type == "cpu" for t in tensors):
        return False
    if not torch.is_inference_mode_enabled() and any(t.is_inference() for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def prepare_decode(decode_frame, rotary, win_k, win_v, cache_k, cache_v, h, s, tokens_seen):
    """Make what ``decode_cpu`` keeps for the next token now, where a single token would go to it: after
    an eviction that a decode step made, so that the eviction step pays for it rather than the step after
    (building rotates and copies the whole frame; a step writes one pair)."""
    memory = (win_k, win_v, cache_k, cache_v, h, s)
    if cpu_decode_applies(1, *memory) and not decode_frame.matches(tokens_seen, *memory, rotary):
        decode_frame.build(*memory, tokens_seen, rotary)


def attend(
    q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor, inv_freq, tokens_seen, rotary=None,
    normalizer="shared", linear_cap=0, decode_frame=None,
):  # fmt: skip
    """See ``reference.attend``; dispatched as described in this module's docstring, and on a CPU a single
    token goes to ``decode_cpu`` when the caller keeps a ``decode_frame`` (a ``DecodeFrame``) and a
    ``rotary`` (a ``FrameRotary``, which every path reads its rotary tables from). The Triton path and
    ``decode_cpu`` write the window in place and return it; the Triton path forgets the rotated keys
    ``rotary`` kept."""
    args = (q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor, inv_freq, tokens_seen)
    if uses_triton(q, k, v, win_k, cache_k, h, s, fmap_q, window_factor, feature_map=fmap_q):
        if rotary is not None:
            rotary.forget()
        return _triton_module("attend").attend(*args, normalizer, linear_cap, rotary)
    state = (k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor)
    if rotary is not None and decode_frame is not None and cpu_decode_applies(q.shape[2], q, *state):
        return decode_cpu.decode(*args, rotary, decode_frame, normalizer, linear_cap)
    return reference.attend(*args, rotary, normalizer, linear_cap)


def evict(
    win_k, win_v, cache_k, cache_v, h, s, fmap_k, tokens_seen, policy="sre", generator=None, memo=None,
    pinned=None, score=None,
):  # fmt: skip
    """See ``evict_reference.evict``; dispatched as described in this module's docstring (Triton runs
    ``TRITON_POLICIES`` without ``pinned`` candidates only). ``memo`` (a ``CacheMemo``)
    serves the reference only; the Triton path forgets what it kept, as it writes the
    cache in place."""
    args = (win_k, win_v, cache_k, cache_v, h, s, fmap_k, tokens_seen, policy, generator)
    fast = pinned is None and policy in TRITON_POLICIES
    if fast and uses_triton(win_k, cache_k, h, s, fmap_k, feature_map=fmap_k):
        if memo is not None:
            memo.forget()
        return _triton_module("evict").evict(*args, scores=score)
    return evict_reference.evict(*args, memo, pinned, score)


def candidate_scores(
    win_k, win_v, cache_k, cache_v, h, s, fmap_k, tokens_seen, policy="sre", generator=None, memo=None
):  # fmt: skip
    """See ``evict_reference.candidate_scores``; dispatched as ``evict`` is."""
    if policy in TRITON_POLICIES and uses_triton(win_k, cache_k, h, s, fmap_k, feature_map=fmap_k):
        return _triton_module("evict").candidate_scores(
            win_k, win_v, cache_k, cache_v, h, s, fmap_k, tokens_seen, policy
        )
    return evict_reference.candidate_scores(
        win_k, win_v, cache_k, cache_v, h, s, fmap_k, tokens_seen, policy, generator, memo
    )


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """See ``reference.hedgehog``; dispatched as described in this module's docstring."""
    if uses_triton(x, weight, feature_map=weight):
        return _triton_module("hedgehog").hedgehog(x, weight)
    return reference.hedgehog(x, weight)
