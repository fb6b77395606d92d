"""The chat screen: conversation, input, status bar and the memory inspector panel."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, ProgressBar

from lola_chat.errors import UsageError
from lola_chat.tui import commands
from lola_chat.tui.widgets.inspector import MemoryInspector
from lola_chat.tui.widgets.prompt import PromptArea
from lola_chat.tui.widgets.status import StatusBar
from lola_chat.tui.widgets.transcript import PieceBuffer, Transcript

# Streamed text is moved into the Markdown view at most this often; re-rendering per token is too slow.
FLUSH_INTERVAL_S = 1 / 20
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+b", "undo", "Undo exchange"),
        Binding("f2", "toggle_inspector", "Memory"),
        Binding("f3,ctrl+o", "sessions", "Sessions"),
        Binding("ctrl+n", "new_session", "New session", show=False),
        Binding("ctrl+s", "save", "Save", show=False),
    ]
    AUTO_FOCUS = "#prompt"

    def __init__(self) -> None:
        super().__init__()
        self.session_name: str | None = None
        self._pieces = PieceBuffer()
        self._streaming = False
        self._feed_progress: tuple[int, int] | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-body"):
            with Vertical(id="chat-main"):
                yield Transcript(id="transcript")
                yield ProgressBar(id="feed-progress", show_eta=False, classes="hidden")
                yield PromptArea(id="prompt", placeholder="Message  (Enter sends, Ctrl+J new line, /help)")
            yield MemoryInspector(id="inspector", classes="hidden")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self._ticker = self.set_interval(FLUSH_INTERVAL_S, self._tick, pause=True)
        self.watch(self.app, "activity", self._show_activity)

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def inspector(self) -> MemoryInspector:
        return self.query_one(MemoryInspector)

    def _show_activity(self, activity: str) -> None:
        self.status.show(activity=activity)

    async def apply(self, view) -> None:
        """Show an ``EngineView`` read at the end of an engine job."""
        await self._finish_stream()
        if self._feed_progress is not None:
            self._end_feed()
        await self.transcript.show(view.history)
        self.status.show(report=view.report, stats=view.stats)
        if self.app.inspector_open:
            self.inspector.show(view.report)
        if view.session != self.session_name:
            self.session_name = view.session
            self.query_one(PromptArea).sent.load(commands.typed_prompts(view.history))
            self.app.remember_session(view.session)

    async def _tick(self) -> None:
        await self.transcript.append_reply(self._pieces.drain())
        if self._feed_progress is not None:
            done, total = self._feed_progress
            self.query_one("#feed-progress", ProgressBar).update(total=max(total, 1), progress=done)

    async def _start_stream(self) -> None:
        await self.transcript.begin_reply()
        self._streaming = True
        self._ticker.resume()

    async def _finish_stream(self) -> None:
        if self._streaming:
            self._ticker.pause()
            await self._tick()
            await self.transcript.end_reply()
            self._streaming = False

    async def on_prompt_area_submitted(self, event: PromptArea.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        try:
            command = commands.parse(text)
            if command is not None:
                accepted = await self.run_command(*command)
            else:
                accepted = await self.send(commands.message_text(event.text))
        except UsageError as error:
            self.notify(str(error), severity="error")
            return
        if accepted:
            event.prompt.sent.add(text, command=command is not None)
            event.prompt.clear()

    async def send(self, text: str) -> bool:
        cancel = threading.Event()
        if not self.app.claim("generating", cancel=cancel):
            return False
        await self.transcript.add_user(text)
        await self._start_stream()

        def job(engine):
            return self.app.view(engine, engine.chat(text, on_piece=self._pieces.feed, cancel=cancel))

        self.app.start_job(job, self.apply)
        return True

    async def action_regenerate(self) -> None:
        if self.transcript.last_reply() is None:
            self.notify("There is no reply to regenerate yet", severity="warning")
            return
        cancel = threading.Event()
        if not self.app.claim("regenerating", cancel=cancel):
            return
        await self.transcript.drop_last_reply()
        await self._start_stream()

        def job(engine):
            return self.app.view(engine, engine.regenerate(on_piece=self._pieces.feed, cancel=cancel))

        self.app.start_job(job, self.apply)

    def action_undo(self) -> None:
        def job(engine):
            engine.undo()
            return self.app.view(engine)

        self.app.run_engine("undoing", job, self.apply)

    def action_stop(self) -> None:
        if self.app.stop_work():
            self.notify("Stopping…")

    def action_save(self) -> None:
        def job(engine):
            engine.save()
            return engine.session.name

        self.app.run_engine("saving", job, lambda name: self.notify(f"Saved session {name}"))

    def action_toggle_inspector(self) -> None:
        opening = self.inspector.has_class("hidden")
        self.inspector.set_class(not opening, "hidden")
        self.app.inspector_open = opening
        if opening:
            self.inspector.show(self.status.report)
            # During a reply the detailed report comes with the end of the turn instead.
            self.app.run_engine(
                "reading memory",
                lambda engine: engine.memory_report(detail=True),
                self.inspector.show,
                quiet=True,
            )

    def action_sessions(self) -> None:
        from lola_chat.tui.screens.sessions import SessionsScreen

        self.app.push_screen(SessionsScreen())

    def action_new_session(self) -> None:
        self.open_session(None, create=True)

    def open_session(self, name: str | None, create: bool, then=None) -> bool:
        """Switch the engine to session ``name`` (a new one with a free name when None)."""

        def job(engine):
            target = name or free_session_name(engine.store)
            if create and engine.store.exists(target):
                raise UsageError(f"a session named {target!r} already exists; open it from Sessions (F3)")
            engine.open(target, create=create)
            return self.app.view(engine)

        async def done(view) -> None:
            await self.apply(view)
            self.notify(f"{'New session' if create else 'Opened'} {view.session}")
            if then is not None:
                then(view)

        return self.app.run_engine("opening session", job, done)

    async def run_command(self, name: str, rest: str) -> bool:
        """Run a slash command; True when it was taken (the input is then cleared)."""
        if name == "help":
            self.app.action_help()
        elif name == "new":
            return self.open_session(rest or None, create=True)
        elif name == "rename":
            if not rest:
                raise UsageError("usage: /rename NAME")
            return self.rename_session(rest)
        elif name == "system":
            return self.set_system(rest)
        elif name == "set":
            return self.set_generation(commands.parse_setting(rest))
        elif name == "memory":
            self.action_toggle_inspector()
        elif name == "save":
            self.action_save()
        elif name == "export":
            return self.action_export(*commands.parse_export(rest))
        elif name == "feed":
            return self.feed(commands.one_path(rest, "feed"))
        elif name == "copy":
            self.action_copy(code=rest.strip().lower() == "code")
        elif name == "sessions":
            self.action_sessions()
        return True

    def rename_session(self, new_name: str) -> bool:
        def job(engine):
            engine.store.rename(engine.session.name, new_name)
            return self.app.view(engine)

        return self.app.run_engine("renaming", job, self.apply)

    def set_system(self, text: str) -> bool:
        if not text:
            raise UsageError("usage: /system TEXT (the instructions the model follows in this session)")

        def job(engine):
            engine.set_system(text)
            return self.app.view(engine)

        async def done(view) -> None:
            await self.apply(view)
            self.notify("System prompt set")

        return self.app.run_engine("setting the system prompt", job, done)

    def set_generation(self, settings: dict) -> bool:
        shown = ", ".join(f"{key} = {value}" for key, value in settings.items())
        return self.app.run_engine(
            "changing settings",
            lambda engine: engine.set_generation(**settings),
            lambda _: self.notify(f"Set {shown}"),
        )

    def action_export(self, fmt: str = "markdown", path: str | None = None) -> bool:
        directory = self.app.export_dir or Path.cwd()

        def job(engine):
            target = commands.export_target(path, directory, engine.session.name, fmt)
            return commands.write_text_file(target, engine.session.export(fmt))

        return self.app.run_engine("exporting", job, lambda target: self.notify(f"Exported to {target}"))

    def feed(self, path: str) -> bool:
        cancel = threading.Event()
        if not self.app.claim("reading a document (Escape stops)", cancel=cancel):
            return False

        def progress(done: int, total: int) -> None:
            self._feed_progress = (done, total)

        def job(engine):
            tokens = engine.feed(commands.read_text_file(path), on_progress=progress, cancel=cancel)
            return tokens, self.app.view(engine)

        async def done(result) -> None:
            tokens, view = result
            await self.apply(view)
            stopped = " (stopped)" if cancel.is_set() else ""
            self.notify(f"Read {tokens:,} tokens from {path}{stopped}")

        self._feed_progress = (0, 1)
        self.query_one("#feed-progress").remove_class("hidden")
        self._ticker.resume()
        self.app.start_job(job, done)
        return True

    def _end_feed(self) -> None:
        self._feed_progress = None
        self.query_one("#feed-progress").add_class("hidden")
        if not self._streaming:
            self._ticker.pause()

    def action_copy(self, code: bool = False) -> None:
        reply = self.transcript.last_reply()
        if reply is None:
            self.notify("There is no reply to copy yet", severity="warning")
            return
        if code:
            blocks = CODE_BLOCK.findall(reply)
            if not blocks:
                self.notify("The last reply has no code block", severity="warning")
                return
            reply = blocks[-1]
        self.app.copy_text(reply)


def free_session_name(store) -> str:
    number = 1
    while store.exists(f"chat-{number}"):
        number += 1
    return f"chat-{number}"
