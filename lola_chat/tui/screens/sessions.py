"""The sessions screen (list, open, create, rename, delete, export) and a session's snapshots (restore,
branch). Everything goes through the engine and its session store, in the engine worker."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.coordinate import Coordinate
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from lola_chat.tui import commands
from lola_chat.tui.screens.dialogs import ConfirmScreen, NameScreen
from lola_chat.tui.text import ago, human_bytes, human_count, visible

SESSION_COLUMNS = ("", "name", "tokens", "last used", "size", "snapshots", "messages")
SNAPSHOT_COLUMNS = ("snapshot", "created", "tokens", "size", "note")


def selected_key(table: DataTable) -> str | None:
    if table.row_count == 0:
        return None
    return table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value


class SessionsScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "Open"),
        Binding("n", "create", "New"),
        Binding("r", "rename", "Rename"),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export('markdown')", "Export .md"),
        Binding("j", "export('jsonl')", "Export .jsonl"),
        Binding("s", "snapshots", "Snapshots"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def compose(self) -> ComposeResult:
        yield Static("Sessions", classes="screen-title")
        yield DataTable(id="sessions-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*SESSION_COLUMNS)
        self.reload()

    def reload(self) -> None:
        self.app.run_engine_soon(
            "listing sessions", lambda engine: (engine.store.list(), engine.session.name), self._fill
        )

    def _fill(self, result) -> None:
        if not self.is_attached:
            return
        infos, current = result
        table = self.query_one(DataTable)
        selected = selected_key(table)
        table.clear()
        now = self.app.clock()
        for info in infos:
            table.add_row(
                "●" if info.name == current else "",
                Text(visible(info.name)),
                human_count(info.tokens_seen),
                ago(info.last_used, now),
                human_bytes(info.nbytes),
                str(info.snapshots),
                human_count(info.messages),
                key=info.name,
            )
        names = [info.name for info in infos]
        if selected in names:
            table.move_cursor(row=names.index(selected))

    @property
    def selected(self) -> str | None:
        return selected_key(self.query_one(DataTable))

    @property
    def current(self) -> str | None:
        return self.app.chat.session_name

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_open(self) -> None:
        name = self.selected
        if name is not None:
            self.app.chat.open_session(name, create=False, then=lambda _view: self.dismiss())

    def action_create(self) -> None:
        def create(name: str | None) -> None:
            if name is not None:
                self.app.chat.open_session(name, create=True, then=lambda _view: self.dismiss())

        self.app.push_screen(NameScreen("Name of the new session:"), create)

    def action_rename(self) -> None:
        old_name = self.selected
        if old_name is None:
            return

        def rename(new_name: str | None) -> None:
            if not new_name or new_name == old_name:
                return

            def job(engine):
                # The store renames the open session in place too (its Session object follows).
                engine.store.rename(old_name, new_name)
                return self.app.view(engine)

            async def done(view) -> None:
                await self.app.chat.apply(view)
                self.notify(f"Renamed {old_name} to {new_name}")
                self.reload()

            self.app.run_engine("renaming", job, done)

        self.app.push_screen(NameScreen(f"New name for {old_name!r}:", old_name), rename)

    def action_delete(self) -> None:
        name = self.selected
        if name is None:
            return
        if name == self.current:
            self.notify("This session is open; open another one before deleting it", severity="warning")
            return

        def delete(confirmed: bool | None) -> None:
            if confirmed:
                self.app.run_engine("deleting", lambda engine: engine.store.delete(name), self._deleted(name))

        question = (
            f"Delete session {name!r} with its transcript and all its snapshots? This cannot be undone."
        )
        self.app.push_screen(ConfirmScreen(question, "Delete"), delete)

    def _deleted(self, name: str):
        def done(_result) -> None:
            self.notify(f"Deleted session {name}")
            self.reload()

        return done

    def action_export(self, fmt: str) -> None:
        name = self.selected
        if name is None:
            return
        directory = self.app.export_dir or Path.cwd()

        def job(engine):
            session = engine.session if name == engine.session.name else engine.store.open(name)
            target = commands.export_target(None, directory, name, fmt)
            return commands.write_text_file(target, session.export(fmt))

        self.app.run_engine("exporting", job, lambda target: self.notify(f"Exported to {target}"))

    def action_snapshots(self) -> None:
        name = self.selected
        if name is not None:
            self.app.push_screen(SnapshotsScreen(name))


class SnapshotsScreen(Screen):
    BINDINGS = [
        Binding("enter,r", "restore", "Restore"),
        Binding("b", "branch", "Branch from it"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, session: str) -> None:
        super().__init__()
        self.session = session
        self.tokens: dict[str, int] = {}

    def compose(self) -> ComposeResult:
        yield Static(Text(f"Snapshots of {visible(self.session)} (newest first)"), classes="screen-title")
        yield DataTable(id="snapshots-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*SNAPSHOT_COLUMNS)

        def job(engine):
            is_open = self.session == engine.session.name
            return (engine.session if is_open else engine.store.open(self.session)).snapshots()

        self.app.run_engine_soon("listing snapshots", job, self._fill)

    def _fill(self, snapshots) -> None:
        if not self.is_attached:
            return
        table = self.query_one(DataTable)
        now = self.app.clock()
        for info in reversed(snapshots):
            self.tokens[info.id] = info.tokens_seen
            table.add_row(
                info.id,
                ago(info.created, now),
                human_count(info.tokens_seen),
                human_bytes(info.nbytes),
                Text(visible(info.note)),
                key=info.id,
            )

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_restore()

    def _back_to_chat(self, view) -> None:
        while self.app.screen is not self.app.chat:
            self.app.pop_screen()

    def action_restore(self) -> None:
        snapshot = selected_key(self.query_one(DataTable))
        if snapshot is None:
            return

        def restore(confirmed: bool | None) -> None:
            if not confirmed:
                return

            def job(engine):
                if engine.session.name != self.session:
                    engine.open(self.session, create=False)
                engine.restore(snapshot)
                return self.app.view(engine)

            self.app.run_engine("restoring", job, self._switched(f"Restored snapshot {snapshot}"))

        tokens = human_count(self.tokens.get(snapshot, 0))
        question = (
            f"Go back to snapshot {snapshot} of {self.session!r} ({tokens} tokens)? "
            "The conversation after it is hidden; later snapshots are kept."
        )
        self.app.push_screen(ConfirmScreen(question, "Restore"), restore)

    def action_branch(self) -> None:
        snapshot = selected_key(self.query_one(DataTable))
        if snapshot is None:
            return

        def branch(new_name: str | None) -> None:
            if not new_name:
                return

            def job(engine):
                if engine.session.name == self.session:
                    engine.branch(new_name, snapshot)
                else:
                    engine.store.branch(self.session, new_name, snapshot)
                    engine.open(new_name, create=False)
                return self.app.view(engine)

            self.app.run_engine("branching", job, self._switched(f"New session {new_name} from {snapshot}"))

        self.app.push_screen(NameScreen(f"Name of the session branched from snapshot {snapshot}:"), branch)

    def _switched(self, message: str):
        async def done(view) -> None:
            await self.app.chat.apply(view)
            self._back_to_chat(view)
            self.notify(message)

        return done
