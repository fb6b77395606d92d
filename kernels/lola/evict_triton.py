"""LoLA eviction at a chunk end in Triton kernels, state updated in place.

Candidates are the G cache slots followed by the C pairs of the leaving chunk, as in
``evict_reference.evict``, scored by ``evict_score_triton`` (or ranked by scores the caller gives); the
top G are kept, compacted into the cache in time order, and the rest folded into H and s. Equal scores
go to the earlier candidate (what a stable descending sort selects). Exact ties are real: un-rotated
layer-0 keys depend on the token alone, so a repeated token ties with itself (and, under "novelty",
scores 0 with its twin), and the order kept decides the positions at attention time.

Where the G best end (the G-th highest score, and how many candidates on it are kept) is found once per
head by a cut kernel (one in-register sort). Selection then runs one program per (row, query head,
block of candidates): it compares its candidates with the cut and copies the kept ones to their new
slots in a fresh buffer and the folded ones (at most C) to theirs in another; a commit kernel folds
those into H and s with one product per part of H and moves the new slots into the cache. No host round
trip is needed, so the step can live inside a CUDA graph. The commit kernel also shifts the window, as
it runs after every query head has read the leaving chunk; where nothing leaves the window (the first
chunk closes) the shift is a kernel alone.

Rows: as in ``evict_score_triton``, the kernels see layers x batch as one dimension, so the public
functions take one layer's state or every layer's stacked (a leading layer dimension).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lola_chat.kernels.lola import TRITON_POLICIES
from lola_chat.kernels.lola.evict_score_triton import (
    candidate_frame,
    candidates,
    feature_head,
    geometry,
    launch_scores,
)
from lola_chat.kernels.lola.hedgehog_triton import block_rows, load_feature_map, matmul

# Candidates per selection program, and the parts each head's state is committed in: enough programs
# that no SM walks a head's candidates or state alone. A part's feature rows lie in one half of phi
# (2E rows), so the split is even.
SELECT_ROWS = 32
COMMIT_SPLIT = 4


@triton.jit
def _cut(every_score, every, G: tl.constexpr):
    """Where the G best of the scores ``every_score`` (at candidate indices ``every``, -inf past the last)
    end: the G-th highest score, and how many candidates scoring exactly it are kept (the earliest).
    One sort instead of pairwise ranks: the ranks of a program's candidates, and the kept ones before
    them, then follow from comparisons with it."""
    threshold = tl.max(tl.where(every == G - 1, tl.sort(every_score, descending=True), float("-inf")), axis=0)
    return threshold, G - tl.sum((every_score > threshold).to(tl.int32), axis=0)


@triton.jit
def _kept(score, index, every_score, every, threshold, ties, N: tl.constexpr):
    """Whether candidates ``index`` (scores ``score``) are among the G best given ``_cut``'s threshold and
    ties: above the threshold, or on it with fewer than ``ties`` earlier candidates on it."""
    on_it = (every_score[None, :] == threshold) & (every[None, :] < index[:, None])
    earlier_ties = tl.sum(on_it.to(tl.int32), axis=1)
    return ((score > threshold) | ((score == threshold) & (earlier_ties < ties))) & (index < N)


@triton.jit
def _load_scores(at, mask):
    """Scores as ranked: NaN, which a descending torch sort puts first, as +inf (the reference keeps it
    first), so that exactly G are kept whatever the scores."""
    score = tl.load(at, mask=mask, other=float("-inf"))
    return tl.where(score != score, float("inf"), score)


@triton.jit
def _cut_kernel(score_ptr, cut_ptr, ties_ptr, N: tl.constexpr, G: tl.constexpr, ALL: tl.constexpr):
    """``_cut`` of head ``program_id(0)``'s scores, for every selection program of that head to read."""
    pid = tl.program_id(0)
    every = tl.arange(0, ALL)
    threshold, ties = _cut(_load_scores(score_ptr + pid * N + every, every < N), every, G)
    tl.store(cut_ptr + pid, threshold)
    tl.store(ties_ptr + pid, ties)


@triton.jit(do_not_specialize=["seen", "batch"])
def _select_kernel(
    wk_ptr, wv_ptr, ck_ptr, cv_ptr, score_ptr, cut_ptr, ties_ptr, keep_ptr, new_k_ptr, new_v_ptr,
    fold_k_ptr, fold_v_ptr, ids_ptr, leaving_ptr, new_ids_ptr, leaving_stride, seen, seen_ptr, batch,
    HQ: tl.constexpr, HKV: tl.constexpr, HC: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, ALL: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr, IDS: tl.constexpr,
):  # fmt: skip
    """Candidates ``program_id(1) * BLOCK_N + [0, BLOCK_N)`` of ``program_id(0)`` = row * HQ + query head,
    whose cut ``_cut_kernel`` found: the kept ones go to their new cache slots in ``new_k``/``new_v`` and
    ``keep`` (and with ``IDS`` their token ids, from the cache's ids or the leaving chunk's, to
    ``new_ids``), the folded ones to theirs in ``fold_k``/``fold_v``. Nothing is written in place: other
    programs still read the candidates."""
    N: tl.constexpr = G + C
    pid, block = tl.program_id(0), tl.program_id(1)
    row, head = pid // HQ, pid % HQ
    cached, previous, cache_row, win_row = candidate_frame(
        row, head // (HQ // HC), seen, seen_ptr, HKV, HC, C, G, SEEN_ON_DEVICE
    )
    index = block * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, valid = candidates(
        wk_ptr, wv_ptr, ck_ptr, cv_ptr, cache_row, win_row, index, cached, previous, G, D
    )
    if G > 0:
        scores = score_ptr + pid * N
        every = tl.arange(0, ALL)
        every_score = _load_scores(scores + every, every < N)
        threshold, ties = tl.load(cut_ptr + pid), tl.load(ties_ptr + pid)
        mine = _load_scores(scores + index, index < N)
        kept = _kept(mine, index, every_score, every, threshold, ties, N)
        # A kept candidate's slot counts the kept ones before it, in earlier blocks too: every candidate
        # on the threshold is kept up to the ``ties``-th, so those before this block follow from a
        # running count rather than from their ranks.
        on_it = every_score == threshold
        kept_every = (every_score > threshold) | (on_it & (tl.cumsum(on_it.to(tl.int32), axis=0) <= ties))
        kept_before = tl.sum((kept_every & (every < block * BLOCK_N)).to(tl.int32), axis=0)
        slot = kept_before + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        to = (pid * G + slot[:, None]) * D + tl.arange(0, D)[None, :]
        # Kept but invalid candidates (the slots a filling cache has not reached) load as zeros and are
        # stored too: every slot of the new cache is written, so empty ones hold zeros, not scratch.
        tl.store(new_k_ptr + to, k, mask=kept[:, None])
        tl.store(new_v_ptr + to, v, mask=kept[:, None])
        tl.store(keep_ptr + pid * G + slot, index.to(tl.int64), mask=kept)
        if IDS:
            # Every kept candidate's id, invalid ones' too (an empty slot's -1), as a gather by ``keep``.
            ids = tl.load(ids_ptr + cache_row + index, mask=kept & (index < G), other=0)
            leaving = leaving_ptr + (row % batch) * leaving_stride + index - G
            ids += tl.load(leaving, mask=kept & (index >= G), other=0)
            tl.store(new_ids_ptr + pid * G + slot, ids, mask=kept)
    else:
        kept = index < 0
        kept_every = tl.arange(0, ALL) < 0
    # The folded candidates (valid, not kept: at most C of them, as G are kept from G + C) go to their
    # slots in ``fold_k``/``fold_v``, in candidate order, for the commit kernel to fold.
    every = tl.arange(0, ALL)
    folded_every = (every >= G - cached) & (every < G + previous) & ~kept_every
    folded = valid & ~kept
    fold_slot = tl.sum((folded_every & (every < block * BLOCK_N)).to(tl.int32), axis=0)
    fold_slot += tl.cumsum(folded.to(tl.int32), axis=0) - 1
    to = (pid * C + fold_slot[:, None]) * D + tl.arange(0, D)[None, :]
    # Never past the head's C rows, whatever the scores (the bound holds when exactly G are kept).
    folded &= fold_slot < C
    tl.store(fold_k_ptr + to, k, mask=folded[:, None])
    tl.store(fold_v_ptr + to, v, mask=folded[:, None])


@triton.jit
def _shift_rows(wk_ptr, wv_ptr, window, rows, C: tl.constexpr, D: tl.constexpr):
    """Window ``window``'s current-chunk rows ``rows`` (slots C + rows) move to the previous chunk's."""
    at = (window * 2 * C + rows[:, None]) * D + tl.arange(0, D)[None, :]
    ok = (rows < C)[:, None]
    tl.store(wk_ptr + at, tl.load(wk_ptr + at + C * D, mask=ok), mask=ok)
    tl.store(wv_ptr + at, tl.load(wv_ptr + at + C * D, mask=ok), mask=ok)


@triton.jit
def _fold(fold_k_ptr, fold_v_ptr, fk_ptr, pid, fmap_head, rows, count, C: tl.constexpr,
          D: tl.constexpr, E: tl.constexpr, FOLD_ROWS: tl.constexpr, PART: tl.constexpr):  # fmt: skip
    """sum phi(k) v^T and sum phi(k) over the ``count`` folded pairs of ``pid``, for the feature rows
    ``rows`` (PART of them, all in the up half or all in the down half of phi = [up; down]): (PART, D),
    (PART,). The softmax's max and sum come from the whole feature row, the rows' own features from a
    product with only their columns of the feature map."""
    slot = tl.arange(0, FOLD_ROWS)
    ok = slot < count
    at = (pid * C + slot[:, None]) * D + tl.arange(0, D)[None, :]
    k = tl.load(fold_k_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    v = tl.load(fold_v_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    z = matmul(k, load_feature_map(fk_ptr, fmap_head, D, E), False)
    z_max, z_min = tl.max(z, axis=1), tl.min(z, axis=1)
    up_sum = tl.sum(tl.exp(z - z_max[:, None]), axis=1)
    down_sum = tl.sum(tl.exp(z_min[:, None] - z), axis=1)
    columns = rows % E
    w = tl.load(fk_ptr + fmap_head * D * E + tl.arange(0, D)[:, None] * E + columns[None, :])
    z = matmul(k, w.to(tl.float32), False)
    if tl.min(rows, axis=0) < E:
        phi = tl.exp(z - z_max[:, None]) / up_sum[:, None]
    else:
        phi = tl.exp(z_min[:, None] - z) / down_sum[:, None]
    phi = tl.where(ok[:, None], phi, 0.0)
    return matmul(tl.trans(phi), v, False), tl.sum(phi, axis=0)


@triton.jit(do_not_specialize=["seen", "batch"])
def _commit_kernel(
    ck_ptr, cv_ptr, h_ptr, s_ptr, wk_ptr, wv_ptr, fk_ptr, new_k_ptr, new_v_ptr, fold_k_ptr, fold_v_ptr,
    ids_ptr, new_ids_ptr, seen, seen_ptr, batch, HQ: tl.constexpr, HKV: tl.constexpr, HC: tl.constexpr,
    C: tl.constexpr, G: tl.constexpr, D: tl.constexpr, E: tl.constexpr, SPLIT: tl.constexpr,
    SLOTS: tl.constexpr, SHIFT_ROWS: tl.constexpr, FOLD_ROWS: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr,
    IDS: tl.constexpr,
):  # fmt: skip
    """Part ``program_id(1)`` of ``SPLIT`` of ``program_id(0)``'s state: H and s (2E rows) add the fold
    of the pairs ``_select_kernel`` left in ``fold_k``/``fold_v`` (one product over all of them, so
    H, which grows over the conversation, takes one rounding per eviction); the cache (and with ``IDS``
    its ids) takes the new slots (``SLOTS`` rows per part); and the first query head of each key/value
    head shifts that head's window (``SHIFT_ROWS`` rows per part)."""
    pid, part = tl.program_id(0), tl.program_id(1)
    row, head = pid // HQ, pid % HQ
    if head % (HQ // HKV) == 0:
        window = row * HKV + head // (HQ // HKV)
        _shift_rows(wk_ptr, wv_ptr, window, part * SHIFT_ROWS + tl.arange(0, SHIFT_ROWS), C, D)
    # G of the valid candidates are kept (all of them where there are fewer); the rest were folded.
    cached, previous, _, _ = candidate_frame(row, 0, seen, seen_ptr, HKV, HC, C, G, SEEN_ON_DEVICE)
    count = tl.maximum(cached + previous - G, 0)
    dims = tl.arange(0, D)
    rows = part * (2 * E // SPLIT) + tl.arange(0, 2 * E // SPLIT)
    fold, fold_norm = _fold(fold_k_ptr, fold_v_ptr, fk_ptr, pid, feature_head(row, head, batch, HQ), rows,
                            count, C, D, E, FOLD_ROWS, 2 * E // SPLIT)  # fmt: skip
    h_at = h_ptr + (pid * 2 * E + rows[:, None]) * D + dims[None, :]
    tl.store(h_at, tl.load(h_at) + fold)
    tl.store(s_ptr + pid * 2 * E + rows, tl.load(s_ptr + pid * 2 * E + rows) + fold_norm)
    # A cache kept per KV head takes the new slots of its group's first query head (all chose alike).
    if G > 0 and head % (HQ // HC) == 0:
        slot = part * SLOTS + tl.arange(0, SLOTS)
        ok = (slot < G)[:, None]
        cache_row = (row * HC + head // (HQ // HC)) * G
        at = (pid * G + slot[:, None]) * D + dims[None, :]
        to = (cache_row + slot[:, None]) * D + dims[None, :]
        tl.store(ck_ptr + to, tl.load(new_k_ptr + at, mask=ok), mask=ok)
        tl.store(cv_ptr + to, tl.load(new_v_ptr + at, mask=ok), mask=ok)
        if IDS:
            ok = slot < G
            tl.store(ids_ptr + cache_row + slot, tl.load(new_ids_ptr + pid * G + slot, mask=ok), mask=ok)


@triton.jit
def _shift_window_kernel(wk_ptr, wv_ptr, C: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The current chunk (window slots C..2C-1) becomes the previous one (slots 0..C-1)."""
    for start in range(0, C, BLOCK_N):
        _shift_rows(wk_ptr, wv_ptr, tl.program_id(0), start + tl.arange(0, BLOCK_N), C, D)


def _rows(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors with a leading layer dimension folded into the batch (views: in-place updates reach
    the caller's tensors)."""
    return [None if t is None else t.flatten(0, 1) for t in tensors]


def candidate_scores(
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    h: torch.Tensor,
    s: torch.Tensor,
    fmap_k: torch.Tensor,
    tokens_seen: int | torch.Tensor,
    policy: str = "sre",
) -> torch.Tensor | None:
    """``evict_reference.candidate_scores`` for ``policy`` in ``RECALL_POLICIES`` (shapes as ``evict``,
    with or without the leading layer dimension): (B, Hq, G + C) fp32, or (L, B, Hq, G + C) for stacked
    layers, -inf for absent candidates. With a tensor ``tokens_seen`` it is None only for G = 0 (where
    nothing leaves the window, every score is -inf)."""
    if policy not in TRITON_POLICIES:
        raise ValueError(f"the Triton eviction implements the policies {TRITON_POLICIES}, not {policy!r}")
    chunk, capacity = win_k.shape[-2] // 2, cache_k.shape[-2]
    if capacity == 0 or not (isinstance(tokens_seen, torch.Tensor) or tokens_seen > chunk):
        return None
    batch = win_k.shape[-4]
    scores = torch.empty(*h.shape[:-2], capacity + chunk, dtype=torch.float32, device=h.device)
    state = (win_k, win_v, cache_k, cache_v, h, s, scores)
    if fmap_k.dim() == 4:
        state = _rows(*state)
    win_k, win_v, cache_k, cache_v, h, s, flat = state
    seen, shape = geometry(win_k, cache_k, h, fmap_k, tokens_seen)
    launch_scores(win_k, win_v, cache_k, cache_v, h, s, fmap_k.contiguous(), flat, seen, batch, policy, shape)
    return scores


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
    cache_ids: torch.Tensor | None = None,
    leaving_ids: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Close the full current chunk, in place: the previous chunk leaves the window.

    Same contract as ``evict_reference.evict`` for ``policy`` in ``RECALL_POLICIES`` (the policies
    here; the ablations "random" and "recent" raise ValueError; ``generator`` is accepted for signature
    parity and unused). Under the novelty policies the nearest key is chosen by squared distances whose
    key products are fp32 sums in another order than the reference's (one TF32 product for 16-bit keys,
    which it holds exactly, three for fp32 keys), so of two candidates at
    nearly equal distance the kernel and the reference may pick different ones.
    win_k, win_v (B, Hkv, 2C, D); cache_k, cache_v (B, Hq, G, D), or (B, Hkv, G, D) for a cache kept per
    KV head (then ``scores`` must rank alike for every query head of a group: a joint policy's); h
    (B, Hq, 2E, D) and s (B, Hq, 2E) fp32; fmap_k (Hq, D, E); all state tensors contiguous, D and E
    powers of two >= 16. Every layer of a model at once: the same tensors with a leading layer
    dimension L (win_k (L, B, Hkv, 2C, D), ..., fmap_k (L, Hq, D, E), ``scores`` and ``cache_ids`` too;
    ``leaving_ids`` stays (B, C)), each layer evicted as alone. ``scores`` (B, Hq, G + C): the ranking
    to keep by, as ``candidate_scores`` gives it, instead of the policy's own
    (``evict_reference.evict``'s ``score``), or None.
    ``tokens_seen`` counts the full current chunk; it is an int or a one-element integer tensor on the
    state's device.

    Every state tensor is updated in place and returned as the same object:
    (win_k, win_v, cache_k, cache_v, h, s, keep). ``keep`` (B, Hq, G) int64 ((L, B, Hq, G) for stacked
    layers) gives, for each new cache slot, its index among the candidates (old cache slots 0..G-1, then
    the leaving chunk). With an int ``tokens_seen`` it is None where the reference returns None (nothing
    left the window, or G = 0); with a tensor it is None only for G = 0 and otherwise always filled (the
    identity when nothing left the window). Slots that are empty after an eviction hold zeros (they
    are never read; zeros keep snapshots deterministic).

    ``cache_ids`` (B, cache heads, G) int64 contiguous, with ``leaving_ids`` (B, C) int64 (unit stride in
    C): the token ids the cache and the leaving chunk hold, updated in place as the cache is, so that
    ``cache_ids`` becomes ``cat(cache_ids, leaving_ids per head).gather(2, keep)`` without further
    kernels (unchanged where ``keep`` is None).
    """
    if policy not in TRITON_POLICIES:
        raise ValueError(f"the Triton eviction implements the policies {TRITON_POLICIES}, not {policy!r}")
    given = (win_k, win_v, cache_k, cache_v, h, s)
    for state in given + ((cache_ids,) if cache_ids is not None else ()):
        assert state.is_contiguous(), "state tensors and ids must be contiguous (updated in place)"
    if scores is not None:
        assert scores.shape == (*h.shape[:-2], cache_k.shape[-2] + win_k.shape[-2] // 2), (
            "scores: (..., Hq, G + C)"
        )
    batch = win_k.shape[-4]
    if fmap_k.dim() == 4:
        win_k, win_v, cache_k, cache_v, h, s, cache_ids, scores = _rows(
            win_k, win_v, cache_k, cache_v, h, s, cache_ids, scores
        )
    rows, n_kv_heads, window, dim = win_k.shape
    chunk = window // 2
    n_heads, capacity = h.shape[1], cache_k.shape[2]
    on_device = isinstance(tokens_seen, torch.Tensor)
    keep = None
    if on_device or tokens_seen > chunk:
        assert on_device or tokens_seen % chunk == 0, "eviction runs only when a chunk is full"
        candidate_count = capacity + chunk
        keep = torch.empty(rows, n_heads, capacity, dtype=torch.int64, device=h.device)
        fmap = fmap_k.contiguous()
        seen, shape = geometry(win_k, cache_k, h, fmap_k, tokens_seen)
        if scores is None:
            scores = torch.empty(rows, n_heads, candidate_count, dtype=torch.float32, device=h.device)
            if capacity > 0:
                launch_scores(win_k, win_v, cache_k, cache_v, h, s, fmap, scores, seen, batch, policy, shape)
        else:
            scores = scores.to(torch.float32).contiguous()
        every = triton.next_power_of_2(candidate_count)
        cut = torch.empty(rows * n_heads, dtype=torch.float32, device=h.device)
        ties = torch.empty(rows * n_heads, dtype=torch.int32, device=h.device)
        if capacity > 0:
            _cut_kernel[(rows * n_heads,)](
                scores, cut, ties, N=candidate_count, G=capacity, ALL=every, num_warps=8
            )
        blocks = triton.cdiv(candidate_count, SELECT_ROWS)
        # The new slots per query head, whatever the cache's heads (``_commit_kernel``), and the folded
        # pairs.
        new_k = torch.empty(rows, n_heads, capacity, dim, dtype=cache_k.dtype, device=h.device)
        new_v = torch.empty_like(new_k)
        fold_k = torch.empty(rows, n_heads, chunk, dim, dtype=cache_k.dtype, device=h.device)
        fold_v = torch.empty_like(fold_k)
        with_ids = cache_ids is not None and capacity > 0
        if with_ids:
            assert leaving_ids.stride(1) == 1, "leaving ids: (B, C) with unit stride in C"
            new_ids = torch.empty(rows, n_heads, capacity, dtype=cache_ids.dtype, device=h.device)
        else:  # the kernels take pointers they do not read
            cache_ids = leaving_ids = new_ids = keep
        # 8 warps share each block's (BLOCK_N, ALL) rank comparisons.
        _select_kernel[(rows * n_heads, blocks)](
            win_k, win_v, cache_k, cache_v, scores, cut, ties, keep, new_k, new_v, fold_k, fold_v,
            cache_ids, leaving_ids, new_ids, leaving_ids.stride(0), *seen, batch, BLOCK_N=SELECT_ROWS,
            ALL=every, IDS=with_ids, num_warps=8, **{k: v for k, v in shape.items() if k != "E"},
        )  # fmt: skip
        _commit_kernel[(rows * n_heads, COMMIT_SPLIT)](
            cache_k, cache_v, h, s, win_k, win_v, fmap, new_k, new_v, fold_k, fold_v, cache_ids, new_ids,
            *seen, batch, SPLIT=COMMIT_SPLIT, IDS=with_ids, FOLD_ROWS=max(16, triton.next_power_of_2(chunk)),
            SLOTS=triton.next_power_of_2(triton.cdiv(max(capacity, 1), COMMIT_SPLIT)),
            SHIFT_ROWS=triton.next_power_of_2(triton.cdiv(chunk, COMMIT_SPLIT)), num_warps=4, **shape,
        )  # fmt: skip
        keep = None if capacity == 0 else keep.view(*given[4].shape[:-2], capacity)
    else:
        assert tokens_seen == chunk, "eviction runs only when a chunk is full"
        _shift_window_kernel[(rows * n_kv_heads,)](win_k, win_v, C=chunk, D=dim, BLOCK_N=block_rows(chunk))
    return (*given, keep)
