"""Joint eviction policies ("joint-" + a recall policy): one choice of positions for the whole model."""

import pytest
import torch
from lola_chat.kernels.lola import evict_reference
from test_invariants import HKV, HQ, D, new_memory, random_attn, random_qkv, tiny_model

from lola_chat.errors import LolaError, UsageError
from lola_chat.graphs import CapturedDecoder
from lola_chat.joint import close_chunk_jointly, joint_ranking
from lola_chat.memory import LolaMemory, LolaSettings

JOINT = LolaSettings(chunk=4, capacity=6, policy="joint-relative-novelty")


def positions(length, start=0):
    return torch.arange(start, start + length)[None]


def test_every_layer_and_head_keeps_the_same_positions_under_a_joint_policy():
    model = tiny_model(seed=3)
    tokens = torch.randint(0, 97, (1, 45))
    held = {}
    with torch.no_grad():
        for policy in ("relative-novelty", "joint-relative-novelty"):
            state = model.new_state("lola", LolaSettings(chunk=4, capacity=6, policy=policy))
            model(tokens, state, ids=positions(45))
            held[policy] = torch.stack([memory.cache_ids for memory in state.layers])
    joint = held["joint-relative-novelty"]
    assert (joint >= 0).all() and (joint == joint[:1, :, :1]).all()
    assert (joint[0, 0, 0].diff() > 0).all()
    # Chosen apart, the layers and heads of this model keep different positions.
    apart = held["relative-novelty"]
    assert not (apart == apart[:1, :, :1]).all()


def test_a_joint_eviction_keeps_the_top_mean_score_of_every_layer_and_head():
    chunk, capacity = 4, 6
    attns = [random_attn(seed=11), random_attn(seed=12)]
    memories = [new_memory(chunk, capacity, policy="joint-sre") for _ in attns]
    q, k, v = random_qkv(6 * chunk, seed=13)
    for start in range(0, 6 * chunk, chunk):
        piece = slice(start, start + chunk)
        for memory, attn in zip(memories, attns, strict=True):
            memory.attend(q[:, :, piece], k[:, :, piece], v[:, :, piece], attn, positions(chunk, start))
        if start + chunk < 6 * chunk:
            close_chunk_jointly(memories, attns)
    scores = []
    for memory, attn in zip(memories, attns, strict=True):
        cand = evict_reference._candidates(
            memory.win_k, memory.win_v, memory.cache_k, memory.cache_v, attn.fmap_k, memory.tokens_seen, None
        )
        scores.append(evict_reference.self_recall_error(cand[2], cand[1], memory.h, memory.s))
    mean = torch.stack(scores).mean(dim=(0, 2))
    keep = mean.topk(capacity, dim=-1).indices.sort(dim=-1).values
    expected = [memory._candidate_ids().gather(2, keep[:, None].expand(-1, HKV, -1)) for memory in memories]
    close_chunk_jointly(memories, attns)
    for memory, ids in zip(memories, expected, strict=True):
        assert torch.equal(memory.cache_ids, ids)
        assert memory.pending is None


def pooled_by_hand(scores, power, span):
    """``joint_ranking``'s (B, N) ranking computed one candidate at a time."""
    _, batch, _, n = scores.shape
    out = torch.full((batch, n), float("-inf"), dtype=scores.dtype)
    for b in range(batch):
        there = [j for j in range(n) if scores[0, b, 0, j] > float("-inf")]
        own = {j: (scores[:, b, :, j] ** power).mean() for j in there}
        for j in there:
            out[b, j] = max(own[i] for i in there if abs(i - j) <= span)
    return out


@pytest.mark.parametrize(("power", "span"), [(1, 0), (4, 0), (1, 1), (4, 1), (2, 3)])
def test_the_joint_ranking_pools_powers_over_layers_and_heads_then_neighbours(power, span):
    g = torch.Generator().manual_seed(41)
    scores = torch.rand(3, 2, HQ, 10, generator=g, dtype=torch.float64)
    scores[:, 0, :, :3] = float("-inf")  # a cache not yet full: its first slots are not there
    settings = LolaSettings(chunk=4, capacity=6, policy="joint-sre", joint_power=power, joint_span=span)
    ranking = joint_ranking(scores, settings)
    assert ranking.shape == (2, HQ, 10) and (ranking == ranking[:, :1]).all()
    torch.testing.assert_close(ranking[:, 0], pooled_by_hand(scores, power, span), rtol=1e-12, atol=0)
    assert (ranking[0, :, :3] == float("-inf")).all()


def test_a_high_power_ranks_a_pair_one_layer_recalls_badly_above_one_all_recall_fairly():
    scores = torch.full((4, 1, HQ, 2), 0.5, dtype=torch.float64)
    scores[:, :, :, 0] = 0.0
    scores[0, :, :, 0] = 1.6  # mean 0.4 < 0.5, but mean of fourth powers 1.64 > 0.0625
    by_mean, by_power = (
        joint_ranking(scores, LolaSettings(policy="joint-sre", joint_power=power))[0, 0] for power in (1, 4)
    )
    assert by_mean[0] < by_mean[1] and by_power[0] > by_power[1]


@pytest.mark.parametrize("span", [0, 1])
def test_a_span_keeps_the_neighbours_of_what_the_memory_keeps(span):
    """G = 3: when the second chunk (positions 4-7) leaves, position 5 stands out; with a span of 1 it
    is kept with both its neighbours, without one with what else scored best."""
    chunk, length = 4, 16
    attns = [random_attn(seed=51), random_attn(seed=52)]
    settings = LolaSettings(chunk=chunk, capacity=3, policy="joint-sre", joint_span=span)
    memories = [LolaMemory(2, HQ, HKV, D, 2 * D, settings, torch.float64, torch.device("cpu")) for _ in attns]
    q, k, v = random_qkv(length, seed=53)
    v[:, :, 5] *= 100.0  # a value nothing else recalls: the top score of every layer and head
    for start in range(0, length, chunk):
        piece = slice(start, start + chunk)
        for memory, attn in zip(memories, attns, strict=True):
            memory.attend(q[:, :, piece], k[:, :, piece], v[:, :, piece], attn, positions(chunk, start))
        if start + chunk < length:
            close_chunk_jointly(memories, attns)
    for memory in memories:
        kept = memory.cache_ids.tolist()
        assert all(5 in head for rows in kept for head in rows), "the outlier is kept"
        assert (kept == [[[4, 5, 6]] * HKV] * 2) == (span == 1)


def test_the_joint_pooling_is_recorded_only_where_it_changes_something():
    plain = LolaSettings(policy="joint-sre")
    pooled = LolaSettings(policy="joint-sre", joint_power=4, joint_span=1)
    per_head = LolaSettings(policy="sre", joint_power=4, joint_span=1)
    assert "joint_power" not in plain.as_dict() and "joint_span" not in per_head.as_dict()
    assert pooled.as_dict() | {"joint_power": 1, "joint_span": 0} == plain.as_dict() | {
        "joint_power": 1, "joint_span": 0
    }  # fmt: skip
    assert (pooled.as_dict()["joint_power"], pooled.as_dict()["joint_span"]) == (4, 1)
    # What was written before the fields existed reads back as the plain mean.
    assert LolaSettings(**plain.as_dict()) == plain and LolaSettings(**pooled.as_dict()) == pooled
    for bad in ({"joint_power": 0}, {"joint_power": 9}, {"joint_span": -1}):
        with pytest.raises(UsageError, match="joint pooling"):
            LolaSettings(policy="joint-sre", **bad)


def test_a_score_missing_in_some_layers_counts_as_zero_not_as_a_power_of_minus_infinity():
    scores = torch.ones(2, 1, HQ, 3, dtype=torch.float64)
    scores[1, :, :, 1] = float("-inf")
    settings = LolaSettings(policy="joint-sre", joint_power=4)
    assert joint_ranking(scores, settings)[0, 0].tolist() == [1.0, 0.5, 1.0]


@pytest.mark.parametrize("split", [0, 1, 3, 4, 5, 17, 30])
@pytest.mark.parametrize("pooling", [{}, {"joint_power": 4, "joint_span": 1}], ids=["mean", "pooled"])
def test_joint_prefill_equals_split_prefill_then_decode(split, pooling):
    model = tiny_model(seed=4)
    tokens = torch.randint(0, 97, (2, 41))
    settings = LolaSettings(chunk=4, capacity=6, policy="joint-relative-novelty", **pooling)
    with torch.no_grad():
        whole = model.new_state("lola", settings, batch=2)
        expected = model(tokens, whole)
        state = model.new_state("lola", settings, batch=2)
        logits = [model(tokens[:, :split], state)] if split else []
        logits += [model(tokens[:, t : t + 1], state) for t in range(split, 41)]
    torch.testing.assert_close(torch.cat(logits, 1), expected, rtol=1e-9, atol=1e-9)
    for name, tensor in whole.tensors().items():
        torch.testing.assert_close(state.tensors()[name], tensor, rtol=1e-9, atol=1e-9)


CUTS = [(0, 9, [(0, 4), (4, 8), (8, 9)]), (3, 2, [(0, 1), (1, 2)])]


@pytest.mark.parametrize(("seen", "length", "cuts"), CUTS)
def test_a_joint_state_cuts_a_forward_pass_at_chunk_ends(seen, length, cuts):
    model = tiny_model()
    state = model.new_state("lola", JOINT)
    if seen:
        with torch.no_grad():
            model(torch.randint(0, 97, (1, seen)), state)
    assert state.segments(length) == cuts
    per_head = model.new_state("lola", LolaSettings(chunk=4, capacity=6))
    assert per_head.segments(length) == [(0, length)]


def test_a_joint_memory_refuses_tokens_past_a_chunk_its_model_has_not_closed():
    memory = new_memory(4, 6, policy="joint-sre")
    q, k, v = random_qkv(6)
    with pytest.raises(LolaError, match="joint eviction"):
        memory.attend(q, k, v, random_attn())


def random_state(seed, cache_heads, chunk=4, capacity=6, batch=2):
    """(win_k, win_v, cache_k, cache_v, h, s) at a chunk end, random, fp64; the cache has ``cache_heads``."""
    g = torch.Generator().manual_seed(seed)
    win_k, win_v = (torch.randn(batch, HKV, 2 * chunk, D, generator=g, dtype=torch.float64) for _ in "kv")
    cache = (torch.randn(batch, cache_heads, capacity, D, generator=g, dtype=torch.float64) for _ in "kv")
    h = torch.rand(batch, HQ, 2 * D, D, generator=g, dtype=torch.float64)
    s = torch.rand(batch, HQ, 2 * D, generator=g, dtype=torch.float64) + 1.0
    return (win_k, win_v, *cache, h, s)


@pytest.mark.parametrize("policy", [*evict_reference.RECALL_POLICIES, "recent"])
def test_given_scores_rank_the_candidates_as_the_policy_does(policy):
    chunk, capacity, batch = 4, 6, 2
    state = (*random_state(21, HQ), random_attn(seed=22).fmap_k, 3 * chunk)
    score = evict_reference.candidate_scores(*state, policy)
    by_policy = evict_reference.evict(*state, policy)
    by_score = evict_reference.evict(*state, "random", score=score)
    assert score.shape == (batch, HQ, capacity + chunk) and torch.isfinite(score[..., capacity - 2 :]).all()
    for a, b in zip(by_policy, by_score, strict=True):
        assert torch.equal(a, b)


def test_captured_decoding_refuses_the_ablation_policies():
    model = tiny_model()
    with pytest.raises(LolaError, match="captured decoding runs the eviction policies"):
        CapturedDecoder(
            model, model.new_state("lola", LolaSettings(chunk=4, capacity=6, policy="random")), capture=False
        )


def test_a_joint_cache_is_kept_once_per_kv_head():
    joint = new_memory(4, 3 * 6, policy="joint-sre")
    per_head = new_memory(4, 6, policy="sre")
    assert joint.cache_k.shape == (2, HKV, 18, D) and joint.cache_ids.shape == (2, HKV, 18)
    assert joint.nbytes() == per_head.nbytes()


def test_a_joint_state_attends_as_its_cache_copied_to_every_query_head():
    model = tiny_model(seed=6)
    tokens = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        joint = model.new_state("lola", JOINT)
        model(tokens, joint)
        copied = model.new_state("lola", LolaSettings(chunk=4, capacity=6, policy="relative-novelty"))
        for memory, source in zip(copied.layers, joint.layers, strict=True):
            tensors = source.tensors()
            for name in ("cache_k", "cache_v", "cache_ids"):
                tensors[name] = tensors[name].repeat_interleave(HQ // HKV, dim=1)
            memory.load(tensors, source.tokens_seen)
        # Three tokens stay inside the chunk: no eviction, only attention reads the cache.
        nxt = tokens[:, :3]
        torch.testing.assert_close(model(nxt, copied), model(nxt, joint), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", ["relative-novelty", "novelty", "sre"])
def test_a_cache_per_kv_head_scores_as_that_cache_copied_to_every_query_head(policy):
    chunk = 4
    win_k, win_v, cache_k, cache_v, h, s = random_state(31, HKV, chunk)
    fmap_k = random_attn(seed=32).fmap_k
    per_kv = evict_reference.candidate_scores(win_k, win_v, cache_k, cache_v, h, s, fmap_k, 3 * chunk, policy)
    copied = [x.repeat_interleave(HQ // HKV, dim=1) for x in (cache_k, cache_v)]
    per_query = evict_reference.candidate_scores(win_k, win_v, *copied, h, s, fmap_k, 3 * chunk, policy)
    torch.testing.assert_close(per_kv, per_query, rtol=1e-12, atol=1e-12)
