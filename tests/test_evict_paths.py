"""``reference.evict``'s cheaper CPU path (fold only the pairs that leave) computes what the plain
formula computes: score every candidate, keep the top G, fold every valid candidate not kept, with a
0/1 mask over all G + C candidates. Selections and moved keys are exact; H and s may differ only by
the order of the fp32 (or float64) sums."""

import pytest
import torch
from lola_chat.kernels.lola import reference

# Tolerance of H and s: the same terms, summed in another order.
SUM_ORDER_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}


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
            if policy == "sre":
                score = reference.self_recall_error(phi, cand_v, h, s)
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


@pytest.mark.parametrize("policy", ["sre", "random", "recent"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens_seen", "chunk", "capacity", "heads", "kv_heads", "dim", "batch"), CASES)
def test_evict_equals_the_masked_definition(tokens_seen, chunk, capacity, heads, kv_heads, dim, batch, dtype,
                                            policy):  # fmt: skip
    memory, fmap_k = memory_before_eviction(dtype, batch, heads, kv_heads, dim, chunk, capacity)
    got = reference.evict(*memory, fmap_k, tokens_seen, policy, torch.Generator().manual_seed(1))
    expected = evict_by_definition(*memory, fmap_k, tokens_seen, policy, torch.Generator().manual_seed(1))
    assert_same_eviction(got, expected, dtype)


def test_evict_folds_nothing_while_the_cache_has_room():
    memory, fmap_k = memory_before_eviction(torch.float32, 2, 4, 2, 8, chunk=8, capacity=20)
    *_, h, s, keep = reference.evict(*memory, fmap_k, tokens_seen=16)
    assert torch.equal(h, memory[4]) and torch.equal(s, memory[5])
    assert keep.shape == (2, 4, 20)


def test_evict_at_G0_is_differentiable():
    memory, fmap_k = memory_before_eviction(torch.float32, 1, 4, 2, 8, chunk=8, capacity=0)
    fmap_k.requires_grad_(True)
    *_, h, s, _ = reference.evict(*memory, fmap_k, tokens_seen=32)
    (h.sum() + s.sum()).backward()
    assert fmap_k.grad is not None and torch.isfinite(fmap_k.grad).all()
