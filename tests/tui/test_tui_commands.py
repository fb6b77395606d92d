"""Slash commands, the memory inspector and history paging."""

from __future__ import annotations

import html
import json

import pytest
from pilot_helpers import settle, shown, type_and_send

from lola_chat.errors import UsageError
from lola_chat.tui import commands
from lola_chat.tui.screens.help import HelpScreen
from lola_chat.tui.text import human_bytes
from lola_chat.tui.widgets.inspector import MemoryInspector
from lola_chat.tui.widgets.prompt import PromptArea
from lola_chat.tui.widgets.transcript import PAGE, MessageView


def notifications(app) -> list[str]:
    return [notification.message for notification in app._notifications]


async def test_set_temperature_reaches_engine(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "/set temperature 0.3")
        await settle(app, pilot)
        await type_and_send(pilot, "/set seed none")
        await settle(app, pilot)
        assert ("set_generation", {"temperature": 0.3}) in engine.calls
        assert engine.generation == {"temperature": 0.3, "seed": None}
        assert "Set temperature = 0.3" in notifications(app)


async def test_bad_slash_command_is_reported_and_kept(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "/set temperature hot")
        await settle(app, pilot)
        assert "temperature needs a float value, not 'hot'" in notifications(app)
        assert app.chat.query_one(PromptArea).text == "/set temperature hot"
        assert not [call for call in engine.calls if call[0] == "set_generation"]


async def test_system_new_rename_and_save(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "/system Answer in French.")
        await settle(app, pilot)
        assert engine.session.system_prompt == "Answer in French."
        await type_and_send(pilot, "/new")
        await settle(app, pilot)
        assert engine.session.name == "chat-1" and app.chat.session_name == "chat-1"
        await type_and_send(pilot, "/rename notes")
        await settle(app, pilot)
        assert engine.session.name == "notes" and not engine.store.exists("chat-1")
        assert app.chat.status.report["session"] == "notes"
        await type_and_send(pilot, "/save")
        await settle(app, pilot)
        assert ("save",) in engine.calls


async def test_new_with_bad_name_is_rejected(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "/new ../evil")
        await settle(app, pilot)
        assert engine.session.name == "test"
        assert any("bad session name '../evil'" in message for message in notifications(app))


async def test_export_writes_file_in_export_dir(engine, make_app, tmp_path):
    engine.replies = ["an answer"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "question")
        await settle(app, pilot)
        await type_and_send(pilot, "/export")
        await settle(app, pilot)
        await type_and_send(pilot, "/export jsonl")
        await settle(app, pilot)
        await type_and_send(pilot, "/export markdown")
        await settle(app, pilot)
    assert "an answer" in (tmp_path / "test.md").read_text()
    assert (tmp_path / "test-1.md").exists()
    records = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert [record["role"] for record in records] == ["user", "assistant"]
    assert f"Exported to {tmp_path / 'test.jsonl'}" in notifications(app)


async def test_feed_reads_a_file_with_progress(engine, make_app, tmp_path):
    document = tmp_path / "notes.txt"
    document.write_text("word " * 1000)
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, f"/feed {document}")
        await settle(app, pilot)
        assert ("feed", 5000) in engine.calls
        assert f"Read 1,000 tokens from {document}" in notifications(app)
        assert app.chat.status.report["tokens_seen"] == 1000
        assert app.chat.query_one("#feed-progress").has_class("hidden")
        title = str(app.chat.query(".message-title").last().render())
        assert "document of 5,000 characters" in title
        await type_and_send(pilot, f"/feed {tmp_path / 'missing.txt'}")
        await settle(app, pilot)
        assert any(message.startswith("could not read") for message in notifications(app))


async def test_escape_cancels_a_feed(engine, make_app, tmp_path):
    document = tmp_path / "book.txt"
    document.write_text("word " * 1000)
    engine.hold.set()
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, f"/feed {document}")
        await pilot.pause(0.2)
        bar = app.chat.query_one("#feed-progress")
        assert not bar.has_class("hidden") and bar.progress == 100 and bar.total == 1000
        await pilot.press("escape")
        await settle(app, pilot)
        assert engine.cancel_seen and bar.has_class("hidden")
        assert f"Read 100 tokens from {document} (stopped)" in notifications(app)


async def test_inspector_toggles_and_shows_numbers(engine, make_app):
    engine.replies = ["four words of reply"]
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        inspector = app.chat.query_one(MemoryInspector)
        assert not inspector.display or inspector.has_class("hidden")
        await pilot.press("f2")
        await settle(app, pilot)
        assert not inspector.has_class("hidden")
        await type_and_send(pilot, "two words")
        await settle(app, pilot)
        report = inspector.report
        assert report["tokens_seen"] == engine.session.tokens_seen == 6
        assert "cached_text" in report, "a turn with the inspector open brings a detailed report"
        totals = str(inspector.query_one("#inspector-totals").render())
        assert "tokens seen         6" in totals
        state, kv_cache = report["state_bytes"], report["kv_cache_bytes"]
        assert f"state on device     {human_bytes(state)}" in totals
        assert f"full KV cache       {human_bytes(kv_cache)} ({kv_cache / state:.1f}× this state)" in totals
        table = inspector.query_one("#inspector-layers")
        assert table.row_count == 4 and table.get_row_at(0)[1:3] == ["6/16", "0/16"]
        recall = str(inspector.query_one("#inspector-recall").render())
        assert recall.count("█") > 0 and recall.splitlines()[1].endswith(" 8")
        cached = str(inspector.query_one("#inspector-cached").render())
        assert "\\x1b[31mred" in cached
        await type_and_send(pilot, "/memory")
        await settle(app, pilot)
        assert inspector.has_class("hidden") and not app.inspector_open


async def test_only_recent_history_is_mounted_and_earlier_pages_load(engine, make_app):
    app = make_app()
    engine.open("test")
    total = 2 * PAGE + 6
    for index in range(total):
        role = "user" if index % 2 == 0 else "assistant"
        engine.session.messages.append({"role": role, "content": f"message {index}", "stopped": False})
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        views = app.chat.query(MessageView)
        assert len(views) == PAGE and views.first().message["content"] == f"message {total - PAGE}"
        app.chat.transcript.scroll_home(animate=False, immediate=True)
        await pilot.pause()
        await pilot.click("#load-earlier")
        await settle(app, pilot)
        assert len(app.chat.query(MessageView)) == 2 * PAGE
        app.chat.transcript.focus()
        app.chat.transcript.scroll_home(animate=False, immediate=True)
        await pilot.pause()
        await pilot.press("pageup")
        await settle(app, pilot)
        assert len(shown(app)) == total and shown(app)[0][1] == "message 0"
        assert app.chat.query_one("#load-earlier").has_class("hidden")


async def test_help_screen_lists_keys(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = html.unescape(app.export_screenshot()).replace("\xa0", " ")
        for label in ("Ctrl+R", "Regenerate", "F2", "/set KEY VALUE", "Up / Down"):
            assert label in text
        assert "older / newer prompts (on first / last line)" in text
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.chat


async def test_palette_offers_chat_actions(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"toggle memory")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.inspector_open


def test_slash_parsing():
    assert commands.parse("hello") is None
    assert commands.parse("//etc/hosts") is None and commands.message_text("//etc") == "/etc"
    assert commands.parse("/SET top_p 0.5") == ("set", "top_p 0.5")
    assert commands.parse_setting("max_new_tokens 64") == {"max_new_tokens": 64}
    assert commands.parse_export('jsonl "my file.jsonl"') == ("jsonl", "my file.jsonl")
    for bad in ("top_p 2", "top_p", "colour red", "max_new_tokens 0.5"):
        with pytest.raises(UsageError):
            commands.parse_setting(bad)
    with pytest.raises(UsageError, match="unknown command /frobnicate"):
        commands.parse("/frobnicate now")


async def test_copy_last_reply_and_its_code_block(engine, make_app):
    engine.replies = ["Use this:\n\n```sh\nls -la\n```\n"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "/copy")
        assert "There is no reply to copy yet" in notifications(app)
        await type_and_send(pilot, "how do I list files?")
        await settle(app, pilot)
        await type_and_send(pilot, "/copy")
        assert app.clipboard == engine.history()[-1]["content"]
        await type_and_send(pilot, "/copy code")
        assert app.clipboard == "ls -la\n"
