"""The Triton eviction (self-recall scoring, top-G selection, folding) against ``reference.evict``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lola_chat.kernels.lola import evict_triton, reference  # noqa: E402

CASES = [
    # (tokens_seen, chunk, capacity, heads, kv_heads, dim, batch)
    pytest.param(16, 16, 24, 3, 1, 16, 2, id="nothing-leaves-yet"),
    pytest.param(32, 16, 24, 3, 1, 16, 2, id="first-eviction-cache-empty"),
    pytest.param(48, 16, 24, 6, 2, 16, 1, id="cache-partly-full"),
    pytest.param(160, 16, 24, 3, 1, 32, 1, id="steady-state"),
    pytest.param(160, 16, 0, 3, 1, 16, 2, id="G0"),
    pytest.param(192, 64, 24, 3, 1, 16, 1, id="chunk64"),
]


def run_both(states, tokens_seen, device_seen=False):
    # The memory just before eviction: the current chunk is full.
    clean, poisoned = states.memory(tokens_seen - 1)
    c = states.chunk
    for memory in (clean, poisoned):
        for name in ("win_k", "win_v"):
            memory[name][:, :, 2 * c - 1] = clean[name][:, :, 2 * c - 2]
    fmap = states.feature_map()

    def call(fn, m, seen):
        return fn(m["win_k"], m["win_v"], m["cache_k"], m["cache_v"], m["h"], m["s"], fmap, seen)

    expected = call(reference.evict, clean, tokens_seen)
    seen = torch.tensor([tokens_seen], device=states.device) if device_seen else tokens_seen
    got = call(evict_triton.evict, poisoned, seen)
    return expected, got, poisoned


def check(expected, got, poisoned, states, tokens_seen, device_seen=False):
    names = ("win_k", "win_v", "cache_k", "cache_v", "h", "s")
    for name, tensor in zip(names, got[:6], strict=True):
        assert tensor is poisoned[name], f"{name} is updated in place"
    *ref_memory, ref_keep = expected
    *memory, keep = got
    g = states.capacity
    cached, previous, current = reference.frame(tokens_seen, states.chunk, g)
    assert current == 0
    used = torch.arange(g, device=states.device) >= g - cached
    for name, value, ref in zip(names, memory, ref_memory, strict=True):
        if name.startswith("cache"):
            value, ref = value[:, :, used], ref[:, :, used]
        elif name.startswith("win"):
            value, ref = value[:, :, : states.chunk], ref[:, :, : states.chunk]
        exact = name in ("win_k", "win_v", "cache_k", "cache_v")
        torch.testing.assert_close(value, ref, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5)
    assert torch.isfinite(memory[4]).all() and torch.isfinite(memory[5]).all(), "read a poisoned slot"
    if ref_keep is None and not (device_seen and g > 0):
        assert keep is None
    elif ref_keep is None:
        torch.testing.assert_close(keep, torch.arange(g, device=keep.device).expand_as(keep))
    else:
        torch.testing.assert_close(keep[:, :, used], ref_keep[:, :, used], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens_seen,chunk,capacity,heads,kv_heads,dim,batch", CASES)
def test_evict_matches_reference(
    device, lola_states, dtype, tokens_seen, chunk, capacity, heads, kv_heads, dim, batch
):
    states = lola_states(
        device, dtype, batch, heads, kv_heads, dim, chunk, capacity, seed=tokens_seen + capacity
    )
    expected, got, poisoned = run_both(states, tokens_seen)
    check(expected, got, poisoned, states, tokens_seen)


@pytest.mark.parametrize("tokens_seen", [16, 48, 160])
def test_evict_reads_position_from_device_tensor(device, lola_states, tokens_seen):
    states = lola_states(device, torch.float32, seed=3)
    expected, got, poisoned = run_both(states, tokens_seen, device_seen=True)
    check(expected, got, poisoned, states, tokens_seen, device_seen=True)


def test_evict_rejects_other_policies(device, lola_states):
    states = lola_states(device, torch.float32)
    _, m = states.memory(32)
    with pytest.raises(ValueError, match="sre"):
        evict_triton.evict(m["win_k"], m["win_v"], m["cache_k"], m["cache_v"], m["h"], m["s"],
                           states.feature_map(), 32, policy="random")  # fmt: skip
