"""The multi-line chat input: Enter sends, Ctrl+J / Alt+Enter / Shift+Enter start a new line."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea

from lola_chat.tui.text import visible

# Terminals without the kitty keyboard protocol report Alt+Enter as plain Enter, so Ctrl+J is the
# newline key that works everywhere.
NEWLINE_KEYS = ("ctrl+j", "alt+enter", "shift+enter")


class PromptArea(TextArea):
    """TextArea whose Enter submits. Handlers here replace TextArea's own (prevent_default), not extend."""

    @dataclass
    class Submitted(Message):
        prompt: PromptArea
        text: str

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")

    async def _on_paste(self, event: events.Paste) -> None:
        # Pasted escape sequences are kept as visible text, so what is shown is what is sent.
        event.prevent_default()
        if self.read_only:
            return
        result = self.replace(visible(event.text), *self.selection)
        self.move_cursor(result.end_location)
        self.focus()

    def take(self) -> str:
        """The text, clearing the input."""
        text = self.text
        self.clear()
        return text
