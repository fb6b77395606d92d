"""LoLA attention for a single new token (a decode step) on a CPU: ``reference.attend`` for T = 1 in a
handful of PyTorch ops.

On a CPU a decode step is bound by the number of ops, not by arithmetic: the reference scores the cache
and the window apart, pads, concatenates and multiplies seven times for one query. Here one layer keeps,
between the tokens of a chunk, every key of its frame rotated and transposed (B, Hc, D, S) and every
value with a column of ones appended (B, Hc, S, D + 1), S = G + 2C, per cache head (Hc: the query heads,
or the KV heads for a joint policy's cache, whose query heads then read them once as the rows of one
product), the window repeated for each cache head of its group and unseen slots zeroed, and an additive
mask (S,) of the slots the query sees. A step writes the new pair into them and into the window (in
place, as the Triton path does), and computes
scores (with the mask), the softmax sums and the weighted values (with the sum in the extra column), and
the linear term and its normalizer (H with s as an extra column) in three products. The kept tensors are
rebuilt whenever they are not the ones the last step left (an eviction, a load, a reference call, other
rotary frequencies).
"""

from __future__ import annotations

import torch
from lola_chat.kernels.lola.reference import (
    FrameRotary,
    accumulator,
    apply_rotary,
    frame,
    hedgehog,
    layout,
    linear_cap_factor,
)


class DecodeFrame:
    """What one layer's decode steps keep between tokens (see the module docstring). ``ready_for`` is
    the token count, the memory tensors and the ``FrameRotary`` the kept ones were made from or last
    written into: every other writer of a CPU memory replaces its tensors rather than writing in place."""

    def __init__(self):
        self.ready_for: tuple | None = None

    def matches(self, tokens_seen: int, *tensors: torch.Tensor) -> bool:
        kept = self.ready_for
        if kept is None or kept[0] != tokens_seen:
            return False
        return all(a is b for a, b in zip(kept[1], tensors, strict=True))

    def mark(self, tokens_seen: int, *tensors: torch.Tensor) -> None:
        self.ready_for = (tokens_seen, tensors)

    def build(self, win_k, win_v, cache_k, cache_v, h, s, tokens_seen: int, rotary: FrameRotary) -> None:
        capacity = cache_k.shape[2]
        chunk = win_k.shape[2] // 2
        # One copy of the window per cache head: the cache heads are the query heads, or (a joint
        # policy's cache) the KV heads, whose query heads then share every kept key and value.
        copies = cache_k.shape[1] // win_k.shape[1]
        acc = accumulator(cache_k.dtype)
        where = layout(chunk, capacity, tokens_seen, 1, cache_k.device)
        # The token's own slot counts as seen: ``decode`` writes its key, value and mask before scoring.
        unseen = where.hidden[0][:, None]
        cache_rot = rotary.rotate(cache_k, where.key_start).to(acc)
        window_rot = rotary.rotate(win_k, where.key_start + capacity).to(acc)
        keys = torch.cat([cache_rot, window_rot.repeat_interleave(copies, dim=1)], dim=2)
        values = torch.cat([cache_v, win_v.repeat_interleave(copies, dim=1)], dim=2).to(acc)
        # Unseen slots hold zeros: their weight is zero, and stale or empty slots (NaN, inf) must not turn
        # a score or a zero weight into NaN.
        self.keys_t = keys.masked_fill(unseen, 0.0).transpose(-1, -2).contiguous()
        ones = torch.ones_like(values[..., :1])
        self.values = torch.cat([values.masked_fill(unseen, 0.0), ones], dim=-1)
        self.mask = torch.zeros(unseen.shape[0], dtype=acc, device=keys.device).masked_fill_(
            unseen[:, 0], float("-inf")
        )
        self.state = torch.cat([h, s[..., None]], dim=-1)
        self.mark(tokens_seen, win_k, win_v, cache_k, cache_v, h, s, rotary)


def decode(
    q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor, inv_freq, tokens_seen: int,
    rotary: FrameRotary, kept: DecodeFrame, normalizer: str = "shared", linear_cap: int = 0,
):  # fmt: skip
    """``reference.attend`` for one token (T = 1), on tensors that need no gradient.

    q: (B, Hq, 1, D); k, v: (B, Hkv, 1, D) un-rotated; the memory as the reference takes it; ``rotary``
    the layer's ``FrameRotary`` (its tables; what it keeps for the reference is dropped, as the window
    changes in place); ``kept`` the layer's ``DecodeFrame``. Writes the new pair into win_k and win_v in
    place. Returns (y (B, Hq, 1, D) in q's dtype, win_k, win_v)."""
    batch, n_heads, _, dim = q.shape
    n_kv_heads = k.shape[1]
    chunk = win_k.shape[2] // 2
    capacity = cache_k.shape[2]
    current = tokens_seen % chunk
    acc = accumulator(q.dtype)
    if normalizer not in ("shared", "window"):
        raise ValueError(f"unknown normalizer {normalizer!r}")
    memory = (win_k, win_v, cache_k, cache_v, h, s)
    if not kept.matches(tokens_seen, *memory, rotary):
        kept.build(*memory, tokens_seen, rotary)
    # The reference's kept keys would not notice the window changing in place (its tables stay).
    rotary.forget()
    cached, previous, _ = frame(tokens_seen, chunk, capacity)
    slot = capacity + chunk + current
    cos, sin = rotary.table(q.dtype, q.device)
    at = cached + previous + current - rotary.first
    # Query and new key sit at the same frame position: one rotation for both.
    rotated = apply_rotary(torch.cat([q, k], dim=1), cos[at], sin[at]).to(acc)
    q_rot, k_rot = rotated[:, :n_heads], rotated[:, n_heads:]
    cache_heads = kept.keys_t.shape[1]
    copies = cache_heads // n_kv_heads
    kept.keys_t.view(batch, n_kv_heads, copies, dim, -1)[..., slot] = k_rot
    kept.values.view(batch, n_kv_heads, copies, -1, dim + 1)[:, :, :, slot, :dim] = v
    kept.mask[slot] = 0.0
    win_k[:, :, chunk + current] = k[:, :, 0]
    win_v[:, :, chunk + current] = v[:, :, 0]

    # The query heads of one cache head (consecutive) as the rows of one product with its keys.
    rows, heads = batch * cache_heads, batch * n_heads
    q_rows = q_rot.reshape(rows, n_heads // cache_heads, dim)
    scores = torch.bmm(q_rows, kept.keys_t.view(rows, dim, -1)).mul_(dim**-0.5)
    scores += kept.mask
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    softmax_part = weights @ kept.values.view(rows, -1, dim + 1)
    phi_q = hedgehog(q, fmap_q).reshape(heads, 1, -1)
    linear_part = (phi_q @ kept.state.view(heads, -1, dim + 1)).view(batch, n_heads, 1, dim + 1)
    softmax_part = softmax_part.view(batch, n_heads, 1, dim + 1) * window_factor.to(acc)[:, None, None]
    cap = linear_cap_factor(tokens_seen, chunk, capacity, linear_cap)
    if normalizer == "window":
        # exp is monotonic: the window's largest weight is exp(best window score - best score).
        window_best = weights.view(batch, n_heads, 1, -1)[..., capacity:].amax(dim=-1, keepdim=True)
        total = torch.addcmul(softmax_part, linear_part, window_best, value=cap)
    else:
        total = torch.add(softmax_part, linear_part, alpha=cap)
    y = (total[..., :dim] / total[..., dim:]).to(q.dtype)
    kept.mark(tokens_seen + 1, *memory, rotary)
    return y, win_k, win_v
