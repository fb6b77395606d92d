"""Split-KV (Flash-Decoding style) decode attention over a static KV cache.

A single query per head reads the whole cache, so one program per head would leave most of the GPU
idle at batch 1. The cache is cut into splits; one program handles one (batch, KV head, split) and
all query heads of that KV head (grouped-query attention reads each key once), writing a partial
maximum, sum and weighted value sum; a small PyTorch combine merges the splits. The length is read
from a device tensor, so a CUDA graph captured once serves every position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT = 1024
BLOCK_N = 64


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, length_ptr, m_ptr, l_ptr, acc_ptr,
    sk_b, sk_h, sk_n, SPLITS,
    HKV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    SPLIT_LEN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    batch = pid // HKV
    kv_head = pid % HKV
    length = tl.load(length_ptr)
    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    dims = tl.arange(0, D)
    head = kv_head * GROUP + rows
    q_at = q_ptr + ((batch * HKV * GROUP + head) * D)[:, None] + dims[None, :]
    q = tl.load(q_at, mask=row_ok[:, None], other=0.0).to(tl.float32) / tl.sqrt(D * 1.0)
    m = tl.full((GROUP_PAD,), -1.0e30, tl.float32)
    total = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, D), tl.float32)
    base = batch * sk_b + kv_head * sk_h
    n = tl.arange(0, BLOCK)
    for start in range(0, SPLIT_LEN, BLOCK):
        slot = split * SPLIT_LEN + start + n
        ok = slot < length
        at = base + slot[:, None] * sk_n + dims[None, :]
        k = tl.load(k_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        weights = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(weights, axis=1)
        acc = acc * alpha[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = (pid * SPLITS + split) * GROUP_PAD + rows
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, total)
    tl.store(acc_ptr + out[:, None] * D + dims[None, :], acc)


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor | int) -> torch.Tensor:
    """Same contract as ``reference.decode``: q (B, Hq, 1, D) rotated; k, v (B, Hkv, N, D) with unit
    stride in D and equal layouts; ``length`` an int or one-element integer tensor on q's device
    (1 <= length <= N; slots from ``length`` on are never read). D a power of two >= 16.
    Returns (B, Hq, 1, D) in q's dtype."""
    batch, n_heads, _, dim = q.shape
    n_kv_heads, slots = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    assert k.stride() == v.stride() and k.stride(-1) == 1
    if not isinstance(length, torch.Tensor):
        length = torch.tensor([length], device=q.device)
    split_len = min(SPLIT, triton.next_power_of_2(slots))
    splits = triton.cdiv(slots, split_len)
    group_pad = max(triton.next_power_of_2(group), 1)
    shape = (batch * n_kv_heads, splits, group_pad)
    m = torch.empty(shape, dtype=torch.float32, device=q.device)
    total = torch.empty(shape, dtype=torch.float32, device=q.device)
    acc = torch.empty(*shape, dim, dtype=torch.float32, device=q.device)
    _split_kernel[(batch * n_kv_heads, splits)](
        q.contiguous(), k, v, length, m, total, acc,
        k.stride(0), k.stride(1), k.stride(2), splits,
        HKV=n_kv_heads, GROUP=group, GROUP_PAD=group_pad, D=dim,
        SPLIT_LEN=split_len, BLOCK=min(BLOCK_N, split_len),
    )  # fmt: skip
    # Splits past the length hold m = -1e30 and a zero sum, so they weigh nothing.
    top = m.amax(dim=1, keepdim=True)
    scale = torch.exp(m - top)
    y = (acc * scale[..., None]).sum(dim=1) / (total * scale).sum(dim=1)[..., None]
    y = y.reshape(batch, n_kv_heads, group_pad, dim)[:, :, :group]
    return y.reshape(batch, n_heads, 1, dim).to(q.dtype)
