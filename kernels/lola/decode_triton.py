"""LoLA attention for a single new token (a decode step) in Triton, split over the keys: one program per
(batch, query head, block of keys) writes a partial online-softmax result (the one holding the token's
slot also appends the new pair to the window), one more per (batch, query head) the linear term, and a
second kernel per (batch, query head) merges them into y.
Fused, a decode step would be one program per (batch, query head), nine for the default model at batch
1, leaving most of a GPU's SMs idle while each walks its key blocks one after another; the split runs
the blocks at once. Both kernels are programmatic dependent launches where the GPU has them
(``dispatch.launch_options``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lola_chat.kernels.dispatch import launch_options
from lola_chat.kernels.lola.frame_triton import (
    append,
    cache_tile,
    current_tile,
    finish,
    frame_counts,
    linear_cap_factor,
    linear_state,
    linear_term,
    load_rows,
    previous_tile,
    queries,
    rotate,
    softmax_block,
)
from lola_chat.kernels.lola.hedgehog_triton import load_feature_map


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
    blocks rather than after them).

    Only q and the new pair come from the kernel before this one (the projection); the memory it reads
    (cache, window, hidden state) was last written by an earlier step, the token count before the
    step's first dependent launch (by an ordinary launch, which a dependent one never overlaps), and the
    feature map is a weight. So all of those load before ``gdc_wait``, overlapping the projection's end,
    and only q and the new pair's round trip remain after it."""
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
        w = load_feature_map(fq_ptr, head, D, E)
        h_up, h_down, s_up, s_down = linear_state(batch, head, h_ptr, s_ptr, HQ, D, E)
        if PDL:
            tl.extra.cuda.gdc_wait()
        q, q_partner = load_rows(q_ptr + batch * sq_b + head * sq_h, t, 0, t_ok, D)
        linear, linear_norm = linear_term(q, w, h_up, h_down, s_up, s_down, True)
        tl.store(part_total_ptr + part + t, linear_norm)
        tl.store(part_acc_ptr + part * D + tl.arange(0, D)[None, :], linear)
    else:
        freq = tl.load(freq_ptr + tl.arange(0, D) % (D // 2)).to(tl.float32)
        # A new name: Triton's compiler refuses a branch that rebinds ``seen`` with another type.
        if SEEN_ON_DEVICE:
            count = tl.load(seen_ptr)
        else:
            count = seen.to(tl.int64)
        cached, previous, current = frame_counts(count, C, G)
        win_row = (batch * HKV + kv_head) * 2 * C
        window_block = block - CACHE_BLOCKS
        current_block = window_block - WINDOW_BLOCKS
        if block < CACHE_BLOCKS:
            k, v, ok = cache_tile(
                ck_ptr, cv_ptr, (batch * HQ + head) * G, block * BLOCK_N, cached, freq, G, D, BLOCK_N
            )
        elif window_block < WINDOW_BLOCKS:
            k, v, ok = previous_tile(
                wk_ptr, wv_ptr, win_row, window_block * BLOCK_N, cached, previous, freq, D, BLOCK_N
            )
        else:
            k, v, ok = current_tile(
                wk_ptr, wv_ptr, win_row, current_block * BLOCK_N, cached, previous, current, freq, C, D,
                BLOCK_N,
            )  # fmt: skip
        # The token's own position: its query's and its new key's.
        position = cached + previous + current + t
        if PDL:
            tl.extra.cuda.gdc_wait()
        if block >= CACHE_BLOCKS + WINDOW_BLOCKS:
            # The new pair as one row, rotated alone: a tile's worth of sines and cosines would now sit
            # on the path that waited for the projection.
            new_base = batch * sk_b + kv_head * sk_h
            k_new, k_new_partner = load_rows(k_ptr + new_base, t, 0, t_ok, D)
            v_new = tl.load(v_ptr + new_base + tl.arange(0, D)[None, :]).to(tl.float32)
            is_new = (current_block * BLOCK_N + tl.arange(0, BLOCK_N)) == current
            k = tl.where(is_new[:, None], rotate(k_new, k_new_partner, position, freq), k)
            v = tl.where(is_new[:, None], v_new, v)
            ok = ok | is_new
            # The program holding the token's slot, of the first query head of its key/value head,
            # appends the pair: nothing in this kernel reads that slot from the window.
            writes = t_ok & (t * 0 + current // BLOCK_N == current_block) & (t * 0 + head % (HQ // HKV) == 0)
            append(writes, t, current + t, k_ptr, v_ptr, new_base, 0, wk_ptr, wv_ptr, win_row, C, D)
        q, q_rot = queries(q_ptr, sq_b, sq_h, 0, batch, head, t, t_ok, position, freq, D)
        m = tl.full((1,), -1.0e30, tl.float32)
        # A block's best score is its m: ``top`` goes unused. Names, not ``_``: Triton's compiler, unlike its
        # interpreter, refuses a name that the two branches bind with different types.
        m, total, acc, top = softmax_block(
            m, tl.zeros((1,), tl.float32), tl.zeros((1, D), tl.float32), q_rot, k, v,
            ok[None, :] & t_ok[:, None], True,
        )  # fmt: skip
        tl.store(part_m_ptr + part + t, m)
        tl.store(part_total_ptr + part + t, total)
        tl.store(part_acc_ptr + part * D + tl.arange(0, D)[None, :], acc)


@triton.jit(do_not_specialize=["seen"])
def _decode_merge_kernel(
    gate_ptr, y_ptr, part_m_ptr, part_total_ptr, part_acc_ptr, seen, seen_ptr, linear_cap, sy_b, sy_h,
    HQ: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCKS: tl.constexpr,
    CACHE_BLOCKS: tl.constexpr, ALL_BLOCKS: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr,
    WINDOW_NORMALIZER: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token: merge the partials of every key block with the linear term (the partial after them)
    and store y. The token count and the gate load before ``gdc_wait``: only the partials come from the
    kernel before."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    batch, head = pid // HQ, pid % HQ
    if SEEN_ON_DEVICE:
        seen = tl.load(seen_ptr)
    linear_factor = linear_cap_factor(seen, linear_cap, C, G)
    gate = tl.load(gate_ptr + head).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    blocks = tl.arange(0, ALL_BLOCKS)
    ok = blocks < BLOCKS
    first = pid * (BLOCKS + 1)
    dims = tl.arange(0, D)
    part_m = tl.load(part_m_ptr + first + blocks, mask=ok, other=-1.0e30)
    part_total = tl.load(part_total_ptr + first + blocks, mask=ok, other=0.0)
    part_acc_at = part_acc_ptr + (first + blocks[:, None]) * D + dims[None, :]
    part_acc = tl.load(part_acc_at, mask=ok[:, None], other=0.0)
    t = tl.arange(0, 1)
    linear_norm = tl.load(part_total_ptr + first + BLOCKS + t)
    linear = tl.load(part_acc_ptr + (first + BLOCKS + t[:, None]) * D + dims[None, :])
    m = tl.max(part_m, axis=0)
    scale = tl.exp(part_m - m)
    total = tl.sum(part_total * scale, axis=0)
    acc = tl.sum(part_acc * scale[:, None], axis=0)
    window_top = tl.max(tl.where(blocks >= CACHE_BLOCKS, part_m, -1.0e30), axis=0)
    finish(
        m + t * 0.0, total + t * 0.0, acc[None, :], window_top + t * 0.0, linear, linear_norm, linear_factor,
        gate, t, t < 1, batch, head, y_ptr, sy_b, sy_h, 0, D, WINDOW_NORMALIZER,
    )  # fmt: skip


def decode(q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q, window_factor, inv_freq, seen,
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
        window_factor, y, part_m, part_total, part_acc, *seen, y.stride(0), y.stride(1),
        HQ=n_heads, C=chunk, G=capacity, D=dim, BLOCKS=blocks, CACHE_BLOCKS=cache_blocks,
        ALL_BLOCKS=triton.next_power_of_2(blocks), SEEN_ON_DEVICE=on_device,
        WINDOW_NORMALIZER=normalizer == "window", num_warps=4, **launch,
    )  # fmt: skip
