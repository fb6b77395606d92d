"""The Triton attention (split over key blocks, for one token and for tiles of queries) against
``reference.attend``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lola_chat.kernels.lola import attend_triton, reference  # noqa: E402

# Tolerances on y: fp32 differs from the reference only in summation order; in bf16 the reference
# rotates in bf16 while the kernel rotates in fp32, and y is rounded to bf16.
TOLERANCE = {torch.float32: dict(atol=5e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}

CASES = [
    # (tokens_seen, T, chunk, capacity, heads, kv_heads, dim, batch)
    pytest.param(0, 16, 16, 24, 3, 1, 16, 2, id="first-chunk-prefill"),
    pytest.param(5, 7, 16, 24, 3, 1, 16, 2, id="partial-chunk-no-previous"),
    pytest.param(19, 1, 16, 24, 3, 1, 16, 2, id="decode-cache-empty"),
    pytest.param(36, 5, 16, 24, 6, 2, 16, 1, id="cache-partly-full"),
    pytest.param(1000, 8, 16, 24, 3, 1, 32, 1, id="steady-state-fills-chunk"),
    pytest.param(997, 1, 16, 0, 3, 1, 16, 2, id="G0-decode"),
    pytest.param(64 * 3 + 1, 63, 64, 24, 3, 1, 16, 1, id="T63"),
    pytest.param(160 + 3, 5, 16, 0, 3, 1, 16, 2, id="G0-segment"),
    pytest.param(64 * 9 + 20, 40, 64, 100, 6, 2, 16, 2, id="segment-several-cache-blocks"),
    pytest.param(36, 1, 16, 24, 3, 1, 16, 2, id="decode-cache-partly-full"),
    pytest.param(1000, 1, 16, 24, 6, 2, 32, 1, id="decode-steady-state-G24"),
    pytest.param(64 * 40 + 63, 1, 64, 128, 9, 3, 64, 1, id="decode-default-shapes-last-slot"),
]


def run_both(
    states,
    tokens_seen,
    length,
    device_seen=False,
    normalizer="shared",
    packed=False,
    linear_cap=0,
    cache_heads=None,
):
    clean, poisoned = states.memory(tokens_seen, cache_heads)
    b, hq, hkv, d = states.batch, states.heads, states.kv_heads, states.dim
    if packed:
        # As Transformer.pack_projections makes them: views into one (B, T, (Hq + 2 Hkv) D) GEMM output.
        qkv = states.randn(b, length, (hq + 2 * hkv) * d).split((hq * d, hkv * d, hkv * d), dim=-1)
        q, k, v = (x.view(b, length, -1, d).transpose(1, 2) for x in qkv)
    else:
        # q, k, v as the unpacked model makes them: transposed views of (B, T, H, D) projections.
        q = states.randn(b, length, hq, d).transpose(1, 2)
        k = states.randn(b, length, hkv, d).transpose(1, 2)
        v = states.randn(b, length, hkv, d).transpose(1, 2)
    fmap = states.feature_map()
    gate = torch.sigmoid(states.randn(hq, scale=2.0))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=states.device) / d)

    def call(fn, memory, seen):
        m = memory
        return fn(q, k, v, m["win_k"], m["win_v"], m["cache_k"], m["cache_v"], m["h"], m["s"],
                  fmap, gate, inv_freq, seen, normalizer=normalizer, linear_cap=linear_cap)  # fmt: skip

    expected = call(reference.attend, clean, tokens_seen)
    seen = torch.tensor([tokens_seen], device=states.device) if device_seen else tokens_seen
    before = {name: tensor.clone() for name, tensor in poisoned.items()}
    got = call(attend_triton.attend, poisoned, seen)
    return expected, got, (poisoned, before)


def check(expected, got, kernel_memory, states, tokens_seen, length, dtype):
    y_ref, win_k_ref, win_v_ref = expected
    y, win_k, win_v = got
    poisoned, before = kernel_memory  # the kernel's state tensors after and before the call
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert torch.isfinite(y).all(), "the kernel read a poisoned slot"
    torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCE[dtype])
    assert win_k is poisoned["win_k"] and win_v is poisoned["win_v"], "the window is updated in place"
    c = states.chunk
    current = tokens_seen % c
    written = slice(c + current, c + current + length)
    torch.testing.assert_close(win_k[:, :, written], win_k_ref[:, :, written], atol=0, rtol=0)
    torch.testing.assert_close(win_v[:, :, written], win_v_ref[:, :, written], atol=0, rtol=0)
    # Nothing else is written: the rest of the window (NaN where unused) and the other state tensors.
    for name, tensor in before.items():
        if name in ("win_k", "win_v"):
            tensor[:, :, written] = poisoned[name][:, :, written]
        torch.testing.assert_close(poisoned[name], tensor, atol=0, rtol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens_seen,length,chunk,capacity,heads,kv_heads,dim,batch", CASES)
def test_attend_matches_reference(
    device, lola_states, dtype, tokens_seen, length, chunk, capacity, heads, kv_heads, dim, batch
):
    states = lola_states(device, dtype, batch, heads, kv_heads, dim, chunk, capacity, seed=tokens_seen)
    expected, got, kernel_memory = run_both(states, tokens_seen, length)
    check(expected, got, kernel_memory, states, tokens_seen, length, dtype)


WINDOW_CASES = [
    case
    for case in CASES
    if case.id in ("cache-partly-full", "steady-state-fills-chunk", "T63", "decode-steady-state-G24")
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens_seen,length,chunk,capacity,heads,kv_heads,dim,batch", WINDOW_CASES)
def test_attend_with_the_window_normalizer_matches_reference(
    device, lola_states, dtype, tokens_seen, length, chunk, capacity, heads, kv_heads, dim, batch
):
    states = lola_states(device, dtype, batch, heads, kv_heads, dim, chunk, capacity, seed=tokens_seen + 1)
    expected, got, kernel_memory = run_both(states, tokens_seen, length, normalizer="window")
    check(expected, got, kernel_memory, states, tokens_seen, length, dtype)
    shared, _, _ = run_both(states, tokens_seen, length)[0]
    assert not torch.allclose(shared.float(), expected[0].float(), atol=1e-3), "the normalizer had no effect"


@pytest.mark.parametrize("device_seen", [False, True], ids=["host-count", "device-count"])
@pytest.mark.parametrize("tokens_seen,length,chunk,capacity,heads,kv_heads,dim,batch", WINDOW_CASES)
def test_attend_with_a_linear_cap_matches_reference(
    device, lola_states, device_seen, tokens_seen, length, chunk, capacity, heads, kv_heads, dim, batch
):
    dtype = torch.float32
    states = lola_states(device, dtype, batch, heads, kv_heads, dim, chunk, capacity, seed=tokens_seen + 3)
    cap = reference.folded(tokens_seen, chunk, capacity) // 3
    expected, got, kernel_memory = run_both(
        states, tokens_seen, length, device_seen, "window", linear_cap=cap
    )
    check(expected, got, kernel_memory, states, tokens_seen, length, dtype)
    uncapped, _, _ = run_both(states, tokens_seen, length, normalizer="window")[0]
    assert not torch.allclose(uncapped, expected[0], atol=1e-3), "the cap had no effect"


@pytest.mark.parametrize("tokens_seen,length", [(53, 1), (36, 5)], ids=["decode", "segment"])
def test_attend_reads_packed_projection_views(device, lola_states, tokens_seen, length):
    states = lola_states(device, torch.float32, heads=6, kv_heads=2, seed=tokens_seen + 2)
    expected, got, kernel_memory = run_both(states, tokens_seen, length, packed=True)
    check(expected, got, kernel_memory, states, tokens_seen, length, torch.float32)


def test_attend_reads_position_from_device_tensor(device, lola_states):
    states = lola_states(device, torch.float32, seed=7)
    expected, got, kernel_memory = run_both(states, 53, 1, device_seen=True)
    check(expected, got, kernel_memory, states, 53, 1, torch.float32)


# A cache per KV head, which every query head of a group reads.
KV_CACHE_IDS = (
    "first-chunk-prefill",
    "cache-partly-full",
    "segment-several-cache-blocks",
    "decode-cache-partly-full",
    "decode-steady-state-G24",
    "decode-default-shapes-last-slot",
    "T63",
)
KV_CACHE_CASES = [case for case in CASES if case.id in KV_CACHE_IDS]


@pytest.mark.parametrize("tokens_seen,length,chunk,capacity,heads,kv_heads,dim,batch", KV_CACHE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attend_with_a_cache_per_kv_head_matches_reference(
    device, lola_states, dtype, tokens_seen, length, chunk, capacity, heads, kv_heads, dim, batch
):
    states = lola_states(device, dtype, batch, heads, kv_heads, dim, chunk, capacity, seed=tokens_seen + 5)
    expected, got, kernel_memory = run_both(
        states, tokens_seen, length, normalizer="window", cache_heads=kv_heads
    )
    check(expected, got, kernel_memory, states, tokens_seen, length, dtype)
    # The reference reads a cache per KV head as that cache copied to each query head of the group (as
    # rows of one product per KV head, so up to the order of the sums).
    clean, _ = states.memory(tokens_seen, kv_heads)
    fmap = states.feature_map()
    q = states.randn(batch, heads, length, dim)
    k, v = states.randn(batch, kv_heads, length, dim), states.randn(batch, kv_heads, length, dim)
    gate = torch.sigmoid(states.randn(heads))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=states.device) / dim)
    copied = {
        name: reference.expand_heads(x, heads) if name.startswith("cache") else x for name, x in clean.items()
    }
    ys = [
        reference.attend(q, k, v, m["win_k"], m["win_v"], m["cache_k"], m["cache_v"], m["h"], m["s"], fmap,
                         gate, inv_freq, tokens_seen, normalizer="window")[0]
        for m in (clean, copied)
    ]  # fmt: skip
    torch.testing.assert_close(ys[0], ys[1])
