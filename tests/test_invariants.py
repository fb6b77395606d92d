"""The invariants of DESIGN.md, each as a test, on random tensors and on a tiny random Llama model."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lola_chat.kernels import lola

from lola_chat.memory import JOINT, POLICIES, LolaMemory, LolaSettings, State

HQ, HKV, D = 6, 2, 16


def random_attn(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    fmap_q = torch.randn(HQ, D, D, generator=g, dtype=dtype) * 0.5
    fmap_k = torch.randn(HQ, D, D, generator=g, dtype=dtype) * 0.5
    gate = torch.rand(HQ, generator=g, dtype=dtype) * 0.8 + 0.1
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    return SimpleNamespace(fmap_q=fmap_q, fmap_k=fmap_k, window_factor=lambda: gate, inv_freq=inv_freq)


def random_qkv(length, seed=1, batch=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HQ, length, D, generator=g, dtype=dtype)
    k = torch.randn(batch, HKV, length, D, generator=g, dtype=dtype)
    v = torch.randn(batch, HKV, length, D, generator=g, dtype=dtype)
    return q, k, v


def new_memory(chunk, capacity, batch=2, dtype=torch.float64, policy="sre", linear_cap=0):
    settings = LolaSettings(chunk=chunk, capacity=capacity, policy=policy, linear_cap=linear_cap)
    return LolaMemory(batch, HQ, HKV, D, 2 * D, settings, dtype, torch.device("cpu"))


def exact_softmax(q, k, v, inv_freq):
    pos = torch.arange(q.shape[2])
    return F.scaled_dot_product_attention(
        lola.rotate(q, pos, inv_freq), lola.rotate(k, pos, inv_freq), v, is_causal=True, enable_gqa=True
    )


def lolcats_hybrid(q, k, v, attn, chunk):
    """Window (previous + current chunk, causal) softmax plus linear attention over everything older,
    written directly from the definition with absolute positions."""
    length = q.shape[2]
    rep = HQ // HKV
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    pos = torch.arange(length)
    scores = lola.rotate(q, pos, attn.inv_freq) @ lola.rotate(k, pos, attn.inv_freq).transpose(-1, -2)
    scores = scores * D**-0.5
    qc, kc = pos[:, None] // chunk, pos[None, :] // chunk
    in_window = (kc >= qc - 1) & (pos[None, :] <= pos[:, None])
    folded = kc < qc - 1
    scores = scores.masked_fill(~in_window, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    gate = attn.window_factor()[None, :, None, None]
    phi_q, phi_k = lola.hedgehog(q, attn.fmap_q).double(), lola.hedgehog(k, attn.fmap_k).double()
    linear = (phi_q @ phi_k.transpose(-1, -2)) * folded
    numerator = gate * weights @ v + linear @ v
    return numerator / (gate * weights.sum(-1, keepdim=True) + linear.sum(-1, keepdim=True))


@pytest.mark.parametrize("chunk,capacity,length", [(8, 16, 32), (8, 16, 29), (16, 32, 63), (4, 0, 8)])
def test_equals_exact_softmax_while_everything_fits(chunk, capacity, length):
    assert ((length - 1) // chunk - 1) * chunk <= capacity
    attn = random_attn()
    q, k, v = random_qkv(length)
    y = new_memory(chunk, capacity).attend(q, k, v, attn)
    torch.testing.assert_close(y, exact_softmax(q, k, v, attn.inv_freq), rtol=1e-6, atol=1e-6)


def test_differs_from_softmax_once_tokens_are_folded():
    attn = random_attn()
    q, k, v = random_qkv(80)
    y = new_memory(8, 16).attend(q, k, v, attn)
    assert not torch.allclose(y, exact_softmax(q, k, v, attn.inv_freq), atol=1e-3)


@pytest.mark.parametrize("chunk,length", [(8, 70), (16, 64), (5, 33)])
def test_zero_capacity_is_the_lolcats_hybrid(chunk, length):
    attn = random_attn(seed=3)
    q, k, v = random_qkv(length, seed=4)
    y = new_memory(chunk, 0).attend(q, k, v, attn)
    # Feature maps, rotations and H are fp32 in the reference, so agreement is at fp32 level.
    torch.testing.assert_close(y, lolcats_hybrid(q, k, v, attn, chunk), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "capacity,policy,linear_cap",
    [
        (0, "sre", 0),
        (6, "sre", 0),
        (16, "sre", 0),
        (6, "novelty", 0),
        (16, "novelty", 12),
        (0, "sre", 12),
        (16, "relative-novelty", 12),
    ],
)
def test_prefill_equals_split_prefill_then_decode(capacity, policy, linear_cap):
    chunk, length = 8, 61
    attn = random_attn(seed=5)
    q, k, v = random_qkv(length, seed=6)
    whole = new_memory(chunk, capacity, policy=policy, linear_cap=linear_cap)
    y_whole = whole.attend(q, k, v, attn)
    for split in [0, 1, 7, 8, 9, 23, 40, 60]:
        memory = new_memory(chunk, capacity, policy=policy, linear_cap=linear_cap)
        parts = [memory.attend(q[:, :, :split], k[:, :, :split], v[:, :, :split], attn)]
        for t in range(split, length):
            parts.append(memory.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], attn))
        torch.testing.assert_close(torch.cat(parts, 2), y_whole, rtol=1e-10, atol=1e-10)
        for name in memory.names:
            torch.testing.assert_close(getattr(memory, name), getattr(whole, name), rtol=1e-10, atol=1e-10)


def test_state_bytes_never_change():
    chunk, capacity = 8, 16
    attn = random_attn()
    memory = new_memory(chunk, capacity, batch=1)
    q, k, v = random_qkv(2 * chunk + capacity, batch=1)
    memory.attend(q, k, v, attn)
    layout = {name: (t.shape, t.dtype) for name, t in memory.tensors().items()}
    size = sum(memory.nbytes().values())
    for step in range(49):
        q, k, v = random_qkv(2 * chunk + capacity, seed=10 + step, batch=1)
        memory.attend(q, k, v, attn)
        assert {name: (t.shape, t.dtype) for name, t in memory.tensors().items()} == layout
        assert sum(memory.nbytes().values()) == size
    assert memory.tokens_seen == 50 * (2 * chunk + capacity)
    assert memory.fill()["sparse_cache"] == capacity


def test_eviction_keeps_the_pairs_with_highest_self_recall_error():
    chunk, capacity = 8, 6
    attn = random_attn(seed=8)
    memory = new_memory(chunk, capacity, batch=1)
    q, k, v = random_qkv(3 * chunk - 1, seed=9, batch=1)
    memory.attend(q, k, v, attn)
    cand_k = torch.cat([memory.cache_k, memory.win_k[:, :, :chunk].repeat_interleave(HQ // HKV, 1)], 2)
    cand_v = torch.cat([memory.cache_v, memory.win_v[:, :, :chunk].repeat_interleave(HQ // HKV, 1)], 2)
    errors = lola.self_recall_error(lola.hedgehog(cand_k, attn.fmap_k), cand_v, memory.h, memory.s)
    last = torch.cat([q[:, :, -1:], k[:, :, -1:], v[:, :, -1:]], 1)
    memory.attend(last[:, :HQ], last[:, HQ : HQ + HKV], last[:, HQ + HKV :], attn)
    expected = cand_k.gather(
        2, errors.topk(capacity, -1).indices.sort(-1).values[..., None].expand(-1, -1, -1, D)
    )
    torch.testing.assert_close(memory.cache_k, expected)


@pytest.mark.parametrize("policy", [policy for policy in POLICIES if not policy.startswith(JOINT)])
def test_policies_fill_the_cache_in_time_order(policy):
    chunk, capacity = 4, 6
    memory = new_memory(chunk, capacity, batch=1, policy=policy)
    length = 40
    q, k, v = random_qkv(length, batch=1)
    ids = torch.arange(length)[None]
    memory.attend(q, k, v, random_attn(), ids)
    cached = memory.cache_ids[0]
    _, previous, current = lola.frame(length, chunk, capacity)
    first_in_window = length - previous - current
    assert (cached >= 0).all() and (cached < first_in_window).all()
    assert (cached.diff(dim=-1) > 0).all()
    if policy == "recent":
        expected = torch.arange(first_in_window - capacity, first_in_window)
        assert (cached == expected).all()


def tiny_model(seed=0):
    from lola_chat.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, intermediate=96)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.fmap_q.normal_(0, 0.5)
            block.self_attn.fmap_k.normal_(0, 0.5)
    return model


def test_model_equals_huggingface_llama_while_everything_fits():
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    c = model.cfg
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.dim,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads,
            intermediate_size=c.intermediate,
            rope_theta=c.rope_theta,
            rms_norm_eps=c.norm_eps,
            tie_word_embeddings=True,
        )
    ).double()
    linear_only = ("fmap", "window_logit", "lm_head")
    weights = {"model." + k: v for k, v in model.state_dict().items() if not any(n in k for n in linear_only)}
    hf.load_state_dict(weights, strict=False)
    hf.tie_weights()
    tokens = torch.randint(0, c.vocab_size, (2, 40))
    expected = hf(tokens).logits
    with torch.no_grad():
        for kind in ["softmax", "lola"]:
            logits = model(tokens, model.new_state(kind, LolaSettings(chunk=8, capacity=24), batch=2))
            torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_model_prefill_equals_decode_and_snapshot_round_trip_is_bit_identical(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(seed=1)
    settings = LolaSettings(chunk=4, capacity=6)
    tokens = torch.randint(0, 97, (1, 37))
    with torch.no_grad():
        whole = model.new_state("lola", settings)
        expected = model(tokens, whole)
        state = model.new_state("lola", settings)
        logits = [model(tokens[:, :10], state)]
        logits += [model(tokens[:, t : t + 1], state) for t in range(10, 37)]
        torch.testing.assert_close(torch.cat(logits, 1), expected, rtol=1e-9, atol=1e-9)

        save_file(state.tensors(), tmp_path / "s.safetensors")
        loaded = model.new_state("lola", settings)
        loaded.load(load_file(tmp_path / "s.safetensors"), state.tokens_seen)
        nxt = torch.tensor([[5, 6, 7, 8, 9]])
        assert torch.equal(model(nxt, loaded), model(nxt, state))


def test_checkpoint_restore_is_exact():
    model = tiny_model(seed=2)
    with torch.no_grad():
        state: State = model.new_state("lola", LolaSettings(chunk=4, capacity=6))
        model(torch.randint(0, 97, (1, 23)), state)
        saved = state.checkpoint()
        probe = torch.tensor([[1, 2, 3]])
        before = model(probe, state)
        model(torch.randint(0, 97, (1, 30)), state)
        state.restore(saved)
        assert torch.equal(model(probe, state), before)
