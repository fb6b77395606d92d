"""The "window" normalizer measures the linear term against the window's best score: a cached key that
outscores the whole window takes the share of attention it would have in softmax, instead of being
drowned by the folded pairs as with the paper's "shared" normalizer."""

import pytest
import torch
from lola_chat.kernels import lola
from test_invariants import HQ, random_attn, random_qkv
from test_invariants import new_memory as make_memory


def filled_memory(margin: float):
    """A memory with pairs folded into H and s, whose newest cache slot holds a key aligned with the
    next query (``margin`` above every window score) and a value of all 7s."""
    attn = random_attn(seed=5)
    attn.inv_freq = torch.zeros_like(attn.inv_freq)  # no rotation, so the alignment survives positions
    memory = make_memory(chunk=4, capacity=4)
    q, k, v = random_qkv(40, seed=6)
    memory.attend(q, k, v, attn)
    assert memory.folded() > 0 and float(memory.s.abs().sum()) > 0
    query = torch.randn(
        2, HQ, 1, q.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(7)
    )
    window_scores = query @ memory.win_k.repeat_interleave(HQ // memory.win_k.shape[1], 1).transpose(-1, -2)
    unit = query / query.norm(dim=-1, keepdim=True)
    needed = (window_scores.amax() + margin) * q.shape[-1] ** 0.5 / query.norm(dim=-1, keepdim=True)
    memory.cache_k[:, :, -1:] = unit * needed
    memory.cache_v[:, :, -1:] = 7.0
    return memory, attn, query


def attend_one(memory, attn, query, normalizer="window"):
    return lola.attend(
        query, query[:, :: HQ // memory.win_k.shape[1]], query[:, :: HQ // memory.win_k.shape[1]],
        memory.win_k, memory.win_v, memory.cache_k, memory.cache_v, memory.h, memory.s,
        attn.fmap_q, attn.window_factor(), attn.inv_freq, memory.tokens_seen, None, normalizer,
    )[0]  # fmt: skip


def test_a_cached_key_far_above_the_window_takes_the_attention():
    memory, attn, query = filled_memory(margin=60.0)
    y = attend_one(memory, attn, query)
    torch.testing.assert_close(y, torch.full_like(y, 7.0), rtol=0, atol=1e-6)


def test_the_linear_share_shrinks_with_the_cached_keys_lead():
    distances = []
    for margin in (1.0, 4.0, 16.0):
        memory, attn, query = filled_memory(margin)
        distances.append(float((attend_one(memory, attn, query) - 7.0).abs().max()))
    assert distances[0] > distances[1] > distances[2]


def test_the_shared_normalizer_keeps_the_linear_share():
    memory, attn, query = filled_memory(margin=60.0)
    y = attend_one(memory, attn, query, "shared")
    assert float((y - 7.0).abs().max()) > 1e-2


def test_an_unknown_normalizer_is_refused():
    memory, attn, query = filled_memory(margin=1.0)
    with pytest.raises(ValueError, match="normalizer"):
        attend_one(memory, attn, query, "softmax")


def test_settings_refuse_an_unknown_normalizer_or_policy():
    from lola_chat.errors import UsageError
    from lola_chat.memory import LolaSettings

    with pytest.raises(UsageError, match="normalizer"):
        LolaSettings(normalizer="windows")
    with pytest.raises(UsageError, match="policy"):
        LolaSettings(policy="lru")


def attend_capped(memory, attn, query, linear_cap, h_scale=1.0):
    return lola.attend(
        query, query[:, :: HQ // memory.win_k.shape[1]], query[:, :: HQ // memory.win_k.shape[1]],
        memory.win_k, memory.win_v, memory.cache_k, memory.cache_v, memory.h * h_scale, memory.s * h_scale,
        attn.fmap_q, attn.window_factor(), attn.inv_freq, memory.tokens_seen, None, "window", linear_cap,
    )[0]  # fmt: skip


def test_a_linear_cap_weighs_the_hidden_state_as_if_it_held_that_many_pairs():
    memory, attn, query = filled_memory(margin=0.5)
    folded = memory.folded()
    capped = attend_capped(memory, attn, query, folded // 4)
    torch.testing.assert_close(capped, attend_capped(memory, attn, query, 0, (folded // 4) / folded))
    assert not torch.allclose(capped, attend_capped(memory, attn, query, 0))
    for no_effect in (folded, folded + 1):
        torch.testing.assert_close(
            attend_capped(memory, attn, query, no_effect), attend_capped(memory, attn, query, 0)
        )
