"""`lola-chat eval` on a tiny random model and tiny lengths: the needle prompts (exact length, needle at
the asked depth), the held-out perplexity windows, the state sizes, and the files a run writes."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from lola_chat import cli
from lola_chat.config import Config, Paths
from lola_chat.errors import UsageError
from lola_chat.evals import command, footprint, niah, report, running
from lola_chat.evals.arms import parse_arms, parse_lengths
from lola_chat.evals.ppl import heldout_windows
from lola_chat.linearization import resolve_linearization, save_linearization
from lola_chat.linearize import card
from lola_chat.linearize.data import encode, read_books
from lola_chat.linearize.tiny import tiny_tokenizer, write_tiny_checkpoint, write_tiny_data
from lola_chat.memory import LolaSettings
from lola_chat.weights import load_model

CONFIGS = "softmax,g0,g64,random64,window-joint-relative-novelty64"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_data(tmp_path / "data")


def parse(argv: list[str], monkeypatch):
    """Arguments and config as `lola-chat ARGV` would get them (sys.argv too: results record it)."""
    from lola_chat.evals import bench

    monkeypatch.setattr(sys, "argv", ["lola-chat", *argv])
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    command.register(subparsers, cli.common_options())
    bench.register(subparsers, cli.common_options())
    args = parser.parse_args(argv)
    return args, cli.build_config(args)


@pytest.mark.parametrize("length", [160, 333, 512])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_prompt_has_the_exact_length_and_depth(tokenizer, tiny_data, length, depth):
    prose = niah.prose_haystack(tokenizer, read_books(tiny_data))
    for haystack in (niah.noise_haystack(tokenizer), prose):
        prompt = niah.build_prompt(
            tokenizer, haystack, length, depth, "amber-comet", "4817263", start_sentence=3
        )
        assert len(prompt.ids) == length
        needle = encode(tokenizer, niah.NEEDLE.format(key="amber-comet", value="4817263"))
        assert prompt.ids[prompt.needle_start : prompt.needle_start + len(needle)] == needle
        offset = prompt.needle_start - prompt.haystack_start
        longest = max(len(s) for s in haystack.sentences)
        assert abs(offset - depth * prompt.haystack_tokens) <= longest / 2 + 1
        text = tokenizer.decode(prompt.ids)
        assert text.count("4817263") == 1 and text.endswith(niah.ANSWER_PREFIX.format(key="amber-comet"))


def test_prompt_sets_are_seeded_with_depths_from_0_to_100_percent(tokenizer):
    haystack = niah.noise_haystack(tokenizer)
    prompts = niah.prompt_set(tokenizer, haystack, 256, 5, seed=1)
    assert [p.depth for p in prompts] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(len(p.value) == 7 and p.value.isdigit() for p in prompts)
    assert prompts == niah.prompt_set(tokenizer, haystack, 256, 5, seed=1)
    assert prompts != niah.prompt_set(tokenizer, haystack, 256, 5, seed=2)


def test_a_too_short_length_is_a_usage_error(tokenizer):
    with pytest.raises(UsageError, match="too short"):
        niah.build_prompt(tokenizer, niah.noise_haystack(tokenizer), 20, 0.5, "k", "1234567")


def test_exact_match_needs_the_whole_number(tokenizer):
    ids = lambda text: encode(tokenizer, text)
    assert niah.is_correct(tokenizer, ids(" 4817263.<|im_end|>"), "4817263")
    assert not niah.is_correct(tokenizer, ids(" 48172639."), "4817263")
    assert not niah.is_correct(tokenizer, ids(" 481726"), "4817263")
    assert not niah.is_correct(tokenizer, ids(" no.<|im_end|> 4817263"), "4817263")


def test_perplexity_windows_come_only_from_held_out_text(tokenizer, tiny_data):
    books = read_books(tiny_data)
    windows = heldout_windows(tokenizer, books, 64, limit=None)
    assert windows.shape[0] > 2 and windows.shape[1] == 64
    for window in windows:
        text = tokenizer.decode(window.tolist())
        assert any(text in book.heldout for book in books)
        assert not any(text in book.train for book in books)


def test_parse_arms_and_lengths():
    arms = {arm.name: arm for arm in parse_arms("softmax,g0,sre32,window64,random128,recent128")}
    assert arms["softmax"].attention == "softmax"
    assert (arms["sre32"].capacity, arms["sre32"].policy) == (32, "sre")
    assert (arms["random128"].capacity, arms["random128"].policy) == (128, "random")
    assert arms["sre32"].settings(16).normalizer == "shared"
    assert arms["window64"].settings(16) == LolaSettings(16, 64, "sre", "window")
    assert "window normalizer" in arms["window64"].label and "window" not in arms["sre32"].label
    ablations = {arm.name: arm for arm in parse_arms("window-random128,window-recent64")}
    assert ablations["window-random128"].settings(16) == LolaSettings(16, 128, "random", "window")
    assert ablations["window-recent64"].settings(16) == LolaSettings(16, 64, "recent", "window")
    assert "keep most recent, window normalizer" in ablations["window-recent64"].label
    capped = parse_arms("window-novelty128-cap2048")[0]
    assert capped.settings(16) == LolaSettings(16, 128, "novelty", "window", linear_cap=2048)
    assert "capped at 2048" in capped.label and "capped" not in arms["window64"].label
    shipped = parse_arms("window-relative-novelty256-cap2048")[0]
    assert shipped.settings(64) == LolaSettings(64, 256, "relative-novelty", "window", linear_cap=2048)
    with pytest.raises(UsageError, match="window-relative-sre<G>, window-relative-novelty<G>"):
        parse_arms("relative-sre64")
    joint = parse_arms("window-joint-relative-novelty256-cap2048")[0]
    assert joint.settings(64) == LolaSettings(64, 256, "joint-relative-novelty", "window", linear_cap=2048)
    assert "one choice for all layers and heads" in joint.label and "powers" not in joint.label
    pooled = parse_arms("window-joint-relative-novelty768-cap2048-p4-span1")[0]
    assert pooled.settings(64) == LolaSettings(
        64, 768, "joint-relative-novelty", "window", linear_cap=2048, joint_power=4, joint_span=1
    )
    assert "mean score to the power 4, kept with the candidates within 1" in pooled.label
    oracle = parse_arms("window-relative-novelty256-cap2048-oracle")[0]
    assert oracle.oracle and oracle.settings(64) == shipped.settings(64) and not shipped.oracle
    assert "oracle" in oracle.label and "oracle" not in shipped.label
    assert parse_lengths("1K,2k,300,1M") == [1024, 2048, 300, 2**20]
    for bad in ("fast", "g", "softmax2", "128", "window-", "window-window128", "window-g", "window-128",
                "windowg128", "windowrandom128", "window-sre64", "window128-cap",
                "window128cap64", "window128-oracle-cap64", "softmax-oracle", "window-novelty64-span1",
                "window-joint-sre64-p0", "window-joint-sre64-span1-p4"):  # fmt: skip
        with pytest.raises(UsageError):
            parse_arms(bad)
    with pytest.raises(UsageError):
        parse_lengths("1G")


def test_state_sizes_match_real_states(tmp_path, lola_home):
    config = Config(paths=Paths.from_env(), device="cpu", model_dir=write_tiny_checkpoint(tmp_path / "m"))
    model = load_model(config, torch.device("cpu"), torch.float32, progress=False).model
    arms = parse_arms("softmax,g0,g32")
    rows = {
        (r["config"], r["length"]): r
        for r in footprint.evaluate(model.cfg, arms, [64, 192], 16, torch.float32)
    }
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 192))
    for arm in arms:
        state = model.new_state(arm.attention, arm.settings(16))
        with torch.inference_mode():
            model(tokens, state, last_only=True)
        assert rows[(arm.name, 192)]["state_bytes"] == state.nbytes()
    assert rows[("softmax", 192)]["state_bytes"] == 3 * rows[("softmax", 64)]["state_bytes"]
    assert rows[("g32", 192)]["state_bytes"] == rows[("g32", 64)]["state_bytes"]


def tiny_linearization(directory, lola_home, tmp_path):
    """A linearization folder for the tiny model (feature maps nudged away from identity, no LoRA)."""
    config = Config(paths=Paths.from_env(), device="cpu", model_dir=write_tiny_checkpoint(tmp_path / "m"))
    model = load_model(config, torch.device("cpu"), torch.float32, progress=False).model
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.fmap_k.add_(0.1)
    save_linearization(
        model, directory, None, 16.0, 8, LolaSettings(chunk=32, capacity=64), {"base_model": "tiny"}
    )
    return directory


def test_eval_all_writes_results_tables_plots_and_the_card(tmp_path, lola_home, tiny_data, monkeypatch):
    linearization = tiny_linearization(tmp_path / "lin", lola_home, tmp_path)
    out = tmp_path / "results"
    argv = "eval all --tiny --device cpu --lengths 200,256 --prompts 2 --contexts 96 --ppl-windows 2"
    argv = [*argv.split(), "--softmax-max-length", "200", "--configs", CONFIGS, "--out", str(out)]
    argv += ["--data", str(tiny_data)]
    argv += ["--linearization", str(linearization), "--card", str(linearization)]
    args, config = parse(argv, monkeypatch)
    assert args.func(args, config) == 0

    results = report.read_results(out)
    assert sorted(results) == ["memory", "niah", "ppl"]
    for payload in results.values():
        assert payload["command"].startswith("lola-chat eval all") and payload["commit"] and payload["device"]
        assert payload["versions"]["torch"] == torch.__version__
        assert payload["model"]["linearization_fingerprint"] == card.fingerprint(linearization)
    niah_rows = results["niah"]["rows"]
    arms = len(parse_arms(CONFIGS))
    assert len(niah_rows) == arms * 2 * 2
    assert {(r["haystack"], r["length"]) for r in niah_rows} == {
        (h, n) for h in ("noise", "prose") for n in (200, 256)
    }
    skipped = [r for r in niah_rows if r["config"] == "softmax" and r["length"] == 256]
    assert [r["error"] for r in skipped] == ["not run", "not run"]
    run = [r for r in niah_rows if r not in skipped]
    assert all(r["prompts"] == 2 and 0 <= r["correct"] <= 2 and r["state_bytes"] > 0 for r in run)
    assert all(len(r["correct_by_depth"]) == 2 and sum(r["correct_by_depth"]) == r["correct"] for r in run)
    # The needle measure is a LoLA memory's alone, a share of the needle's tokens.
    assert all(("needle_held" in r) == (r["config"] != "softmax") for r in run)
    assert all(0 <= r["needle_held"] <= 1 for r in run if r["config"] != "softmax")
    assert all(r["perplexity"] > 1 and r["windows"] == 2 for r in results["ppl"]["rows"])
    assert len(results["memory"]["rows"]) == arms * 2

    readme = (out / "README.md").read_text()
    for arm in parse_arms(CONFIGS):
        assert arm.label in readme
    assert all((out / f"{name}.png").stat().st_size > 1000 for name in ("niah", "ppl", "memory"))
    card_text = (linearization / "README.md").read_text()
    assert "Needle in a haystack" in card_text and "No evaluation results" not in card_text

    (out / "README.md").unlink()
    args, config = parse(["eval", "report", "--out", str(out)], monkeypatch)
    assert args.func(args, config) == 0
    assert (out / "README.md").read_text() == readme


def test_append_adds_a_runs_rows_and_keeps_every_runs_provenance(tmp_path, lola_home, tiny_data, monkeypatch):
    out = tmp_path / "results"
    base = ["eval", "niah", "--tiny", "--device", "cpu", "--prompts", "1", "--configs", "g0,g64"]
    base += ["--out", str(out), "--data", str(tiny_data)]
    for argv in (["--lengths", "200"], ["--lengths", "256", "--append"], ["--lengths", "256", "--append"]):
        args, config = parse([*base, *argv], monkeypatch)
        assert args.func(args, config) == 0
    payload = report.read_results(out)["niah"]
    assert sorted({(r["config"], r["length"]) for r in payload["rows"]}) == [
        ("g0", 200), ("g0", 256), ("g64", 200), ("g64", 256)
    ]  # fmt: skip
    assert len(payload["rows"]) == 2 * 2 * 2
    assert [run["command"].split("--lengths ")[1][:3] for run in payload["earlier_runs"]] == ["200", "256"]
    assert "with rows of an earlier run" in (out / "README.md").read_text()

    # One run of several evals: only the eval that had a file before carries earlier runs.
    every = "eval all --tiny --device cpu --lengths 256 --prompts 1 --contexts 96 --ppl-windows 1"
    every = [*every.split(), "--configs", "g0", "--out", str(out), "--data", str(tiny_data), "--append"]
    args, config = parse(every, monkeypatch)
    assert args.func(args, config) == 0
    results = report.read_results(out)
    assert len(results["niah"]["earlier_runs"]) == 3
    assert "earlier_runs" not in results["ppl"] and "earlier_runs" not in results["memory"]


def test_the_commit_named_in_the_environment_wins_over_the_trees_git(monkeypatch):
    from lola_chat.evals import provenance

    monkeypatch.setenv(provenance.COMMIT_ENV, "abc1234")
    assert provenance.git_commit() == "abc1234"
    monkeypatch.delenv(provenance.COMMIT_ENV)
    assert provenance.git_commit() not in ("abc1234", "")


def test_results_elsewhere_leave_the_shipped_card_alone(tmp_path, lola_home, monkeypatch):
    shipped = resolve_linearization("smollm2-135m-instruct") / "README.md"
    before = shipped.read_bytes()
    args, config = parse(["eval", "report", "--out", str(tmp_path / "results")], monkeypatch)
    with pytest.raises(UsageError, match="no results folder"):
        args.func(args, config)
    (tmp_path / "results").mkdir()
    assert args.func(args, config) == 0
    assert shipped.read_bytes() == before


def test_bench_on_random_default_shapes_runs_the_shipped_settings(monkeypatch, lola_home):
    from lola_chat.config import DEFAULT_LINEARIZATION
    from lola_chat.evals import bench
    from lola_chat.linearization import linearization_settings

    monkeypatch.setattr(bench, "random_model", lambda *args, four_bit: object())
    shipped = linearization_settings(resolve_linearization(DEFAULT_LINEARIZATION))
    args, config = parse(["bench", "--random-default-shapes"], monkeypatch)
    assert bench.load(args, config, torch.device("cpu"), torch.float32).settings == shipped
    args, config = parse(["bench", "--random-default-shapes", "--capacity", "32"], monkeypatch)
    assert bench.load(args, config, torch.device("cpu"), torch.float32).settings.capacity == 32


@pytest.mark.parametrize("capacity", [0, 16])
def test_memory_holds_locates_what_the_memory_keeps(tiny_loaded, capacity):
    """After 96 tokens with an 8-token chunk, the last 8 positions sit in the window and, at G > 0, G
    earlier ones in each head's cache; the softmax cache has no such measure."""
    model = tiny_loaded.model
    tokens = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0))
    state = model.new_state("lola", LolaSettings(chunk=8, capacity=capacity), batch=2)
    with torch.inference_mode():
        running.prefill(model, state, tokens, 32, positions=True)
    window = torch.tensor([88, 88])
    assert running.memory_holds(state, window, torch.tensor([8, 8])) == [1.0, 1.0]
    # Every head's cache holds G of the 88 positions before the window; a shorter span counts only its own.
    before = running.memory_holds(state, torch.tensor([0, 0]), torch.tensor([88, 88]))
    assert before == pytest.approx([capacity / 88] * 2)
    assert running.memory_holds(state, torch.tensor([0, 88]), torch.tensor([88, 4])) == [before[0], 1.0]
    softmax = model.new_state("softmax", batch=2)
    with torch.inference_mode():
        running.prefill(model, softmax, tokens, 32, positions=True)
    assert running.memory_holds(softmax, window, torch.tensor([8, 8])) is None


def test_pinned_ids_survive_every_eviction(tiny_loaded):
    """An oracle arm's pinned span stays in every head's cache through every eviction; the other
    sequence of the batch pins another span, and an unpinned memory keeps less of them."""
    model = tiny_loaded.model
    tokens = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(1))
    first, count = torch.tensor([10, 40]), torch.tensor([4, 10])
    held = {}
    for pinned in (False, True):
        state = model.new_state("lola", LolaSettings(chunk=8, capacity=16), batch=2)
        if pinned:
            for memory in state.layers:
                memory.pin_ids(first, count)
        with torch.inference_mode():
            running.prefill(model, state, tokens, 32, positions=True)
        held[pinned] = running.memory_holds(state, first, count)
    assert held[True] == [1.0, 1.0]
    assert held[False][0] < 1.0 and held[False][1] < 1.0
