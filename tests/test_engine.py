"""The engine on a tiny random model: turns, persistence, undo/regenerate/stop, feed, inspection."""

import dataclasses
import json
import threading

import pytest
import torch

from lola_chat.config import Config, GenerationSettings, Paths
from lola_chat.engine import Engine
from lola_chat.errors import LolaError, SnapshotError
from lola_chat.memory import LolaSettings
from lola_chat.sessions import SessionStore


def make_engine(loaded, home, attention="lola", seed=7, max_new_tokens=12):
    config = Config(
        paths=Paths.from_env({"LOLA_CHAT_HOME": str(home)}),
        attention=attention,
        generation=GenerationSettings(temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, seed=seed),
    )
    store = SessionStore(config.paths.sessions, keep_snapshots=50)
    return Engine(config, loaded, store, torch.device("cpu"))


def probe_logits(engine):
    with torch.inference_mode():
        probe = torch.tensor([[5, 6, 7]])
        saved = engine.state.checkpoint()
        logits = engine.model(probe, engine.state)
        engine.state.restore(saved)
        return logits


def test_turn_streams_and_persists_bit_identically(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    pieces = []
    stats = engine.chat("hello world", on_piece=pieces.append)
    assert stats.new_tokens > 0 and stats.prefill_tps > 0
    engine.chat("what is my name?")
    tokens, expected = engine.state.tokens_seen, probe_logits(engine)
    engine.close()

    again = make_engine(tiny_loaded, lola_home)
    again.open("t")
    assert again.state.tokens_seen == tokens
    assert torch.equal(probe_logits(again), expected)
    history = again.history()
    assert [r["role"] for r in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == "".join(pieces)


def test_each_turn_prefills_only_its_own_tokens(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    first = engine.chat("hello world")
    second = engine.chat("hello world")
    system = len(engine.template.block("system", engine.session.system_prompt))
    assert first.prompt_tokens == second.prompt_tokens + system


def test_undo_restores_the_exact_state(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    engine.chat("hello world")
    before = probe_logits(engine)
    tokens = engine.state.tokens_seen
    engine.chat("what is the capital?")
    engine.undo()
    assert engine.state.tokens_seen == tokens
    assert torch.equal(probe_logits(engine), before)
    assert [r["role"] for r in engine.history()] == ["user", "assistant"]


def test_regenerate_replays_the_question_from_the_state_before_it(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home, seed=None)
    engine.open("t")
    engine.set_generation(temperature=0.0)
    engine.chat("hello world")
    first = engine.history()[-1]["content"]
    engine.regenerate()
    history = engine.history()
    assert [r["role"] for r in history] == ["user", "assistant"]
    assert history[-1]["content"] == first  # greedy: the same reply from the same state


def test_stop_keeps_the_partial_reply_and_a_consistent_state(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home, max_new_tokens=50)
    engine.open("t")
    cancel = threading.Event()
    seen = []

    def on_piece(piece):
        seen.append(piece)
        if len(seen) == 3:
            cancel.set()

    stats = engine.chat("hello world", on_piece=on_piece, cancel=cancel)
    assert stats.stopped
    last = engine.history()[-1]
    assert last["stopped"] and last["content"].startswith("".join(seen))
    after_stop = probe_logits(engine)
    engine.close()
    engine.open("t")
    assert torch.equal(probe_logits(engine), after_stop)


def test_feed_adds_a_document_without_a_reply_and_memory_stays_fixed(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("doc")
    engine.feed("hello world " * 20)
    small = engine.memory_report()
    engine.feed("Paris is the capital. " * 200)
    large = engine.memory_report()
    assert large["tokens_seen"] > 4 * small["tokens_seen"]
    assert large["state_bytes"] == small["state_bytes"]
    assert large["kv_cache_bytes"] > small["kv_cache_bytes"]
    layer = large["layers"][0]
    assert layer["cache_tokens"] == 12 and layer["folded_tokens"] > 0
    assert len(large["cached_text"]) == 2 and large["cached_text"][0]
    assert sum(large["recall_error"]["counts"]) == 2 * 4 * 12
    assert engine.history()[-1]["role"] == "user"


def test_cancelled_feed_leaves_the_state_unchanged(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("doc")
    engine.chat("hello world")
    before = probe_logits(engine)
    cancel = threading.Event()
    cancel.set()
    assert engine.feed("hello " * 3000, cancel=cancel) == 0
    assert torch.equal(probe_logits(engine), before)


def test_snapshot_from_another_eviction_policy_loads(tiny_loaded, lola_home):
    """The policy decides only which pairs later evictions fold: a conversation saved under one policy
    resumes under another with its state intact, and its snapshots record the policy they ran."""
    tiny_loaded.lola = dataclasses.replace(tiny_loaded.lola, policy="novelty")
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    engine.chat("hello world")
    saved = {k: v.clone() for k, v in engine.state.tensors().items()}
    tokens = engine.state.tokens_seen
    engine.close()

    tiny_loaded.lola = dataclasses.replace(tiny_loaded.lola, policy="relative-novelty")
    other = make_engine(tiny_loaded, lola_home)
    other.open("t")
    assert other.state.tokens_seen == tokens
    assert all(torch.equal(other.state.tensors()[k], v) for k, v in saved.items())
    _, meta = other.session.load_snapshot(other.expectations())
    assert json.loads(meta["lola"])["policy"] == "novelty"


def test_snapshot_from_other_settings_is_refused_and_rebuild_recovers(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    engine.chat("hello world")
    tokens = engine.state.tokens_seen
    engine.close()

    tiny_loaded.lola = LolaSettings(chunk=8, capacity=4)
    other = make_engine(tiny_loaded, lola_home)
    with pytest.raises(SnapshotError, match="lola") as refused:
        other.open("t")
    assert "capacity" in str(refused.value) and "policy" not in str(refused.value)
    other.open("t", rebuild=True)
    template = other.template
    expected = len(template.block("system", other.session.system_prompt))
    expected += sum(len(template.block(r["role"], r["content"])) for r in other.history())
    assert other.state.tokens_seen == expected and tokens > 0


def test_a_joint_policys_snapshots_and_a_per_head_policys_refuse_each_other(tiny_loaded, lola_home):
    tiny_loaded.lola = LolaSettings(chunk=8, capacity=12, policy="joint-relative-novelty")
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("joint")
    engine.chat("hello world")
    engine.close()
    reopened = make_engine(tiny_loaded, lola_home)
    reopened.open("joint")
    assert reopened.state.layers[0].cache_k.shape[1] == tiny_loaded.model.cfg.n_kv_heads
    reopened.close()

    tiny_loaded.lola = LolaSettings(chunk=8, capacity=12, policy="relative-novelty")
    per_head = make_engine(tiny_loaded, lola_home)
    with pytest.raises(LolaError, match="joint eviction policy keeps its cache per KV head"):
        per_head.open("joint")
    per_head.open("apart")
    per_head.chat("hello world")
    per_head.close()
    tiny_loaded.lola = LolaSettings(chunk=8, capacity=12, policy="joint-sre")
    with pytest.raises(SnapshotError, match="cache"):
        make_engine(tiny_loaded, lola_home).open("apart")


def test_softmax_baseline_runs_the_same_turns(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home, attention="softmax")
    engine.open("s")
    engine.chat("hello world")
    report = engine.memory_report()
    assert report["attention"] == "softmax"
    assert report["state_bytes"] == report["kv_cache_bytes"]


def test_undo_without_an_exchange_is_a_clear_error(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    with pytest.raises(LolaError, match="no exchange"):
        engine.undo()


def test_restore_and_branch(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    engine.chat("hello world")
    first = engine.session.latest_snapshot().id
    after_first = probe_logits(engine)
    engine.chat("what is my name?")
    engine.restore(first)
    assert torch.equal(probe_logits(engine), after_first)
    assert len(engine.history()) == 2
    engine.branch("t2", first)
    assert engine.session.name == "t2"
    assert torch.equal(probe_logits(engine), after_first)


def test_ngram_blocking_names_the_tokens_that_would_repeat():
    from lola_chat.sampling import repeated_ngram_followers

    assert repeated_ngram_followers([1, 2, 3, 9, 1, 2], 3) == [3]
    assert repeated_ngram_followers([1, 2, 3, 1, 2, 4, 1, 2], 3) == [3, 4]
    assert repeated_ngram_followers([1, 2, 3, 4], 3) == []
    assert repeated_ngram_followers([1, 1, 1], 0) == []
    # Against the definition: every n-gram of the reply whose first n-1 tokens end it now.
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        tokens = torch.randint(
            0, 3, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator
        )
        tokens = tokens.tolist()
        for n in (2, 3, 4):
            grams = [tokens[i : i + n] for i in range(len(tokens) - n + 1)]
            expected = [gram[-1] for gram in grams if gram[:-1] == tokens[len(tokens) - n + 1 :]]
            assert repeated_ngram_followers(tokens, n) == expected, (tokens, n)


def test_command_line_settings_win_over_the_session_and_the_session_over_defaults(tiny_loaded, lola_home):
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    engine.set_generation(top_p=0.5, max_new_tokens=3)
    engine.close()
    config = Config(
        paths=Paths.from_env({"LOLA_CHAT_HOME": str(lola_home)}),
        generation=GenerationSettings(max_new_tokens=7),
        generation_flags=frozenset({"max_new_tokens"}),
    )
    again = Engine(config, tiny_loaded, SessionStore(config.paths.sessions), torch.device("cpu"))
    again.open("t")
    assert again.generation.max_new_tokens == 7 and again.generation.top_p == 0.5


def test_captured_decoding_applies_where_the_lola_kernels_run_on_triton(tiny_loaded, lola_home, monkeypatch):
    from lola_chat.kernels import lola

    from lola_chat import decoding

    model = tiny_loaded.model
    lola_state = model.new_state("lola", tiny_loaded.lola)
    assert not decoding.captured_decoding_applies(model, lola_state)  # a CPU: the kernels run the reference
    engine = make_engine(tiny_loaded, lola_home)
    engine.open("t")
    engine.chat("hello")
    assert engine._feeder.decoding == "model" and engine._feeder.decoder is None

    asked = []
    monkeypatch.setattr(lola, "uses_triton", lambda *tensors, feature_map=None: asked.append(tensors) or True)
    assert decoding.captured_decoding_applies(model, lola_state)
    assert asked[0][0] is lola_state.layers[0].win_k
    assert not decoding.captured_decoding_applies(model, model.new_state("softmax"))
    random_policy = LolaSettings(chunk=8, capacity=12, policy="random")
    assert not decoding.captured_decoding_applies(model, model.new_state("lola", random_policy))
    joint_policy = LolaSettings(chunk=8, capacity=12, policy="joint-relative-novelty")
    assert decoding.captured_decoding_applies(model, model.new_state("lola", joint_policy))
    with pytest.raises(LolaError, match="unknown decoding"):
        decoding.TokenFeeder(model, "fast")


def test_sample_takes_a_given_argmax_only_where_greedy_would_pick_it():
    from lola_chat.sampling import sample

    def unread() -> int:
        raise AssertionError("sampling read the argmax, which waits for the device")

    logits = torch.tensor([0.0, 5.0, 4.0, 1.0])
    greedy = GenerationSettings(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=3)
    # A stale hint shows whether it was taken: greedy alone would pick 1.
    assert sample(logits, greedy, None, [], argmax=lambda: 3) == 3
    assert sample(logits, greedy, None, [], argmax=None) == 1
    assert sample(logits, greedy, None, [], argmax=lambda: None) == 1
    # The n-gram rule bans 3 after [7, 8] here: the hint is refused and the logits decide without it.
    assert sample(logits, greedy, None, [7, 8, 3, 7, 8], argmax=lambda: 3) == 1
    penalized = dataclasses.replace(greedy, repetition_penalty=1.5)
    assert sample(logits, penalized, None, [0], argmax=unread) == 1
    hot = dataclasses.replace(greedy, temperature=1.0, seed=0)
    picks = {sample(logits, hot, torch.Generator().manual_seed(i), [], argmax=unread) for i in range(8)}
    assert 0 not in picks
