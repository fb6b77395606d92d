"""Scoring of LoLA's eviction candidates in Triton kernels (``evict_triton`` selects by the scores).

Candidates are the G cache slots followed by the C pairs of the leaving chunk, as in
``evict_reference.evict``. Every valid candidate is scored by self-recall error against the current H
and s ("sre"), or by the smaller of that and its cache-recall error ("novelty": the value distance to
the valid candidate with the nearest key, ``evict_reference.cache_recall_error``), the self-recall
error divided by the value's norm under the "relative-" policies.

Two kernels. The cache-recall error is a function of the candidates alone, so it runs once per cache
head (one per KV head for a cache kept per KV head, which all query heads of the group share), one
program per block of candidates, each searching every other candidate for the nearest key with the
key products on the tensor cores. The self-recall error needs each query head's H and s, so the
scoring kernel runs one program per (row, query head, block of candidates) and takes the minimum with
the recall read back.

Rows: the kernels see the state as (rows, heads, ...) with rows = layers x batch, so that one launch
scores every layer of a model whose memories are stacked (``CapturedDecoder``) as well as one layer.
A row's layer picks its feature map, its batch index the leaving chunk's token ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lola_chat.kernels.lola.evict_reference import SRE_EPS
from lola_chat.kernels.lola.frame_triton import frame_counts
from lola_chat.kernels.lola.hedgehog_triton import block_rows, features, load_feature_map, matmul

# Candidates per scoring program: each program loads its head's whole H (2E x D fp32), so more rows
# spread that load; with every layer in one launch there are programs enough to fill the SMs.
SCORE_ROWS = 32
# Candidates per nearest-key program: the search's key products are (RECALL_ROWS, D) x (D, 64) tiles.
RECALL_ROWS = 64


@triton.jit
def candidate_rows(cache_ptr, win_ptr, cache_row, win_row, index, cached, previous,
                   G: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """Rows ``index`` (in storage dtype, zeros where invalid) of the candidates' keys or values, and
    their validity."""
    dims = tl.arange(0, D)[None, :]
    in_cache = (index < G) & (index >= G - cached)
    leaving = (index >= G) & (index < G + previous)  # previous is 0 or C
    rows = tl.load(cache_ptr + (cache_row + index[:, None]) * D + dims, mask=in_cache[:, None], other=0.0)
    rows += tl.load(win_ptr + (win_row + index[:, None] - G) * D + dims, mask=leaving[:, None], other=0.0)
    return rows, in_cache | leaving


@triton.jit
def candidates(wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index, cached, previous,
               G: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """Keys and values (in storage dtype, zeros where invalid) and validity of candidates ``index``."""
    k, valid = candidate_rows(ck_ptr, wk_ptr, cache_row, win_row, index, cached, previous, G, D)
    v, _ = candidate_rows(cv_ptr, wv_ptr, cache_row, win_row, index, cached, previous, G, D)
    return k, v, valid


@triton.jit
def candidate_frame(row, cache_head, seen, seen_ptr, HKV: tl.constexpr, HC: tl.constexpr,
                    C: tl.constexpr, G: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr):  # fmt: skip
    """(cached, previous, cache_row, win_row) of the candidates of cache head ``cache_head`` of state row
    ``row``; the cache has HC heads (the query heads, or HKV for a cache kept per KV head)."""
    if SEEN_ON_DEVICE:
        seen = tl.load(seen_ptr)
    cached, previous, _ = frame_counts(seen - 1, C, G)
    return cached, previous, (row * HC + cache_head) * G, (row * HKV + cache_head * HKV // HC) * 2 * C


@triton.jit
def feature_head(row, head, batch, HQ: tl.constexpr):
    """Index of query head ``head``'s feature map for state row ``row`` (layer * batch + sequence) in a
    contiguous (layers * HQ, D, E) stack."""
    return (row // batch) * HQ + head


@triton.jit
def _cache_recall_error(wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index, k, v, cached, previous,
                        N: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_OTHER: tl.constexpr, HALF_KEYS: tl.constexpr):  # fmt: skip
    """|| v_i - v_j || for the candidates ``index`` (keys ``k`` in storage dtype, fp32 values ``v``), j
    the valid other candidate whose key is nearest to k_i, searched BLOCK_OTHER candidates at a time;
    ||v_i|| where there is none (``evict_reference.cache_recall_error``). ``HALF_KEYS``: the keys are
    stored in a 16-bit float type, whose values TF32 holds exactly, so one TF32 product gives the same
    fp32 sums as ``matmul``'s three. (Not a product in the 16-bit type: Triton's interpreter, which the
    CPU tests run, multiplies bfloat16 tiles wrongly.)"""
    k32 = k.to(tl.float32)
    nearest_distance = tl.full((BLOCK_N,), float("inf"), tl.float32)
    nearest = tl.zeros((BLOCK_N,), tl.int32)
    k_norm = tl.sum(k32 * k32, axis=1)
    for start in range(0, N, BLOCK_OTHER):
        other = start + tl.arange(0, BLOCK_OTHER)
        k_other, valid = candidate_rows(ck_ptr, wk_ptr, cache_row, win_row, other, cached, previous, G, D)
        k_other = k_other.to(tl.float32)
        if HALF_KEYS:
            cross = tl.dot(k32, tl.trans(k_other), input_precision="tf32")
        else:
            cross = matmul(k32, tl.trans(k_other), False)
        # Squared distances: only their order matters, so no square root.
        distance = k_norm[:, None] + tl.sum(k_other * k_other, axis=1)[None, :] - 2.0 * cross
        distance = tl.where(valid[None, :] & (other[None, :] != index[:, None]), distance, float("inf"))
        block_distance, block_nearest = tl.min(distance, axis=1, return_indices=True)
        # Strictly closer only: on equal distances the earlier candidate stays, as the reference picks.
        closer = block_distance < nearest_distance
        nearest = tl.where(closer, start + block_nearest, nearest)
        nearest_distance = tl.where(closer, block_distance, nearest_distance)
    # The neighbour's value is gathered and subtracted rather than its distance expanded like the keys':
    # twins then score exactly 0 (no |v_i|^2 + |v_j|^2 - 2 v_i.v_j cancellation residue), as in the
    # reference, and it costs one row load per candidate instead of a second product per column block.
    # With no valid neighbour ``nearest`` is 0, whose row loads as zeros if invalid; it is not used then.
    v_near, _ = candidate_rows(cv_ptr, wv_ptr, cache_row, win_row, nearest, cached, previous, G, D)
    error = v - tl.where((nearest_distance < float("inf"))[:, None], v_near.to(tl.float32), 0.0)
    return tl.sqrt(tl.sum(error * error, axis=1))


@triton.jit(do_not_specialize=["seen"])
def _recall_kernel(
    wk_ptr, wv_ptr, ck_ptr, cv_ptr, recall_ptr, seen, seen_ptr,
    HKV: tl.constexpr, HC: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_OTHER: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr, HALF_KEYS: tl.constexpr,
):  # fmt: skip
    """Cache-recall errors of the candidates ``program_id(1) * BLOCK_N + [0, BLOCK_N)`` of
    ``program_id(0)`` = row * HC + cache head."""
    N: tl.constexpr = G + C
    pid = tl.program_id(0)
    cached, previous, cache_row, win_row = candidate_frame(
        pid // HC, pid % HC, seen, seen_ptr, HKV, HC, C, G, SEEN_ON_DEVICE
    )
    index = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, _ = candidates(wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index, cached, previous, G, D)
    recall = _cache_recall_error(wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index, k,
                                 v.to(tl.float32), cached, previous, N, G, D, BLOCK_N,
                                 BLOCK_OTHER, HALF_KEYS)  # fmt: skip
    tl.store(recall_ptr + pid * N + index, recall, mask=index < N)


@triton.jit(do_not_specialize=["seen", "batch"])
def _score_kernel(
    wk_ptr, wv_ptr, ck_ptr, cv_ptr, h_ptr, s_ptr, fk_ptr, recall_ptr, score_ptr, seen, seen_ptr, batch, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, HC: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    E: tl.constexpr, BLOCK_N: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr, NOVELTY: tl.constexpr,
    RELATIVE: tl.constexpr,
):  # fmt: skip
    """Scores of the candidates ``program_id(1) * BLOCK_N + [0, BLOCK_N)`` of ``program_id(0)`` = row * HQ
    + query head, -inf for invalid ones; under ``NOVELTY`` the cache head's recall errors bound them."""
    N: tl.constexpr = G + C
    pid = tl.program_id(0)
    row, head = pid // HQ, pid % HQ
    cache_head = head // (HQ // HC)
    cached, previous, cache_row, win_row = candidate_frame(
        row, cache_head, seen, seen_ptr, HKV, HC, C, G, SEEN_ON_DEVICE
    )
    w = load_feature_map(fk_ptr, feature_head(row, head, batch, HQ), D, E)
    feats = tl.arange(0, E)
    state_row = pid * 2 * E
    h_up_at = h_ptr + (state_row + feats[:, None]) * D + tl.arange(0, D)[None, :]
    h_up = tl.load(h_up_at)
    h_down = tl.load(h_up_at + E * D)
    s_up = tl.load(s_ptr + state_row + feats)
    s_down = tl.load(s_ptr + state_row + E + feats)
    index = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, valid = candidates(
        wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index, cached, previous, G, D
    )
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    up, down = features(k, w, False)
    recalled = matmul(up, h_up, False) + matmul(down, h_down, False)
    norm = tl.sum(up * s_up[None, :], axis=1) + tl.sum(down * s_down[None, :], axis=1)
    error = v - recalled / tl.maximum(norm, eps)[:, None]
    score = tl.sqrt(tl.sum(error * error, axis=1))
    if RELATIVE:
        score = score / tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), eps)
    if NOVELTY:
        recall = tl.load(recall_ptr + (row * HC + cache_head) * N + index, mask=index < N, other=0.0)
        score = tl.minimum(score, recall)
    tl.store(score_ptr + pid * N + index, tl.where(valid, score, float("-inf")), mask=index < N)


def geometry(win_k, cache_k, h, fmap_k, tokens_seen) -> tuple[tuple, dict]:
    """The token count as the kernels take it (host int, device pointer) and their shape constants, for
    state tensors with the rows (layers x batch) flattened."""
    on_device = isinstance(tokens_seen, torch.Tensor)
    seen = (0 if on_device else tokens_seen, tokens_seen if on_device else h)
    shape = dict(HQ=h.shape[1], HKV=win_k.shape[1], HC=cache_k.shape[1], C=win_k.shape[2] // 2,
                 G=cache_k.shape[2], D=win_k.shape[3], E=fmap_k.shape[-1],
                 SEEN_ON_DEVICE=on_device)  # fmt: skip
    return seen, shape


def launch_scores(win_k, win_v, cache_k, cache_v, h, s, fmap, scores, seen, batch, policy, shape) -> None:
    """Fill ``scores`` (rows, Hq, G + C) for state tensors with flattened rows (``geometry``'s shape)."""
    rows, n_heads, n_candidates = scores.shape
    novelty = policy.endswith("novelty")
    recall = scores
    if novelty:
        cache_heads = cache_k.shape[1]
        recall = torch.empty(rows, cache_heads, n_candidates, dtype=torch.float32, device=h.device)
        _recall_kernel[(rows * cache_heads, triton.cdiv(n_candidates, RECALL_ROWS))](
            win_k, win_v, cache_k, cache_v, recall, *seen, BLOCK_N=RECALL_ROWS,
            BLOCK_OTHER=block_rows(n_candidates, 64), num_warps=4,
            HALF_KEYS=cache_k.dtype in (torch.bfloat16, torch.float16),
            **{k: shape[k] for k in ("HKV", "HC", "C", "G", "D", "SEEN_ON_DEVICE")},
        )  # fmt: skip
    _score_kernel[(rows * n_heads, triton.cdiv(n_candidates, SCORE_ROWS))](
        win_k, win_v, cache_k, cache_v, h, s, fmap, recall, scores, *seen, batch, SRE_EPS,
        BLOCK_N=SCORE_ROWS, NOVELTY=novelty, RELATIVE=policy.startswith("relative-"), num_warps=4, **shape,
    )  # fmt: skip
