"""Transformer.pack_projections: q/k/v and gate/up each in one GEMM, with the norms, the gating and the
residual adds fused into the projections (``fused_linear``), computing what the separate projections
compute, with the separate weights kept as views into the packed ones."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the fused GEMV test runs its kernel in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lola_chat.linearization import load_linearization, save_linearization  # noqa: E402
from lola_chat.linearize import lora  # noqa: E402
from lola_chat.linearize.teacher import capture_attention  # noqa: E402
from lola_chat.memory import LolaSettings  # noqa: E402
from lola_chat.model import ModelConfig, Transformer  # noqa: E402

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate=48)
# Small chunks, so that a few tokens already evict into the sparse cache and the hidden state.
SETTINGS = LolaSettings(chunk=4, capacity=4)
# fp32 GEMMs of another width may sum in another order.
TIGHT = dict(atol=1e-5, rtol=1e-5)


def random_model(seed: int, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CFG).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():  # feature maps away from the identity, so that the hidden state matters
        for block in model.layers:
            block.self_attn.fmap_q.add_(torch.randn_like(block.self_attn.fmap_q) / 4)
            block.self_attn.fmap_k.add_(torch.randn_like(block.self_attn.fmap_k) / 4)
    return model


def twin(model: Transformer) -> Transformer:
    copy = random_model(seed=99, dtype=model.embed_tokens.weight.dtype)
    copy.load_state_dict(model.state_dict())
    return copy


def run(model: Transformer, prompt: int = 19, decode: int = 6):
    """Logits of a prefill and of each decoded token, and the LoLA state after them."""
    tokens = torch.randint(
        0, CFG.vocab_size, (2, prompt + decode), generator=torch.Generator().manual_seed(1)
    )
    state = model.new_state("lola", SETTINGS, batch=2)
    with torch.no_grad():
        logits = [model(tokens[:, :prompt], state)]
        logits += [model(tokens[:, i : i + 1], state) for i in range(prompt, prompt + decode)]
    return torch.cat(logits, dim=1), state.tensors()


def assert_same_run(a, b, **tolerance):
    torch.testing.assert_close(a[0], b[0], **tolerance)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **tolerance, msg=name)


def test_packed_model_computes_what_the_separate_projections_do():
    model = random_model(0)
    plain = twin(model)
    state = run(plain)
    assert state[1]["layers.0.h"].abs().sum() > 0, "the hidden state took no tokens"
    assert_same_run(run(model.pack_projections()), state, **TIGHT)


def storages(model: Transformer) -> dict[int, int]:
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_the_projections_become_views_of_the_packed_weight():
    model = random_model(0)
    names = [name for name, _ in model.named_parameters()]
    keys = list(model.state_dict())
    weights = {name: p.clone() for name, p in model.named_parameters()}
    before = sum(storages(model).values())
    model.pack_projections()
    assert [name for name, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert sum(storages(model).values()) == before, "packing stores a weight twice"
    for block in model.layers:
        for packed, parts in (
            (
                block.self_attn.qkv_proj,
                (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj),
            ),
            (block.mlp.gate_up_proj, (block.mlp.gate_proj, block.mlp.up_proj)),
        ):
            offset = packed.weight.data_ptr()
            for part in parts:
                assert part.weight.data_ptr() == offset and not part.weight.requires_grad
                offset += part.weight.nbytes
            assert offset == packed.weight.data_ptr() + packed.weight.nbytes


def test_packing_twice_is_harmless():
    model = random_model(0)
    once = run(twin(model).pack_projections())
    model.pack_projections().pack_projections()
    assert (
        model.layers[1].self_attn.q_proj.weight.data_ptr()
        == model.layers[1].self_attn.qkv_proj.weight.data_ptr()
    )
    assert_same_run(run(model), once, atol=0, rtol=0)


def test_packing_again_after_a_cast_shares_again():
    model = random_model(0).pack_projections().double()
    attn = model.layers[0].self_attn
    assert (
        attn.k_proj.weight.untyped_storage().data_ptr() != attn.qkv_proj.weight.untyped_storage().data_ptr()
    )
    model.pack_projections()
    assert (
        attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_proj.weight.untyped_storage().data_ptr()
    )
    assert attn.qkv_proj.weight.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_state_dict_loaded_after_packing_reaches_the_packed_gemm(dtype):
    # bf16 on a CPU runs the packed GEMM on a oneDNN copy of the weight, which must be remade too.
    model = random_model(0, dtype).pack_projections()
    run(model)
    other = random_model(1, dtype)
    expected = run(twin(other).pack_projections())
    model.load_state_dict(other.state_dict())
    assert_same_run(run(model), expected, atol=0, rtol=0)


def test_a_linearization_merged_after_packing_reaches_the_packed_gemm(tmp_path):
    base = random_model(0)
    factors = {
        f"layers.{i}.self_attn.{name}": (torch.randn(2, CFG.dim), torch.randn(out, 2) / 10)
        for i in range(CFG.n_layers)
        for name, out in (("q_proj", CFG.n_heads * CFG.head_dim), ("v_proj", CFG.n_kv_heads * CFG.head_dim))
    }
    save_linearization(random_model(1), tmp_path, factors, 4.0, 2, SETTINGS, {})
    packed, plain = twin(base).pack_projections(), twin(base)
    load_linearization(packed, tmp_path)
    load_linearization(plain, tmp_path)
    assert_same_run(run(packed), run(plain), **TIGHT)


def test_lora_adapters_bypass_the_packed_weight():
    # lola-chat linearize trains LoRA on a loaded (packed) model: the adapters must take effect.
    model, plain = random_model(0), random_model(0)
    model.pack_projections()
    for m in (model, plain):
        torch.manual_seed(3)
        for param in lora.attach(m, rank=2, alpha=4.0):
            param.data.normal_()
    x = torch.randn(1, 5, CFG.dim)
    with torch.no_grad():
        for got, expected in zip(
            model.layers[0].self_attn.project(x), plain.layers[0].self_attn.project(x), strict=True
        ):
            torch.testing.assert_close(got, expected, **TIGHT)
        lora.detach(model)
        lora.detach(plain)
        assert_same_run(run(model), run(plain), **TIGHT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors stand in for CUDA ones in the interpreter")
def test_decoding_through_the_triton_gemv_computes_what_the_separate_projections_do(monkeypatch):
    triton = pytest.importorskip("triton")
    from lola_chat.kernels import gemv
    from lola_chat.kernels.gemv import gemv_triton

    launched = []
    kernel = gemv_triton.fused_linear

    def one_tiling(*args, **kwargs):  # tiles smaller than the shapes, so masked edges are exercised
        launched.append(args[1].shape)
        return kernel(*args, **kwargs, config=triton.Config({"BLOCK_N": 32, "BLOCK_K": 16}))

    monkeypatch.setattr(gemv_triton, "fused_linear", one_tiling)
    monkeypatch.setattr(gemv, "fast_path", lambda *tensors: True)
    model = random_model(0)
    expected = run(twin(model), decode=3)
    # Unpacked, only the head (one module with its norm either way) runs the GEMV: once per decoded token.
    assert len(launched) == 3
    launched.clear()
    got = run(model.pack_projections(), decode=3)
    # Each decoded token (two rows): four GEMVs per layer and the head's; the prefill has too many rows.
    assert len(launched) == 3 * (4 * CFG.n_layers + 1)
    assert_same_run(got, expected, **TIGHT)


def test_the_window_factor_is_computed_once_per_value_of_its_logit():
    model = random_model(0).pack_projections()
    attn = model.layers[0].self_attn
    with torch.no_grad():
        attn.window_logit.normal_()
        first = attn.window_factor()
        assert attn.window_factor() is first
        torch.testing.assert_close(first, torch.sigmoid(attn.window_logit), atol=0, rtol=0)
        attn.window_logit.add_(1.0)  # in place, as a linearization loaded after packing writes it
        second = attn.window_factor()
    assert second is not first
    torch.testing.assert_close(second, torch.sigmoid(attn.window_logit), atol=0, rtol=0)
    assert model.double().layers[0].self_attn.window_factor().dtype == torch.float64
    attn.window_logit = torch.nn.Parameter(torch.ones_like(attn.window_logit), requires_grad=False)
    torch.testing.assert_close(attn.window_factor(), torch.sigmoid(attn.window_logit), atol=0, rtol=0)
    attn.window_logit.requires_grad_(True)  # trained (linearize): computed on every call, for autograd
    attn.window_factor().sum().backward()
    assert attn.window_logit.grad is not None and attn.window_factor() is not attn.window_factor()


def test_the_teacher_captures_the_same_attention_from_a_packed_model():
    # lola-chat linearize trains on a loaded (packed) model, whose norms run inside the q/k/v GEMM.
    model = random_model(0)
    plain = twin(model)
    model.pack_projections()
    tokens = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    captured, expected = capture_attention(model, tokens), capture_attention(plain, tokens)
    assert [len(part) for part in captured] == [CFG.n_layers, CFG.n_layers]
    for got, want in zip([*captured[0], *captured[1]], [*expected[0], *expected[1]], strict=True):
        torch.testing.assert_close(got, want, **TIGHT)
    with torch.no_grad():
        first = model.layers[0].input_layernorm(model.embed_tokens(tokens))
    torch.testing.assert_close(captured[0][0], first, atol=0, rtol=0)
