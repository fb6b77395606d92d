"""LoLA attention in plain PyTorch: the specification every fast path is tested against.

One layer's memory is a set of fixed-size tensors (see ``lola_chat.memory``):

    win_k, win_v     (B, Hkv, 2C, D)  sliding window: slots [0, C) the previous chunk, [C, 2C) the current
    cache_k, cache_v (B, Hc, G, D)    sparse cache; valid entries are right-aligned and in time order;
                                      Hc = Hq, or Hkv under a joint eviction policy (every query head of
                                      a KV group keeps the same pairs, stored once)
    h                (B, Hq, F, D)    hidden state  sum phi(k) v^T   (fp32, or float64 for float64 inputs)
    s                (B, Hq, F)       normalizer    sum phi(k)

Keys are stored un-rotated. Rotary positions are applied at attention time in a compact frame
(cache entries first, then the previous chunk, then the current chunk), so positions stay below
G + 2C however long the conversation; while nothing has been folded into the hidden state the
frame positions are the true positions. The feature maps see un-rotated queries and keys, so the
hidden state does not depend on absolute positions either.

Every function here is out-of-place (returns new tensors) so the same code can be trained through.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs; float64 stays float64 (so tests can check exactly)."""
    return torch.promote_types(dtype, torch.float32)


def expand_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, H, ...) -> (B, n_heads, ...), each of the H heads serving n_heads / H consecutive heads."""
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def grouped_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y with y's heads each serving consecutive heads of x, as rows of one product per y head
    rather than copies of y. x: (B, H, T, K); y: (B, Hy, K, N) with H a multiple of Hy. Returns
    (B, H, T, N)."""
    batch, heads, rows, _ = x.shape
    grouped = x.reshape(batch, y.shape[1], heads // y.shape[1] * rows, x.shape[-1]) @ y
    return grouped.reshape(batch, heads, rows, y.shape[-1])


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map phi(x) = [softmax(x W), softmax(-x W)], computed in fp32 (or wider).

    x: (B, H, T, D); weight: (H, D, E). Returns (B, H, T, 2E) in ``accumulator(x.dtype)``.
    """
    acc = accumulator(x.dtype)
    z = x.to(acc) @ weight.to(acc)
    return torch.stack([z, -z], dim=-2).softmax(dim=-1).flatten(-2)


def linear_products(phi: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """phi H and phi s: (..., N, F) features against the hidden state h (..., F, D) and normalizer
    s (..., F) -> (..., N, D) and (..., N, 1). One product, s as one more column of H: a product with
    s alone is a matrix-vector product, several times slower per element on a CPU."""
    products = phi @ torch.cat([h, s[..., None]], dim=-1)
    return products[..., :-1], products[..., -1:]


def rotary_table(
    pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin of the rotary angles at ``pos`` (any shape), computed in float64 and
    rounded to ``dtype``: ``apply_rotary(x, *rotary_table(pos, inv_freq, x.dtype)) == rotate(x, pos,
    inv_freq)``. The sin's first half is negated so a rotation needs one roll instead of neg and cat."""
    angles = pos.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotate-half rotation, x * cos + [-x2, x1] * sin, as x * cos + [x2, x1] * [-sin, sin]
    (the same products: negation is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half convention) at integer positions.

    x: (..., L, D); pos: (L,) or broadcastable to x's leading dims plus L; inv_freq: (D/2,).
    """
    return apply_rotary(x, *rotary_table(pos, inv_freq, x.dtype))


class FrameRotary:
    """Rotary tables for every position a memory's compact frame can use, from -(G + C) (slots that
    are masked anyway) to G + 2C, made once per dtype and device; and the memory's keys as last
    rotated, so that a decode step rotates only its new key.

    A memory passes one to every attend call of one layer. Within a chunk the frame does not move:
    the rotated cache keys are reused while the same cache tensor comes back, and the rotated window
    is extended by the new keys while the window passed in is the one the last call returned. Any
    other tensor (after an eviction, a load, an in-place kernel) is rotated afresh. Nothing is kept
    while autograd records through the keys."""

    def __init__(self, inv_freq: torch.Tensor, chunk: int, capacity: int):
        self.inv_freq = inv_freq
        self.first = -(capacity + chunk)
        self.end = capacity + 2 * chunk
        self._tables: dict = {}
        self._kept: dict[str, tuple] = {}

    def table(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, device)
        if key not in self._tables:
            # Made as ordinary tensors even inside inference mode, so that autograd may use them later.
            with torch.inference_mode(False):
                pos = torch.arange(self.first, self.end, device=device)
                self._tables[key] = rotary_table(pos, self.inv_freq.to(device), dtype)
        return self._tables[key]

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (..., L, D) at the consecutive positions start, start + 1, ..., start + L - 1."""
        cos, sin = self.table(x.dtype, x.device)
        begin = start - self.first
        length = x.shape[-2]
        return apply_rotary(x, cos[begin : begin + length], sin[begin : begin + length])

    def forget(self) -> None:
        self._kept.clear()

    def prepared(
        self, name: str, x: torch.Tensor, acc: torch.dtype, start: int | None = None, appended=None
    ) -> torch.Tensor:
        """``x`` rotated from frame position ``start`` (not rotated when None) and cast to ``acc``.
        ``appended``: (the tensor ``x`` was made from, the new rows, their first slot) when ``x`` is
        that tensor with the new rows written in along dim 2."""

        def prepare(rows: torch.Tensor, first: int | None) -> torch.Tensor:
            # A copy even when nothing changes: the kept tensor is extended in place later, and must
            # never be the caller's (out-of-place contract).
            return rows.to(acc, copy=True) if first is None else self.rotate(rows, first).to(acc)

        kept = self._kept.get(name)
        if kept is not None and appended is not None and kept[0] is appended[0] and kept[1] == start:
            _, new, slot = appended
            rows = prepare(new, None if start is None else start + slot)
            if torch.is_grad_enabled():  # an earlier call's graph may have saved the kept tensor
                out = torch.slice_scatter(kept[2], rows, dim=2, start=slot, end=slot + new.shape[2])
            else:
                out = kept[2]
                out[:, :, slot : slot + new.shape[2]] = rows
        elif kept is not None and kept[0] is x and kept[1] == start:
            return kept[2]
        else:
            out = prepare(x, start)
        if torch.is_grad_enabled() and out.requires_grad:
            self._kept.pop(name, None)
        else:
            self._kept[name] = (x, start, out)
        return out


def frame(tokens_seen: int, chunk: int, capacity: int) -> tuple[int, int, int]:
    """(cache entries in use, previous-chunk tokens in the window, current-chunk tokens) after
    ``tokens_seen`` tokens. Everything about a memory's fill follows from its token count."""
    complete = tokens_seen // chunk
    cached = min(capacity, max(0, complete - 1) * chunk)
    previous = chunk if complete >= 1 else 0
    return cached, previous, tokens_seen % chunk


def folded(tokens_seen: int, chunk: int, capacity: int) -> int:
    """Pairs in the hidden state after ``tokens_seen`` tokens: everything outside cache and window."""
    return tokens_seen - sum(frame(tokens_seen, chunk, capacity))


def linear_cap_factor(tokens_seen: int, chunk: int, capacity: int, linear_cap: int) -> float:
    """min(1, linear_cap / folded pairs) after ``tokens_seen`` tokens; 1 when ``linear_cap`` is 0."""
    pairs = folded(tokens_seen, chunk, capacity)
    return linear_cap / pairs if 0 < linear_cap < pairs else 1.0


@dataclass(frozen=True)
class Layout:
    """Where the keys and queries of one attend call sit in the compact frame, and what each query
    sees. Depends only on integers, so it is made once per (fill, length) and reused."""

    key_start: int  # frame position of cache slot 0; the slots' positions are consecutive from it
    query_start: int
    hidden: torch.Tensor  # (T, G + 2C) bool: key slot j is not visible to query t
    # The slots some query sees, [first, end): a suffix of the cache and a range of the window.
    cache_seen: tuple[int, int]
    window_seen: tuple[int, int]


def layout(chunk: int, capacity: int, tokens_seen: int, length: int, device: torch.device) -> Layout:
    """The layout depends on the frame only, so a long conversation reuses a bounded set of them."""
    return _layout(chunk, capacity, *frame(tokens_seen, chunk, capacity), length, device)


@functools.lru_cache(maxsize=512)
def _layout(
    chunk: int, capacity: int, cached: int, previous: int, current: int, length: int, device: torch.device
) -> Layout:
    # Made as ordinary tensors even inside inference mode, so that autograd may use them later.
    with torch.inference_mode(False):
        return _make_layout(chunk, capacity, cached, previous, current, length, device)


def _make_layout(
    chunk: int, capacity: int, cached: int, previous: int, current: int, length: int, device: torch.device
) -> Layout:
    slot = torch.arange(capacity + 2 * chunk, device=device)
    in_cache = slot < capacity
    in_previous = (slot >= capacity) & (slot < capacity + chunk)
    window_slot = slot - capacity - chunk
    query_slot = current + torch.arange(length, device=device)
    visible = torch.where(
        in_cache,
        slot >= capacity - cached,
        torch.where(in_previous, torch.tensor(previous > 0, device=device), window_slot >= 0),
    )
    visible = visible[None, :] & (~(window_slot[None, :] > query_slot[:, None]))
    # Visible slots sit at consecutive frame positions (cache, previous chunk, current chunk); while
    # there is no previous chunk the cache is empty too, so both may shift down over masked slots.
    return Layout(
        key_start=cached - capacity - (chunk - previous),
        query_start=cached + previous + current,
        hidden=~visible,
        cache_seen=(capacity - cached, capacity),
        window_seen=(0 if previous else chunk, chunk + current + length),
    )


def _zero_outside(x: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """x with rows (dim 2) outside [first, end) set to zero: no weight reaches them, and stale or
    empty slots must not turn a zero weight into NaN."""
    rows = x.shape[2]
    if (first, end) == (0, rows):
        return x
    return F.pad(x[:, :, first:end], (0, 0, first, rows - end))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    h: torch.Tensor,
    s: torch.Tensor,
    fmap_q: torch.Tensor,
    window_factor: torch.Tensor,
    inv_freq: torch.Tensor,
    tokens_seen: int,
    rotary: FrameRotary | None = None,
    normalizer: str = "shared",
    linear_cap: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attend T new tokens that all fall inside the current chunk, and append them to the window.

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D), un-rotated; T <= C - (tokens_seen % C).
    window_factor: (Hq,) in (0, 1). ``rotary``: tables for ``inv_freq`` kept by the caller, or None.
    Returns (y (B, Hq, T, D) in q's dtype, new win_k, new win_v).

        y = (g sum_j exp(a_j - m) v_j + r phi(q)^T H) / (g sum_j exp(a_j - m) + r phi(q)^T s)

    with a_j over the cache and the window and m their maximum. ``normalizer`` "shared" is the
    paper's formula (r = 1); "window" measures the linear term against the window's best score,
    r = exp(m_window - m), so a cached key that outscores the whole window is not drowned by the
    folded pairs. Both are the LoLCATs hybrid at G = 0 (then m_window = m).

    ``linear_cap`` > 0 caps the hidden state's weight at what it has after that many folded pairs:
    r is multiplied by min(1, linear_cap / folded). phi(q)^T s grows with every folded pair while the
    softmax sums stay bounded by G + 2C, so far past the lengths the feature maps were trained at the
    linear term would drown the exact memories; the cap keeps the balance of those lengths and leaves
    what H recalls (H over s) unchanged. 0 leaves r alone.
    """
    length, dim = q.shape[2:]
    chunk = win_k.shape[2] // 2
    capacity = cache_k.shape[2]
    current = tokens_seen % chunk
    assert current + length <= chunk, "a segment may not cross a chunk boundary"
    keys_before, values_before = win_k, win_v
    win_k = torch.slice_scatter(win_k, k, dim=2, start=chunk + current, end=chunk + current + length)
    win_v = torch.slice_scatter(win_v, v, dim=2, start=chunk + current, end=chunk + current + length)
    where = layout(chunk, capacity, tokens_seen, length, q.device)
    rotary = rotary if rotary is not None else FrameRotary(inv_freq, chunk, capacity)

    # The window is shared by the query heads of a KV group, and a cache kept per KV head likewise, so
    # each is scored per head it is stored for, never copied.
    acc = accumulator(q.dtype)
    q_rot = rotary.rotate(q, where.query_start).to(acc)
    cache_rot = rotary.prepared("cache_k", cache_k, acc, where.key_start)
    win_start = where.key_start + capacity
    win_rot = rotary.prepared("win_k", win_k, acc, win_start, (keys_before, k, chunk + current))
    # The cache and the window are scored apart, their sums joined at the end: no (T, G + 2C) row of
    # scores is assembled (on a CPU that copy cost about as much as the window's products).
    cache_scores = grouped_matmul(q_rot, cache_rot.transpose(-1, -2)) * dim**-0.5
    cache_scores = cache_scores.masked_fill(where.hidden[:, :capacity], float("-inf"))
    win_scores = grouped_matmul(q_rot, win_rot.transpose(-1, -2)) * dim**-0.5
    win_scores = win_scores.masked_fill(where.hidden[:, capacity:], float("-inf"))
    # Every query sees its own key in the window, so the window's best score is finite.
    win_top = win_scores.amax(dim=-1, keepdim=True)
    top = win_top if capacity == 0 else torch.maximum(win_top, cache_scores.amax(dim=-1, keepdim=True))
    cache_weights, win_weights = torch.exp(cache_scores - top), torch.exp(win_scores - top)
    # The linear term learned (at G = 0) to stand for the folded pairs' weight relative to the best
    # window score; "window" rescales it when a cached key scores above the whole window.
    linear_scale = 1.0
    if normalizer == "window":
        linear_scale = torch.exp(win_top - top)
    elif normalizer != "shared":
        raise ValueError(f"unknown normalizer {normalizer!r}")
    linear_scale = linear_scale * linear_cap_factor(tokens_seen, chunk, capacity, linear_cap)
    cache_values = _zero_outside(rotary.prepared("cache_v", cache_v, acc), *where.cache_seen)
    win_values = rotary.prepared("win_v", win_v, acc, None, (values_before, v, chunk + current))
    win_values = _zero_outside(win_values, *where.window_seen)
    softmax_part = grouped_matmul(cache_weights, cache_values) + grouped_matmul(win_weights, win_values)
    total = cache_weights.sum(dim=-1, keepdim=True) + win_weights.sum(dim=-1, keepdim=True)
    gate = window_factor.to(acc)[None, :, None, None]
    recalled, norm = linear_products(hedgehog(q, fmap_q), h, s)
    numerator = gate * softmax_part + linear_scale * recalled
    denominator = gate * total + linear_scale * norm
    return (numerator / denominator).to(q.dtype), win_k, win_v
