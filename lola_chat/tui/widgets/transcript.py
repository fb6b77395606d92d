"""The conversation view: only the most recent messages are mounted; older ones are paged in on demand,
so a transcript of any length opens at once. A streaming reply is appended in batches."""

from __future__ import annotations

import threading

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Button, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from lola_chat.tui.text import shorten, visible

PAGE = 24
# A user message is shown as plain text; past this many characters only its start is shown.
USER_DISPLAY_LIMIT = 4000
ROLE_TITLES = {"user": "You", "assistant": "LoLA", "system": "System"}


def message_key(message: dict) -> tuple:
    """What decides whether a rendered message is still current."""
    return (message.get("role"), message.get("content"), bool(message.get("stopped")))


class MessageView(Vertical):
    """One message: a title line and the body (Markdown for the model, plain text for the user)."""

    def __init__(self, message: dict) -> None:
        role = message.get("role", "assistant")
        super().__init__(classes=f"message {role}")
        self.message = dict(message)
        self.role = role

    def compose(self) -> ComposeResult:
        yield Static(self._title(), classes="message-title")
        content = visible(self.message.get("content", ""))
        if self.role == "assistant":
            yield Markdown(content, open_links=False, classes="message-body")
        else:
            yield Static(Text(shorten(content, USER_DISPLAY_LIMIT)), classes="message-body")

    def _title(self) -> Text:
        title = Text(ROLE_TITLES.get(self.role, self.role), style="bold")
        if self.message.get("document"):
            title.append(f"  document of {len(self.message.get('content', '')):,} characters", style="italic")
        if self.message.get("stopped"):
            title.append("  ■ stopped", style="italic")
        return title

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def mark_stopped(self, stopped: bool) -> None:
        self.message["stopped"] = stopped
        self.set_class(stopped, "stopped")
        self.query_one(".message-title", Static).update(self._title())


class PieceBuffer:
    """Text pieces handed over from the engine thread; the UI drains them at its own pace."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: list[str] = []

    def feed(self, piece: str) -> None:
        with self._lock:
            self._pieces.append(piece)

    def drain(self) -> str:
        with self._lock:
            text = "".join(self._pieces)
            self._pieces.clear()
        return text


class Transcript(VerticalScroll):
    """Holds the whole visible history as data and mounts a window of its most recent messages."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.messages: list[dict] = []
        self.first_shown = 0
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Button("", id="load-earlier", classes="hidden", compact=True)

    @property
    def views(self) -> list[MessageView]:
        return list(self.query_children(MessageView))

    async def show(self, messages: list[dict]) -> None:
        """Bring the view in line with ``messages`` (which it keeps), re-rendering only the messages that
        changed at the end. Only the mounted messages are compared, so a turn costs the same at any length.
        """
        start = self.first_shown
        same = start
        limit = min(len(self.messages), len(messages))
        while same < limit and message_key(self.messages[same]) == message_key(messages[same]):
            same += 1
        if same == start:
            await self.remove_children(MessageView)
            start = self.first_shown = max(0, len(messages) - PAGE)
            same = start
        else:
            await self.remove_children(self.views[same - start :])
        self.messages = messages
        new_views = [MessageView(message) for message in messages[same:]]
        if new_views:
            await self.mount_all(new_views)
        self._update_load_button()
        self.anchor()

    async def load_earlier(self) -> None:
        if self.first_shown == 0:
            return
        start = max(0, self.first_shown - PAGE)
        views = [MessageView(message) for message in self.messages[start : self.first_shown]]
        anchor = self.views[0] if self.views else None
        await self.mount_all(views, after=self.query_one("#load-earlier"))
        self.first_shown = start
        self._update_load_button()
        if anchor is not None:
            self.call_after_refresh(self.scroll_to_widget, anchor, top=True, animate=False)

    def _update_load_button(self) -> None:
        button = self.query_one("#load-earlier", Button)
        button.set_class(self.first_shown == 0, "hidden")
        button.label = f"▲ {self.first_shown:,} earlier messages (click, or scroll up)"

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "load-earlier":
            event.stop()
            await self.load_earlier()

    async def _on_mouse_scroll_up(self, _event) -> None:
        if self.scroll_y <= 0:
            await self.load_earlier()

    async def _scroll_or_load(self, scroll) -> None:
        """Keys that scroll up page earlier messages in once the top is reached."""
        if self.scroll_y <= 0 and self.first_shown:
            await self.load_earlier()
        else:
            scroll()

    async def action_scroll_up(self) -> None:
        await self._scroll_or_load(super().action_scroll_up)

    async def action_page_up(self) -> None:
        await self._scroll_or_load(super().action_page_up)

    async def action_scroll_home(self) -> None:
        await self._scroll_or_load(super().action_scroll_home)

    async def add_user(self, text: str) -> None:
        message = {"role": "user", "content": text, "stopped": False}
        self.messages.append(message)
        await self.mount(MessageView(message))
        self.anchor()

    async def begin_reply(self) -> None:
        """Mount an empty reply that ``append_reply`` streams into."""
        message = {"role": "assistant", "content": "", "stopped": False}
        self.messages.append(message)
        view = MessageView(message)
        await self.mount(view)
        self._stream = Markdown.get_stream(view.markdown)
        self.anchor()

    async def append_reply(self, text: str) -> None:
        if not text or self._stream is None:
            return
        self.messages[-1]["content"] += text
        self.views[-1].message["content"] = self.messages[-1]["content"]
        await self._stream.write(visible(text))

    async def end_reply(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    async def drop_last_reply(self) -> None:
        """Remove the last assistant message before a regenerated one streams in."""
        views = self.views
        if views and views[-1].role == "assistant":
            await views[-1].remove()
            self.messages.pop()

    def last_reply(self) -> str | None:
        for message in reversed(self.messages):
            if message.get("role") == "assistant":
                return message.get("content", "")
        return None
