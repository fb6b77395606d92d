"""``evict_reference.evict``'s cheaper CPU path (fold only the pairs that leave) computes what the plain
formula computes: score every candidate, keep the top G, fold every valid candidate not kept, with a
0/1 mask over all G + C candidates. Selections and moved keys are exact; H and s may differ only by
the order of the fp32 (or float64) sums."""

import pytest
import torch
from lola_chat.kernels.lola import evict_reference, reference

# Tolerance of H and s: the same terms, summed in another order.
SUM_ORDER_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}


def cache_recall_by_definition(k, v, valid):
    """For each candidate: the value distance to the valid other candidate with the nearest key."""
    error = torch.linalg.vector_norm(v.double(), dim=-1)
    for b, head, i in torch.cartesian_prod(*(torch.arange(n) for n in k.shape[:3])).tolist():
        others = [j for j in range(k.shape[2]) if valid[j] and j != i]
        if others:
            key = k[b, head].double()
            nearest = min(others, key=lambda j: float(torch.dist(key[i], key[j])))
            error[b, head, i] = torch.dist(v[b, head, i].double(), v[b, head, nearest].double())
    return error


def evict_by_definition(win_k, win_v, cache_k, cache_v, h, s, fmap_k, tokens_seen, policy, generator):
    chunk, capacity, n_heads = win_k.shape[2] // 2, cache_k.shape[2], cache_k.shape[1]
    cached, previous, _ = reference.frame(tokens_seen - 1, chunk, capacity)
    keep = None
    if previous:
        group = n_heads // win_k.shape[1]
        cand_k = torch.cat([cache_k, win_k[:, :, :chunk].repeat_interleave(group, dim=1)], dim=2)
        cand_v = torch.cat([cache_v, win_v[:, :, :chunk].repeat_interleave(group, dim=1)], dim=2)
        valid = torch.arange(capacity + chunk) >= capacity - cached
        phi = reference.hedgehog(cand_k, fmap_k)
        kept = torch.zeros(cand_v.shape[:3], dtype=torch.bool)
        if capacity:
            if policy in evict_reference.RECALL_POLICIES:
                score = evict_reference.self_recall_error(phi, cand_v, h, s)
                if policy.startswith("relative-"):
                    score = score / cand_v.to(score.dtype).norm(dim=-1)
                if policy.endswith("novelty"):
                    recall = cache_recall_by_definition(cand_k, cand_v, valid).to(score.dtype)
                    score = torch.minimum(score, recall)
            elif policy == "random":
                score = torch.rand(cand_v.shape[:3], generator=generator)
            else:
                score = torch.arange(capacity + chunk, dtype=torch.float32).expand(cand_v.shape[:3])
            score = score.masked_fill(~valid, float("-inf"))
            keep = score.sort(dim=-1, descending=True, stable=True).indices[..., :capacity].sort(-1).values
            index = keep[..., None].expand(-1, -1, -1, cand_k.shape[-1])
            cache_k, cache_v = cand_k.gather(2, index), cand_v.gather(2, index)
            kept = kept.scatter(2, keep, True)
        folded = phi * (valid & ~kept).to(phi.dtype)[..., None]
        h = h + folded.transpose(-1, -2) @ cand_v.to(h.dtype)
        s = s + folded.sum(dim=2)
    win_k = torch.cat([win_k[:, :, chunk:], win_k[:, :, chunk:]], dim=2)
    win_v = torch.cat([win_v[:, :, chunk:], win_v[:, :, chunk:]], dim=2)
    return win_k, win_v, cache_k, cache_v, h, s, keep


def memory_before_eviction(dtype, batch, heads, kv_heads, dim, chunk, capacity, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = reference.accumulator(dtype)
    win_k = torch.randn(batch, kv_heads, 2 * chunk, dim, generator=g).to(dtype)
    win_v = torch.randn(batch, kv_heads, 2 * chunk, dim, generator=g).to(dtype)
    cache_k = torch.randn(batch, heads, capacity, dim, generator=g).to(dtype)
    cache_v = torch.randn(batch, heads, capacity, dim, generator=g).to(dtype)
    h = torch.rand(batch, heads, 2 * dim, dim, generator=g).to(acc)
    s = torch.rand(batch, heads, 2 * dim, generator=g).to(acc) + 1
    fmap_k = (torch.randn(heads, dim, dim, generator=g) * 0.3).to(dtype)
    return [win_k, win_v, cache_k, cache_v, h, s], fmap_k


CASES = [
    # (tokens_seen, chunk, capacity, heads, kv_heads, dim, batch)
    pytest.param(8, 8, 16, 4, 2, 8, 2, id="nothing-leaves-yet"),
    pytest.param(16, 8, 16, 4, 2, 8, 2, id="cache-empty"),
    pytest.param(24, 8, 20, 4, 2, 8, 1, id="cache-partly-full"),
    pytest.param(32, 8, 20, 4, 2, 8, 2, id="G-not-a-multiple-of-C"),
    pytest.param(80, 8, 20, 6, 3, 16, 2, id="steady"),
    pytest.param(80, 8, 5, 4, 1, 8, 1, id="G-below-C"),
    pytest.param(80, 8, 0, 4, 2, 8, 2, id="G0"),
]


def assert_same_eviction(got, expected, dtype):
    *memory, keep = got
    *ref_memory, ref_keep = expected
    for name, value, ref in zip(("win_k", "win_v", "cache_k", "cache_v"), memory, ref_memory, strict=False):
        assert torch.equal(value, ref), name
    tol = SUM_ORDER_TOL[dtype]
    torch.testing.assert_close(memory[4], ref_memory[4], atol=tol, rtol=tol)
    torch.testing.assert_close(memory[5], ref_memory[5], atol=tol, rtol=tol)
    assert (keep is None) == (ref_keep is None)
    if keep is not None:
        assert torch.equal(keep, ref_keep)


@pytest.mark.parametrize("policy", [*evict_reference.RECALL_POLICIES, "random", "recent"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens_seen", "chunk", "capacity", "heads", "kv_heads", "dim", "batch"), CASES)
def test_evict_equals_the_masked_definition(tokens_seen, chunk, capacity, heads, kv_heads, dim, batch, dtype,
                                            policy):  # fmt: skip
    memory, fmap_k = memory_before_eviction(dtype, batch, heads, kv_heads, dim, chunk, capacity)
    got = evict_reference.evict(*memory, fmap_k, tokens_seen, policy, torch.Generator().manual_seed(1))
    expected = evict_by_definition(*memory, fmap_k, tokens_seen, policy, torch.Generator().manual_seed(1))
    assert_same_eviction(got, expected, dtype)


def test_evict_folds_nothing_while_the_cache_has_room():
    memory, fmap_k = memory_before_eviction(torch.float32, 2, 4, 2, 8, chunk=8, capacity=20)
    *_, h, s, keep = evict_reference.evict(*memory, fmap_k, tokens_seen=16)
    assert torch.equal(h, memory[4]) and torch.equal(s, memory[5])
    assert keep.shape == (2, 4, 20)


def test_evict_at_G0_is_differentiable():
    memory, fmap_k = memory_before_eviction(torch.float32, 1, 4, 2, 8, chunk=8, capacity=0)
    fmap_k.requires_grad_(True)
    *_, h, s, _ = evict_reference.evict(*memory, fmap_k, tokens_seen=32)
    (h.sum() + s.sum()).backward()
    assert fmap_k.grad is not None and torch.isfinite(fmap_k.grad).all()


def new_chunk(memory, chunk, seed):
    """The memory after eviction with a fresh current chunk written in (what attend would do)."""
    g = torch.Generator().manual_seed(seed)
    win_k, win_v, *rest = memory
    fresh = [torch.randn(x[:, :, chunk:].shape, generator=g).to(x.dtype) for x in (win_k, win_v)]
    return [torch.cat([x[:, :, :chunk], y], dim=2) for x, y in zip((win_k, win_v), fresh, strict=True)] + rest


@pytest.mark.parametrize("policy", [*evict_reference.RECALL_POLICIES, "random", "recent"])
@pytest.mark.parametrize(
    ("chunk", "capacity", "heads", "kv_heads", "batch"),
    [(8, 20, 4, 2, 2), (8, 16, 6, 3, 1), (8, 5, 4, 1, 2), (8, 0, 4, 2, 1)],
    ids=["G-not-a-multiple-of-C", "steady", "G-below-C", "G0"],
)
def test_kept_key_features_give_the_same_evictions(chunk, capacity, heads, kv_heads, batch, policy):
    """Evictions from an empty cache through a full one, with and without the kept features."""
    memory, fmap_k = memory_before_eviction(torch.bfloat16, batch, heads, kv_heads, 8, chunk, capacity)
    plain, reused = list(memory), list(memory)
    features = evict_reference.CacheMemo()
    with torch.inference_mode():
        for step in range(1, 8):
            seen = step * chunk
            generator = torch.Generator().manual_seed(step)
            expected = evict_reference.evict(*plain, fmap_k, seen, policy, generator)
            got = evict_reference.evict(
                *reused, fmap_k, seen, policy, torch.Generator().manual_seed(step), features
            )
            assert_same_eviction(got, expected, torch.bfloat16)
            plain, reused = new_chunk(expected[:6], chunk, step), new_chunk(got[:6], chunk, step)
            if capacity and step >= 2:
                assert features.get(got[2], fmap_k) is not None


def test_kept_key_features_serve_only_the_unchanged_cache_and_feature_map():
    memory, fmap_k = memory_before_eviction(torch.float32, 1, 4, 2, 8, chunk=8, capacity=16)
    features = evict_reference.CacheMemo()
    cache_k = evict_reference.evict(*memory, fmap_k, 32, memo=features)[2]
    kept = features.get(cache_k, fmap_k)
    torch.testing.assert_close(kept, reference.hedgehog(cache_k, fmap_k), atol=1e-6, rtol=1e-6)
    assert features.get(cache_k.clone(), fmap_k) is None
    assert features.get(cache_k, fmap_k.clone()) is None
    fmap_k.mul_(2)
    assert features.get(cache_k, fmap_k) is None
    features.keep(cache_k, fmap_k, kept)
    cache_k[:, :, 0] = 0
    assert features.get(cache_k, fmap_k) is None


def test_nothing_is_kept_while_autograd_records():
    memory, fmap_k = memory_before_eviction(torch.float32, 1, 4, 2, 8, chunk=8, capacity=16)
    fmap_k.requires_grad_(True)
    features = evict_reference.CacheMemo()
    cache_k = evict_reference.evict(*memory, fmap_k, 32, memo=features)[2]
    assert features.get(cache_k, fmap_k) is None


def attention_weights(heads, dim, g):
    """What a memory reads of its attention layer: feature maps, window factors, rotary frequencies."""
    from types import SimpleNamespace

    return SimpleNamespace(
        fmap_q=torch.randn(heads, dim, dim, generator=g) * 0.5,
        fmap_k=torch.randn(heads, dim, dim, generator=g) * 0.5,
        window_factor=lambda: torch.full((heads,), 0.5),
        inv_freq=1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim),
    )


def test_a_memory_keeping_features_attends_as_one_that_forgets_them():
    """A memory reloaded from its own tensors before every call forgets what it kept."""
    from lola_chat.memory import LolaMemory, LolaSettings

    g = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, chunk = 4, 2, 8, 8
    attn = attention_weights(heads, dim, g)
    settings = LolaSettings(chunk=chunk, capacity=12)
    kept, forgetful = (
        LolaMemory(2, heads, kv_heads, dim, 2 * dim, settings, torch.float32, "cpu") for _ in "ab"
    )
    with torch.inference_mode():
        for length in (5, 11, 8, 16, 3, 21):
            q = torch.randn(2, heads, length, dim, generator=g)
            k, v = (torch.randn(2, kv_heads, length, dim, generator=g) for _ in "kv")
            forgetful.load(forgetful.tensors(), forgetful.tokens_seen)
            torch.testing.assert_close(kept.attend(q, k, v, attn), forgetful.attend(q, k, v, attn))
    for name in LolaMemory.memory_names:
        torch.testing.assert_close(getattr(kept, name), getattr(forgetful, name), atol=1e-5, rtol=1e-5)


def test_a_restored_checkpoint_keeps_what_its_memory_kept(monkeypatch):
    """A state restored from a checkpoint (another state's, as the bench and regenerate restore) evicts
    from what the checkpointed memory kept, not a full search, and goes on exactly as the original."""
    from lola_chat.memory import LolaMemory, LolaSettings, State

    g = torch.Generator().manual_seed(4)
    heads, kv_heads, dim, chunk = 4, 2, 8, 8
    attn = attention_weights(heads, dim, g)
    settings = LolaSettings(chunk=chunk, capacity=12, policy="relative-novelty")
    original, restored, forgetful = (
        State([LolaMemory(1, heads, kv_heads, dim, 2 * dim, settings, torch.bfloat16, "cpu")]) for _ in "abc"
    )

    def feed(state, length, seed):
        r = torch.Generator().manual_seed(seed)
        q = torch.randn(1, heads, length, dim, generator=r).bfloat16()
        k, v = (torch.randn(1, kv_heads, length, dim, generator=r).bfloat16() for _ in "kv")
        return state.layers[0].attend(q, k, v, attn)

    searches = []
    full_search = evict_reference.nearest_keys
    monkeypatch.setattr(
        evict_reference,
        "nearest_keys",
        lambda k, valid, known=None: searches.append(known is None) or full_search(k, valid, known),
    )
    with torch.inference_mode():
        for seed in range(6):
            feed(original, 8, seed)
        checkpoint = original.checkpoint()
        forgetful.load(*checkpoint[:2])
        restored.restore(checkpoint)
        searches.clear()
        for seed in range(6, 9):
            expected = feed(forgetful, 8, seed)
            torch.testing.assert_close(feed(restored, 8, seed), expected, atol=0, rtol=0)
            torch.testing.assert_close(feed(original, 8, seed), expected, atol=0, rtol=0)
    # Searches alternate: the forgetful state's first is full, everything else was kept.
    assert searches and searches.count(True) == 1, "after the restore, searches started from what was kept"
    for name, tensor in forgetful.tensors().items():
        assert torch.equal(restored.tensors()[name], tensor), name
        assert torch.equal(original.tensors()[name], tensor), name


def test_cache_recall_error_is_zero_for_a_duplicate_and_the_value_norm_for_a_lone_pair():
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 1, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)
    k[..., 3, :], v[..., 3, :] = k[..., 1, :], v[..., 1, :]
    valid = torch.tensor([False, True, True, True, True])
    error = evict_reference.cache_recall_error(k, v, valid)
    assert error[0, 0, 1] == 0 and error[0, 0, 3] == 0
    assert error[0, 0, 2] > 0
    torch.testing.assert_close(error, cache_recall_by_definition(k, v, valid).float())
    alone = torch.tensor([False, False, True, False, False])
    torch.testing.assert_close(evict_reference.cache_recall_error(k, v, alone)[0, 0, 2], v[0, 0, 2].norm())


def test_cache_recall_error_with_tied_nearest_keys_matches_the_definition():
    # Duplicated keys far apart tie for nearest: the first of them is the one taken.
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    k[..., 40, :], k[..., 9, :] = k[..., 3, :], k[..., 3, :]
    valid = torch.arange(64) >= 5
    error = evict_reference.cache_recall_error(k, v, valid)
    torch.testing.assert_close(error, cache_recall_by_definition(k, v, valid).float())


@pytest.mark.parametrize("joint", [False, True], ids=["per-head", "joint"])
@pytest.mark.parametrize("repeats", [False, True], ids=["distinct", "repeated-keys"])
@pytest.mark.parametrize("chunk", [8, 1])
def test_kept_nearest_keys_give_the_full_search(joint, repeats, chunk):
    """Evictions through a filling then full cache: the nearest keys searched from those kept (only the
    leaving chunk's distances computed) are the full search's for every valid candidate, indices and
    distances, ties included (repeated keys: the leaving chunk repeats cached and leaving keys exactly).
    A chunk of 1 leaves a single key, alone among the candidates while the cache is empty."""
    capacity, heads, kv_heads = 20, 4, 2
    memory, fmap_k = memory_before_eviction(torch.bfloat16, 1, heads, kv_heads, 8, chunk, capacity)
    if joint:
        memory[2:4] = [x[:, :kv_heads] for x in memory[2:4]]
    memo = evict_reference.CacheMemo()
    used = 0
    with torch.inference_mode():
        for step in range(1, 10 if chunk > 1 else 40):
            seen = step * chunk
            win_k, win_v, cache_k, cache_v = memory[:4]
            if repeats and step > 2:
                win_k[:, :, 0] = cache_k[:, :kv_heads, -3]
                win_k[:, :, chunk - 1] = win_k[:, :, chunk // 2]
            cand_k = torch.cat(
                [
                    reference.expand_heads(cache_k, heads if not joint else kv_heads),
                    win_k[:, :, :chunk].repeat_interleave(1 if joint else heads // kv_heads, 1),
                ],
                2,
            )
            cached, _, _ = reference.frame(seen - 1, chunk, capacity)
            valid = torch.arange(capacity + chunk) >= capacity - cached
            known = memo.nearest(cache_k, fmap_k, valid[:capacity])
            if known is not None:
                used += 1
                full = evict_reference.nearest_keys(cand_k, valid)
                fast = evict_reference.nearest_keys(cand_k, valid, known)
                # Rows of empty slots are never ranked (their scores are -inf).
                assert torch.equal(fast[0][..., valid], full[0][..., valid])
                assert torch.equal(fast[1][..., valid], full[1][..., valid])
            score = None
            if joint:
                score = evict_reference.candidate_scores(*memory, fmap_k, seen, "relative-novelty", memo=memo)
                score = None if score is None else score.mean(dim=1, keepdim=True).expand_as(score)
            got = evict_reference.evict(*memory, fmap_k, seen, "relative-novelty", memo=memo, score=score)
            memory = new_chunk(got[:6], chunk, step)
    assert used >= 6


def test_fp32_keys_are_searched_in_full_at_every_eviction():
    """Sums of fp32 keys' products are not exact in any dtype here, so a kept search could break a tie
    otherwise than a full one: nothing is kept for them."""
    memory, fmap_k = memory_before_eviction(torch.float32, 1, 4, 2, 8, chunk=8, capacity=20)
    memo = evict_reference.CacheMemo()
    with torch.inference_mode():
        for step in range(1, 6):
            got = evict_reference.evict(*memory, fmap_k, step * 8, "relative-novelty", memo=memo)
            valid = torch.ones(20, dtype=torch.bool)
            assert memo.get(got[2], fmap_k) is not None or step == 1
            assert memo.nearest(got[2], fmap_k, valid) is None
            memory = new_chunk(got[:6], 8, step)


@pytest.mark.parametrize("changed", [None, "win_v", "fmap_k"])
def test_candidates_held_from_scoring_serve_only_an_eviction_of_the_same_tensors(changed):
    """``candidate_scores`` holds its candidates for the ``evict`` that follows; a tensor changed in place
    in between makes that eviction build them again (it then equals an eviction without the memo)."""
    memory, fmap_k = memory_before_eviction(torch.float32, 1, 4, 2, 8, chunk=8, capacity=16)
    memo = evict_reference.CacheMemo()
    score = evict_reference.candidate_scores(*memory, fmap_k, 32, "relative-novelty", memo=memo)
    if changed == "win_v":
        memory[1].mul_(2)
    elif changed == "fmap_k":
        fmap_k.mul_(2)
    got = evict_reference.evict(*memory, fmap_k, 32, "relative-novelty", memo=memo, score=score)
    expected = evict_reference.evict(*memory, fmap_k, 32, "relative-novelty", score=score)
    assert_same_eviction(got, expected, torch.float32)
    assert memo.take_scored((*memory[:4], fmap_k), 32) == (None, None), "held for one eviction only"


def test_pinned_candidates_are_kept_whatever_their_scores():
    # Head 0 pins a cached slot, and two leaving pairs, that its scores alone would not all keep; head 1
    # pins every candidate, more than G, and keeps the earliest of them.
    g = torch.Generator().manual_seed(2)
    batch, heads, chunk, capacity, dim = 1, 2, 8, 6, 16
    win_k, win_v = torch.randn(2, batch, 1, 2 * chunk, dim, generator=g)
    cache_k, cache_v = torch.randn(2, batch, heads, capacity, dim, generator=g)
    h = torch.randn(batch, heads, 2 * dim, dim, generator=g).abs()
    s = torch.randn(batch, heads, 2 * dim, generator=g).abs()
    fmap_k = torch.randn(heads, dim, dim, generator=g)
    memory = (win_k, win_v, cache_k, cache_v, h, s, fmap_k, 4 * chunk)
    pinned = torch.zeros(batch, heads, capacity + chunk, dtype=torch.bool)
    pinned[0, 0, [1, 7, 9]] = True
    pinned[0, 1, :] = True
    *_, keep = evict_reference.evict(*memory, "relative-novelty", pinned=pinned)
    assert {1, 7, 9} <= set(keep[0, 0].tolist())
    assert keep[0, 1].tolist() == list(range(capacity))
    *_, unpinned = evict_reference.evict(*memory, "relative-novelty")
    assert not {1, 7, 9} <= set(unpinned[0, 0].tolist()), "the case would pass without pinning"
