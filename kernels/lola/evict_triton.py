"""LoLA eviction at a chunk end in one Triton kernel per (batch, query head), state updated in place.

Candidates are the G cache slots followed by the C pairs of the leaving chunk, as in
``reference.evict``. The kernel scores every valid candidate by self-recall error against the
current H and s, keeps the top G, compacts them into the cache in time order, and folds the rest into
H and s. Equal scores go to the earlier candidate (what a stable descending sort selects). Exact ties
are real: un-rotated layer-0 keys depend on the token alone, so a repeated token ties with itself, and
the order kept decides the positions at attention time. ``torch.topk`` in the reference leaves ties
unspecified, so the two agree only where no scores tie. Ranks come from pairwise comparisons, so no
sort and no host round trip is needed and the step can live inside a CUDA graph; the window shift is a
second kernel, after every query head has read the leaving chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lola_chat.kernels.lola.attend_triton import frame_counts
from lola_chat.kernels.lola.hedgehog_triton import block_rows, features, load_feature_map
from lola_chat.kernels.lola.reference import SRE_EPS


@triton.jit
def _candidates(wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index, cached, previous,
                C: tl.constexpr, G: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """Keys and values (in storage dtype, zeros where invalid) and validity of candidates ``index``."""
    dims = tl.arange(0, D)[None, :]
    in_cache = (index < G) & (index >= G - cached)
    leaving = (index >= G) & (index < G + previous)  # previous is 0 or C
    cache_at = (cache_row + index[:, None]) * D + dims
    win_at = (win_row + index[:, None] - G) * D + dims
    k = tl.load(ck_ptr + cache_at, mask=in_cache[:, None], other=0.0)
    k += tl.load(wk_ptr + win_at, mask=leaving[:, None], other=0.0)
    v = tl.load(cv_ptr + cache_at, mask=in_cache[:, None], other=0.0)
    v += tl.load(wv_ptr + win_at, mask=leaving[:, None], other=0.0)
    return k, v, in_cache | leaving


@triton.jit(do_not_specialize=["seen"])
def _evict_kernel(
    wk_ptr, wv_ptr, ck_ptr, cv_ptr, h_ptr, s_ptr, fk_ptr, score_ptr, keep_ptr, seen, seen_ptr, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    E: tl.constexpr, BLOCK_N: tl.constexpr, ALL: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    N: tl.constexpr = G + C
    pid = tl.program_id(0)
    batch = pid // HQ
    head = pid % HQ
    kv_head = head // (HQ // HKV)
    if SEEN_ON_DEVICE:
        seen = tl.load(seen_ptr)
    cached, previous, _ = frame_counts(seen - 1, C, G)
    cache_row = (batch * HQ + head) * G
    win_row = (batch * HKV + kv_head) * 2 * C
    w = load_feature_map(fk_ptr, head, D, E)
    dims = tl.arange(0, D)
    feats = tl.arange(0, E)
    state_row = (batch * HQ + head) * 2 * E
    h_up_at = h_ptr + (state_row + feats[:, None]) * D + dims[None, :]
    h_down_at = h_up_at + E * D
    n = tl.arange(0, BLOCK_N)
    scores = score_ptr + pid * N

    if G > 0:
        h_up = tl.load(h_up_at)
        h_down = tl.load(h_down_at)
        s_up = tl.load(s_ptr + state_row + feats)
        s_down = tl.load(s_ptr + state_row + E + feats)
        for start in range(0, N, BLOCK_N):
            index = start + n
            k, v, valid = _candidates(wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index,
                                      cached, previous, C, G, D)  # fmt: skip
            up, down = features(k.to(tl.float32), w, False)
            recalled = tl.dot(up, h_up, input_precision="ieee") + tl.dot(down, h_down, input_precision="ieee")
            norm = tl.sum(up * s_up[None, :], axis=1) + tl.sum(down * s_down[None, :], axis=1)
            error = v.to(tl.float32) - recalled / tl.maximum(norm, eps)[:, None]
            score = tl.sqrt(tl.sum(error * error, axis=1))
            tl.store(scores + index, tl.where(valid, score, float("-inf")), mask=index < N)
        tl.debug_barrier()
        every = tl.arange(0, ALL)
        every_score = tl.load(scores + every, mask=every < N, other=float("-inf"))

    fold_up = tl.zeros((E, D), tl.float32)
    fold_down = tl.zeros((E, D), tl.float32)
    norm_up = tl.zeros((E,), tl.float32)
    norm_down = tl.zeros((E,), tl.float32)
    kept_before = 0
    for start in range(0, N, BLOCK_N):
        index = start + n
        k, v, valid = _candidates(wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index,
                                  cached, previous, C, G, D)  # fmt: skip
        if G > 0:
            mine = tl.load(scores + index, mask=index < N, other=float("-inf"))
            ahead = (every_score[None, :] > mine[:, None]) | (
                (every_score[None, :] == mine[:, None]) & (every[None, :] < index[:, None])
            )
            kept = (tl.sum(ahead.to(tl.int32), axis=1) < G) & (index < N)
        else:
            kept = index < 0
        up, down = features(k.to(tl.float32), w, False)
        folded = (valid & ~kept)[:, None]
        up = tl.where(folded, up, 0.0)
        down = tl.where(folded, down, 0.0)
        vf = v.to(tl.float32)
        fold_up += tl.dot(tl.trans(up), vf, input_precision="ieee")
        fold_down += tl.dot(tl.trans(down), vf, input_precision="ieee")
        norm_up += tl.sum(up, axis=0)
        norm_down += tl.sum(down, axis=0)
        if G > 0:
            slot = kept_before + tl.cumsum(kept.to(tl.int32), axis=0) - 1
            # A kept candidate moves to a slot at or below its own index: every thread must have
            # loaded this block before any slot of it is overwritten.
            tl.debug_barrier()
            to = (cache_row + slot[:, None]) * D + dims[None, :]
            tl.store(ck_ptr + to, k, mask=(kept & valid)[:, None])
            tl.store(cv_ptr + to, v, mask=(kept & valid)[:, None])
            tl.store(keep_ptr + pid * G + slot, index.to(tl.int64), mask=kept)
            kept_before += tl.sum(kept.to(tl.int32), axis=0)

    tl.store(h_up_at, tl.load(h_up_at) + fold_up)
    tl.store(h_down_at, tl.load(h_down_at) + fold_down)
    tl.store(s_ptr + state_row + feats, tl.load(s_ptr + state_row + feats) + norm_up)
    tl.store(s_ptr + state_row + E + feats, tl.load(s_ptr + state_row + E + feats) + norm_down)


@triton.jit
def _shift_window_kernel(wk_ptr, wv_ptr, C: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The current chunk (window slots C..2C-1) becomes the previous one (slots 0..C-1)."""
    base = tl.program_id(0) * 2 * C * D
    dims = tl.arange(0, D)[None, :]
    for start in range(0, C, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)[:, None]
        ok = rows < C
        at = base + rows * D + dims
        tl.store(wk_ptr + at, tl.load(wk_ptr + at + C * D, mask=ok), mask=ok)
        tl.store(wv_ptr + at, tl.load(wv_ptr + at + C * D, mask=ok), mask=ok)


def evict(
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    h: torch.Tensor,
    s: torch.Tensor,
    fmap_k: torch.Tensor,
    tokens_seen: int | torch.Tensor,
    policy: str = "sre",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Close the full current chunk, in place: the previous chunk leaves the window.

    Same contract as ``reference.evict`` for ``policy="sre"`` (the only policy here; ``generator``
    is accepted for signature parity and unused): win_k, win_v (B, Hkv, 2C, D); cache_k, cache_v
    (B, Hq, G, D); h (B, Hq, 2E, D) and s (B, Hq, 2E) fp32; fmap_k (Hq, D, E); all state tensors
    contiguous, D and E powers of two >= 16. ``tokens_seen`` counts the full current chunk; it is
    an int or a one-element integer tensor on the state's device.

    Every state tensor is updated in place and returned as the same object:
    (win_k, win_v, cache_k, cache_v, h, s, keep). ``keep`` (B, Hq, G) int64 gives, for each new
    cache slot, its index among the candidates (old cache slots 0..G-1, then the leaving chunk).
    With an int ``tokens_seen`` it is None where the reference returns None (nothing left the
    window, or G = 0); with a tensor it is None only for G = 0 and otherwise always filled (the
    identity when nothing left the window). Slots that are empty after the eviction hold
    unspecified keys and values, as they are never read.
    """
    if policy != "sre":
        raise ValueError(f"the Triton eviction implements only the 'sre' policy, not {policy!r}")
    batch, n_kv_heads, window, dim = win_k.shape
    chunk = window // 2
    n_heads, capacity = cache_k.shape[1], cache_k.shape[2]
    for state in (win_k, win_v, cache_k, cache_v, h, s):
        assert state.is_contiguous(), "state tensors must be contiguous"
    on_device = isinstance(tokens_seen, torch.Tensor)
    keep = None
    if on_device or tokens_seen > chunk:
        assert on_device or tokens_seen % chunk == 0, "eviction runs only when a chunk is full"
        candidates = capacity + chunk
        scores = torch.empty(batch, n_heads, candidates, dtype=torch.float32, device=h.device)
        keep = torch.empty(batch, n_heads, capacity, dtype=torch.int64, device=h.device)
        # 8 warps: with 4 the fp32 tiles spill to local memory (ptxas -v for sm_90).
        _evict_kernel[(batch * n_heads,)](
            win_k, win_v, cache_k, cache_v, h, s, fmap_k.contiguous(), scores, keep,
            0 if on_device else tokens_seen, tokens_seen if on_device else h, SRE_EPS,
            HQ=n_heads, HKV=n_kv_heads, C=chunk, G=capacity, D=dim, E=fmap_k.shape[-1],
            BLOCK_N=block_rows(candidates, 32), ALL=triton.next_power_of_2(candidates),
            SEEN_ON_DEVICE=on_device, num_warps=8,
        )  # fmt: skip
        if capacity == 0:
            keep = None
    else:
        assert tokens_seen == chunk, "eviction runs only when a chunk is full"
    _shift_window_kernel[(batch * n_kv_heads,)](win_k, win_v, C=chunk, D=dim, BLOCK_N=block_rows(chunk))
    return win_k, win_v, cache_k, cache_v, h, s, keep
