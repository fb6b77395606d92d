"""SVG snapshots of the three main screens at a fixed size. Regenerate after an intended change with
``.venv/bin/pytest tests/tui/test_tui_snapshots.py --snapshot-update`` and review the SVGs."""

from __future__ import annotations

from fake_engine import BASE_TIME
from pilot_helpers import settle, type_and_send

from lola_chat.tui.widgets.prompt import PromptArea

SIZE = (100, 32)
REPLY = (
    'Here is a small function:\n\n```python\ndef greet(name):\n    return f"hello {name}"\n```\n\n'
    "It **returns** a greeting; call it with a `name`."
)


def chat_app(engine, make_app):
    engine.replies = ["Nice to meet you, Ada. I will remember that.", REPLY]
    engine.store.create("notes").last_used = BASE_TIME - 2 * 86400
    return make_app()


async def two_turns(pilot) -> None:
    app = pilot.app
    await settle(app, pilot)
    # A blinking cursor would make the picture depend on timing.
    app.chat.query_one(PromptArea).cursor_blink = False
    await type_and_send(pilot, "My name is Ada.")
    await settle(app, pilot)
    await type_and_send(pilot, "Write a greeting function in Python.")
    await settle(app, pilot)


def test_chat_screen(snap_compare, engine, make_app):
    assert snap_compare(chat_app(engine, make_app), terminal_size=SIZE, run_before=two_turns)


def test_memory_inspector(snap_compare, engine, make_app):
    async def run_before(pilot) -> None:
        await two_turns(pilot)
        await pilot.press("f2")
        await settle(pilot.app, pilot)

    assert snap_compare(chat_app(engine, make_app), terminal_size=SIZE, run_before=run_before)


def test_session_list(snap_compare, engine, make_app):
    async def run_before(pilot) -> None:
        await two_turns(pilot)
        await pilot.press("f3")
        await settle(pilot.app, pilot)

    assert snap_compare(chat_app(engine, make_app), terminal_size=SIZE, run_before=run_before)
