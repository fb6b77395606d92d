"""The chat screen driven through Pilot with the scripted fake engine."""

from __future__ import annotations

import json
import re
import time

from pilot_helpers import settle, shown, type_and_send
from textual.events import Paste

from lola_chat.tui.screens.chat import ChatScreen
from lola_chat.tui.widgets.prompt import PromptArea


async def test_send_shows_streamed_reply(engine, make_app):
    engine.replies = ["Hello **there**, friend."]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, ChatScreen)
        await type_and_send(pilot, "hi")
        await settle(app, pilot)
        assert ("chat", "hi") in engine.calls
        assert shown(app) == [("user", "hi", False), ("assistant", "Hello **there**, friend.", False)]
        assert app.screen.query_one(PromptArea).text == ""


async def test_reply_streams_in_batches_while_generating(engine, make_app):
    engine.replies = ["one two three four"]
    engine.hold.set()
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "count")
        await pilot.pause(0.2)
        assert app.activity == "generating"
        assert shown(app)[-1] == ("assistant", "one ", False)
        assert "generating" in str(app.chat.status.status_text())
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.activity == ""


async def test_escape_stops_reply_and_keeps_partial(engine, make_app):
    engine.replies = ["partial answer that goes on"]
    engine.hold.set()
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "tell me")
        await pilot.pause(0.1)
        await pilot.press("escape")
        await settle(app, pilot)
        assert engine.cancel_seen
        assert shown(app)[-1] == ("assistant", "partial ", True)
        assert "stopped" in str(app.chat.query(".message-title").last().render())


async def test_regenerate_replaces_last_reply(engine, make_app):
    engine.replies = ["first answer", "second answer"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "question")
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert ("regenerate",) in engine.calls
        assert shown(app) == [("user", "question", False), ("assistant", "second answer", False)]


async def test_undo_drops_last_exchange(engine, make_app):
    engine.replies = ["a1", "a2"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "q1")
        await settle(app, pilot)
        await type_and_send(pilot, "q2")
        await settle(app, pilot)
        tokens_before = engine.session.tokens_seen
        await pilot.press("ctrl+b")
        await settle(app, pilot)
        assert ("undo",) in engine.calls
        assert shown(app) == [("user", "q1", False), ("assistant", "a1", False)]
        assert app.chat.status.report["tokens_seen"] == engine.session.tokens_seen < tokens_before


async def test_second_message_while_busy_is_refused_and_kept(engine, make_app):
    engine.hold.set()
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "first")
        await pilot.pause(0.1)
        await type_and_send(pilot, "second")
        assert app.chat.query_one(PromptArea).text == "second"
        assert [call for call in engine.calls if call[0] == "chat"] == [("chat", "first")]
        await pilot.press("escape")
        await settle(app, pilot)


async def test_large_paste_does_not_hang(engine, make_app):
    text = ("a pasted line with \x1b[2J an escape\n" * 6000)[:200_000]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        prompt = app.chat.query_one(PromptArea)
        prompt.focus()
        started = time.perf_counter()
        prompt.post_message(Paste(text))
        await pilot.pause()
        assert "\\x1b[2J" in prompt.text and "\x1b" not in prompt.text
        await pilot.press("enter")
        await settle(app, pilot)
        assert time.perf_counter() - started < 10
        sent = [call[1] for call in engine.calls if call[0] == "chat"]
        assert len(sent) == 1 and len(sent[0]) >= len(text)
        assert "more characters" in str(app.chat.query(".message-body").first().render())


async def test_newline_keys_insert_instead_of_sending(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        prompt = app.chat.query_one(PromptArea)
        prompt.focus()
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb"
        assert not [call for call in engine.calls if call[0] == "chat"]


async def test_markup_and_control_characters_are_shown_as_text(engine, make_app):
    engine.replies = ["[bold red]not markup[/] \x1b[31mred"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "[link=x]me[/link]")
        await settle(app, pilot)
        screen_text = app.export_screenshot()
        assert "[bold&#160;red]not&#160;markup[/]" in screen_text
        assert "\\x1b[31mred" in screen_text and "\x1b" not in screen_text
        assert "[link=x]me[/link]" in screen_text


async def test_ctrl_c_stops_first_then_quits(engine, make_app):
    engine.hold.set()
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "go")
        await pilot.pause(0.1)
        await pilot.press("ctrl+c")
        await settle(app, pilot)
        assert engine.cancel_seen and app.is_running
        await pilot.press("ctrl+c")
        await pilot.pause()
    assert app.return_code == 0


async def test_state_file_remembers_last_session(engine, make_app, tmp_path):
    app = make_app("work")
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
    again = make_app(None)
    async with again.run_test(size=(100, 32)) as pilot:
        await settle(again, pilot)
        assert again.chat.session_name == "work"
    assert json.loads((tmp_path / "state.json").read_text()) == {"last_session": "work"}


async def test_quit_during_a_reply_stops_it_and_saves_once(engine, make_app):
    engine.hold.set()
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "a long question")
        await pilot.pause(0.1)
        await pilot.press("ctrl+q")
        await pilot.pause()
    app.shutdown_engine()
    assert engine.cancel_seen and engine.closed
    assert ("save",) not in engine.calls, "the stopped turn saved itself; nothing is left to save"


async def test_no_color_gives_a_grey_screen(engine, make_app, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    engine.replies = ["some **bold** reply"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "hi")
        await settle(app, pilot)
        colours = set(re.findall(r"fill: #([0-9a-f]{6})", app.export_screenshot()))
    assert app.no_color and colours
    colours.discard("c5c8c6")  # the default foreground of the SVG frame, not of the app
    assert all(c[0:2] == c[2:4] == c[4:6] for c in colours), colours
