"""A long segment's whole chunks attend in one call (evictions first, then all chunks stacked): the same
outputs and memory as chunk by chunk."""

from types import SimpleNamespace

import pytest
import torch

from lola_chat.memory import LolaMemory, LolaSettings

HQ, HKV, D = 6, 2, 16


def random_attn(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmap_q = (torch.randn(HQ, D, D, generator=g) * 0.5).to(dtype)
    fmap_k = (torch.randn(HQ, D, D, generator=g) * 0.5).to(dtype)
    gate = (torch.rand(HQ, generator=g) * 0.8 + 0.1).to(dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    return SimpleNamespace(fmap_q=fmap_q, fmap_k=fmap_k, window_factor=lambda: gate, inv_freq=inv_freq)


def feed(batch_chunks, segments, settings, dtype, attn, seed=1):
    """Feed segments of the given lengths; returns (outputs, memory)."""
    memory = LolaMemory(2, HQ, HKV, D, 2 * D, settings, dtype, torch.device("cpu"))
    memory.batch_chunks = batch_chunks
    g = torch.Generator().manual_seed(seed)
    outputs = []
    with torch.inference_mode():
        for length in segments:
            q = torch.randn(2, HQ, length, D, generator=g).to(dtype)
            k, v = (torch.randn(2, HKV, length, D, generator=g).to(dtype) for _ in range(2))
            ids = torch.randint(0, 100, (2, length), generator=g)
            outputs.append(memory.attend(q, k, v, attn, ids))
    return outputs, memory


@pytest.mark.parametrize("normalizer", ["shared", "window"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("chunk", "capacity", "segments"),
    [
        (8, 16, [100]),  # from empty: the frame fills chunk by chunk, then whole chunks go together
        (8, 16, [3, 90, 1, 40]),  # segments starting mid-chunk, a partial cache, decode in between
        (8, 12, [5, 63, 64]),  # G not a multiple of C
        (8, 0, [63, 17, 50]),  # G = 0
        (16, 24, [7, 200]),
    ],
)
def test_whole_chunks_together_equal_chunk_by_chunk(chunk, capacity, segments, dtype, normalizer):
    settings = LolaSettings(chunk=chunk, capacity=capacity, normalizer=normalizer)
    attn = random_attn(dtype if dtype == torch.float64 else torch.float32)
    together, memory = feed(4, segments, settings, dtype, attn)
    apart, reference = feed(1, segments, settings, dtype, attn)
    for y, expected in zip(together, apart, strict=True):
        torch.testing.assert_close(y, expected, rtol=0, atol=0 if dtype == torch.float64 else 1e-2)
    for name in LolaMemory.names:
        torch.testing.assert_close(getattr(memory, name), getattr(reference, name), rtol=0, atol=1e-5)
    assert (memory.tokens_seen, memory.evictions) == (reference.tokens_seen, reference.evictions)


def test_whole_chunks_go_together_only_once_the_frame_is_steady():
    settings = LolaSettings(chunk=8, capacity=16)
    attn = random_attn(torch.float64)
    memory = LolaMemory(1, HQ, HKV, D, 2 * D, settings, torch.float64, torch.device("cpu"))
    q, k = torch.zeros(1, HQ, 64, D, dtype=torch.float64), torch.zeros(1, HKV, 64, D, dtype=torch.float64)
    assert memory._steady_chunks(q, k, attn, 64) == 0  # empty cache: each chunk has its own frame
    memory.tokens_seen = 24
    assert memory._steady_chunks(q, k, attn, 64) == 8
    assert memory._steady_chunks(q, k, attn, 15) == 0
    memory.tokens_seen = 25
    assert memory._steady_chunks(q, k, attn, 64) == 0
