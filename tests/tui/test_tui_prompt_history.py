"""Up / Down in the chat input browse the prompts sent before, through Pilot with the fake engine."""

from __future__ import annotations

from fake_engine import BASE_TIME
from pilot_helpers import settle, type_and_send

from lola_chat.tui.screens.sessions import SessionsScreen
from lola_chat.tui.widgets.prompt import PromptArea, PromptHistory


def user(content: str, **extra) -> dict:
    return {"type": "message", "role": "user", "content": content, "stopped": False, **extra}


def reply(content: str) -> dict:
    return {"type": "message", "role": "assistant", "content": content, "stopped": False}


def prompt_of(app) -> PromptArea:
    return app.chat.query_one(PromptArea)


async def send_all(app, pilot, *texts: str) -> None:
    for text in texts:
        await type_and_send(pilot, text)
        await settle(app, pilot)


async def test_up_recalls_sent_prompts_from_newest_back(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await send_all(app, pilot, "first question", "second question")
        prompt = prompt_of(app)
        await pilot.press("up")
        assert prompt.text == "second question"
        assert prompt.cursor_location == (0, len("second question"))
        await pilot.press("up")
        assert prompt.text == "first question"
        await pilot.press("up")
        assert prompt.text == "first question", "Up past the oldest prompt keeps it"


async def test_down_comes_forward_and_restores_the_draft(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await send_all(app, pilot, "one", "two")
        prompt = prompt_of(app)
        prompt.insert("half typed")
        await pilot.press("up", "up")
        assert prompt.text == "one"
        await pilot.press("down")
        assert prompt.text == "two"
        await pilot.press("down")
        assert prompt.text == "half typed"
        assert prompt.cursor_location == (0, len("half typed"))
        await pilot.press("down")
        assert prompt.text == "half typed"


async def test_a_recalled_prompt_sent_again_goes_to_the_end(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await send_all(app, pilot, "alpha", "beta")
        await pilot.press("up", "up", "enter")
        await settle(app, pilot)
        assert engine.calls[-1] == ("chat", "alpha")
        prompt = prompt_of(app)
        assert prompt.text == ""
        await pilot.press("up")
        assert prompt.text == "alpha"
        await pilot.press("up")
        assert prompt.text == "beta"


async def test_up_and_down_move_inside_a_multi_line_input(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await send_all(app, pilot, "earlier")
        prompt = prompt_of(app)
        prompt.insert("line one\nline two\nline three")
        await pilot.press("up")
        assert prompt.text == "line one\nline two\nline three"
        assert prompt.cursor_location[0] == 1
        await pilot.press("up")
        assert prompt.cursor_location[0] == 0
        await pilot.press("down")
        assert prompt.text == "line one\nline two\nline three"
        assert prompt.cursor_location[0] == 1
        await pilot.press("up", "up")
        assert prompt.text == "earlier", "Up on the first line recalls"
        await pilot.press("down")
        assert prompt.text == "line one\nline two\nline three", "the multi-line draft is kept"


async def test_up_moves_inside_a_soft_wrapped_line_first(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await send_all(app, pilot, "earlier")
        prompt = prompt_of(app)
        long_line = "word " * 60
        prompt.insert(long_line)
        await pilot.press("up")
        assert prompt.text == long_line
        assert prompt.cursor_location[1] < len(long_line)
        for _ in range(len(long_line) // 40):
            if prompt.text != long_line:
                break
            await pilot.press("up")
        assert prompt.text == "earlier", "Up on the first visual row recalls"


async def test_multi_line_prompts_are_browsed_whole(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await send_all(app, pilot, "short", "top\nmiddle\nbottom")
        prompt = prompt_of(app)
        await pilot.press("up")
        assert prompt.text == "top\nmiddle\nbottom"
        assert prompt.cursor_location == (0, len("top")), "an older prompt opens on its first line"
        await pilot.press("up")
        assert prompt.text == "short"
        await pilot.press("down")
        assert prompt.cursor_location == (2, len("bottom")), "a newer prompt opens on its last line"
        await pilot.press("down")
        assert prompt.text == ""


async def test_history_loads_from_the_session_transcript(engine, make_app):
    session = engine.store.create("test")
    session.messages = [
        user("what is lola"),
        reply("A memory."),
        user("a long document " * 20, document=True),
        user("/etc/hosts, what is it"),
        reply("A file."),
    ]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        prompt = prompt_of(app)
        await pilot.press("up")
        assert prompt.text == "//etc/hosts, what is it", "a leading slash comes back doubled, as typed"
        await pilot.press("up")
        assert prompt.text == "what is lola", "fed documents are not prompts"
        await pilot.press("up")
        assert prompt.text == "what is lola"


async def test_switching_sessions_reloads_history_and_keeps_commands(engine, make_app):
    engine.store.create("other").messages = [user("in other"), reply("Yes.")]
    engine.store.sessions["other"].last_used = BASE_TIME - 86400
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await send_all(app, pilot, "in test", "/set temperature 0.5")
        await pilot.press("f3")
        await settle(app, pilot)
        assert isinstance(app.screen, SessionsScreen)
        await pilot.press("down", "enter")
        await settle(app, pilot)
        assert engine.session.name == "other"
        prompt = prompt_of(app)
        prompt.focus()
        await pilot.press("up")
        assert prompt.text == "/set temperature 0.5", "commands typed while the app runs are kept"
        await pilot.press("up")
        assert prompt.text == "in other"
        await pilot.press("up")
        assert prompt.text == "in other", "the other session's prompts are gone"


def test_edits_to_recalled_prompts_last_until_the_next_send():
    history = PromptHistory()
    history.load(["a", "b"])
    assert history.step("draft", -1) == "b"
    assert history.step("b edited", -1) == "a"
    assert history.step("a", 1) == "b edited"
    assert history.step("b edited", 1) == "draft"
    assert history.step("draft", 1) is None
    history.add("draft")
    history.add("draft")
    assert history.entries == ["a", "b", "draft"], "a repeat of the newest is kept once"
    assert history.step("", -1) == "draft"
    assert history.step("draft", -1) == "b", "edits are dropped once a prompt is sent"
