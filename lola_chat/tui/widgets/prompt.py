"""The multi-line chat input: Enter sends, Ctrl+J / Alt+Enter / Shift+Enter start a new line, Up on the
first line and Down on the last browse the prompts sent before."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea

from lola_chat.tui.text import visible

# Terminals without the kitty keyboard protocol report Alt+Enter as plain Enter, so Ctrl+J is the
# newline key that works everywhere.
NEWLINE_KEYS = ("ctrl+j", "alt+enter", "shift+enter")


class PromptHistory:
    """The prompts sent, oldest first, and the place reached while browsing them.

    Browsing walks a copy of the entries with the draft at its end, so the draft and any edits made to a
    recalled prompt are still there when the user comes back to them, until the next send.
    """

    def __init__(self) -> None:
        self.entries: list[str] = []
        # Typed commands are in no transcript, so they outlive a reload (a session switch).
        self.commands: list[str] = []
        self._browsing: list[str] | None = None
        self._place = 0

    def load(self, prompts: list[str]) -> None:
        """Start again from ``prompts`` (a session's), followed by the commands typed so far."""
        self.entries = [*prompts, *self.commands]
        self._browsing = None

    def add(self, text: str, command: bool = False) -> None:
        """Record a sent prompt (a repeat of the newest is kept once) and end browsing."""
        self._browsing = None
        if command:
            self.commands.append(text)
        if text and (not self.entries or self.entries[-1] != text):
            self.entries.append(text)

    def step(self, current: str, offset: int) -> str | None:
        """The text ``offset`` places away (-1 older, +1 newer) after keeping ``current`` where we are;
        None, with nothing changed, past either end."""
        if self._browsing is None:
            self._browsing = [*self.entries, ""]
            self._place = len(self.entries)
        target = self._place + offset
        if not 0 <= target < len(self._browsing):
            return None
        self._browsing[self._place] = current
        self._place = target
        return self._browsing[target]


class PromptArea(TextArea):
    """TextArea whose Enter submits. Handlers here replace TextArea's own (prevent_default), not extend."""

    @dataclass
    class Submitted(Message):
        prompt: PromptArea
        text: str

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        # Not ``history``: TextArea's own attribute of that name is its undo history.
        self.sent = PromptHistory()

    def action_cursor_up(self, select: bool = False) -> None:
        if select or not self.navigator.is_first_wrapped_line(self.cursor_location) or not self._recall(-1):
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if select or not self.navigator.is_last_wrapped_line(self.cursor_location) or not self._recall(1):
            super().action_cursor_down(select)

    def _recall(self, offset: int) -> bool:
        text = self.sent.step(self.text, offset)
        if text is None:
            return False
        self.replace(text, (0, 0), self.document.end)
        # Older text opens on its first row and newer on its last, so holding the key keeps browsing.
        if offset < 0:
            self.move_cursor(self.navigator.get_location_end((0, 0)))
        else:
            self.move_cursor(self.document.end)
        return True

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
