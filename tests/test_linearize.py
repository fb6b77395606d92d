"""`lola-chat linearize` on a tiny random Llama checkpoint and a tiny dataset: the data split, the
attention-transfer loss going down, and a whole run writing a loadable, reproducible linearization."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import pytest
import torch

from lola_chat import cli
from lola_chat.config import Config, Paths
from lola_chat.linearization import load_linearization
from lola_chat.linearize import card, command, lora
from lola_chat.linearize.data import TokenMixture, read_books, split_book, strip_gutenberg
from lola_chat.linearize.tiny import write_tiny_checkpoint, write_tiny_data
from lola_chat.linearize.train import TrainSettings, optimize
from lola_chat.linearize.transfer import transfer_loss, transfer_parameters
from lola_chat.weights import load_model

CHUNK = 16
STAGE_CHECKPOINTS = [("lora", 2), ("transfer", 2), ("transfer", 3)]


def parse(argv: list[str], monkeypatch):
    """Arguments and config as `lola-chat ARGV` would get them (sys.argv too: results record it)."""
    monkeypatch.setattr(sys, "argv", ["lola-chat", *argv])
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(), cli.common_options())
    args = parser.parse_args(argv)
    return args, cli.build_config(args)


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_data(tmp_path / "data")


@pytest.fixture
def tiny_loaded(tmp_path, lola_home):
    model_dir = write_tiny_checkpoint(tmp_path / "tiny-model")
    config = Config(paths=Paths.from_env(), device="cpu", model_dir=model_dir, linearization=None)
    return load_model(config, torch.device("cpu"), torch.float32, progress=False)


def test_gutenberg_header_and_footer_are_stripped(tiny_data):
    raw = (tiny_data / "books" / "river_tale.txt").read_text()
    body = strip_gutenberg(raw)
    assert body.startswith("Paragraph 0 of the river book.")
    assert body.endswith("before the lamp went out.")
    assert "GUTENBERG" not in body and "License" not in body and "\r" not in body


def test_heldout_split_never_overlaps_training(tiny_data):
    for book in read_books(tiny_data):
        train_paragraphs = set(book.train.split("\n\n"))
        heldout_paragraphs = book.heldout.split("\n\n")
        assert not train_paragraphs & set(heldout_paragraphs)
        assert all(paragraph not in book.train for paragraph in heldout_paragraphs)
        whole = len(book.train) + len(book.heldout)
        assert 0.07 < len(book.heldout) / whole < 0.13
    train, heldout = split_book("one\n\ntwo\n\nthree", heldout_fraction=0.3)
    assert (train, heldout) == ("one\n\ntwo", "three")


def test_mixture_windows_are_seeded_and_the_right_shape():
    streams = {"a": list(range(100)), "b": list(range(1000, 1010))}
    first = TokenMixture(streams, {"a": 0.5, "b": 0.5}, seq_len=32, seed=3).batch(6)
    again = TokenMixture(streams, {"a": 0.5, "b": 0.5}, seq_len=32, seed=3).batch(6)
    assert first.shape == (6, 32) and torch.equal(first, again)


def test_attention_transfer_loss_decreases(tiny_loaded):
    model = tiny_loaded.model
    torch.manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 6 * CHUNK))
    before, per_layer = transfer_loss(model, tokens, CHUNK)
    assert per_layer.shape == (model.cfg.n_layers,) and math.isfinite(before.item())
    params = transfer_parameters(model)
    settings = dataclasses.replace(TrainSettings(), checkpoint_every=1000)
    step = lambda: (transfer_loss(model, tokens, CHUNK)[0], {})
    summary = optimize(model, "transfer", params, 15, 1e-2, step, settings, _NullLog(), tiny_loaded.model_dir)
    after, _ = transfer_loss(model, tokens, CHUNK)
    assert math.isfinite(summary["final_loss"])
    assert after.item() < 0.8 * before.item()
    assert all(p.grad is not None for p in params)


class _NullLog:
    def write(self, record: dict) -> None:
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def test_lora_adapters_start_as_identity_and_detach_cleanly(tiny_loaded):
    model = tiny_loaded.model
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        before = model(tokens, model.new_state("softmax"))
        lora.attach(model, rank=4, alpha=8.0)
        after = model(tokens, model.new_state("softmax"))
        factors = lora.detach(model)
    assert torch.allclose(before, after)
    assert len(factors) == 4 * model.cfg.n_layers
    a, b = factors["layers.0.self_attn.q_proj"]
    assert a.shape == (4, model.cfg.dim) and b.shape == (model.cfg.n_heads * model.cfg.head_dim, 4)
    assert isinstance(model.layers[0].self_attn.q_proj, torch.nn.Linear)


def run_linearize(out, data, monkeypatch, seed=0, extra=()):
    argv = "linearize --tiny --device cpu --steps-transfer 3 --steps-lora 2 --seq-len 64 --batch 2"
    argv += f" --chunk {CHUNK} --self-generated 3 --reply-tokens 8 --checkpoint-every 2 --seed {seed}"
    argv = [*argv.split(), "--out", str(out), "--data", str(data), *extra]
    args, config = parse(argv, monkeypatch)
    assert args.func(args, config) == 0
    return config


def test_linearize_writes_a_loadable_reproducible_linearization(tmp_path, lola_home, tiny_data, monkeypatch):
    out = tmp_path / "lin"
    config = run_linearize(out, tiny_data, monkeypatch)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["transfer"] * 3 + ["lora"] * 2
    assert all(math.isfinite(r["loss"]) for r in records)
    assert {"kl", "ce"} <= records[-1].keys() and len(records[0]["layer_mse"]) == 2
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [f"{stage}-00000{step}.safetensors" for stage, step in STAGE_CHECKPOINTS]
    meta = json.loads((out / "config.json").read_text())
    assert meta["lora"]["rank"] == 8 and meta["lola"]["chunk"] == CHUNK
    assert meta["training"]["data"]["self_generated_conversations"] == 3
    assert meta["training"]["command"].startswith("lola-chat linearize --tiny") and meta["training"]["commit"]
    readme = (out / "README.md").read_text()
    assert "## How it was made" in readme and "No evaluation results" in readme

    tiny = dataclasses.replace(config, model_dir=config.paths.cache / "tiny-model", linearization=None)
    base = load_model(tiny, torch.device("cpu"), torch.float32, progress=False).model
    fresh = load_model(tiny, torch.device("cpu"), torch.float32, progress=False).model
    fingerprint, settings = load_linearization(fresh, out)
    assert fingerprint == card.fingerprint(out) and settings.chunk == CHUNK
    assert not torch.equal(fresh.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(fresh.layers[0].self_attn.fmap_q, torch.eye(16).expand(4, 16, 16))

    run_linearize(tmp_path / "again", tiny_data, monkeypatch)
    assert card.fingerprint(tmp_path / "again") == fingerprint


@pytest.mark.parametrize("normalizer", ["shared", "window"])
def test_training_with_a_sparse_cache_uses_it_and_reaches_the_feature_maps(tiny_loaded, normalizer):
    from lola_chat.linearize.distill import distill_loss

    model = tiny_loaded.model
    torch.manual_seed(1)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 6 * CHUNK))
    without, _ = transfer_loss(model, tokens, CHUNK)
    with_cache, _ = transfer_loss(model, tokens, CHUNK, capacity=CHUNK, normalizer=normalizer)
    assert math.isfinite(with_cache.item()) and with_cache.item() != without.item()
    params = transfer_parameters(model)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    loss, parts = distill_loss(model, tokens, CHUNK, 1.0, capacity=CHUNK, normalizer=normalizer)
    loss.backward()
    assert math.isfinite(parts["kl"]) and all(p.grad is not None for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)


def test_linearize_with_a_training_cache_saves_its_normalizer(tmp_path, lola_home, tiny_data, monkeypatch):
    out = tmp_path / "lin"
    shipped = [
        "--policy",
        "joint-relative-novelty",
        "--linear-cap",
        "512",
        "--joint-power",
        "4",
        "--joint-span",
        "1",
    ]
    run_linearize(
        out, tiny_data, monkeypatch, extra=["--train-capacity", "16", "--normalizer", "window", *shipped]
    )
    meta = json.loads((out / "config.json").read_text())
    assert meta["lola"]["normalizer"] == "window"
    # The inference settings given as flags are what it ships.
    lola = meta["lola"]
    assert (lola["policy"], lola["linear_cap"], lola["joint_power"], lola["joint_span"]) == (
        "joint-relative-novelty", 512, 4, 1
    )  # fmt: skip
    assert meta["training"]["settings"]["train_capacity"] == 16
    assert "a sparse cache of G = 16 (window normalizer) in training" in (out / "README.md").read_text()


def test_linearize_refuses_missing_data(tmp_path, lola_home, monkeypatch):
    args, config = parse(
        ["linearize", "--tiny", "--device", "cpu", "--data", str(tmp_path / "nowhere")], monkeypatch
    )
    with pytest.raises(Exception, match="no training data"):
        args.func(args, config)
