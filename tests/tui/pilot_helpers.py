"""Small Pilot helpers shared by the app tests."""

from __future__ import annotations

from lola_chat.tui.widgets.prompt import PromptArea
from lola_chat.tui.widgets.transcript import MessageView


async def settle(app, pilot) -> None:
    """Wait until every engine job has finished and the UI has caught up."""
    for _ in range(3):
        await app.workers.wait_for_complete()
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
