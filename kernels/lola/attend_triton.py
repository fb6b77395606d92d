"""LoLA attention for one segment of new tokens in Triton.

Segments of several tokens run fused in one kernel, one program per (batch, query head, tile of up to
16 queries). It rotates queries and keys at attention time in the compact frame of ``reference.attend``
(cache, previous chunk, current chunk), runs an online softmax over the three key ranges with fp32
accumulation, adds the Hedgehog linear term phi(q)^T H over phi(q)^T s with the shared normalizer
(optionally rescaled to the window's best score), and writes the new keys and values into the window.
Unused slots (empty cache slots, window slots past the newest token) are never loaded. A single token
(a decode step) runs split over the keys instead (``decode_triton``); both are built from the blocks
of ``frame_triton``.

The token count can be a host integer or a device tensor, so a CUDA graph captured once serves
every position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lola_chat.kernels.lola.decode_triton import decode
from lola_chat.kernels.lola.frame_triton import (
    append,
    cache_keys,
    current_keys,
    finish,
    frame_counts,
    linear_cap_factor,
    linear_state,
    linear_term,
    previous_keys,
    queries,
)
from lola_chat.kernels.lola.hedgehog_triton import block_rows, load_feature_map


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
    q, q_rot = queries(q_ptr, sq_b, sq_h, sq_t, batch, head, t, t_ok, cached + previous + q_slot, freq, D)

    m = tl.full((BLOCK_T,), -1.0e30, tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T, D), tl.float32)
    # The window's best score: the linear term is measured against it (see reference.attend).
    window_top = tl.full((BLOCK_T,), -1.0e30, tl.float32)
    cache_row = (batch * HQ + head) * G
    win_row = (batch * HKV + kv_head) * 2 * C
    new_base = batch * sk_b + kv_head * sk_h
    for start in range(0, G, BLOCK_N):
        m, total, acc = cache_keys(
            m, total, acc, q_rot, ck_ptr, cv_ptr, cache_row, start, cached, t_ok, freq, G, D, BLOCK_N, ONE_ROW
        )
    for start in range(0, C, BLOCK_N):
        m, total, acc, window_top = previous_keys(
            m, total, acc, window_top, q_rot, wk_ptr, wv_ptr, win_row, start, cached, previous, t_ok, freq,
            D, BLOCK_N, ONE_ROW,
        )  # fmt: skip
    for start in range(0, C, BLOCK_N):
        m, total, acc, window_top = current_keys(
            m, total, acc, window_top, q_rot, wk_ptr, wv_ptr, k_ptr, v_ptr, win_row, new_base, sk_t,
            start, cached, previous, current, T, q_slot, t_ok, freq, C, D, BLOCK_N, ONE_ROW,
        )  # fmt: skip
    h_up, h_down, s_up, s_down = linear_state(batch, head, h_ptr, s_ptr, HQ, D, E)
    linear, linear_norm = linear_term(
        q, load_feature_map(fq_ptr, head, D, E), h_up, h_down, s_up, s_down, ONE_ROW
    )
    finish(
        m, total, acc, window_top, linear, linear_norm, linear_cap_factor(seen, linear_cap, C, G),
        tl.load(gate_ptr + head).to(tl.float32), t, t_ok, batch, head, y_ptr, sy_b, sy_h, sy_t, D,
        WINDOW_NORMALIZER,
    )  # fmt: skip
    # The first query head of each key/value head appends (a tensor compare: scalar masks are not portable).
    writes = t_ok & (t * 0 + head % (HQ // HKV) == 0)
    append(writes, t, q_slot, k_ptr, v_ptr, new_base, sk_t, wk_ptr, wv_ptr, win_row, C, D)


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
        decode(*args, seen, on_device, y, normalizer)
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
