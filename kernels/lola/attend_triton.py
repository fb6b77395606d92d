"""LoLA attention for a segment of new tokens (one, in a decode step, up to a chunk) in Triton, split over
the keys: one program per (batch, query head, tile of queries, block of keys) writes a partial
online-softmax result, one more per (batch, query head, tile) the linear term, and a second kernel,
one program per (batch, query head, query), merges them into y.

Queries and keys are rotated at attention time in the compact frame of ``reference.attend`` (cache,
previous chunk, current chunk, causal within the segment) by the fp32 cosines and sines of
``reference.FrameRotary``'s tables, sums accumulate in fp32, and the linear term
phi(q)^T H over phi(q)^T s joins with the shared normalizer (optionally rescaled to the window's best
score). The new keys and values are appended to the window. Unused slots (empty cache slots, window
slots past the newest token) are never loaded.

Fused, one program per (batch, query head, tile) walks every key block one after another: nine heads
at batch 1 leave most of a GPU's SMs idle, and a chunk's attention was the larger part of a prefill.
The split runs the blocks at once. Both kernels are programmatic dependent launches where the GPU has
them (``dispatch.launch_options``). The token count can be a host integer or a device tensor, so a CUDA
graph captured once serves every position.
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
    new_keys,
    previous_tile,
    queries,
    rotary_rows,
    rotate,
    softmax_block,
)
from lola_chat.kernels.lola.hedgehog_triton import load_feature_map
from lola_chat.kernels.lola.reference import FrameRotary

# Queries per tile, keys per block and warps per key-block program, the fastest in ad-hoc timings of
# the captured decode step (one query: blocks of 16 to 256 keys, 2 to 16 warps) and of the captured
# chunk step (a 64-token segment: tiles of 16 to 64 queries by 32 to 128 keys, 2 to 8 warps) at the
# default shapes (G = 768) on an H200. Rotary tables made larger blocks pay: while each program computed
# its sines and cosines, blocks of 16 keys with 8 warps had been fastest.
ONE_ROW_LAUNCH = dict(block_t=1, block_n=64, num_warps=4)
TILE_LAUNCH = dict(block_t=64, block_n=64, num_warps=4)


@triton.jit(do_not_specialize=["seen"])
def _key_blocks_kernel(
    q_ptr, k_ptr, v_ptr, wk_ptr, wv_ptr, ck_ptr, cv_ptr, h_ptr, s_ptr, fq_ptr, cos_ptr, sin_ptr,
    part_m_ptr, part_total_ptr, part_acc_ptr, seen, seen_ptr, T, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    HQ: tl.constexpr, HKV: tl.constexpr, HC: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, SEEN_ON_DEVICE: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """One tile of queries (``program_id(1)``), one block of keys (``program_id(2)``): the block's softmax
    max, sum and weighted values per query (a partial). The program after the last block computes the
    linear term instead: phi(q)^T H as its values and phi(q)^T s as its sum (it needs neither the
    softmax's maximum nor its sum, so it runs beside the blocks rather than after them).

    Only q and the new pairs come from the kernel before this one (the projection); the memory it reads
    (cache, window, hidden state) was last written by an earlier step or by the eviction before this
    segment (ordinary launches, which a dependent one never overlaps), the token count before the
    step's first dependent launch, and the feature map is a weight. So all of those load before
    ``gdc_wait``, overlapping the projection's end, and only q and the new pairs' round trip remain
    after it."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    ONE_ROW: tl.constexpr = BLOCK_T == 1
    CACHE_BLOCKS: tl.constexpr = (G + BLOCK_N - 1) // BLOCK_N
    WINDOW_BLOCKS: tl.constexpr = (C + BLOCK_N - 1) // BLOCK_N
    LINEAR_BLOCK: tl.constexpr = CACHE_BLOCKS + 2 * WINDOW_BLOCKS
    pid, tile, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, head = pid // HQ, pid % HQ
    kv_head = head // (HQ // HKV)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    # Partials are laid out (B * Hq, tiles, blocks + 1, BLOCK_T): a program writes BLOCK_T consecutive rows.
    rows = ((pid * tl.num_programs(1) + tile) * (LINEAR_BLOCK + 1) + block) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, D)
    if block == LINEAR_BLOCK:
        w = load_feature_map(fq_ptr, head, D, E)
        h_up, h_down, s_up, s_down = linear_state(batch, head, h_ptr, s_ptr, HQ, D, E)
        if PDL:
            tl.extra.cuda.gdc_wait()
        q, q_partner = load_rows(q_ptr + batch * sq_b + head * sq_h, t, sq_t, t_ok, D)
        linear, linear_norm = linear_term(q, w, h_up, h_down, s_up, s_down, ONE_ROW)
        tl.store(part_total_ptr + rows, linear_norm)
        tl.store(part_acc_ptr + rows[:, None] * D + dims[None, :], linear)
    else:
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
            cache_row = (batch * HC + head // (HQ // HC)) * G
            k, v, ok = cache_tile(
                ck_ptr, cv_ptr, cache_row, block * BLOCK_N, cached, cos_ptr, sin_ptr, G, D, BLOCK_N
            )
        elif window_block < WINDOW_BLOCKS:
            k, v, ok = previous_tile(
                wk_ptr, wv_ptr, win_row, window_block * BLOCK_N, cached, previous, cos_ptr, sin_ptr, D,
                BLOCK_N,
            )  # fmt: skip
        else:
            k, v, ok = current_tile(
                wk_ptr, wv_ptr, win_row, current_block * BLOCK_N, cached, previous, current, cos_ptr,
                sin_ptr, C, D, BLOCK_N,
            )  # fmt: skip
        # The queries' own slots in the current chunk, and their frame positions.
        q_slot = current + t
        position = cached + previous + q_slot
        visible = ok[None, :] & t_ok[:, None]
        cos_q, sin_q = rotary_rows(cos_ptr, sin_ptr, position, t_ok, D)
        if PDL:
            tl.extra.cuda.gdc_wait()
        if block >= CACHE_BLOCKS + WINDOW_BLOCKS:
            new_base = batch * sk_b + kv_head * sk_h
            slot = current_block * BLOCK_N + tl.arange(0, BLOCK_N)
            if ONE_ROW:
                # The new pair as one row, rotated alone at the query's own position.
                k_new, k_new_partner = load_rows(k_ptr + new_base, t, 0, t_ok, D)
                v_new = tl.load(v_ptr + new_base + dims[None, :]).to(tl.float32)
                is_new = slot == current
                k = tl.where(is_new[:, None], rotate(k_new, k_new_partner, cos_q, sin_q), k)
                v = tl.where(is_new[:, None], v_new, v)
                ok = ok | is_new
                visible = ok[None, :] & t_ok[:, None]
            else:
                k, v, ok = new_keys(
                    k, v, ok, k_ptr, v_ptr, new_base, sk_t, current_block * BLOCK_N, cached + previous,
                    current, T, cos_ptr, sin_ptr, D, BLOCK_N,
                )  # fmt: skip
                visible = ok[None, :] & (slot[None, :] <= q_slot[:, None]) & t_ok[:, None]
            # The block holding a query's slot, of the first query head of its key/value head, appends
            # that query's pair: nothing in this kernel reads the window's slots from ``current`` on.
            writes = t_ok & (q_slot // BLOCK_N == current_block) & (t * 0 + head % (HQ // HKV) == 0)
            append(writes, t, q_slot, k_ptr, v_ptr, new_base, sk_t, wk_ptr, wv_ptr, win_row, C, D)
        q, q_rot = queries(q_ptr, sq_b, sq_h, sq_t, batch, head, t, t_ok, cos_q, sin_q, D)
        m = tl.full((BLOCK_T,), -1.0e30, tl.float32)
        # A block's best score is its m: ``top`` goes unused. Names, not ``_``: Triton's compiler, unlike its
        # interpreter, refuses a name that the two branches bind with different types.
        m, total, acc, top = softmax_block(
            m, tl.zeros((BLOCK_T,), tl.float32), tl.zeros((BLOCK_T, D), tl.float32), q_rot, k, v, visible,
            ONE_ROW,
        )  # fmt: skip
        tl.store(part_m_ptr + rows, m)
        tl.store(part_total_ptr + rows, total)
        tl.store(part_acc_ptr + rows[:, None] * D + dims[None, :], acc)


@triton.jit(do_not_specialize=["seen"])
def _merge_kernel(
    gate_ptr, y_ptr, part_m_ptr, part_total_ptr, part_acc_ptr, seen, seen_ptr, linear_cap, sy_b, sy_h, sy_t,
    HQ: tl.constexpr, C: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCKS: tl.constexpr,
    CACHE_BLOCKS: tl.constexpr, ALL_BLOCKS: tl.constexpr, BLOCK_T: tl.constexpr,
    SEEN_ON_DEVICE: tl.constexpr, WINDOW_NORMALIZER: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One query (``program_id(1)``): merge the partials of every key block with the linear term (the
    partial after them) and store y. The token count and the gate load before ``gdc_wait``: only the
    partials come from the kernel before."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid, row = tl.program_id(0), tl.program_id(1)
    batch, head = pid // HQ, pid % HQ
    if SEEN_ON_DEVICE:
        seen = tl.load(seen_ptr)
    linear_factor = linear_cap_factor(seen, linear_cap, C, G)
    gate = tl.load(gate_ptr + head).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    blocks = tl.arange(0, ALL_BLOCKS)
    ok = blocks < BLOCKS
    # This query's partials: one per block, BLOCK_T apart (the key blocks kernel's layout).
    tiles = (tl.num_programs(1) + BLOCK_T - 1) // BLOCK_T
    first = (pid * tiles + row // BLOCK_T) * (BLOCKS + 1) * BLOCK_T + row % BLOCK_T
    dims = tl.arange(0, D)
    at = first + blocks * BLOCK_T
    part_m = tl.load(part_m_ptr + at, mask=ok, other=-1.0e30)
    part_total = tl.load(part_total_ptr + at, mask=ok, other=0.0)
    part_acc = tl.load(part_acc_ptr + at[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
    t = tl.arange(0, 1)
    linear_at = first + BLOCKS * BLOCK_T + t
    linear_norm = tl.load(part_total_ptr + linear_at)
    linear = tl.load(part_acc_ptr + linear_at[:, None] * D + dims[None, :])
    m = tl.max(part_m, axis=0)
    scale = tl.exp(part_m - m)
    total = tl.sum(part_total * scale, axis=0)
    acc = tl.sum(part_acc * scale[:, None], axis=0)
    window_top = tl.max(tl.where(blocks >= CACHE_BLOCKS, part_m, -1.0e30), axis=0)
    finish(
        m + t * 0.0, total + t * 0.0, acc[None, :], window_top + t * 0.0, linear, linear_norm, linear_factor,
        gate, row + t, t < 1, batch, head, y_ptr, sy_b, sy_h, sy_t, D, WINDOW_NORMALIZER,
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
    rotary: FrameRotary | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attend T new tokens inside the current chunk and append them to the window, in place.

    Same contract as ``reference.attend``: q (B, Hq, T, D); k, v (B, Hkv, T, D) un-rotated, with
    T <= C - tokens_seen % C; win_k, win_v (B, Hkv, 2C, D); cache_k, cache_v (B, Hq, G, D) or, kept
    per KV head (a joint eviction policy's), (B, Hkv, G, D);
    h (B, Hq, F, D) and s (B, Hq, F) fp32 with F = 2E; fmap_q (Hq, D, E); window_factor (Hq,);
    inv_freq (D/2,). D and E are powers of two >= 16; the state tensors are contiguous.
    ``tokens_seen`` is an int or a one-element integer tensor on q's device (then nothing is
    checked on the host, and a CUDA graph can replay the call at any position). ``normalizer``:
    "shared" or "window", and ``linear_cap``, as in the reference. ``rotary``: the ``FrameRotary`` of
    ``inv_freq``, chunk and capacity that the caller keeps (its fp32 tables, made once, are read by the
    kernel; a CUDA graph needs them made before capture), or None to make the tables for this call.

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
    assert 1 <= length <= chunk and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert k.stride() == v.stride(), "k and v must share a layout"
    for state in (win_k, win_v, cache_k, cache_v, h, s):
        assert state.is_contiguous(), "state tensors must be contiguous"
    y = torch.empty(batch, length, n_heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    seen = (0 if on_device else tokens_seen, tokens_seen if on_device else q)
    config = ONE_ROW_LAUNCH if length == 1 else TILE_LAUNCH
    block_t, block_n = config["block_t"], config["block_n"]
    tiles = triton.cdiv(length, block_t)
    cache_blocks = triton.cdiv(capacity, block_n)
    blocks = cache_blocks + 2 * triton.cdiv(chunk, block_n)
    # One partial per query, key block and tile, then the linear term's.
    partials = batch * n_heads * tiles * (blocks + 1) * block_t
    part_m = torch.empty(partials, dtype=torch.float32, device=q.device)
    part_total = torch.empty_like(part_m)
    part_acc = torch.empty(partials, dim, dtype=torch.float32, device=q.device)
    rotary = rotary if rotary is not None else FrameRotary(inv_freq, chunk, capacity)
    # The tables from frame position 0, the first any kernel reads.
    cos, sin = (table[-rotary.first :] for table in rotary.table(torch.float32, q.device))
    assert cos.shape[0] >= capacity + 2 * chunk, "rotary tables made for a smaller frame"
    shape = dict(HQ=n_heads, C=chunk, G=capacity, D=dim, SEEN_ON_DEVICE=on_device)
    launch = launch_options(q)
    _key_blocks_kernel[(batch * n_heads, tiles, blocks + 1)](
        q, k, v, win_k, win_v, cache_k, cache_v, h, s, fmap_q.contiguous(), cos, sin, part_m, part_total,
        part_acc, *seen, length, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HKV=n_kv_heads, HC=cache_k.shape[1], E=fmap_q.shape[-1], BLOCK_T=block_t, BLOCK_N=block_n,
        num_warps=config["num_warps"], **shape, **launch,
    )  # fmt: skip
    _merge_kernel[(batch * n_heads, length)](
        window_factor, y, part_m, part_total, part_acc, *seen, float(linear_cap), y.stride(0), y.stride(1),
        y.stride(2), BLOCKS=blocks, CACHE_BLOCKS=cache_blocks, ALL_BLOCKS=triton.next_power_of_2(blocks),
        BLOCK_T=block_t, WINDOW_NORMALIZER=normalizer == "window", num_warps=4, **shape, **launch,
    )  # fmt: skip
    return y, win_k, win_v
