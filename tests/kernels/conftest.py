"""Kernel tests: each Triton kernel against the PyTorch reference on random states.

Without a GPU the kernels run in Triton's interpreter, which reads TRITON_INTERPRET when a kernel is
decorated, so it is set here, before any test module imports the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lola_chat.kernels.lola import frame  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def occupied(tokens_seen: int, chunk: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which cache slots (G,) and window slots (2C,) hold a pair after ``tokens_seen`` tokens."""
    cached, previous, current = frame(tokens_seen, chunk, capacity)
    cache = torch.arange(capacity) >= capacity - cached
    slot = torch.arange(2 * chunk)
    window = (slot < previous) | ((slot >= chunk) & (slot < chunk + current))
    return cache, window


class LolaStates:
    """Random LoLA states in two copies: unused slots zeroed (for the reference) and NaN-poisoned
    (for the kernel, which must never read them)."""

    def __init__(self, device, dtype, batch=2, heads=3, kv_heads=1, dim=16, chunk=16, capacity=24, seed=0):
        self.device, self.dtype = device, dtype
        self.batch, self.heads, self.kv_heads, self.dim = batch, heads, kv_heads, dim
        self.chunk, self.capacity = chunk, capacity
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=None, scale=1.0):
        x = torch.randn(*shape, generator=self.gen) * scale
        return x.to(dtype=dtype or self.dtype, device=self.device)

    def memory(self, tokens_seen: int, cache_heads: int | None = None) -> tuple[dict, dict]:
        """(clean, poisoned) dicts of win_k, win_v, cache_k, cache_v, h, s after ``tokens_seen``; the cache
        has ``cache_heads`` heads (the query heads by default)."""
        b, hq, hkv, d, c, g = self.batch, self.heads, self.kv_heads, self.dim, self.chunk, self.capacity
        cache_used, window_used = occupied(tokens_seen, c, g)
        clean, poisoned = {}, {}
        for name, shape, used in (
            ("win_k", (b, hkv, 2 * c, d), window_used),
            ("win_v", (b, hkv, 2 * c, d), window_used),
            ("cache_k", (b, cache_heads or hq, g, d), cache_used),
            ("cache_v", (b, cache_heads or hq, g, d), cache_used),
        ):
            x = self.randn(*shape)
            mask = used.to(self.device)[None, None, :, None]
            clean[name] = x.masked_fill(~mask, 0.0)
            poisoned[name] = x.masked_fill(~mask, float("nan"))
        # A hidden state as folding produces it: H = sum phi v^T and s = sum phi over some pairs.
        folded = 40
        phi = torch.softmax(self.randn(b, hq, folded, 2 * d, dtype=torch.float32, scale=2.0), dim=-1)
        clean["h"] = phi.transpose(-1, -2) @ self.randn(b, hq, folded, d, dtype=torch.float32)
        clean["s"] = phi.sum(dim=2)
        poisoned["h"], poisoned["s"] = clean["h"].clone(), clean["s"].clone()
        return clean, poisoned

    def feature_map(self) -> torch.Tensor:
        return self.randn(self.heads, self.dim, self.dim, scale=self.dim**-0.5)


@pytest.fixture
def lola_states():
    return LolaStates
