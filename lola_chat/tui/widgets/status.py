"""One line under the conversation: session, memory size, device, speed of the last turn, activity."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from lola_chat.tui.text import human_bytes, human_count, rate, visible


class StatusBar(Static):
    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.report: dict = {}
        self.stats = None
        self.activity = ""

    def show(self, report: dict | None = None, stats=None, activity: str | None = None) -> None:
        """Update the parts given; the others keep their last value."""
        if report is not None:
            self.report = report
        if stats is not None:
            self.stats = stats
        if activity is not None:
            self.activity = activity
        self.update(self.status_text())

    def status_text(self) -> Text:
        report = self.report
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(visible(report.get("session", "…")), style="bold")
        parts = [
            f"{human_count(report.get('tokens_seen', 0))} tokens",
            f"state {human_bytes(report.get('state_bytes'))}",
            visible(report.get("device", "")),
        ]
        if self.stats is not None:
            prefill, decode = rate(self.stats.prefill_tps), rate(self.stats.decode_tps)
            parts.append(f"prefill {prefill} · decode {decode} tok/s")
        for part in parts:
            line.append(" │ ")
            line.append(part)
        if self.activity:
            line.append(" │ ")
            line.append(self.activity, style="italic")
        return line
