"""LoLA attention for one segment of new tokens in Triton.

Segments of several tokens run fused in one kernel, one program per (batch, query head, tile of up to
16 queries). It rotates queries and keys at attention time in the compact frame of ``reference.attend``
(cache, previous chunk, current chunk), runs an online softmax over the three key ranges with fp32
accumulation, adds the Hedgehog linear term phi(q)^T H over phi(q)^T s with the shared normalizer
(optionally rescaled to the window's best score), and writes the new keys and values into the window.
Unused slots (empty cache slots, window slots past the newest token) are never loaded.

A single token (a decode step) runs split over the keys instead: one program per (batch, query head,
block of keys) writes a partial online-softmax result, one more per (batch, query head) the linear
term, and a second kernel per (batch, query head) merges them and appends the pair. Fused, a decode
step would be one program per (batch, query head), nine for the default model at batch 1, leaving most
of a GPU's SMs idle while each walks its key blocks one after another; the split runs the blocks at once.

The token count can be a host integer or a device tensor, so a CUDA graph captured once serves
every position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lola_chat.kernels.dispatch import launch_options
from lola_chat.kernels.lola.hedgehog_triton import block_rows, features, load_feature_map, matmul


@triton.jit
def frame_counts(seen, C: tl.constexpr, G: tl.constexpr):
    """(cached, previous, current) after ``seen`` tokens, as ``reference.frame``."""
    complete = seen // C
    cached = tl.minimum(tl.maximum(complete - 1, 0) * C, G)
    previous = tl.where(complete >= 1, C, 0)
    return cached, previous, seen - complete * C


@triton.jit
def rotate(x, partner, pos, freq):
    """Rotary embedding (rotate-half convention) of a (rows, D) tile: x cos + partner sin, where
    ``partner`` is x with its halves swapped and the first negated; pos: (rows,); freq: (D,) with
    the inverse frequencies repeated for both halves."""
    angle = pos.to(tl.float32)[:, None] * freq[None, :]
    return x * tl.cos(angle) + partner * tl.sin(angle)


@triton.jit
def _softmax_block(m, total, acc, q, k, k_partner, v, key_pos, visible, freq, ONE_ROW: tl.constexpr):
    """One online-softmax step over a block of keys; the scale is folded into q."""
    k = rotate(k, k_partner, key_pos, freq)
    scores = matmul(q, tl.trans(k), ONE_ROW)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    weights = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m - m_new)
    total = total * alpha + tl.sum(weights, axis=1)
    acc = acc * alpha[:, None] + matmul(weights, v, ONE_ROW)
    return m_new, total, acc, tl.max(scores, axis=1)


@triton.jit
def _load_rows(base, rows, row_stride, ok, D: tl.constexpr):
    """Rows of a (.., D) tensor as fp32, and their rotary partner (halves swapped, first negated);
    masked rows read as zeros."""
    dims = tl.arange(0, D)
    swapped = (dims + D // 2) % D
    sign = tl.where(dims < D // 2, -1.0, 1.0)
    at = base + rows[:, None] * row_stride
    x = tl.load(at + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    partner = tl.load(at + swapped[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return x, partner * sign[None, :]


@triton.jit
def _cache_keys(m, total, acc, q_rot, ck_ptr, cv_ptr, cache_row, start, cached, t_ok, freq,
                G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, ONE_ROW: tl.constexpr):  # fmt: skip
    """Online softmax over the cache slots start.. start + BLOCK_N (the filled ones are the last
    ``cached``, at frame positions 0..cached-1)."""
    dims = tl.arange(0, D)
    slot = start + tl.arange(0, BLOCK_N)
    ok = (slot < G) & (slot >= G - cached)
    k, k_partner = _load_rows(ck_ptr + cache_row * D, slot, D, ok, D)
    v = tl.load(cv_ptr + (cache_row + slot[:, None]) * D + dims[None, :], mask=ok[:, None], other=0.0)
    visible = ok[None, :] & t_ok[:, None]
    m, total, acc, _ = _softmax_block(
        m, total, acc, q_rot, k, k_partner, v.to(tl.float32), slot - (G - cached), visible, freq, ONE_ROW
    )
    return m, total, acc


@triton.jit
def _previous_keys(m, total, acc, window_top, q_rot, wk_ptr, wv_ptr, win_row, start, cached, previous, t_ok,
                   freq, D: tl.constexpr, BLOCK_N: tl.constexpr, ONE_ROW: tl.constexpr):  # fmt: skip
    """Online softmax over the previous chunk's slots start.. start + BLOCK_N (``previous`` is 0 or C),
    tracking the window's best score."""
    dims = tl.arange(0, D)
    slot = start + tl.arange(0, BLOCK_N)
    ok = slot < previous
    k, k_partner = _load_rows(wk_ptr + win_row * D, slot, D, ok, D)
    v = tl.load(wv_ptr + (win_row + slot[:, None]) * D + dims[None, :], mask=ok[:, None], other=0.0)
    visible = ok[None, :] & t_ok[:, None]
    m, total, acc, block_top = _softmax_block(
        m, total, acc, q_rot, k, k_partner, v.to(tl.float32), cached + slot, visible, freq, ONE_ROW
    )
    return m, total, acc, tl.maximum(window_top, block_top)


@triton.jit
def _current_keys(m, total, acc, window_top, q_rot, wk_ptr, wv_ptr, k_ptr, v_ptr, win_row, new_base,
                  sk_t, start, cached, previous, current, T, q_slot, t_ok, freq, C: tl.constexpr,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, ONE_ROW: tl.constexpr):  # fmt: skip
    """Online softmax over the current chunk's slots start.. start + BLOCK_N: the first ``current``
    from the window, the next T from the new k, v; causal."""
    dims = tl.arange(0, D)
    slot = start + tl.arange(0, BLOCK_N)
    in_window = slot < current
    is_new = (slot >= current) & (slot < current + T)
    new_row = slot - current
    k, k_partner = _load_rows(wk_ptr + (win_row + C) * D, slot, D, in_window, D)
    k_new, k_new_partner = _load_rows(k_ptr + new_base, new_row, sk_t, is_new, D)
    v_old = tl.load(
        wv_ptr + (win_row + C + slot[:, None]) * D + dims[None, :], mask=in_window[:, None], other=0.0
    )
    v_new = tl.load(
        v_ptr + new_base + new_row[:, None] * sk_t + dims[None, :], mask=is_new[:, None], other=0.0
    )
    v = v_old.to(tl.float32) + v_new.to(tl.float32)
    visible = (in_window | is_new)[None, :] & (slot[None, :] <= q_slot[:, None]) & t_ok[:, None]
    m, total, acc, block_top = _softmax_block(
        m, total, acc, q_rot, k + k_new, k_partner + k_new_partner, v, cached + previous + slot, visible,
        freq, ONE_ROW,
    )  # fmt: skip
    return m, total, acc, tl.maximum(window_top, block_top)


@triton.jit
def _linear_cap_factor(seen, linear_cap, C: tl.constexpr, G: tl.constexpr):
    """min(1, linear_cap / folded pairs) after ``seen`` tokens; 1 for a cap of 0 (as
    ``reference.linear_cap_factor``)."""
    cached, previous, current = frame_counts(seen, C, G)
    folded = (seen - cached - previous - current).to(tl.float32)
    return tl.where((linear_cap > 0) & (folded > linear_cap), linear_cap / tl.maximum(folded, 1.0), 1.0)


@triton.jit
def _linear_term(q, w, batch, head, h_ptr, s_ptr, HQ: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                 ONE_ROW: tl.constexpr):  # fmt: skip
    """phi(q)^T H (rows, D) and phi(q)^T s (rows,) of one head, ``w`` its (D, E) feature map."""
    up, down = features(q, w, ONE_ROW)
    dims = tl.arange(0, D)
    feats = tl.arange(0, E)
    state_row = (batch * HQ + head) * 2 * E
    h_up = tl.load(h_ptr + (state_row + feats[:, None]) * D + dims[None, :])
    h_down = tl.load(h_ptr + (state_row + E + feats[:, None]) * D + dims[None, :])
    s_up = tl.load(s_ptr + state_row + feats)
    s_down = tl.load(s_ptr + state_row + E + feats)
    linear = matmul(up, h_up, ONE_ROW) + matmul(down, h_down, ONE_ROW)
    linear_norm = tl.sum(up * s_up[None, :], axis=1) + tl.sum(down * s_down[None, :], axis=1)
    return linear, linear_norm


@triton.jit
def _finish(m, total, acc, window_top, linear, linear_norm, linear_factor, gate, t, t_ok, q_slot, batch,
            head, y_ptr, sy_b, sy_h, sy_t, k_ptr, v_ptr, new_base, sk_t, wk_ptr, wv_ptr, win_row,
            HQ: tl.constexpr, HKV: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
            WINDOW_NORMALIZER: tl.constexpr):  # fmt: skip
    """Add the linear term (``_linear_term``'s) to the softmax sums, store y, and append the new pairs
    to the window."""
    dims = tl.arange(0, D)
    linear_scale = tl.exp(window_top - m) if WINDOW_NORMALIZER else tl.full(m.shape, 1.0, tl.float32)
    linear_scale = linear_scale * linear_factor
    # Rows past the segment have no keys and an empty normalizer; they are not stored.
    norm = tl.where(t_ok, gate * total + linear_norm * linear_scale, 1.0)
    y = (gate * acc + linear * linear_scale[:, None]) / norm[:, None]
    tl.store(y_ptr + batch * sy_b + head * sy_h + t[:, None] * sy_t + dims[None, :], y, mask=t_ok[:, None])

    # One query head per key/value head appends the new pairs; every program reads them from k, v.
    writes = t_ok & (t * 0 + head % (HQ // HKV) == 0)  # a tensor compare: scalar masks are not portable
    k_new = tl.load(k_ptr + new_base + t[:, None] * sk_t + dims[None, :], mask=writes[:, None])
    v_new = tl.load(v_ptr + new_base + t[:, None] * sk_t + dims[None, :], mask=writes[:, None])
    win_new = (win_row + C + q_slot[:, None]) * D + dims[None, :]
    tl.store(wk_ptr + win_new, k_new, mask=writes[:, None])
    tl.store(wv_ptr + win_new, v_new, mask=writes[:, None])


@triton.jit
def _queries(q_ptr, sq_b, sq_h, sq_t, batch, head, t, t_ok, position, freq, D: tl.constexpr):
    """The queries (fp32) and their rotation at ``position`` with the 1/sqrt(D) scale folded in."""
    q, q_partner = _load_rows(q_ptr + batch * sq_b + head * sq_h, t, sq_t, t_ok, D)
    return q, rotate(q, q_partner, position, freq) / tl.sqrt(D * 1.0)


@triton.jit(do_not_specialize=["seen"])
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, wk_ptr, wv_ptr, ck_ptr, cv_ptr, h_ptr, s_ptr, fq_ptr, gate_ptr, freq_ptr, y_ptr,
    seen, seen_ptr, linear_cap, T,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sy_b, sy_h, sy_t,
    HQ: tl.constexpr, HKV: tl.constexpr, C: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    SEEN_ON_DEVICE: tl.constexpr, WINDOW_NORMALIZER: tl.constexpr,
):  # fmt: skip
    ONE_ROW: tl.constexpr = BLOCK_T == 1
    pid = tl.program_id(0)
    batch, head = pid // HQ, pid % HQ
    kv_head = head // (HQ // HKV)
    if SEEN_ON_DEVICE:
        seen = tl.load(seen_ptr)
    cached, previous, current = frame_counts(seen, C, G)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    q_slot = current + t
    freq = tl.load(freq_ptr + tl.arange(0, D) % (D // 2)).to(tl.float32)
    q, q_rot = _queries(q_ptr, sq_b, sq_h, sq_t, batch, head, t, t_ok, cached + previous + q_slot, freq, D)

    m = tl.full((BLOCK_T,), -1.0e30, tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T, D), tl.float32)
    # The window's best score: the linear term is measured against it (see reference.attend).
    window_top = tl.full((BLOCK_T,), -1.0e30, tl.float32)
    cache_row = (batch * HQ + head) * G
    win_row = (batch * HKV + kv_head) * 2 * C
    new_base = batch * sk_b + kv_head * sk_h
    for start in range(0, G, BLOCK_N):
        m, total, acc = _cache_keys(
            m, total, acc, q_rot, ck_ptr, cv_ptr, cache_row, start, cached, t_ok, freq, G, D, BLOCK_N, ONE_ROW
        )
    for start in range(0, C, BLOCK_N):
        m, total, acc, window_top = _previous_keys(
            m, total, acc, window_top, q_rot, wk_ptr, wv_ptr, win_row, start, cached, previous, t_ok, freq,
            D, BLOCK_N, ONE_ROW,
        )  # fmt: skip
    for start in range(0, C, BLOCK_N):
        m, total, acc, window_top = _current_keys(
            m, total, acc, window_top, q_rot, wk_ptr, wv_ptr, k_ptr, v_ptr, win_row, new_base, sk_t,
            start, cached, previous, current, T, q_slot, t_ok, freq, C, D, BLOCK_N, ONE_ROW,
        )  # fmt: skip
    linear, linear_norm = _linear_term(q, load_feature_map(fq_ptr, head, D, E), batch, head, h_ptr, s_ptr,
                                       HQ, D, E, ONE_ROW)  # fmt: skip
    _finish(
        m, total, acc, window_top, linear, linear_norm, _linear_cap_factor(seen, linear_cap, C, G),
        tl.load(gate_ptr + head).to(tl.float32), t, t_ok, q_slot, batch, head, y_ptr, sy_b, sy_h, sy_t,
        k_ptr, v_ptr, new_base, sk_t, wk_ptr, wv_ptr, win_row, HQ, HKV, C, D, WINDOW_NORMALIZER,
    )  # fmt: skip


@triton.jit(do_not_specialize=["seen"])
def _decode_blocks_kernel(
    q_ptr, k_ptr, v_ptr, wk_ptr, wv_ptr, ck_ptr, cv_ptr, h_ptr, s_ptr, fq_ptr, freq_ptr,
    part_m_ptr, part_total_ptr, part_acc_ptr, seen, seen_ptr, sq_b, sq_h, sk_b, sk_h,
    HQ: tl.constexpr, HKV: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    BLOCK_N: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token, one block of keys: the block's softmax max, sum and weighted values (a partial). The
    program after the last block computes the linear term instead: phi(q)^T H as its values and
    phi(q)^T s as its sum (it needs neither the softmax's maximum nor its sum, so it runs beside the
    blocks rather than after them)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    CACHE_BLOCKS: tl.constexpr = (G + BLOCK_N - 1) // BLOCK_N
    WINDOW_BLOCKS: tl.constexpr = (C + BLOCK_N - 1) // BLOCK_N
    LINEAR_BLOCK: tl.constexpr = CACHE_BLOCKS + 2 * WINDOW_BLOCKS
    pid, block = tl.program_id(0), tl.program_id(1)
    batch, head = pid // HQ, pid % HQ
    kv_head = head // (HQ // HKV)
    t = tl.arange(0, 1)
    t_ok = t < 1
    part = pid * (LINEAR_BLOCK + 1) + block
    if block == LINEAR_BLOCK:
        # The feature map is a weight: loaded before waiting on the kernel that writes q.
        w = load_feature_map(fq_ptr, head, D, E)
        if PDL:
            tl.extra.cuda.gdc_wait()
        q, _ = _load_rows(q_ptr + batch * sq_b + head * sq_h, t, 0, t_ok, D)
        linear, linear_norm = _linear_term(q, w, batch, head, h_ptr, s_ptr, HQ, D, E, True)
        tl.store(part_total_ptr + part + t, linear_norm)
        tl.store(part_acc_ptr + part * D + tl.arange(0, D)[None, :], linear)
    else:
        freq = tl.load(freq_ptr + tl.arange(0, D) % (D // 2)).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        # A new name: Triton's compiler refuses a branch that rebinds ``seen`` with another type.
        if SEEN_ON_DEVICE:
            count = tl.load(seen_ptr)
        else:
            count = seen.to(tl.int64)
        cached, previous, current = frame_counts(count, C, G)
        q, q_rot = _queries(
            q_ptr, sq_b, sq_h, 0, batch, head, t, t_ok, cached + previous + current + t, freq, D
        )
        m = tl.full((1,), -1.0e30, tl.float32)
        total = tl.zeros((1,), tl.float32)
        acc = tl.zeros((1, D), tl.float32)
        win_row = (batch * HKV + kv_head) * 2 * C
        # q and window_top go unused (a block's best score is its m). Named, not ``_``: Triton's compiler,
        # unlike its interpreter, refuses a name that a branch rebinds with another type.
        if block < CACHE_BLOCKS:
            cache_row = (batch * HQ + head) * G
            m, total, acc = _cache_keys(
                m, total, acc, q_rot, ck_ptr, cv_ptr, cache_row, block * BLOCK_N, cached, t_ok, freq,
                G, D, BLOCK_N, True,
            )  # fmt: skip
        elif block < CACHE_BLOCKS + WINDOW_BLOCKS:
            m, total, acc, window_top = _previous_keys(
                m, total, acc, m, q_rot, wk_ptr, wv_ptr, win_row, (block - CACHE_BLOCKS) * BLOCK_N, cached,
                previous, t_ok, freq, D, BLOCK_N, True,
            )  # fmt: skip
        else:
            m, total, acc, window_top = _current_keys(
                m, total, acc, m, q_rot, wk_ptr, wv_ptr, k_ptr, v_ptr, win_row,
                batch * sk_b + kv_head * sk_h, 0, (block - CACHE_BLOCKS - WINDOW_BLOCKS) * BLOCK_N, cached,
                previous, current, 1, current + t, t_ok, freq, C, D, BLOCK_N, True,
            )  # fmt: skip
        tl.store(part_m_ptr + part + t, m)
        tl.store(part_total_ptr + part + t, total)
        tl.store(part_acc_ptr + part * D + tl.arange(0, D)[None, :], acc)


@triton.jit(do_not_specialize=["seen"])
def _decode_merge_kernel(
    k_ptr, v_ptr, wk_ptr, wv_ptr, gate_ptr, y_ptr, part_m_ptr, part_total_ptr, part_acc_ptr,
    seen, seen_ptr, linear_cap, sk_b, sk_h, sy_b, sy_h,
    HQ: tl.constexpr, HKV: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCKS: tl.constexpr, CACHE_BLOCKS: tl.constexpr, ALL_BLOCKS: tl.constexpr,
    SEEN_ON_DEVICE: tl.constexpr, WINDOW_NORMALIZER: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token: merge the partials of every key block with the linear term (the partial after them),
    then as the fused kernel ends."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    batch, head = pid // HQ, pid % HQ
    kv_head = head // (HQ // HKV)
    if SEEN_ON_DEVICE:
        seen = tl.load(seen_ptr)
    current = seen % C
    blocks = tl.arange(0, ALL_BLOCKS)
    ok = blocks < BLOCKS
    first = pid * (BLOCKS + 1)
    dims = tl.arange(0, D)
    part_m = tl.load(part_m_ptr + first + blocks, mask=ok, other=-1.0e30)
    part_total = tl.load(part_total_ptr + first + blocks, mask=ok, other=0.0)
    part_acc_at = part_acc_ptr + (first + blocks[:, None]) * D + dims[None, :]
    part_acc = tl.load(part_acc_at, mask=ok[:, None], other=0.0)
    t = tl.arange(0, 1)
    t_ok = t < 1
    linear_norm = tl.load(part_total_ptr + first + BLOCKS + t)
    linear = tl.load(part_acc_ptr + (first + BLOCKS + t[:, None]) * D + dims[None, :])
    m = tl.max(part_m, axis=0)
    scale = tl.exp(part_m - m)
    total = tl.sum(part_total * scale, axis=0)
    acc = tl.sum(part_acc * scale[:, None], axis=0)
    window_top = tl.max(tl.where(blocks >= CACHE_BLOCKS, part_m, -1.0e30), axis=0)
    _finish(
        m + t * 0.0, total + t * 0.0, acc[None, :], window_top + t * 0.0, linear, linear_norm,
        _linear_cap_factor(seen, linear_cap, C, G), tl.load(gate_ptr + head).to(tl.float32), t, t_ok,
        current + t, batch, head, y_ptr, sy_b, sy_h, 0, k_ptr, v_ptr, batch * sk_b + kv_head * sk_h, 0,
        wk_ptr, wv_ptr, (batch * HKV + kv_head) * 2 * C, HQ, HKV, C, D, WINDOW_NORMALIZER,
    )  # fmt: skip


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
    tokens_seen: int | torch.Tensor,
    normalizer: str = "shared",
    linear_cap: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attend T new tokens inside the current chunk and append them to the window, in place.

    Same contract as ``reference.attend``: q (B, Hq, T, D); k, v (B, Hkv, T, D) un-rotated, with
    T <= C - tokens_seen % C; win_k, win_v (B, Hkv, 2C, D); cache_k, cache_v (B, Hq, G, D);
    h (B, Hq, F, D) and s (B, Hq, F) fp32 with F = 2E; fmap_q (Hq, D, E); window_factor (Hq,);
    inv_freq (D/2,). D and E are powers of two >= 16; the state tensors are contiguous.
    ``tokens_seen`` is an int or a one-element integer tensor on q's device (then nothing is
    checked on the host, and a CUDA graph can replay the call at any position). ``normalizer``:
    "shared" or "window", and ``linear_cap``, as in the reference.

    Unlike the reference, win_k and win_v are updated in place and returned as the same tensors.
    Returns (y (B, Hq, T, D) in q's dtype, laid out (B, T, Hq, D) in memory, win_k, win_v).
    """
    batch, n_heads, length, dim = q.shape
    n_kv_heads = k.shape[1]
    chunk = win_k.shape[2] // 2
    capacity = cache_k.shape[2]
    on_device = isinstance(tokens_seen, torch.Tensor)
    if not on_device:
        assert tokens_seen % chunk + length <= chunk, "a segment may not cross a chunk boundary"
    assert length <= chunk and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert k.stride() == v.stride(), "k and v must share a layout"
    for state in (win_k, win_v, cache_k, cache_v, h, s):
        assert state.is_contiguous(), "state tensors must be contiguous"
    y = torch.empty(batch, length, n_heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    seen = (0 if on_device else tokens_seen, tokens_seen if on_device else q, float(linear_cap))
    if length == 1:
        args = (q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor, inv_freq)
        _decode(*args, seen, on_device, y, normalizer)
        return y, win_k, win_v
    # Query tiles of 16 rows: larger tiles spill registers, and more programs spread over more SMs.
    block_t = 16
    grid = (batch * n_heads, triton.cdiv(length, block_t))
    # 8 warps: with 4, the fp32 tiles (keys, their rotation, H) exceed 255 registers per thread and
    # spill to local memory (ptxas -v for sm_90); with 8 they fit.
    _attend_kernel[grid](
        q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q.contiguous(), window_factor, inv_freq, y,
        *seen, length,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        HQ=n_heads, HKV=n_kv_heads, C=chunk, G=capacity, D=dim, E=fmap_q.shape[-1],
        BLOCK_T=block_t, BLOCK_N=block_rows(max(chunk, capacity), 32), SEEN_ON_DEVICE=on_device,
        WINDOW_NORMALIZER=normalizer == "window",
        num_warps=8,
    )  # fmt: skip
    return y, win_k, win_v


def _decode(q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor, inv_freq, seen,
            on_device, y, normalizer):  # fmt: skip
    """``attend`` for one token: the key blocks and the linear term in parallel, then one merge per
    (batch, query head). ``seen``: the kernels' (host count, device count pointer, linear cap)
    arguments, as ``attend`` makes them."""
    batch, n_heads, _, dim = q.shape
    n_kv_heads, chunk, capacity = k.shape[1], win_k.shape[2] // 2, cache_k.shape[2]
    # Blocks of 16 keys with 8 warps each: a one-row block's products are reduced across threads, so more
    # threads over fewer keys finish sooner, and more blocks spread over more SMs.
    block_n = 16
    cache_blocks = triton.cdiv(capacity, block_n)
    blocks = cache_blocks + 2 * triton.cdiv(chunk, block_n)
    # One partial per key block, then the linear term's.
    part_m = torch.empty(batch * n_heads, blocks + 1, dtype=torch.float32, device=q.device)
    part_total = torch.empty_like(part_m)
    part_acc = torch.empty(batch * n_heads, blocks + 1, dim, dtype=torch.float32, device=q.device)
    shape = dict(HQ=n_heads, HKV=n_kv_heads, C=chunk, G=capacity, D=dim, SEEN_ON_DEVICE=on_device)
    launch = launch_options(q)
    _decode_blocks_kernel[(batch * n_heads, blocks + 1)](
        q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q.contiguous(), inv_freq, part_m, part_total,
        part_acc, *seen[:2], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        E=fmap_q.shape[-1], BLOCK_N=block_n, num_warps=8, **shape, **launch,
    )  # fmt: skip
    _decode_merge_kernel[(batch * n_heads,)](
        k, v, win_k, win_v, window_factor, y, part_m, part_total, part_acc, *seen,
        k.stride(0), k.stride(1), y.stride(0), y.stride(1),
        BLOCKS=blocks, CACHE_BLOCKS=cache_blocks, ALL_BLOCKS=triton.next_power_of_2(blocks),
        WINDOW_NORMALIZER=normalizer == "window", num_warps=4, **shape, **launch,
    )  # fmt: skip
