"""Small Pilot helpers shared by the app tests."""

from __future__ import annotations

import time

from lola_chat.tui.widgets.prompt import PromptArea
from lola_chat.tui.widgets.transcript import MessageView


async def settle(app, pilot, timeout: float = 60.0) -> None:
    """Wait until every engine job has finished and the UI has caught up."""
    deadline = time.monotonic() + timeout
    await pilot.pause()
    while True:
        await app.workers.wait_for_complete()
        await pilot.pause()
        if not app.activity and not any(worker.is_running for worker in app.workers):
            break
        assert time.monotonic() < deadline, f"the engine is still busy: {app.activity}"
        await pilot.pause(0.01)
    await pilot.pause()


async def type_and_send(pilot, text: str) -> None:
    prompt = pilot.app.screen.query_one(PromptArea)
    prompt.focus()
    prompt.insert(text)
    await pilot.press("enter")


def shown(app) -> list[tuple[str, str, bool]]:
    """(role, content, stopped) of every message mounted on the chat screen."""
    return [
        (view.role, view.message["content"], bool(view.message.get("stopped")))
        for view in app.chat.query(MessageView)
    ]
