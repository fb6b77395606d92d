"""The CPU fast paths compute what the plain formulas compute: rotary tables, the keys and values a
memory keeps prepared between calls, the cached layouts, the bf16 linear paths, the dtype choice."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lola_chat.kernels import int4
from lola_chat.kernels.dispatch import force_reference
from lola_chat.kernels.lola import evict_reference, reference

from lola_chat.config import DTYPE_ENV, default_dtype
from lola_chat.errors import UsageError
from lola_chat.linear import Linear
from lola_chat.memory import LolaMemory, LolaSettings
from lola_chat.model import ModelConfig, Transformer

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def rotate_by_definition(x, pos, inv_freq):
    angles = pos.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def inv_freq(dim=16):
    return 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_and_frame_tables_equal_the_definition(dtype):
    x = torch.randn(2, 3, 40, 16).to(dtype)
    pos = torch.arange(40) * 3 - 7
    assert torch.equal(reference.rotate(x, pos, inv_freq()), rotate_by_definition(x, pos, inv_freq()))
    frame = reference.FrameRotary(inv_freq(), chunk=8, capacity=16)
    for start in (-24, -3, 0, 5):
        consecutive = torch.arange(start, min(start + 40, frame.end))
        rows = x[:, :, : len(consecutive)]
        expected = rotate_by_definition(rows, consecutive, inv_freq())
        assert torch.equal(frame.rotate(rows, start), expected)


def random_state(dtype, batch=2, hq=6, hkv=2, d=16, chunk=8, capacity=16):
    acc = reference.accumulator(dtype)
    zeros = [torch.zeros(batch, hkv, 2 * chunk, d, dtype=dtype)] * 2 + [
        torch.zeros(batch, hq, capacity, d, dtype=dtype)
    ] * 2
    return zeros + [torch.zeros(batch, hq, 2 * d, d, dtype=acc), torch.zeros(batch, hq, 2 * d, dtype=acc)]


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [16, 0])
def test_kept_rotations_give_the_same_outputs_bit_for_bit(dtype, capacity, inference):
    """A memory's FrameRotary reuses rotated keys within a chunk; a fresh one each call recomputes all."""
    with torch.inference_mode(inference):
        kept_and_fresh_agree(dtype, capacity)


def kept_and_fresh_agree(dtype, capacity):
    chunk, hq, hkv, d = 8, 6, 2, 16
    g = torch.Generator().manual_seed(0)
    fmap_q, fmap_k = torch.randn(hq, d, d, generator=g), torch.randn(hq, d, d, generator=g)
    gate = torch.rand(hq, generator=g)
    kept = reference.FrameRotary(inv_freq(), chunk, capacity)
    fresh_state = random_state(dtype, capacity=capacity)
    kept_state = list(fresh_state)
    seen = 0
    for length in [3, 5, 1, 1, 2, 4, 8] + [1] * 20 + [8, 8, 5]:
        length = min(length, chunk - seen % chunk)
        q = torch.randn(2, hq, length, d, generator=g).to(dtype)
        k, v = (torch.randn(2, hkv, length, d, generator=g).to(dtype) for _ in range(2))
        y0, *fresh_state[:2] = reference.attend(q, k, v, *fresh_state, fmap_q, gate, inv_freq(), seen)
        y1, *kept_state[:2] = reference.attend(q, k, v, *kept_state, fmap_q, gate, inv_freq(), seen, kept)
        assert torch.equal(y0, y1) and torch.equal(fresh_state[0], kept_state[0])
        seen += length
        if seen % chunk == 0:
            *fresh_state, _ = evict_reference.evict(*fresh_state, fmap_k, seen)
            *kept_state, _ = evict_reference.evict(*kept_state, fmap_k, seen)
            kept.forget()


def test_layouts_made_in_inference_mode_serve_autograd_later():
    hq, hkv, d = 6, 2, 16
    fmap = torch.randn(hq, d, d)
    gate = torch.rand(hq)
    state = random_state(torch.float32)
    reference._layout.cache_clear()
    with torch.inference_mode():
        q, k, v = torch.randn(2, hq, 4, d), torch.randn(2, hkv, 4, d), torch.randn(2, hkv, 4, d)
        reference.attend(q, k, v, *state, fmap, gate, inv_freq(), 3)
    q = torch.randn(2, hq, 4, d, requires_grad=True)
    y, _, _ = reference.attend(q, k.clone(), v.clone(), *state, fmap, gate, inv_freq(), 3)
    y.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_default_dtype(monkeypatch):
    assert default_dtype(torch.device("cuda"), environ={}) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert default_dtype(torch.device("cpu"), environ={}) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert default_dtype(torch.device("cpu"), environ={}) == torch.bfloat16
    assert default_dtype(torch.device("cpu"), environ={DTYPE_ENV: "float32"}) == torch.float32
    assert default_dtype(torch.device("cuda"), environ={DTYPE_ENV: "float32"}) == torch.float32
    with pytest.raises(UsageError):
        default_dtype(torch.device("cpu"), environ={DTYPE_ENV: "int8"})


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64, 64), (2, 1, 64), (64,)])
def test_bf16_cpu_linear_equals_linear_within_bf16_rounding(shape):
    """One row (the matrix-vector path) and several (the prepacked oneDNN path): fp32 accumulation,
    one rounding to bf16, as F.linear."""
    torch.manual_seed(0)
    layer = Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(shape).to(torch.bfloat16)
    exact = F.linear(x.float(), layer.weight.float())
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 96)
        torch.testing.assert_close(y.float(), exact, rtol=2**-8, atol=1e-4)
        torch.testing.assert_close(y, F.linear(x, layer.weight), rtol=2**-7, atol=1e-4)


def test_bf16_cpu_linear_follows_weight_changes_and_trains():
    torch.manual_seed(0)
    layer = Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    for length in (1, 7):
        x = torch.randn(1, length, 64).to(torch.bfloat16)
        with torch.no_grad():
            layer(x)
            layer.weight.mul_(2.0)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), atol=4e-2, rtol=2e-2)
    layer.requires_grad_(True)
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("kept", [False, True, "decode"])
def test_slots_no_query_sees_may_hold_nan(kept):
    """Empty cache slots and stale window slots are never read: NaN there changes nothing, whether the
    memory's keys and values are prepared afresh, kept and extended by a later call, or kept by the CPU
    decode path (``decode``: the second token goes to kernels/lola/decode_cpu)."""
    chunk, capacity, seen = 8, 16, 19  # 8 of 16 cache slots in use, a previous chunk, 3 current tokens
    g = torch.Generator().manual_seed(0)
    fmap_q, gate = torch.randn(6, 16, 16, generator=g), torch.rand(6, generator=g)
    q = torch.randn(2, 6, 2, 16, generator=g)
    k, v = torch.randn(2, 2, 2, 2, 16, generator=g)
    state = random_state(torch.float32)
    clean = [torch.randn(t.shape, generator=g) for t in state[:4]] + state[4:]
    dirty = [t.clone() for t in clean]
    for window in dirty[:2]:
        window[:, :, chunk + seen % chunk :] = float("nan")
    for cache in dirty[2:4]:
        cache[:, :, : capacity - 8] = float("nan")
    outputs = []
    for memory in (clean, dirty):
        rotary = reference.FrameRotary(inv_freq(), chunk, capacity)
        if kept:
            _, *memory[:2] = reference.attend(
                q[:, :, :1], k[:, :, :1], v[:, :, :1], *memory, fmap_q, gate, inv_freq(), seen, rotary
            )
            step = (q[:, :, 1:], k[:, :, 1:], v[:, :, 1:])
            args = (*step, *memory, fmap_q, gate, inv_freq(), seen + 1, rotary)
            if kept == "decode":
                from lola_chat.kernels import lola

                with torch.inference_mode():
                    frame = lola.DecodeFrame()
                    outputs.append(lola.attend(*args, decode_frame=frame)[0])
                assert frame.ready_for is not None, "the decode path was taken"
            else:
                outputs.append(reference.attend(*args)[0])
        else:
            outputs.append(reference.attend(q, k, v, *memory, fmap_q, gate, inv_freq(), seen, rotary)[0])
    assert torch.isfinite(outputs[1]).all()
    assert torch.equal(outputs[0], outputs[1])


def test_fp32_state_loads_into_a_bf16_model_and_continues():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate=48)
    torch.manual_seed(0)
    model32 = Transformer(cfg).eval()
    model16 = Transformer(cfg).eval()
    model16.load_state_dict(model32.state_dict())
    model16.to(torch.bfloat16)
    tokens = torch.randint(0, 64, (1, 150))
    with torch.inference_mode():
        state32 = model32.new_state("lola")
        model32(tokens, state32)
        state16 = model16.new_state("lola")
        state16.load(state32.tensors(), state32.tokens_seen)
        assert state16.layers[0].win_k.dtype == torch.bfloat16
        assert state16.layers[0].h.dtype == torch.float32
        next_token = torch.tensor([[5]])
        logits16 = model16(next_token, state16)
        logits32 = model32(next_token, state32)
    assert torch.isfinite(logits16).all()
    assert torch.nn.functional.cosine_similarity(logits16.flatten(), logits32.flatten(), dim=0) > 0.99


def test_a_returned_window_is_never_changed_by_later_calls():
    """The reference's contract (it is trained through). The CPU decode path, like the Triton path, writes
    the memory's own window in place instead (``test_cpu_decode_steps_equal_the_reference``)."""
    with force_reference():
        returned_window_unchanged()


def returned_window_unchanged():
    attn = SimpleNamespace(
        fmap_q=torch.eye(16).expand(6, 16, 16).clone(),
        fmap_k=torch.eye(16).expand(6, 16, 16).clone(),
        window_factor=lambda: torch.full((6,), 0.5),
        inv_freq=inv_freq(),
    )
    memory = LolaMemory(
        1, 6, 2, 16, 32, LolaSettings(chunk=8, capacity=8), torch.float32, torch.device("cpu")
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        memory.attend(
            torch.randn(1, 6, 3, 16, generator=gen), *torch.randn(2, 1, 2, 3, 16, generator=gen), attn
        )
        held = {name: getattr(memory, name) for name in ("win_k", "win_v")}
        copies = {name: t.clone() for name, t in held.items()}
        for _ in range(2):
            memory.attend(
                torch.randn(1, 6, 1, 16, generator=gen), *torch.randn(2, 1, 2, 1, 16, generator=gen), attn
            )
    for name in held:
        assert torch.equal(held[name], copies[name]), name


def test_layouts_are_cached_per_frame_not_per_position():
    reference._layout.cache_clear()
    for seen in range(1000, 1000 + 64 * 20):
        reference.layout(64, 128, seen, 1, torch.device("cpu"))
    assert reference._layout.cache_info().currsize <= 64


def test_a_model_built_in_inference_mode_runs_and_follows_weight_changes():
    # Inference tensors have no version counter: nothing computed from them is kept, so a later in-place
    # change of a weight (a load under inference_mode) still takes effect.
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate=48)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = Transformer(cfg).to(torch.bfloat16).pack_projections()
        tokens = torch.randint(0, 64, (1, 9))
        first = model(tokens, model.new_state("lola", LolaSettings(chunk=4, capacity=4)))
        for block in model.layers:
            block.self_attn.window_logit.add_(1.0)
            block.mlp.down_proj.weight.mul_(2.0)
        second = model(tokens, model.new_state("lola", LolaSettings(chunk=4, capacity=4)))
    assert torch.isfinite(first).all() and not torch.equal(first, second)
    with torch.inference_mode():
        torch.manual_seed(0)
        fresh = Transformer(cfg).to(torch.bfloat16)
        fresh.load_state_dict(model.state_dict())
        expected = fresh(tokens, fresh.new_state("lola", LolaSettings(chunk=4, capacity=4)))
    torch.testing.assert_close(second, expected, atol=5e-2, rtol=5e-2)


needs_int4 = pytest.mark.skipif(not int4.available(), reason="this PyTorch lacks the packed int4 CPU product")


def four_bit_model(seed: int = 0) -> Transformer:
    from lola_chat.evals.bench import TINY_SHAPES, random_model

    torch.manual_seed(seed)
    return random_model(TINY_SHAPES, torch.device("cpu"), torch.bfloat16, four_bit=True)


def one_token_logits(model: Transformer, forced: bool) -> torch.Tensor:
    state = model.new_state("lola", LolaSettings(chunk=8, capacity=16))
    with torch.no_grad(), force_reference(forced):
        model(torch.arange(11)[None] * 7, state)
        return model(torch.tensor([[5]]), state)


@needs_int4
def test_four_bit_weights_decode_one_row_close_to_bf16_and_leave_prefill_alone():
    model = four_bit_model()
    attached = [linear for linear, _ in model.decode_projections() if linear.int4_weight() is not None]
    assert attached == [linear for linear, _ in model.decode_projections()][:-1], "all but the lm_head"
    # The attention's, with the LoRA merged into them (bench.random_model) kept as their correction.
    corrected = [linear for linear in attached if linear.int4_weight().low_rank is not None]
    attention = [(block.self_attn.qkv_proj, block.self_attn.o_proj) for block in model.layers]
    assert corrected == [linear for pair in attention for linear in pair]
    four_bit, bf16 = one_token_logits(model, forced=False), one_token_logits(model, forced=True)
    assert not torch.equal(four_bit, bf16), "the one-row products ran in four bits"
    torch.testing.assert_close(four_bit, bf16, rtol=0.05, atol=0.05 * bf16.abs().max().item())
    down = model.layers[0].mlp.down_proj
    rows = torch.randn(1, 5, down.in_features).bfloat16()
    with torch.no_grad(), force_reference():
        expected = down(rows)
    assert torch.equal(down(rows), expected), "several rows keep the bf16 GEMM"


@needs_int4
def test_a_merged_lora_is_kept_apart_only_where_it_is_the_one_merged():
    model = four_bit_model()
    attn = model.layers[0].self_attn
    qkv, o = attn.qkv_proj, attn.o_proj
    x = torch.randn(1, qkv.in_features, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        expected = torch.mv(qkv.weight.float(), x[0].float())
        got = qkv(x)[0].float()
        with force_reference():
            bf16 = qkv(x)[0].float()
    # The four-bit base plus the LoRA in fp32 differs from the merged bf16 weight's product by that
    # weight's rounding (and the output's), no more.
    assert not torch.equal(got, bf16)
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
    # A fresh four-bit base with a LoRA merged into it attaches; claiming another LoRA (here another
    # scale) than the one merged leaves the weight bf16.
    from lola_chat.evals.bench import _four_bit_form
    from lola_chat.linearization import merge_lora

    form = _four_bit_form(*o.weight.shape)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        o.weight.copy_(int4.exact(*form))
    a, b = torch.randn(8, o.in_features, generator=g), torch.randn(o.out_features, 8, generator=g)
    merge_lora(o, a, b, 0.02)
    recovered = {"layers.0.self_attn.o_proj.weight": form}
    assert o.int4_weight() is None, "the merge changed the weight"
    assert model.attach_int4(recovered) == 1 and o.int4_weight().low_rank is not None
    o.merged_low_rank = (a, b, 0.03)
    o._int4 = None
    assert model.attach_int4(recovered) == 0 and o.int4_weight() is None


@needs_int4
def test_a_changed_weight_drops_its_four_bit_copy():
    model = four_bit_model()
    down = model.layers[1].mlp.down_proj
    x = torch.randn(1, down.in_features).bfloat16()
    with torch.no_grad():
        down.weight.mul_(2.0)
        assert down.int4_weight() is None
        torch.testing.assert_close(down(x), F.linear(x, down.weight), rtol=2**-7, atol=1e-4)
        down.weight.data = down.weight.data / 2.0
    assert down.int4_weight() is None


@needs_int4
def test_four_bit_forms_that_do_not_match_the_weights_are_not_attached():
    from lola_chat.evals.bench import _four_bit_form

    model = four_bit_model(0)
    torch.manual_seed(1)
    recovered = {
        name: _four_bit_form(*weight.shape)
        for name, weight in model.named_parameters()
        if name.endswith("_proj.weight")
    }
    assert model.attach_int4(recovered) == 0
    assert model.double().attach_int4({}) == 0
