"""The building blocks of the LoLA attention kernel (``attend_triton``) in Triton: the compact frame's
counts, rotary embedding at attention time, the key tiles of each range (cache, previous chunk, current
chunk) and one online-softmax step over a tile, the Hedgehog linear term, and the finish that adds it
and stores y, and the append of the new pairs to the window. Queries and keys are rotated at attention
time in the frame of ``reference.attend``; sums accumulate in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lola_chat.kernels.lola.hedgehog_triton import features, matmul


@triton.jit
def frame_counts(seen, C: tl.constexpr, G: tl.constexpr):
    """(cached, previous, current) after ``seen`` tokens, as ``reference.frame``."""
    complete = seen // C
    cached = tl.minimum(tl.maximum(complete - 1, 0) * C, G)
    previous = tl.where(complete >= 1, C, 0)
    return cached, previous, seen - complete * C


@triton.jit
def rotary_rows(cos_ptr, sin_ptr, pos, ok, D: tl.constexpr):
    """Rows ``pos`` (rows,) of the frame's rotary tables (``reference.FrameRotary.table`` in fp32 from
    frame position 0): cos and signed sin (rows, D), zeros where not ``ok``. Loaded rather than computed:
    a tile's sines and cosines cost more than the rest of a decode step's key block."""
    at = pos.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    cos = tl.load(cos_ptr + at, mask=ok[:, None], other=0.0)
    sin = tl.load(sin_ptr + at, mask=ok[:, None], other=0.0)
    return cos, sin


@triton.jit
def rotate(x, partner, cos, sin):
    """Rotary embedding (rotate-half convention) of a (rows, D) tile as ``reference.apply_rotary``:
    x cos + partner sin, ``partner`` x with its halves swapped, ``cos`` and ``sin`` (``rotary_rows``')
    with the sign of the first half folded into sin."""
    return x * cos + partner * sin


@triton.jit
def softmax_block(m, total, acc, q, k, v, visible, ONE_ROW: tl.constexpr):
    """One online-softmax step over a block of rotated keys; the scale is folded into q."""
    scores = matmul(q, tl.trans(k), ONE_ROW)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    weights = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m - m_new)
    total = total * alpha + tl.sum(weights, axis=1)
    acc = acc * alpha[:, None] + matmul(weights, v, ONE_ROW)
    return m_new, total, acc, tl.max(scores, axis=1)


@triton.jit
def load_rows(base, rows, row_stride, ok, D: tl.constexpr):
    """Rows of a (.., D) tensor as fp32, and their rotary partner (halves swapped); masked rows read as
    zeros."""
    dims = tl.arange(0, D)
    swapped = (dims + D // 2) % D
    at = base + rows[:, None] * row_stride
    x = tl.load(at + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    partner = tl.load(at + swapped[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return x, partner


@triton.jit
def cache_tile(ck_ptr, cv_ptr, cache_row, start, cached, cos_ptr, sin_ptr, G: tl.constexpr, D: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """The cache slots start.. start + BLOCK_N (the filled ones are the last ``cached``, at frame
    positions 0..cached-1): keys rotated to their frame positions and values (fp32, zeros where empty),
    and which slots are filled."""
    dims = tl.arange(0, D)
    slot = start + tl.arange(0, BLOCK_N)
    ok = (slot < G) & (slot >= G - cached)
    k, k_partner = load_rows(ck_ptr + cache_row * D, slot, D, ok, D)
    v = tl.load(cv_ptr + (cache_row + slot[:, None]) * D + dims[None, :], mask=ok[:, None], other=0.0)
    cos, sin = rotary_rows(cos_ptr, sin_ptr, slot - (G - cached), ok, D)
    return rotate(k, k_partner, cos, sin), v.to(tl.float32), ok


@triton.jit
def previous_tile(wk_ptr, wv_ptr, win_row, start, cached, previous, cos_ptr, sin_ptr, D: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    """As ``cache_tile``, for the previous chunk's slots start.. start + BLOCK_N (``previous`` is 0 or C)."""
    dims = tl.arange(0, D)
    slot = start + tl.arange(0, BLOCK_N)
    ok = slot < previous
    k, k_partner = load_rows(wk_ptr + win_row * D, slot, D, ok, D)
    v = tl.load(wv_ptr + (win_row + slot[:, None]) * D + dims[None, :], mask=ok[:, None], other=0.0)
    cos, sin = rotary_rows(cos_ptr, sin_ptr, cached + slot, ok, D)
    return rotate(k, k_partner, cos, sin), v.to(tl.float32), ok


@triton.jit
def current_tile(wk_ptr, wv_ptr, win_row, start, cached, previous, current, cos_ptr, sin_ptr, C: tl.constexpr,
                 D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """As ``cache_tile``, for the current chunk's slots start.. start + BLOCK_N that the window holds
    (the first ``current``); ``new_keys`` adds the segment's own."""
    dims = tl.arange(0, D)
    slot = start + tl.arange(0, BLOCK_N)
    ok = slot < current
    k, k_partner = load_rows(wk_ptr + (win_row + C) * D, slot, D, ok, D)
    v = tl.load(wv_ptr + (win_row + C + slot[:, None]) * D + dims[None, :], mask=ok[:, None], other=0.0)
    cos, sin = rotary_rows(cos_ptr, sin_ptr, cached + previous + slot, ok, D)
    return rotate(k, k_partner, cos, sin), v.to(tl.float32), ok


@triton.jit
def new_keys(k, v, ok, k_ptr, v_ptr, new_base, sk_t, start, chunk_start, current, T, cos_ptr, sin_ptr,
             D: tl.constexpr,
             BLOCK_N: tl.constexpr):  # fmt: skip
    """A ``current_tile`` with the segment's T new pairs (rows of k, v) added in the slots after the
    window's ``current``, their keys rotated to ``chunk_start`` (the chunk's first frame position)
    plus their slot."""
    dims = tl.arange(0, D)
    slot = start + tl.arange(0, BLOCK_N)
    is_new = (slot >= current) & (slot < current + T)
    new_row = slot - current
    k_new, k_new_partner = load_rows(k_ptr + new_base, new_row, sk_t, is_new, D)
    v_new = tl.load(
        v_ptr + new_base + new_row[:, None] * sk_t + dims[None, :], mask=is_new[:, None], other=0.0
    )
    cos, sin = rotary_rows(cos_ptr, sin_ptr, chunk_start + slot, is_new, D)
    k_new = rotate(k_new, k_new_partner, cos, sin)
    return k + k_new, v + v_new.to(tl.float32), ok | is_new


@triton.jit
def linear_cap_factor(seen, linear_cap, C: tl.constexpr, G: tl.constexpr):
    """min(1, linear_cap / folded pairs) after ``seen`` tokens; 1 for a cap of 0 (as
    ``reference.linear_cap_factor``)."""
    cached, previous, current = frame_counts(seen, C, G)
    folded = (seen - cached - previous - current).to(tl.float32)
    return tl.where((linear_cap > 0) & (folded > linear_cap), linear_cap / tl.maximum(folded, 1.0), 1.0)


@triton.jit
def linear_state(batch, head, h_ptr, s_ptr, HQ: tl.constexpr, D: tl.constexpr, E: tl.constexpr):
    """One head's hidden state, split by the feature map's halves: H (E, D) twice and s (E,) twice."""
    dims = tl.arange(0, D)
    feats = tl.arange(0, E)
    state_row = (batch * HQ + head) * 2 * E
    h_up = tl.load(h_ptr + (state_row + feats[:, None]) * D + dims[None, :])
    h_down = tl.load(h_ptr + (state_row + E + feats[:, None]) * D + dims[None, :])
    s_up = tl.load(s_ptr + state_row + feats)
    s_down = tl.load(s_ptr + state_row + E + feats)
    return h_up, h_down, s_up, s_down


@triton.jit
def linear_term(q, w, h_up, h_down, s_up, s_down, ONE_ROW: tl.constexpr):
    """phi(q)^T H (rows, D) and phi(q)^T s (rows,) of one head, ``w`` its (D, E) feature map and the
    rest its state (``linear_state``)."""
    up, down = features(q, w, ONE_ROW)
    linear = matmul(up, h_up, ONE_ROW) + matmul(down, h_down, ONE_ROW)
    linear_norm = tl.sum(up * s_up[None, :], axis=1) + tl.sum(down * s_down[None, :], axis=1)
    return linear, linear_norm


@triton.jit
def finish(m, total, acc, window_top, linear, linear_norm, linear_factor, gate, t, t_ok, batch, head, y_ptr,
            sy_b, sy_h, sy_t, D: tl.constexpr, WINDOW_NORMALIZER: tl.constexpr):  # fmt: skip
    """Add the linear term (``linear_term``'s) to the softmax sums and store y."""
    dims = tl.arange(0, D)
    linear_scale = tl.exp(window_top - m) if WINDOW_NORMALIZER else tl.full(m.shape, 1.0, tl.float32)
    linear_scale = linear_scale * linear_factor
    # Rows past the segment have no keys and an empty normalizer; they are not stored.
    norm = tl.where(t_ok, gate * total + linear_norm * linear_scale, 1.0)
    y = (gate * acc + linear * linear_scale[:, None]) / norm[:, None]
    tl.store(y_ptr + batch * sy_b + head * sy_h + t[:, None] * sy_t + dims[None, :], y, mask=t_ok[:, None])


@triton.jit
def append(writes, t, q_slot, k_ptr, v_ptr, new_base, sk_t, wk_ptr, wv_ptr, win_row, C: tl.constexpr,
           D: tl.constexpr):  # fmt: skip
    """Append the new pairs (rows t of k, v where ``writes``) to the window's current half at ``q_slot``.
    One program per key/value head writes; the others only read them from k, v."""
    dims = tl.arange(0, D)
    k_new = tl.load(k_ptr + new_base + t[:, None] * sk_t + dims[None, :], mask=writes[:, None])
    v_new = tl.load(v_ptr + new_base + t[:, None] * sk_t + dims[None, :], mask=writes[:, None])
    win_new = (win_row + C + q_slot[:, None]) * D + dims[None, :]
    tl.store(wk_ptr + win_new, k_new, mask=writes[:, None])
    tl.store(wv_ptr + win_new, v_new, mask=writes[:, None])


@triton.jit
def queries(q_ptr, sq_b, sq_h, sq_t, batch, head, t, t_ok, cos, sin, D: tl.constexpr):
    """The queries (fp32) and their rotation (``rotary_rows``' at their positions) with the 1/sqrt(D)
    scale folded in."""
    q, q_partner = load_rows(q_ptr + batch * sq_b + head * sq_h, t, sq_t, t_ok, D)
    return q, rotate(q, q_partner, cos, sin) / tl.sqrt(D * 1.0)
