"""LoLA attention in plain PyTorch: the specification every fast path is tested against.

One layer's memory is a set of fixed-size tensors (see ``lola_chat.memory``):

    win_k, win_v     (B, Hkv, 2C, D)  sliding window: slots [0, C) the previous chunk, [C, 2C) the current
    cache_k, cache_v (B, Hq, G, D)    sparse cache; valid entries are right-aligned and in time order
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

import torch

SRE_EPS = 1e-6


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs; float64 stays float64 (so tests can check exactly)."""
    return torch.promote_types(dtype, torch.float32)


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map phi(x) = [softmax(x W), softmax(-x W)], computed in fp32 (or wider).

    x: (B, H, T, D); weight: (H, D, E). Returns (B, H, T, 2E) in ``accumulator(x.dtype)``.
    """
    acc = accumulator(x.dtype)
    z = torch.einsum("bhtd,hde->bhte", x.to(acc), weight.to(acc))
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half convention) at integer positions.

    x: (..., L, D); pos: (L,) or broadcastable to x's leading dims plus L; inv_freq: (D/2,).
    """
    angles = pos.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def frame(tokens_seen: int, chunk: int, capacity: int) -> tuple[int, int, int]:
    """(cache entries in use, previous-chunk tokens in the window, current-chunk tokens) after
    ``tokens_seen`` tokens. Everything about a memory's fill follows from its token count."""
    complete = tokens_seen // chunk
    cached = min(capacity, max(0, complete - 1) * chunk)
    previous = chunk if complete >= 1 else 0
    return cached, previous, tokens_seen % chunk


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attend T new tokens that all fall inside the current chunk, and append them to the window.

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D), un-rotated; T <= C - (tokens_seen % C).
    window_factor: (Hq,) in (0, 1). Returns (y (B, Hq, T, D) in q's dtype, new win_k, new win_v).

        y = (g sum_j exp(a_j - m) v_j + r phi(q)^T H) / (g sum_j exp(a_j - m) + r phi(q)^T s),
        r = exp(m_window - m)

    with a_j over the cache and the window, m their maximum and m_window the window's maximum.
    """
    batch, n_heads, length, dim = q.shape
    chunk = win_k.shape[2] // 2
    capacity = cache_k.shape[2]
    cached, previous, current = frame(tokens_seen, chunk, capacity)
    assert current + length <= chunk, "a segment may not cross a chunk boundary"
    win_k = torch.slice_scatter(win_k, k, dim=2, start=chunk + current, end=chunk + current + length)
    win_v = torch.slice_scatter(win_v, v, dim=2, start=chunk + current, end=chunk + current + length)

    device = q.device
    slot = torch.arange(capacity + 2 * chunk, device=device)
    in_cache = slot < capacity
    in_previous = (slot >= capacity) & (slot < capacity + chunk)
    window_slot = slot - capacity - chunk
    key_pos = torch.where(
        in_cache,
        slot - (capacity - cached),
        torch.where(in_previous, cached + slot - capacity, cached + previous + window_slot),
    )
    query_slot = current + torch.arange(length, device=device)
    query_pos = cached + previous + query_slot
    visible = torch.where(
        in_cache,
        slot >= capacity - cached,
        torch.where(in_previous, torch.tensor(previous > 0, device=device), window_slot >= 0),
    )
    visible = visible[None, :] & (~(window_slot[None, :] > query_slot[:, None]))

    # The window is shared by the query heads of a KV group, so it is scored per group, never copied.
    acc = accumulator(q.dtype)
    group = n_heads // win_k.shape[1]
    q_rot = rotate(q, query_pos, inv_freq).to(acc)
    cache_rot = rotate(cache_k, key_pos[:capacity], inv_freq).to(acc)
    win_rot = rotate(win_k, key_pos[capacity:], inv_freq).to(acc)
    q_grouped = q_rot.reshape(batch, -1, group * length, dim)
    win_scores = (q_grouped @ win_rot.transpose(-1, -2)).reshape(batch, n_heads, length, 2 * chunk)
    scores = torch.cat([q_rot @ cache_rot.transpose(-1, -2), win_scores], dim=-1) * dim**-0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - top)
    # The linear term learned (at G = 0) to stand for the folded pairs' weight relative to the best
    # window score. A cached key that scores above the whole window (a recalled fact) lowers the
    # folded pairs' true share by the same factor, so the linear term is rescaled to that maximum.
    linear_scale = torch.exp(scores[..., capacity:].amax(dim=-1, keepdim=True) - top)
    seen = visible.any(dim=0)[:, None]
    cache_values = cache_v.to(acc).masked_fill(~seen[:capacity], 0.0)
    win_values = win_v.to(acc).masked_fill(~seen[capacity:], 0.0)
    win_weights = weights[..., capacity:].reshape(batch, -1, group * length, 2 * chunk)
    softmax_part = weights[..., :capacity] @ cache_values + (win_weights @ win_values).reshape(q.shape)
    gate = window_factor.to(acc)[None, :, None, None]
    phi_q = hedgehog(q, fmap_q)
    numerator = gate * softmax_part + linear_scale * (phi_q @ h)
    denominator = gate * weights.sum(dim=-1, keepdim=True) + linear_scale * (phi_q @ s[..., None])
    return (numerator / denominator).to(q.dtype), win_k, win_v


def self_recall_error(phi_k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """|| v - H^T phi(k) / (s^T phi(k)) || per pair.

    phi_k: (B, Hq, N, F) fp32; v: (B, Hq, N, D); h: (B, Hq, F, D); s: (B, Hq, F). Returns (B, Hq, N).
    An empty hidden state (s = 0) recalls nothing, so the error is ||v||.
    """
    recalled = (phi_k @ h) / (phi_k @ s[..., None]).clamp_min(SRE_EPS)
    return torch.linalg.vector_norm(v.to(recalled.dtype) - recalled, dim=-1)


def evict(
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    h: torch.Tensor,
    s: torch.Tensor,
    fmap_k: torch.Tensor,
    tokens_seen: int,
    policy: str = "sre",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Close the current chunk (it must be full): the previous chunk leaves the window.

    Its pairs and the cached pairs are scored against the current H and s; the top G stay in the
    cache (kept in time order), the rest are folded into H and s; the current chunk becomes the
    previous one. ``tokens_seen`` counts the full current chunk. ``policy`` is "sre" (the method),
    or, for ablations, "random" or "recent". Returns new (win_k, win_v, cache_k, cache_v, h, s) and
    ``keep`` (B, Hq, G): for each new cache slot, its index among the candidates (old cache slots
    0..G-1, then the leaving chunk's tokens G..G+C-1), or None when nothing left the window or G = 0.
    """
    chunk = win_k.shape[2] // 2
    capacity = cache_k.shape[2]
    n_heads = cache_k.shape[1]
    assert tokens_seen % chunk == 0 and tokens_seen > 0, "eviction runs only when a chunk is full"
    cached, previous, _ = frame(tokens_seen - 1, chunk, capacity)
    keep = None
    if previous:
        leaving_k = _expand_kv(win_k[:, :, :chunk], n_heads)
        leaving_v = _expand_kv(win_v[:, :, :chunk], n_heads)
        cand_k = torch.cat([cache_k, leaving_k], dim=2)
        cand_v = torch.cat([cache_v, leaving_v], dim=2)
        valid = torch.arange(capacity + chunk, device=cand_k.device) >= capacity - cached
        phi_k = hedgehog(cand_k, fmap_k)
        if capacity > 0:
            if policy == "sre":
                score = self_recall_error(phi_k, cand_v, h, s)
            elif policy == "random":
                score = torch.rand(cand_v.shape[:3], generator=generator, device="cpu").to(cand_v.device)
            elif policy == "recent":
                score = torch.arange(capacity + chunk, device=cand_k.device, dtype=torch.float32)
                score = score.expand(cand_v.shape[:3])
            else:
                raise ValueError(f"unknown eviction policy {policy!r}")
            score = score.masked_fill(~valid, float("-inf"))
            # A stable sort keeps the earlier of two equal scores (repeated tokens give exact ties).
            order = score.sort(dim=-1, descending=True, stable=True).indices
            keep = order[..., :capacity].sort(dim=-1).values
            cache_k = cand_k.gather(2, keep[..., None].expand(-1, -1, -1, cand_k.shape[-1]))
            cache_v = cand_v.gather(2, keep[..., None].expand(-1, -1, -1, cand_v.shape[-1]))
            kept = torch.zeros_like(score, dtype=torch.bool).scatter(2, keep, True)
        else:
            kept = torch.zeros(cand_v.shape[:3], dtype=torch.bool, device=cand_v.device)
        folded = (valid & ~kept).to(phi_k.dtype)[..., None]
        h = h + (phi_k * folded).transpose(-1, -2) @ cand_v.to(h.dtype)
        s = s + (phi_k * folded).sum(dim=2)
    win_k = torch.cat([win_k[:, :, chunk:], win_k[:, :, chunk:]], dim=2)
    win_v = torch.cat([win_v[:, :, chunk:], win_v[:, :, chunk:]], dim=2)
    return win_k, win_v, cache_k, cache_v, h, s, keep
