"""The memory inspector: what the model's fixed-size memory holds, from ``Engine.memory_report()``."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from lola_chat.tui.text import bar_chart, human_bytes, human_count, one_line, visible

LAYER_COLUMNS = ("layer", "window", "cache", "folded", "hidden state")


def totals_lines(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the totals section."""
    state = report.get("state_bytes", 0)
    kv_cache = report.get("kv_cache_bytes", 0)
    ratio = f"{kv_cache / state:.1f}× this state" if state else "no state yet"
    return [
        ("session", visible(report.get("session", ""))),
        ("attention", report.get("attention", "")),
        ("tokens seen", human_count(report.get("tokens_seen", 0))),
        ("state on device", human_bytes(state)),
        ("full KV cache", f"{human_bytes(kv_cache)} ({ratio})"),
        ("device", visible(report.get("device", ""))),
        ("device free", human_bytes(report.get("device_free_bytes"))),
        ("chunk / capacity", f"{report.get('chunk', 0)} / {report.get('capacity', 0)}"),
        ("evictions this turn", human_count(report.get("evictions_since_turn", 0))),
    ]


def layer_row(layer: dict) -> tuple[str, ...]:
    return (
        str(layer["index"]),
        f"{layer['window_tokens']}/{layer['window_capacity']}",
        f"{layer['cache_tokens']}/{layer['cache_capacity']}",
        human_count(layer["folded_tokens"]),
        human_bytes(layer["hidden_state_bytes"]),
    )


class MemoryInspector(VerticalScroll):
    """Hidden until toggled. ``show(report)`` replaces everything; it never calls the engine itself."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.report: dict = {}

    def compose(self) -> ComposeResult:
        yield Static("Memory", classes="inspector-heading")
        yield Static(id="inspector-totals")
        yield Static("Per layer", classes="inspector-heading")
        yield DataTable(id="inspector-layers", cursor_type="none", zebra_stripes=True, show_cursor=False)
        yield Static("Self-recall error (cached pairs)", classes="inspector-heading")
        yield Static(id="inspector-recall")
        yield Static("Kept verbatim in the sparse cache (head 0)", classes="inspector-heading")
        yield Static(id="inspector-cached")

    def on_mount(self) -> None:
        self.query_one("#inspector-layers", DataTable).add_columns(*LAYER_COLUMNS)

    def show(self, report: dict) -> None:
        self.report = report
        totals = Text()
        for label, value in totals_lines(report):
            totals.append(f"{label:<20}", style="dim")
            totals.append(f"{value}\n")
        totals.rstrip()
        self.query_one("#inspector-totals", Static).update(totals)

        table = self.query_one("#inspector-layers", DataTable)
        table.clear()
        for layer in report.get("layers", []):
            table.add_row(*layer_row(layer))

        recall = report.get("recall_error")
        recall_text = (
            "\n".join(bar_chart(recall["edges"], recall["counts"], width=20))
            if recall and recall.get("counts")
            else "(nothing cached yet)"
        )
        self.query_one("#inspector-recall", Static).update(Text(recall_text))

        cached = report.get("cached_text")
        cached_view = Text()
        for index, text in enumerate(cached or []):
            cached_view.append(f"L{index:<3}", style="bold")
            cached_view.append(f"{one_line(text) or '(empty)'}\n")
        cached_view.rstrip()
        self.query_one("#inspector-cached", Static).update(cached_view if cached else Text("(no detail)"))
