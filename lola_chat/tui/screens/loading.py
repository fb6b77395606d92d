"""Shown while the engine is built: weights fetched, verified, converted, loaded; kernels compiled."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import ProgressBar, Static

from lola_chat.tui.text import visible


class LoadingScreen(Screen):
    def compose(self) -> ComposeResult:
        with Vertical(id="loading-box"):
            yield Static("lola-chat", id="loading-title")
            yield Static("starting…", id="loading-message")
            yield ProgressBar(total=1.0, show_eta=False, id="loading-progress")

    def progress(self, message: str, fraction: float) -> None:
        self.query_one("#loading-message", Static).update(Text(visible(message)))
        self.query_one("#loading-progress", ProgressBar).update(progress=min(max(fraction, 0.0), 1.0))
