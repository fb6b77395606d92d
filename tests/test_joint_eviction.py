"""Joint eviction policies ("joint-" + a recall policy): one choice of positions for the whole model."""

import pytest
import torch
from lola_chat.kernels.lola import evict_reference
from test_invariants import HKV, HQ, D, new_memory, random_attn, random_qkv, tiny_model

from lola_chat.errors import LolaError
from lola_chat.graphs import CapturedDecoder
from lola_chat.memory import LolaSettings, close_chunk_jointly

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


@pytest.mark.parametrize("split", [0, 1, 3, 4, 5, 17, 30])
def test_joint_prefill_equals_split_prefill_then_decode(split):
    model = tiny_model(seed=4)
    tokens = torch.randint(0, 97, (2, 41))
    with torch.no_grad():
        whole = model.new_state("lola", JOINT, batch=2)
        expected = model(tokens, whole)
        state = model.new_state("lola", JOINT, batch=2)
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
