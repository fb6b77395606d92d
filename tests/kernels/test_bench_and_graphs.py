"""`lola-chat bench` end to end on a tiny model, and the captured decoder's refusal off the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from lola_chat.cli import main
from lola_chat.errors import LolaError
from lola_chat.evals.bench import TINY_SHAPES, random_model


def test_bench_tiny_writes_json_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("LOLA_CHAT_HOME", str(tmp_path / "home"))
    out = tmp_path / "results"
    argv = ["bench", "--tiny", "--device", "cpu", "--lengths", "40,72", "--decode-tokens", "18",
            "--repeats", "1", "--out", str(out), "--name", "tiny"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "tiny.json").read_text())
    arms = {r["arm"] for r in results["records"]}
    assert {"lola-reference", "softmax-hf"} <= arms
    assert results["run"]["command"].startswith("lola-chat") and results["run"]["commit"]
    for record in results["records"]:
        assert (
            record["decode_tokens_per_s"] > 0 and record["decode_p99_ms"] >= record["decode_median_ms"] * 0.5
        )
        assert record["prefill_tokens_per_s"] > 0
    lola = [r for r in results["records"] if r["arm"] == "lola-reference"]
    # 18 steps from 40 or 72 tokens with chunks of 16 close at least one chunk; the state is fixed-size.
    assert all(r["eviction_steps"] >= 1 for r in lola)
    assert len({r["state_bytes"] for r in lola}) == 1
    assert "| lola-reference | 40 |" in (out / "tiny.md").read_text()
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
