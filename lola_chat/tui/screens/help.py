"""F1: every key binding and slash command, read from the classes that define them."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from lola_chat.tui.commands import SLASH_COMMANDS
from lola_chat.tui.widgets.prompt import NEWLINE_KEYS


def key_label(keys: str) -> str:
    """``"ctrl+r,f5"`` -> ``"Ctrl+R / F5"``."""
    return " / ".join("+".join(part.capitalize() for part in key.split("+")) for key in keys.split(","))


def binding_rows(bindings) -> list[tuple[str, str]]:
    return [(key_label(binding.key), binding.description) for binding in bindings if binding.description]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, sections: list[tuple[str, list[tuple[str, str]]]]) -> None:
        super().__init__(classes="dialog-screen")
        self.sections = sections

    @classmethod
    def for_app(cls, app) -> HelpScreen:
        from lola_chat.tui.screens.chat import ChatScreen
        from lola_chat.tui.screens.sessions import SessionsScreen, SnapshotsScreen

        typing = [
            ("Enter", "send the message"),
            (key_label(",".join(NEWLINE_KEYS)), "new line in the message"),
            ("Up / Down", "older / newer prompts (on first / last line)"),
        ]
        commands = [(command.usage, command.help) for command in SLASH_COMMANDS]
        return cls(
            [
                ("Anywhere", binding_rows(app.BINDINGS) + [("Ctrl+P", "command palette")]),
                ("Chat", typing + binding_rows(ChatScreen.BINDINGS)),
                ("Slash commands", commands),
                ("Sessions", binding_rows(SessionsScreen.BINDINGS)),
                ("Snapshots", binding_rows(SnapshotsScreen.BINDINGS)),
            ]
        )

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog help"):
            for title, rows in self.sections:
                table = Table.grid(padding=(0, 2))
                table.add_column(style="bold", no_wrap=True)
                table.add_column()
                for key, description in rows:
                    table.add_row(Text(key), Text(description))
                yield Static(title, classes="help-heading")
                yield Static(table)
            yield Static("Escape closes this help.", classes="help-footer")
