"""`lola-chat bench` end to end on a tiny model; the captured decoder's refusal off the GPU, and its step
logic (device-side positions, graph variants, ids, repetition penalty) replayed eagerly through the
Triton interpreter against the engine's ordinary decoding."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from lola_chat.kernels import int4

from lola_chat.cli import main
from lola_chat.config import default_dtype
from lola_chat.errors import LolaError
from lola_chat.evals.bench import TINY_SHAPES, random_model
from lola_chat.evals.bench_report import markdown


def test_bench_tiny_writes_json_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("LOLA_CHAT_HOME", str(tmp_path / "home"))
    out = tmp_path / "results"
    argv = ["bench", "--tiny", "--device", "cpu", "--lengths", "40,72", "--decode-tokens", "18",
            "--repeats", "1", "--out", str(out), "--name", "tiny"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "tiny.json").read_text())
    arms = {r["arm"] for r in results["records"]}
    assert {"lola-reference", "lola-cpu", "lola-chat", "softmax-hf"} <= arms
    assert results["run"]["command"].startswith("lola-chat") and results["run"]["commit"]
    for record in results["records"]:
        assert (
            record["decode_tokens_per_s"] > 0 and record["decode_p99_ms"] >= record["decode_median_ms"] * 0.5
        )
        # The chat arm decodes from another arm's state.
        assert record["arm"] == "lola-chat" or record["prefill_tokens_per_s"] > 0
    lola = [r for r in results["records"] if r["arm"] == "lola-reference"]
    # 18 steps from 40 or 72 tokens with chunks of 16 close at least one chunk; the state is fixed-size.
    assert all(r["eviction_steps"] >= 1 for r in lola)
    assert len({r["state_bytes"] for r in lola}) == 1
    floor = results["floor"]
    # Every weight matrix once: the tied embedding and the packed projections' views are not counted twice.
    model = random_model(TINY_SHAPES, torch.device("cpu"), default_dtype(torch.device("cpu")))
    assert TINY_SHAPES.tie_embeddings
    assert floor["weight_bytes"] == sum(p.nbytes for p in model.parameters() if p.dim() == 2)
    assert floor["weight_matrices"] == 4 * TINY_SHAPES.n_layers + 1 and floor["gemv_pass_ms"] > 0
    # The tiny bench's projections decode in four bits: a quarter of their bf16 bytes, plus a bf16 scale
    # and zero (4 bytes) per 32 weights (64 bytes), plus the attention's LoRA factors in fp32.
    four_bit = random_model(TINY_SHAPES, torch.device("cpu"), torch.bfloat16, four_bit=True)
    projections = [linear for linear, _ in four_bit.decode_projections()][:-1]  # all but the lm_head

    def correction(linear) -> int:
        return sum(factor.numel() * 4 for factor in linear.int4_weight().low_rank or ())

    saved = 0
    if int4.available():
        saved = sum(m.weight.nbytes * (1 - 1 / 4 - 4 / 64) - correction(m) for m in projections)
        assert sum(map(correction, projections)) > 0
    assert floor["read_bytes"] == pytest.approx(floor["weight_bytes"] - saved)
    assert floor["floor_ms"] == pytest.approx(floor["read_bytes"] / floor["copy_bandwidth_gb_per_s"] / 1e6)
    assert floor["tokens_per_s"] == pytest.approx(1000.0 / floor["floor_ms"])
    assert "| lola-reference | 40 |" in (out / "tiny.md").read_text()
    assert "Bandwidth floor" in (out / "tiny.md").read_text()
    # A GPU run adds the GEMV sweep; the table names each shape's fastest configuration.
    floor["gemv_sweep_us"] = {"8x4": {"4x1024, 4 warps": 2.5, "8x256, 4 warps": 1.25}}
    assert "8x4: 8x256, 4 warps (1.25 us)" in markdown(results)
    # A CPU run profiles the model's own steps: the operators each calls, and their own time.
    profile = results["profile"]
    assert profile["source"] == "cpu-operators"
    steps = [profile, profile["eviction"], profile["prefill_chunk"]]
    assert all(step["kernels_per_token"] > 0 and step["kernel_time_ms"] > 0 for step in steps)
    # Counts, not times (which a busy machine reorders): an eviction adds its operators to a step's.
    assert steps[0]["kernels_per_token"] < steps[1]["kernels_per_token"]
    assert all(0 < len(step["top_kernels_ms"]) <= 8 for step in steps)
    assert "One decode step calls" in (out / "tiny.md").read_text()
    # Files written before the profile named its source hold the eager model's kernels.
    del profile["source"]
    assert "of device time in all (Triton path, eager)" in markdown(results)
    profile["source"] = "captured-step"
    assert "(the captured step's kernels launched one by one)" in markdown(results)
    assert (out / "tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_unknown_arms(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOLA_CHAT_HOME", str(tmp_path))
    assert main(["bench", "--tiny", "--device", "cpu", "--arms", "lola-fast"]) == 2
    assert "unknown arm" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_captured_decoder_needs_a_gpu():
    from lola_chat.graphs import CapturedDecoder

    model = random_model(TINY_SHAPES, torch.device("cpu"), torch.float32)
    with pytest.raises(LolaError, match="CUDA"):
        CapturedDecoder(model, model.new_state("lola"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite captures for real")
# The first prefills chunk by chunk, the second in a block of two chunks.
@pytest.mark.parametrize(
    ("shipped_kind", "block_chunks"),
    [(False, 1), (True, 2), ("joint", 2), ("joint-pooled", 2)],
    ids=["sre-shared", "novelty-capped-block", "joint-capped", "joint-pooled"],
)
def test_captured_step_logic_matches_engine_decoding(monkeypatch, shipped_kind, block_chunks):
    pytest.importorskip("triton")
    from lola_chat import graphs
    from lola_chat.config import GenerationSettings
    from lola_chat.memory import LolaSettings
    from lola_chat.model import ModelConfig, Transformer
    from lola_chat.sampling import sample as engine_sample

    class Replay:
        def __init__(self, run, outputs, name):
            self.run, self.outputs, self.name = run, outputs, name

        def replay(self):
            self.outputs[self.name] = self.run()

    def eager(variants, generator=None):
        outputs = {}
        return {name: Replay(run, outputs, name) for name, run in variants.items()}, outputs

    monkeypatch.setattr(graphs, "capture_graphs", eager)
    monkeypatch.setattr(graphs, "require_capture", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=48, dim=64, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, intermediate=128
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    # The shipped kind of settings: novelty eviction, window normalizer and a cap that is active by 50.
    # A joint policy: one ranking for both layers, its cache kept per KV head, a block's chunks fed one by
    # one through both layers.
    policy = "joint-relative-novelty" if str(shipped_kind).startswith("joint") else "novelty"
    # The joint policy with the plain mean, and with the shipped pooling (powers, then neighbours) and a
    # cache of 12, small enough that the pooling changes what the evictions keep (asserted at the end).
    pooling = {"joint_power": 4, "joint_span": 1} if shipped_kind == "joint-pooled" else {}
    settings = (
        LolaSettings(
            chunk=16,
            capacity=12 if pooling else 24,
            policy=policy,
            normalizer="window",
            linear_cap=4,
            **pooling,
        )
        if shipped_kind
        else LolaSettings(chunk=16, capacity=24)
    )
    # With a penalty the step keeps the reply's tokens on the device; without one it skips that.
    sampling = GenerationSettings(temperature=0.0, repetition_penalty=1.0 if shipped_kind else 1.5)
    # Two whole chunks (one block with ``block_chunks`` 2) and four single steps of prompt; decoding then
    # closes the chunk at 48.
    prompt = torch.arange(36)[None]
    with torch.no_grad():
        expected_state = model.new_state("lola", settings)
        logits = model(prompt, expected_state)[0, -1]
        expected = []
        for _ in range(14):
            expected.append(engine_sample(logits, sampling, None, expected))
            logits = model(torch.tensor([[expected[-1]]]), expected_state)[0, -1]
        state = model.new_state("lola", settings)
        decoder = graphs.CapturedDecoder(model, state, sampling, block_chunks=block_chunks)
        token = decoder.prefill(prompt)
        got = []
        for _ in range(14):
            got.append(int(token))
            token = decoder.step(token)
    assert got == expected
    decoder.sync()
    assert state.tokens_seen == expected_state.tokens_seen == 50
    assert state.evictions() == expected_state.evictions()
    for layer, reference in zip(state.layers, expected_state.layers, strict=True):
        torch.testing.assert_close(layer.h, reference.h, atol=1e-5, rtol=1e-5)
        assert torch.equal(layer.win_ids, reference.win_ids) and torch.equal(
            layer.cache_ids, reference.cache_ids
        )
    if pooling:
        # The pooling decides this run's cut: a step that ranked by the plain mean would keep other pairs.
        plain = model.new_state("lola", dataclasses.replace(settings, joint_power=1, joint_span=0))
        with torch.no_grad():
            model(torch.tensor([[*range(36), *expected]]), plain)
        assert not torch.equal(plain.layers[0].cache_ids, state.layers[0].cache_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the profile records CUDA kernels")
def test_the_profile_takes_the_captured_steps_kernels():
    from lola_chat.evals.bench_arms import BenchModel
    from lola_chat.evals.profiling import step_profile
    from lola_chat.memory import LolaSettings

    device = torch.device("cuda")
    model = random_model(TINY_SHAPES, device, default_dtype(device), four_bit=True)
    bench = BenchModel(model, LolaSettings(chunk=16, capacity=24), "tiny random")
    with torch.inference_mode():
        profile = step_profile(bench, device)
    assert profile["source"] == "captured-step"
    steps = [profile, profile["eviction"], profile["prefill_chunk"]]
    assert 0 < steps[0]["kernels_per_token"] < steps[1]["kernels_per_token"] <= steps[2]["kernels_per_token"]
    assert all(step["kernel_time_ms"] > 0 for step in steps)
    # The step's attention kernels, as the decoder launches them (not the eager model's).
    assert "_key_blocks_kernel" in steps[0]["top_kernels_ms"]


def test_the_gemv_sweep_times_each_configuration_per_weight_shape():
    pytest.importorskip("triton")
    from lola_chat.kernels.gemv import gemv_triton

    from lola_chat.evals.weights_pass import config_label, gemv_sweep

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(TINY_SHAPES, device, default_dtype(device)).pack_projections()
    configs = gemv_triton.CONFIGS if device.type == "cuda" else gemv_triton.CONFIGS[:1]
    sweep = gemv_sweep(model, device, configs=configs, repeats=1 if device.type == "cpu" else 10)
    c = TINY_SHAPES
    # The packed projections, o, down and the tied output projection: never the packed parts' views.
    expected = [
        ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim), (c.dim, c.n_heads * c.head_dim),
        (2 * c.intermediate, c.dim), (c.dim, c.intermediate), (c.vocab_size, c.dim),
    ]  # fmt: skip
    assert set(sweep) == {f"{n}x{k}" for n, k in expected}
    for times in sweep.values():
        assert set(times) == {config_label(c) for c in configs} and all(t > 0 for t in times.values())
