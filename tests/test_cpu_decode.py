"""The CPU decode path (kernels/lola/decode_cpu.py) computes what the reference computes, leaves the very
same memory, keeps nothing stale, and is taken only where it applies."""

from types import SimpleNamespace

import pytest
import torch
from lola_chat.kernels.dispatch import force_reference

from lola_chat.joint import close_chunk_jointly
from lola_chat.memory import LolaMemory, LolaSettings

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def inv_freq(dim=16):
    return 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def fake_attention(hq, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.rand(hq, generator=g)
    return SimpleNamespace(
        fmap_q=torch.randn(hq, d, d, generator=g),
        fmap_k=torch.randn(hq, d, d, generator=g),
        window_factor=lambda: gate,
        inv_freq=inv_freq(d),
    )


def feed(memory, q, k, v, attn):
    """``memory.attend``, cut at chunk ends as a model's forward pass cuts it, each chunk closed as the
    model closes it (one layer's joint eviction where the policy is joint)."""
    chunk, outputs, start = memory.settings.chunk, [], 0
    while start < q.shape[2]:
        end = start + min(q.shape[2] - start, chunk - memory.tokens_seen % chunk)
        outputs.append(memory.attend(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn))
        if memory.pending is not None:
            close_chunk_jointly([memory], [attn])
        start = end
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "settings",
    [
        LolaSettings(chunk=8, capacity=16),
        LolaSettings(chunk=8, capacity=16, policy="relative-novelty", normalizer="window", linear_cap=5),
        LolaSettings(chunk=8, capacity=0, normalizer="window"),
        LolaSettings(chunk=8, capacity=12, policy="novelty", normalizer="window"),
        LolaSettings(
            chunk=8, capacity=12, policy="joint-relative-novelty", normalizer="window", linear_cap=5
        ),
    ],
    ids=["sre-shared", "relative-novelty-window-capped", "g0-window", "novelty-g12", "joint-kv-cache"],
)
def test_cpu_decode_steps_equal_the_reference(dtype, settings):
    """Single tokens go to kernels/lola/decode_cpu on a CPU: the same outputs as the reference (within
    fp32 summation order) and the very same memory, over prefills that end mid-chunk, steps across many
    evictions, a segment fed mid-chunk after steps, a checkpoint restored and a load."""
    hq, hkv, d = 6, 2, 16
    attn = fake_attention(hq, d)
    memories = [
        LolaMemory(2, hq, hkv, d, 2 * d, settings, dtype, torch.device("cpu")) for _ in ("reference", "fast")
    ]
    g = torch.Generator().manual_seed(1)
    # [2, 1, 1, 3] inside one chunk: a reference segment after decode steps that wrote the window in place.
    lengths = [5] + [1] * 11 + [2, 1, 1, 3] + [1] * 30 + [6, 2] + [1] * 9
    checkpoint = None
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    with torch.inference_mode():
        for step, length in enumerate(lengths):
            q = torch.randn(2, hq, length, d, generator=g).to(dtype)
            k, v = (torch.randn(2, hkv, length, d, generator=g).to(dtype) for _ in range(2))
            with force_reference():
                expected = feed(memories[0], q, k, v, attn)
            got = feed(memories[1], q, k, v, attn)
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
            for name in LolaMemory.names:
                assert torch.equal(getattr(memories[1], name), getattr(memories[0], name)), name
            if step == 20:
                # As State.checkpoint takes one: copies of the tensors.
                checkpoint = [
                    ({name: t.clone() for name, t in memory.tensors().items()}, memory.tokens_seen)
                    for memory in memories
                ]
            if step == 40:  # back to the checkpoint, mid-chunk, after the window changed in place
                for memory, taken in zip(memories, checkpoint, strict=True):
                    memory.load(*taken)
    assert memories[1].evictions == memories[0].evictions > 3


def test_cpu_decode_is_not_taken_where_it_does_not_apply():
    from lola_chat.kernels import lola

    q = torch.randn(1, 6, 1, 16)
    assert lola.cpu_decode_applies(1, q, torch.zeros(1))
    assert not lola.cpu_decode_applies(2, q)
    assert not lola.cpu_decode_applies(1, q, torch.zeros(1, requires_grad=True))
    assert not lola.cpu_decode_applies(1, q, torch.zeros(1, device="meta"))
    with torch.inference_mode():
        made_in_inference = torch.zeros(1)
        assert lola.cpu_decode_applies(1, q, made_in_inference)
    assert not lola.cpu_decode_applies(1, q, made_in_inference)
    with force_reference():
        assert not lola.cpu_decode_applies(1, q)


def test_a_decode_step_that_evicts_prepares_the_next_one(monkeypatch):
    from lola_chat.kernels.lola import decode_cpu

    built = []
    build = decode_cpu.DecodeFrame.build

    def counted(frame, *args):
        built.append(args[-2])  # the token count it was built for
        return build(frame, *args)

    monkeypatch.setattr(decode_cpu.DecodeFrame, "build", counted)
    attn = fake_attention(6, 16)
    settings = LolaSettings(chunk=8, capacity=8)
    memory = LolaMemory(1, 6, 2, 16, 32, settings, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)

    def feed(length):
        q = torch.randn(1, 6, length, 16, generator=g)
        memory.attend(q, *torch.randn(2, 1, 2, length, 16, generator=g), attn)

    with torch.inference_mode():
        feed(5)
        for _ in range(20):
            feed(1)
            if memory.tokens_seen % 8 == 0:
                tensors = [getattr(memory, name) for name in LolaMemory.memory_names]
                assert memory._decode.matches(memory.tokens_seen, *tensors, memory._rotary)
    # Built for the first step after the prefill, then by each step that closed a chunk, for the next.
    assert built == [5, 8, 16, 24]


def test_new_rotary_frequencies_are_not_served_keys_rotated_with_the_old():
    attn = fake_attention(6, 16)
    settings = LolaSettings(chunk=8, capacity=8)
    memories = [LolaMemory(1, 6, 2, 16, 32, settings, torch.float32, torch.device("cpu")) for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for step in range(12):
            if step == 6:  # mid-chunk, after decode steps
                attn.inv_freq = inv_freq(16) * 0.5
            q = torch.randn(1, 6, 1, 16, generator=g)
            k, v = torch.randn(2, 1, 2, 1, 16, generator=g)
            with force_reference():
                expected = memories[0].attend(q, k, v, attn)
            torch.testing.assert_close(memories[1].attend(q, k, v, attn), expected, atol=1e-5, rtol=1e-5)
