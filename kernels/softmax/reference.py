"""Decode attention over a static KV cache in plain PyTorch: the specification of the split-KV kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor | int) -> torch.Tensor:
    """One query per head against the first ``length`` positions of a static cache.

    q: (B, Hq, 1, D), already rotated; k, v: (B, Hkv, N, D) with Hq a multiple of Hkv; ``length``: an
    int or a one-element integer tensor, 1 <= length <= N. Returns (B, Hq, 1, D) in q's dtype.
    """
    batch, n_heads, _, dim = q.shape
    n_kv_heads, slots = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, n_kv_heads, n_heads // n_kv_heads, dim)
    visible = torch.arange(slots, device=q.device) < torch.as_tensor(length, device=q.device).reshape(-1)[0]
    keys = k.masked_fill(~visible[:, None], 0.0)
    values = v.masked_fill(~visible[:, None], 0.0)
    y = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible[None, :])
    return y.reshape(batch, n_heads, 1, dim)
