"""The Triton eviction (self-recall or novelty scoring, top-G selection, folding) against
``evict_reference.evict``.

Under "novelty" a candidate's score depends on which other candidate has the nearest key; kernel and
reference rank squared distances computed in different orders (the kernel's in fp32, the reference's
in float64 for 16-bit keys and fp32 for fp32 ones), so near-tied distances could pick
different neighbours. The keys here are random (besides the deliberate exact twins), which keeps every
nearest neighbour clearly ahead of the next one: by at least 2e-5 of its distance in these cases, where
fp32 rounding (and on a GPU the TF32 key products: exact for 16-bit keys, about 2^-22 of the product
of the key norms for fp32 ones) moves a squared distance far less.

Scratch buffers (torch.empty) are filled with NaN here (``torch.use_deterministic_algorithms``), so a
result that picked up unwritten scratch memory shows."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lola_chat.kernels.lola import evict_reference, evict_triton, reference  # noqa: E402

from lola_chat.joint import joint_ranking  # noqa: E402
from lola_chat.memory import LolaSettings  # noqa: E402

CASES = [
    # (tokens_seen, chunk, capacity, heads, kv_heads, dim, batch)
    pytest.param(16, 16, 24, 3, 1, 16, 2, id="nothing-leaves-yet"),
    pytest.param(32, 16, 24, 3, 1, 16, 2, id="first-eviction-cache-empty"),
    pytest.param(48, 16, 24, 6, 2, 16, 1, id="cache-partly-full"),
    pytest.param(160, 16, 24, 3, 1, 32, 1, id="steady-state"),
    pytest.param(160, 16, 40, 2, 2, 16, 1, id="G40-two-column-blocks"),
    pytest.param(160, 16, 0, 3, 1, 16, 2, id="G0"),
    pytest.param(192, 64, 24, 3, 1, 16, 1, id="chunk64"),
    pytest.param(80, 16, 48, 6, 2, 16, 2, id="N-a-multiple-of-32-batch2"),
    pytest.param(160, 16, 2, 3, 1, 16, 1, id="G2-fewer-slots-than-commit-parts"),
    pytest.param(50, 10, 20, 6, 2, 16, 1, id="chunk10-window-rows-not-a-multiple-of-commit-parts"),
]


POLICIES = list(evict_reference.RECALL_POLICIES)


@pytest.fixture(autouse=True)
def nan_filled_scratch():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def before_eviction(states, tokens_seen, cache_heads=None):
    """(clean, poisoned) memory just before eviction: the current chunk is full. Values follow their
    keys plus noise, so the nearest key's value is close and cache-recall errors beat self-recall
    errors often enough ("novelty" then keeps other candidates than "sre"), as for repeated text."""
    clean, poisoned = states.memory(tokens_seen - 1, cache_heads)
    c = states.chunk
    for memory in (clean, poisoned):
        for name in ("win_k", "win_v"):
            memory[name][:, :, 2 * c - 1] = clean[name][:, :, 2 * c - 2]
    for memory in (clean, poisoned):
        for kind in ("win", "cache"):
            memory[f"{kind}_v"] = memory[f"{kind}_k"] + 0.3 * memory[f"{kind}_v"]
    return clean, poisoned


def run_both(states, tokens_seen, device_seen=False, policy="sre", memories=None, fmap=None):
    clean, poisoned = memories or before_eviction(states, tokens_seen)
    fmap = states.feature_map() if fmap is None else fmap

    def call(fn, m, seen):
        return fn(m["win_k"], m["win_v"], m["cache_k"], m["cache_v"], m["h"], m["s"], fmap, seen, policy)

    expected = call(evict_reference.evict, clean, tokens_seen)
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
    # Once the kernel has selected (keep is set), every slot is written: empty ones hold zeros, as the
    # reference's do, never the scratch buffers' contents.
    everything = torch.ones_like(used)
    for name, value, ref in zip(names, memory, ref_memory, strict=True):
        if name.startswith("cache"):
            slots = used if keep is None else everything
            value, ref = value[:, :, slots], ref[:, :, slots]
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


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens_seen,chunk,capacity,heads,kv_heads,dim,batch", CASES)
def test_evict_matches_reference(
    device, lola_states, dtype, tokens_seen, chunk, capacity, heads, kv_heads, dim, batch, policy
):
    states = lola_states(
        device, dtype, batch, heads, kv_heads, dim, chunk, capacity, seed=tokens_seen + capacity
    )
    expected, got, poisoned = run_both(states, tokens_seen, policy=policy)
    check(expected, got, poisoned, states, tokens_seen)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("tokens_seen", [16, 48, 160])
def test_evict_reads_position_from_device_tensor(device, lola_states, tokens_seen, policy):
    states = lola_states(device, torch.float32, seed=3)
    expected, got, poisoned = run_both(states, tokens_seen, device_seen=True, policy=policy)
    check(expected, got, poisoned, states, tokens_seen, device_seen=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_novelty_folds_exact_twins(device, lola_states, dtype):
    """Candidates with an exact copy (key and value) among the others score 0, below every other
    candidate, so under "novelty" every copy is folded; under "sre" some of them would stay."""
    tokens_seen, chunk, capacity = 160, 16, 24  # a full cache: candidates 0..23, then window slots 0..15
    states = lola_states(device, dtype, 1, 2, 1, 16, chunk, capacity, seed=11)
    clean, poisoned = before_eviction(states, tokens_seen)
    for memory in (clean, poisoned):
        for kind in ("k", "v"):
            cache, window = memory[f"cache_{kind}"], memory[f"win_{kind}"]
            cache[:, :, 3] = cache[:, :, 5]  # two cache slots
            cache[:, :, 20] = window[:, :, 14]  # a cache slot and a leaving pair (one KV head)
            window[:, :, 10] = window[:, :, 11] = window[:, :, 9]  # three leaving pairs
    twins = torch.tensor([3, 5, 20, capacity + 14, capacity + 9, capacity + 10, capacity + 11])
    fmap = states.feature_map()
    expected, got, poisoned = run_both(
        states, tokens_seen, policy="novelty", memories=(clean, poisoned), fmap=fmap
    )
    check(expected, got, poisoned, states, tokens_seen)
    assert not torch.isin(got[-1], twins.to(device)).any(), "a candidate with an exact twin was kept"
    memory = [clean[name] for name in ("win_k", "win_v", "cache_k", "cache_v", "h", "s")]
    sre_keep = evict_reference.evict(*memory, fmap, tokens_seen, "sre")[-1]
    assert torch.isin(sre_keep, twins.to(device)).any(), "the twins test nothing that sre does not fold"


@pytest.mark.parametrize("policy", ["random", "recent"])
def test_evict_rejects_ablation_policies(device, lola_states, policy):
    states = lola_states(device, torch.float32)
    _, m = states.memory(32)
    with pytest.raises(ValueError, match="novelty"):
        evict_triton.evict(m["win_k"], m["win_v"], m["cache_k"], m["cache_v"], m["h"], m["s"],
                           states.feature_map(), 32, policy=policy)  # fmt: skip


@pytest.mark.parametrize("policy", ["sre", "relative-novelty"])
def test_equal_scores_keep_the_earliest(device, lola_states, policy):
    """All pairs alike but the last 8 leaving ones (candidates 32..39, the second selection block), which
    score higher: those are kept, and the cut falls inside the group of equal scores, whose earliest 16
    are kept, as the reference's stable sort keeps them. The kept ones of the second block land after
    them, which counts the earlier block's kept candidates right."""
    tokens_seen, chunk, capacity = 160, 16, 24
    states = lola_states(device, torch.float32, 1, 2, 1, 16, chunk, capacity, seed=5)
    clean, poisoned = states.memory(tokens_seen - 1)
    g = torch.Generator().manual_seed(0)
    distinct = {name: torch.randn(1, 1, 8, 16, generator=g).to(device) * 10 for name in ("win_k", "win_v")}
    for memory in (clean, poisoned):
        for name in ("win_k", "win_v", "cache_k", "cache_v"):
            memory[name][:] = clean[name][:, :, :1]
        for name, rows in distinct.items():
            memory[name][:, :, 8:16] = rows
    expected, got, poisoned = run_both(states, tokens_seen, policy=policy, memories=(clean, poisoned))
    check(expected, got, poisoned, states, tokens_seen)
    kept = torch.cat([torch.arange(16), capacity + torch.arange(8, 16)]).to(device)
    assert torch.equal(got[-1][0, 0], kept)


@pytest.mark.parametrize("device_seen", [False, True])
@pytest.mark.parametrize(
    ("tokens_seen", "chunk", "capacity", "hq", "hkv", "batch"),
    [(160, 16, 24, 3, 1, 1), (48, 16, 24, 3, 1, 2), (16, 16, 24, 2, 1, 1), (80, 16, 2, 6, 2, 2)],
    ids=["full", "filling-batch2", "nothing-left", "G2"],
)
def test_token_ids_follow_the_kept_pairs(
    device, lola_states, device_seen, tokens_seen, chunk, capacity, hq, hkv, batch
):
    """Given the cache's and the leaving chunk's token ids, the kernels move them as they move the pairs:
    the new ids are the old ones gathered by ``keep`` (unchanged when nothing was selected)."""
    states = lola_states(device, torch.float32, batch, hq, hkv, 16, chunk, capacity, seed=3)
    clean, poisoned = before_eviction(states, tokens_seen)
    g = torch.Generator().manual_seed(1)
    cache_ids = torch.randint(0, 1000, (batch, hq, capacity), generator=g).to(device)
    # The leaving chunk's ids as the captured step keeps them: a view into a wider buffer.
    window_ids = torch.randint(0, 1000, (batch, 2 * chunk), generator=g).to(device)
    ids = cache_ids.clone()
    seen = torch.tensor([tokens_seen], device=device) if device_seen else tokens_seen
    m = poisoned
    *_, keep = evict_triton.evict(
        m["win_k"],
        m["win_v"],
        m["cache_k"],
        m["cache_v"],
        m["h"],
        m["s"],
        states.feature_map(),
        seen,
        "relative-novelty",
        cache_ids=ids,
        leaving_ids=window_ids[:, :chunk],
    )
    if keep is None:
        assert torch.equal(ids, cache_ids)
    else:
        leaving = window_ids[:, None, :chunk].expand(-1, hq, -1)
        assert torch.equal(ids, torch.cat([cache_ids, leaving], dim=2).gather(2, keep))
        if tokens_seen > chunk:
            assert not torch.equal(ids, cache_ids), "the test moves some id"


def memory_args(m):
    return m["win_k"], m["win_v"], m["cache_k"], m["cache_v"], m["h"], m["s"]


@pytest.mark.parametrize("cache_heads", ["query", "kv"])
@pytest.mark.parametrize("policy", POLICIES)
def test_candidate_scores_match_reference(device, lola_states, cache_heads, policy):
    states = lola_states(device, torch.float32, 2, 6, 2, 16, 16, 24, seed=5)
    clean, poisoned = before_eviction(states, 48, 2 if cache_heads == "kv" else None)
    fmap = states.feature_map()
    expected = evict_reference.candidate_scores(*memory_args(clean), fmap, 48, policy)
    got = evict_triton.candidate_scores(*memory_args(poisoned), fmap, 48, policy)
    assert got.shape == expected.shape == (2, 6, 24 + 16)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", [0, 1], ids=["first-head", "last-head"])
def test_a_nan_score_ranks_first_as_in_the_reference(device, lola_states, head):
    """A NaN score (only a broken state gives one) is kept first, as the reference's sort puts it; exactly
    G are kept, and the folded pairs' buffer is never written past its C rows (for the last head, past
    its end)."""
    states = lola_states(device, torch.float32, 1, 2, 1, 16, 16, 24, seed=7)
    clean, poisoned = before_eviction(states, 160)
    fmap = states.feature_map()
    score = evict_reference.candidate_scores(*memory_args(clean), fmap, 160, "sre")
    score[0, head, 30] = float("nan")
    expected = evict_reference.evict(*memory_args(clean), fmap, 160, "sre", score=score)
    got = evict_triton.evict(*memory_args(poisoned), fmap, 160, "sre", scores=score)
    check(expected, got, poisoned, states, 160)
    assert 30 in got[-1][0, head]


KV_CASES = [case for case in CASES if case.id in ("cache-partly-full", "N-a-multiple-of-32-batch2")]


@pytest.mark.parametrize("device_seen", [False, True], ids=["host-count", "device-count"])
@pytest.mark.parametrize("tokens_seen,chunk,capacity,heads,kv_heads,dim,batch", KV_CASES)
def test_a_cache_per_kv_head_keeps_its_groups_ranking(
    device, lola_states, device_seen, tokens_seen, chunk, capacity, heads, kv_heads, dim, batch
):
    """A joint policy's eviction: one given ranking per KV group (here the mean of the group's scores)
    keeps the same pairs for the group's query heads, stored once per KV head, ids moved alike."""
    states = lola_states(device, torch.float32, batch, heads, kv_heads, dim, chunk, capacity, seed=11)
    clean, poisoned = before_eviction(states, tokens_seen, kv_heads)
    fmap = states.feature_map()
    score = evict_reference.candidate_scores(*memory_args(clean), fmap, tokens_seen, "relative-novelty")
    candidates = capacity + chunk
    grouped = score.view(batch, kv_heads, heads // kv_heads, candidates).mean(dim=2, keepdim=True)
    ranking = grouped.expand(-1, -1, heads // kv_heads, -1).reshape(batch, heads, candidates)
    expected = evict_reference.evict(
        *memory_args(clean), fmap, tokens_seen, "relative-novelty", score=ranking
    )
    g = torch.Generator().manual_seed(2)
    cache_ids = torch.randint(0, 1000, (batch, kv_heads, capacity), generator=g).to(device)
    window_ids = torch.randint(0, 1000, (batch, 2 * chunk), generator=g).to(device)
    ids = cache_ids.clone()
    seen = torch.tensor([tokens_seen], device=device) if device_seen else tokens_seen
    got = evict_triton.evict(
        *memory_args(poisoned), fmap, seen, "relative-novelty", cache_ids=ids,
        leaving_ids=window_ids[:, :chunk], scores=ranking,
    )  # fmt: skip
    check(expected, got, poisoned, states, tokens_seen, device_seen)
    kept = got[-1][:, :: heads // kv_heads]
    leaving = window_ids[:, None, :chunk].expand(-1, kv_heads, -1)
    assert torch.equal(ids, torch.cat([cache_ids, leaving], dim=2).gather(2, kept))


STATE_NAMES = ("win_k", "win_v", "cache_k", "cache_v", "h", "s")
LAYERS, BATCH, HEADS, KV_HEADS, DIM, CHUNK, CAPACITY = 2, 2, 4, 2, 16, 16, 24


def layer_states(device, lola_states, tokens_seen, cache_heads):
    """Per layer: (poisoned memory, feature map, cache ids); and the window's ids, shared by the layers."""
    layers = []
    for layer in range(LAYERS):
        states = lola_states(
            device, torch.float32, BATCH, HEADS, KV_HEADS, DIM, CHUNK, CAPACITY, seed=30 + layer
        )
        _, poisoned = before_eviction(states, tokens_seen, cache_heads)
        ids = torch.randint(0, 1000, (BATCH, cache_heads or HEADS, CAPACITY), generator=states.gen)
        layers.append((poisoned, states.feature_map(), ids.to(device)))
    window_ids = torch.randint(0, 1000, (BATCH, 2 * CHUNK), generator=torch.Generator().manual_seed(4))
    return layers, window_ids.to(device)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("tokens_seen", "policy", "cache_heads", "device_seen"),
    [
        (160, "relative-novelty", KV_HEADS, True),
        (160, "sre", None, False),
        (48, "relative-novelty", None, False),
        (48, "sre", KV_HEADS, True),
    ],
    ids=["steady-kv-cache", "steady-sre", "filling-novelty", "filling-kv-cache"],
)
def test_stacked_layers_evict_as_each_layer_alone(
    device, lola_states, device_seen, cache_heads, policy, tokens_seen
):
    """Every layer at once (state tensors with a leading layer dimension, as the captured step stacks
    them) against the same kernels called layer by layer: the same scores, memories, keeps and ids, bit
    for bit. Each layer has its own state and feature map; batch 2, so that a row's layer and its
    sequence (the leaving chunk's ids) are both read from the folded dimension."""
    layers, window_ids = layer_states(device, lola_states, tokens_seen, cache_heads)
    stacked = {name: torch.stack([memory[name] for memory, _, _ in layers]) for name in STATE_NAMES}
    fmaps = torch.stack([fmap for _, fmap, _ in layers])
    stacked_ids = torch.stack([ids for _, _, ids in layers])
    seen = torch.tensor([tokens_seen], device=device) if device_seen else tokens_seen
    leaving = window_ids[:, :CHUNK]

    scores = evict_triton.candidate_scores(*(stacked[n] for n in STATE_NAMES), fmaps, seen, policy)
    alone = [
        evict_triton.candidate_scores(*(m[n] for n in STATE_NAMES), f, seen, policy) for m, f, _ in layers
    ]
    same(scores, torch.stack(alone))
    assert torch.isfinite(scores).any()

    # The shipped pooling (powers and neighbours), which the captured step applies to these scores.
    ranking = joint_ranking(scores, LolaSettings(policy="joint-" + policy, joint_power=4, joint_span=1))
    h_before = stacked["h"].clone()
    *_, keep = evict_triton.evict(
        *(stacked[n] for n in STATE_NAMES), fmaps, seen, policy, cache_ids=stacked_ids, leaving_ids=leaving,
        scores=ranking.expand_as(scores),
    )  # fmt: skip
    assert not torch.equal(stacked["h"], h_before), "the eviction folds some pair"
    for layer, (memory, fmap, ids) in enumerate(layers):
        *_, kept = evict_triton.evict(
            *(memory[n] for n in STATE_NAMES), fmap, seen, policy, cache_ids=ids, leaving_ids=leaving,
            scores=ranking,
        )  # fmt: skip
        same(keep[layer], kept)
        same(stacked_ids[layer], ids)
        for name in STATE_NAMES:
            same(stacked[name][layer], memory[name])
