"""Start-up (loading screen, failures), error handling, and the app on a real Engine."""

from __future__ import annotations

import threading

import pytest
import torch
from pilot_helpers import settle, shown, type_and_send
from textual.widgets import ProgressBar

from lola_chat.config import Config, GenerationSettings, Paths
from lola_chat.errors import LolaError
from lola_chat.tui.app import LolaChatApp
from lola_chat.tui.screens.loading import LoadingScreen
from lola_chat.tui.widgets.inspector import MemoryInspector


def notifications(app) -> list[str]:
    return [notification.message for notification in app._notifications]


async def test_loading_screen_shows_progress_until_the_engine_is_ready(engine, tmp_path):
    release = threading.Event()

    def factory(progress):
        progress("verifying weights", 0.25)
        release.wait(timeout=10)
        return engine

    app = LolaChatApp(factory, "s", tmp_path / "state.json")
    async with app.run_test(size=(100, 32)) as pilot:
        for _ in range(100):
            await pilot.pause(0.02)
            if app.screen.query_one(ProgressBar).progress:
                break
        assert isinstance(app.screen, LoadingScreen)
        assert "verifying weights" in str(app.screen.query_one("#loading-message").render())
        assert app.screen.query_one(ProgressBar).progress == 0.25
        release.set()
        await settle(app, pilot)
        assert app.screen is app.chat and engine.session.name == "s"


async def test_start_failure_exits_with_its_code_and_message(tmp_path):
    def factory(progress):
        raise LolaError("weights missing: run lola-chat doctor")

    app = LolaChatApp(factory, None, tmp_path / "state.json")
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
    assert app.return_code == 1 and app.exit_code == 1
    assert app.error_message == "weights missing: run lola-chat doctor"


async def test_unexpected_error_is_a_notification_not_a_crash(engine, make_app, monkeypatch):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)

        def broken_undo():
            raise RuntimeError("boom")

        monkeypatch.setattr(engine, "undo", broken_undo)
        await pilot.press("ctrl+b")
        await settle(app, pilot)
        assert app.is_running and app.activity == ""
        assert "internal error: RuntimeError: boom" in notifications(app)
        assert "RuntimeError: boom" in app.internal_errors[-1]
        await pilot.press("ctrl+b")
        await settle(app, pilot)


def real_engine(loaded, home, max_new_tokens: int):
    from lola_chat.engine import Engine
    from lola_chat.sessions import SessionStore

    config = Config(
        paths=Paths.from_env({"LOLA_CHAT_HOME": str(home)}),
        generation=GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens, seed=1),
    )
    return Engine(config, loaded, SessionStore(config.paths.sessions), torch.device("cpu"))


async def turn_updates_inspector_and_snapshot(engine, tmp_path, question: str) -> str:
    app = LolaChatApp(lambda progress: engine, "real", tmp_path / "state.json", export_dir=tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("f2")
        await settle(app, pilot)
        await type_and_send(pilot, question)
        await settle(app, pilot)
        messages = shown(app)
        assert [role for role, _content, _stopped in messages] == ["user", "assistant"]
        report = app.chat.query_one(MemoryInspector).report
        assert report["tokens_seen"] == engine.state.tokens_seen > 0
        assert len(report["layers"]) == engine.model.cfg.n_layers and "cached_text" in report
        assert engine.session.latest_snapshot() is not None
    app.shutdown_engine()
    assert engine.session is None, "closing the app closes the session"
    return messages[1][1]


async def test_real_engine_turn_updates_inspector_and_writes_snapshot(tiny_loaded, tmp_path):
    engine = real_engine(tiny_loaded, tmp_path / "home", max_new_tokens=6)
    await turn_updates_inspector_and_snapshot(engine, tmp_path, "hello world")


async def test_real_engine_rename_open_session_then_undo(tiny_loaded, tmp_path):
    engine = real_engine(tiny_loaded, tmp_path / "home", max_new_tokens=4)
    app = LolaChatApp(lambda progress: engine, "first", tmp_path / "state.json")
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "hello")
        await settle(app, pilot)
        await type_and_send(pilot, "/rename second name")
        await settle(app, pilot)
        assert engine.session.name == "second name" and not engine.store.exists("first")
        await type_and_send(pilot, "what is my name?")
        await settle(app, pilot)
        assert len(shown(app)) == 4 and len(engine.history()) == 4
        await pilot.press("ctrl+b")
        await settle(app, pilot)
        assert [role for role, _content, _stopped in shown(app)] == ["user", "assistant"]
        assert app.chat.status.report["tokens_seen"] == engine.state.tokens_seen
    app.shutdown_engine()


@pytest.mark.network
async def test_default_model_answers_through_the_app(tmp_path):
    from lola_chat import fetch, weights

    paths = Paths.from_env()
    if not fetch.weights_status(paths)["present"]:
        pytest.skip("the default weights are not in this user's cache (run lola-chat once to fetch them)")
    loaded = weights.load_model(Config(paths=paths), torch.device("cpu"), torch.float32, progress=False)
    engine = real_engine(loaded, tmp_path / "home", max_new_tokens=16)
    reply = await turn_updates_inspector_and_snapshot(engine, tmp_path, "What is the capital of France?")
    assert reply.strip()
