"""The lola-chat Textual application. It drives an ``Engine`` (see lola_chat/engine.py) and never touches
the model or the session files itself.

Every engine call runs in a thread worker, one at a time (``run_engine``), and comes back to the UI
through ``call_from_thread``; the memory report for the inspector and status bar is read in that same
worker, so the UI thread never waits on the model.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import TextArea

from lola_chat.errors import EXIT_OK, EXIT_RUNTIME, LolaError
from lola_chat.tui.palette import LolaCommands
from lola_chat.tui.screens.chat import ChatScreen
from lola_chat.tui.screens.help import HelpScreen
from lola_chat.tui.screens.loading import LoadingScreen

if TYPE_CHECKING:
    from lola_chat.engine import Engine

ProgressCallback = Callable[[str, float], None]
EngineFactory = Callable[[ProgressCallback], "Engine"]
DEFAULT_SESSION = "default"
# Two Ctrl+C presses this close together quit.
QUIT_PRESS_WINDOW_S = 2.0


@dataclass
class EngineView:
    """What the UI shows of the engine after a job, read in the worker thread."""

    session: str
    report: dict
    history: list[dict]
    stats: Any = None


def read_last_session(state_file: Path) -> str | None:
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = state.get("last_session") if isinstance(state, dict) else None
    return name if isinstance(name, str) and name else None


def write_last_session(state_file: Path, name: str) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = state_file.with_name(state_file.name + ".tmp")
    temporary.write_text(json.dumps({"last_session": name}), encoding="utf-8")
    os.replace(temporary, state_file)


class LolaChatApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "lola-chat"
    COMMANDS = App.COMMANDS | {LolaCommands}
    BINDINGS = [
        Binding("ctrl+c", "interrupt", "Stop the reply; twice: quit", priority=True, show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
        Binding("f1", "help", "Help"),
    ]
    activity: reactive[str] = reactive("")

    def __init__(
        self,
        engine_factory: EngineFactory,
        session: str | None,
        state_file: Path,
        *,
        clock: Callable[[], float] = time.time,
        export_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.engine_factory = engine_factory
        self.requested_session = session
        self.state_file = Path(state_file)
        self.clock = clock
        self.export_dir = export_dir
        self.engine: Engine | None = None
        self.exit_code = EXIT_OK
        self.error_message: str | None = None
        self.internal_errors: list[str] = []
        self.inspector_open = False
        self.cancel_event: threading.Event | None = None
        self._engine_lock = threading.Lock()
        self._last_interrupt = -QUIT_PRESS_WINDOW_S
        self.chat = ChatScreen()

    def on_mount(self) -> None:
        self.push_screen(LoadingScreen())
        self.run_worker(self._start, thread=True, exit_on_error=False, name="start")

    def _start(self) -> None:
        def progress(message: str, fraction: float) -> None:
            self._to_ui(self._loading_progress, message, fraction)

        try:
            engine = self.engine_factory(progress)
            name = self.requested_session or read_last_session(self.state_file) or DEFAULT_SESSION
            current = getattr(engine, "session", None)
            if current is None or current.name != name:
                engine.open(name, create=True)
            view = self.view(engine)
        except LolaError as error:
            self._to_ui(self._start_failed, str(error), error.exit_code)
            return
        except Exception:
            self.internal_errors.append(traceback.format_exc())
            self._to_ui(self._start_failed, "internal error while starting (details follow)", EXIT_RUNTIME)
            return
        self._to_ui(self._started, engine, view)

    def _loading_progress(self, message: str, fraction: float) -> None:
        if isinstance(self.screen, LoadingScreen):
            self.screen.progress(message, fraction)

    def _start_failed(self, message: str, exit_code: int) -> None:
        self.error_message = message
        self.exit_code = exit_code
        self.exit(exit_code, return_code=exit_code)

    async def _started(self, engine: Engine, view: EngineView) -> None:
        self.engine = engine
        await self.switch_screen(self.chat)
        await self.chat.apply(view)

    def _to_ui(self, callback: Callable, *args) -> None:
        """``call_from_thread`` that gives up quietly when the app has closed or is closing."""
        try:
            self.call_from_thread(callback, *args)
        except (RuntimeError, concurrent.futures.CancelledError):
            pass

    def view(self, engine: Engine, stats: Any = None) -> EngineView:
        """Read what the UI shows. Call it in a worker, at the end of a job."""
        return EngineView(
            session=engine.session.name,
            report=engine.memory_report(detail=self.inspector_open),
            history=engine.history(),
            stats=stats,
        )

    def run_engine(
        self,
        activity: str,
        job: Callable[[Engine], Any],
        then: Callable[[Any], Any] | None = None,
        *,
        cancel: threading.Event | None = None,
        quiet: bool = False,
    ) -> bool:
        """Run ``job(engine)`` in a worker, then ``then(result)`` on the UI thread. False when refused."""
        if not self.claim(activity, cancel=cancel, quiet=quiet):
            return False
        self.start_job(job, then)
        return True

    def run_engine_soon(self, activity: str, job: Callable[[Engine], Any], then: Callable) -> None:
        """``run_engine`` that waits for a running job instead of refusing; for views that only read."""
        if self.engine is not None and not self.activity:
            self.run_engine(activity, job, then)
        else:
            self.set_timer(0.1, lambda: self.run_engine_soon(activity, job, then))

    def claim(self, activity: str, *, cancel: threading.Event | None = None, quiet: bool = False) -> bool:
        """Reserve the engine for one job (one at a time), so the UI can prepare before ``start_job``."""
        if self.engine is None or self.activity:
            if not quiet:
                busy = "the model is still loading" if self.engine is None else self.activity
                self.notify(f"Busy: {busy} (Escape stops a reply)", severity="warning")
            return False
        self.activity = activity
        self.cancel_event = cancel
        return True

    def start_job(self, job: Callable[[Engine], Any], then: Callable[[Any], Any] | None = None) -> None:
        """Run the job of a ``claim``."""
        self.run_worker(
            lambda: self._engine_job(job, then),
            thread=True,
            group="engine",
            exit_on_error=False,
            name=self.activity,
        )

    def _engine_job(self, job: Callable[[Engine], Any], then: Callable[[Any], Any] | None) -> None:
        try:
            with self._engine_lock:
                result = job(self.engine)
        except LolaError as error:
            self._to_ui(self._job_failed, str(error))
        except Exception as error:
            self.internal_errors.append(traceback.format_exc())
            self._to_ui(self._job_failed, f"internal error: {type(error).__name__}: {error}")
        else:
            self._to_ui(self._job_done, then, result)

    async def _job_done(self, then: Callable[[Any], Any] | None, result: Any) -> None:
        self._idle()
        if then is None:
            return
        try:
            outcome = then(result)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as error:
            self.internal_errors.append(traceback.format_exc())
            self.notify(f"internal error: {type(error).__name__}: {error}", title="Error", severity="error")

    async def _job_failed(self, message: str) -> None:
        self._idle()
        self.notify(message, title="Error", severity="error", timeout=8)
        # Whatever was shown optimistically (a sent message, a half reply) is replaced by the engine's truth.
        self.refresh_view()

    def _idle(self) -> None:
        self.activity = ""
        self.cancel_event = None

    def refresh_view(self, quiet: bool = True) -> None:
        self.run_engine("reading memory", lambda engine: self.view(engine), self.chat.apply, quiet=quiet)

    def remember_session(self, name: str) -> None:
        try:
            write_last_session(self.state_file, name)
        except OSError as error:
            self.notify(
                f"could not remember the last session in {self.state_file}: {error}", severity="warning"
            )

    def stop_work(self) -> bool:
        """Ask a running reply or feed to stop. True when there was one."""
        if self.cancel_event is None or self.cancel_event.is_set():
            return False
        self.cancel_event.set()
        return True

    def action_interrupt(self) -> None:
        now = time.monotonic()
        if now - self._last_interrupt < QUIT_PRESS_WINDOW_S:
            self.stop_work()
            self.exit(self.exit_code, return_code=self.exit_code)
            return
        self._last_interrupt = now
        if self.stop_work():
            self.notify("Stopping… (Ctrl+C again quits)")
            return
        focused = self.focused
        in_input = focused.selected_text if isinstance(focused, TextArea) else ""
        selected = in_input or self.screen.get_selected_text()
        if selected:
            self.copy_text(selected)
            return
        self.notify("Press Ctrl+C again to quit")

    async def action_quit(self) -> None:
        self.stop_work()
        self.exit(self.exit_code, return_code=self.exit_code)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen.for_app(self))

    async def action_chat_action(self, action: str) -> None:
        if self.engine is not None:
            await self.chat.run_action(action)

    def copy_text(self, text: str) -> None:
        """OSC 52 copy; terminals that ignore it lose nothing but the copy, so it cannot fail here."""
        try:
            self.copy_to_clipboard(text)
        except Exception as error:
            self.notify(f"could not copy: {error}; use /export instead", severity="warning")
            return
        self.notify(f"Copied {len(text):,} characters (if nothing was copied, your terminal lacks OSC 52)")

    def shutdown_engine(self) -> None:
        """Save and close, after any job still running has finished. Runs after the UI has closed."""
        if self.engine is None:
            return
        with self._engine_lock:
            try:
                if self.engine.session is not None and self._unsaved():
                    self.engine.save()
            finally:
                self.engine.close()

    def _unsaved(self) -> bool:
        """Turns save their own snapshot; saving again on exit would only push older snapshots out."""
        latest = self.engine.session.latest_snapshot()
        tokens = self.engine.memory_report(detail=False)["tokens_seen"]
        return latest is None or latest.tokens_seen != tokens


def run_chat(engine_factory: EngineFactory, session: str | None, state_file: Path) -> int:
    """Run the app until the user quits; return the process exit code."""
    app = LolaChatApp(engine_factory, session, state_file)
    app.run()
    code = app.exit_code
    try:
        app.shutdown_engine()
    except LolaError as error:
        print(f"lola-chat: {error}", file=sys.stderr)
        code = code or error.exit_code
    if app.error_message:
        print(f"lola-chat: {app.error_message}", file=sys.stderr)
    for details in app.internal_errors:
        print(details, file=sys.stderr)
    return code
