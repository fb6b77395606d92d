"""The engine fed through the captured decoder's step functions (run without graphs, through Triton's
interpreter) against the engine fed by the model's forward: the same greedy replies, token counts and
saved state over turns that cross chunk boundaries, after undo / regenerate / restore, and after a
cancelled feed."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from lola_chat import engine as engine_module
from lola_chat.config import Config, GenerationSettings, Paths
from lola_chat.engine import Engine
from lola_chat.memory import LolaSettings
from lola_chat.model import ModelConfig, Transformer
from lola_chat.sessions import SessionStore

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite runs the captured engine for real"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def triton_shaped(tiny_loaded):
    """The tiny model with the smallest shapes the Triton kernels take (head_dim 16); one layer and two
    heads keep the interpreter fast."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    vocab = len(tiny_loaded.tokenizer)
    cfg = ModelConfig(
        vocab_size=vocab, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, intermediate=64
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("fmap_q", "fmap_k")):
                param.add_(0.3 * torch.randn_like(param))
            elif param.dim() == 2:
                param.normal_(0.0, 0.3)
    return dataclasses.replace(tiny_loaded, model=model, lola=LolaSettings(chunk=16, capacity=16))


def make_engine(loaded, home, decoding: str) -> Engine:
    config = Config(
        paths=Paths.from_env({"LOLA_CHAT_HOME": str(home)}),
        generation=GenerationSettings(temperature=0.0, max_new_tokens=5, no_repeat_ngram=3),
    )
    engine = Engine(config, loaded, SessionStore(config.paths.sessions), torch.device("cpu"), decoding)
    engine.open("t")
    engine.set_system("hi")
    return engine


def assert_same_memory(captured: Engine, eager: Engine) -> None:
    """Same tokens and ids, close tensors; and the snapshot on disk is the engine's (synced) state."""
    assert captured.state.tokens_seen == eager.state.tokens_seen
    assert captured.state.evictions() == eager.state.evictions()
    state = captured.state.tensors()
    for name, expected in eager.state.tensors().items():
        if name.endswith("_ids"):
            assert torch.equal(state[name], expected), name
        else:
            torch.testing.assert_close(state[name], expected, atol=1e-5, rtol=1e-5, msg=name)
    saved, meta = captured.session.load_snapshot(captured.expectations())
    assert int(meta["tokens_seen"]) == captured.state.tokens_seen
    assert all(torch.equal(saved[name], tensor) for name, tensor in state.items())


def test_captured_steps_give_the_engine_the_same_turns(tiny_loaded, tmp_path, monkeypatch):
    loaded = triton_shaped(tiny_loaded)
    captured = make_engine(loaded, tmp_path / "captured", "uncaptured")
    eager = make_engine(loaded, tmp_path / "eager", "model")

    def both(action):
        results = [action(engine) for engine in (captured, eager)]
        assert results[0] == results[1]
        assert_same_memory(captured, eager)
        return results[0]

    def reply(engine) -> tuple[str, int]:
        return engine.history()[-1]["content"], engine.history()[-1]["tokens_seen"]

    replies = [
        both(lambda engine, text=text: (engine.chat(text).new_tokens, reply(engine)))
        for text in ("hello world", "what is my name?")
    ]
    assert captured.state.tokens_seen > 3 * loaded.lola.chunk
    assert all(tokens > 0 for tokens, _ in replies) and replies[0][1][0] != replies[1][1][0]
    decoder = captured._feeder.decoder
    assert decoder is not None and eager._feeder.decoder is None

    both(lambda engine: (engine.undo(), engine.state.tokens_seen))
    both(lambda engine: (engine.regenerate().new_tokens, reply(engine)))
    first_answer = captured.history()[1]["snapshot"]
    both(lambda engine: engine.restore(first_answer))

    # A cancelled feed: the decoder has run a piece ahead; the state and the next turn must not see it.
    monkeypatch.setattr(engine_module, "PREFILL_PIECE", 8)

    def cancelled_feed(engine):
        cancel = threading.Event()
        return engine.feed(
            "hello world, what is", on_progress=lambda done, total: cancel.set(), cancel=cancel
        )

    assert both(cancelled_feed) == 0
    both(lambda engine: (engine.chat("the capital").new_tokens, reply(engine)))
    assert captured._feeder.decoder is decoder


def test_feeding_the_decoders_argmax_feeds_its_own_buffer(tiny_loaded):
    from lola_chat.decoding import TokenFeeder

    loaded = triton_shaped(tiny_loaded)
    feeder = TokenFeeder(loaded.model, "uncaptured")
    reference = TokenFeeder(loaded.model, "model")
    for each in (feeder, reference):
        each.bind(loaded.model.new_state("lola", loaded.lola))
    assert feeder.argmax() is None, "nothing fed yet"
    prompt = list(range(5, 25))
    logits = feeder.feed(prompt)
    expected = reference.feed(prompt)
    fed = []
    decoder = feeder.decoder
    step = decoder.step
    decoder.step = lambda token: fed.append(token) or step(token)
    for _ in range(3):
        token = feeder.argmax()
        assert token == int(expected.argmax()) == int(logits.argmax())
        logits, expected = feeder.feed([token]), reference.feed([token])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    other = (feeder.argmax() + 1) % loaded.model.cfg.vocab_size
    torch.testing.assert_close(feeder.feed([other]), reference.feed([other]), atol=1e-4, rtol=1e-4)
    # The argmax went back as the decoder's own buffer, without a copy from the host; another token did not.
    assert all(token is decoder.token for token in fed[:3]) and fed[3] == other
    # A decoder stepped directly, or a feeder bound again, has no argmax the feeder could vouch for.
    assert feeder.argmax() is not None
    step(decoder.token)
    assert feeder.argmax() is None
    feeder.bind(loaded.model.new_state("lola", loaded.lola))
    feeder.prepare()
    assert feeder.argmax() is None
