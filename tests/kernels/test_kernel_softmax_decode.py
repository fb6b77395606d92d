"""The split-KV softmax decode kernel against ``kernels/softmax/reference.py`` (and SDPA on the full
prefix), with the cache past the length poisoned with NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from lola_chat.kernels.softmax import decode_triton, reference  # noqa: E402

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def inputs(device, dtype, batch, heads, kv_heads, slots, dim, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, slots, dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, slots, dim, generator=gen).to(device, dtype)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, length:] = float("nan")
    poisoned_v[:, :, length:] = float("nan")
    return q, k, v, poisoned_k, poisoned_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "batch,heads,kv_heads,slots,dim,length",
    [
        pytest.param(1, 9, 3, 63, 16, 63, id="T63-full-gqa3"),
        pytest.param(2, 4, 1, 100, 32, 37, id="partial-gqa4"),
        pytest.param(1, 2, 2, 2500, 16, 2049, id="several-splits"),
        pytest.param(1, 3, 1, 16, 16, 1, id="one-position"),
    ],
)
def test_decode_matches_reference(device, dtype, batch, heads, kv_heads, slots, dim, length):
    q, k, v, poisoned_k, poisoned_v = inputs(device, dtype, batch, heads, kv_heads, slots, dim, length)
    expected = reference.decode(q, k, v, length)
    got = decode_triton.decode(q, poisoned_k, poisoned_v, torch.tensor([length], device=device))
    assert got.shape == expected.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all(), "the kernel read past the length"
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])


def test_reference_is_attention_over_the_prefix(device):
    q, k, v, _, _ = inputs(device, torch.float32, 1, 6, 2, 40, 16, 25)
    prefix = F.scaled_dot_product_attention(q, k[:, :, :25], v[:, :, :25], enable_gqa=True)
    torch.testing.assert_close(reference.decode(q, k, v, 25), prefix, atol=1e-6, rtol=1e-5)


def test_static_cache_layer_decodes_as_the_growing_kv_cache():
    from types import SimpleNamespace

    from lola_chat.graphs import _Counter
    from lola_chat.memory import LolaSettings, SoftmaxMemory
    from lola_chat.softmax_graphs import _StaticKVLayer

    heads, kv_heads, dim, steps = 6, 2, 16, 20
    attn = SimpleNamespace(inv_freq=1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    cpu = torch.device("cpu")
    counter = _Counter(0, cpu)
    static = _StaticKVLayer(1, kv_heads, 32, dim, torch.float32, cpu, counter)
    growing = SoftmaxMemory(1, heads, kv_heads, dim, 2 * dim, LolaSettings(), torch.float32, cpu)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        q = torch.randn(1, heads, 1, dim, generator=gen)
        k, v = torch.randn(2, 1, kv_heads, 1, dim, generator=gen)
        torch.testing.assert_close(static.attend(q, k, v, attn), growing.attend(q, k, v, attn))
        counter.advance(1)
