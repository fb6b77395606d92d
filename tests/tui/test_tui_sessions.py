"""The sessions and snapshots screens."""

from __future__ import annotations

from fake_engine import BASE_TIME
from pilot_helpers import settle, shown, type_and_send

from lola_chat.tui.screens.dialogs import ConfirmScreen, NameScreen
from lola_chat.tui.screens.sessions import SessionsScreen, SnapshotsScreen


def notifications(app) -> list[str]:
    return [notification.message for notification in app._notifications]


def table_names(app) -> list[str]:
    table = app.screen.query_one("#sessions-table")
    return [table.get_row_at(row)[1].plain for row in range(table.row_count)]


async def open_sessions(app, pilot) -> None:
    await pilot.press("f3")
    await settle(app, pilot)
    assert isinstance(app.screen, SessionsScreen)


async def answer(pilot, text: str) -> None:
    """Type into the name dialog and submit it."""
    assert isinstance(pilot.app.screen, NameScreen)
    name_input = pilot.app.screen.query_one("#name-input")
    name_input.value = text
    await pilot.press("enter")


async def test_list_create_and_switch_sessions(engine, make_app):
    engine.replies = ["in test"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "hello test")
        await settle(app, pilot)
        await open_sessions(app, pilot)
        assert table_names(app) == ["test"]
        await pilot.press("n")
        await answer(pilot, "other")
        await settle(app, pilot)
        assert app.screen is app.chat and engine.session.name == "other"
        assert shown(app) == []
        await open_sessions(app, pilot)
        assert table_names(app) == ["other", "test"]
        await pilot.press("down", "enter")
        await settle(app, pilot)
        assert engine.session.name == "test" and app.chat.session_name == "test"
        assert shown(app) == [("user", "hello test", False), ("assistant", "in test", False)]


async def test_bad_session_name_is_rejected(engine, make_app):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await open_sessions(app, pilot)
        await pilot.press("n")
        await answer(pilot, "../escape")
        await settle(app, pilot)
        assert any("bad session name '../escape'" in message for message in notifications(app))
        assert not engine.store.exists("../escape") and engine.session.name == "test"


async def test_rename_and_delete_with_confirmation(engine, make_app):
    app = make_app()
    engine.store.create("old").last_used = BASE_TIME - 86400
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await open_sessions(app, pilot)
        assert table_names(app) == ["test", "old"]
        await pilot.press("down", "r")
        await answer(pilot, "renamed")
        await settle(app, pilot)
        assert table_names(app) == ["test", "renamed"]
        await pilot.press("down", "d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await settle(app, pilot)
        assert engine.store.exists("renamed")
        await pilot.press("d", "y")
        await settle(app, pilot)
        assert not engine.store.exists("renamed") and table_names(app) == ["test"]
        await pilot.press("d")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen), "the open session cannot be deleted"
        assert engine.store.exists("test")


async def test_export_from_session_list(engine, make_app, tmp_path):
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "remember me")
        await settle(app, pilot)
        await open_sessions(app, pilot)
        await pilot.press("e", "j")
        await settle(app, pilot)
    assert "remember me" in (tmp_path / "test.md").read_text()
    assert "remember me" in (tmp_path / "test.jsonl").read_text()


async def test_restore_an_earlier_snapshot(engine, make_app):
    engine.replies = ["first reply", "second reply"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "one")
        await settle(app, pilot)
        await type_and_send(pilot, "two")
        await settle(app, pilot)
        await open_sessions(app, pilot)
        await pilot.press("s")
        await settle(app, pilot)
        assert isinstance(app.screen, SnapshotsScreen)
        table = app.screen.query_one("#snapshots-table")
        assert [table.get_row_at(row)[0] for row in range(table.row_count)] == ["000002", "000001"]
        await pilot.press("down", "enter")
        await pilot.pause()
        await pilot.press("y")
        await settle(app, pilot)
        assert ("restore", "000001") in engine.calls
        assert app.screen is app.chat
        assert shown(app) == [("user", "one", False), ("assistant", "first reply", False)]
        assert app.chat.status.report["tokens_seen"] == engine.session.tokens_seen == 3


async def test_branch_from_a_snapshot(engine, make_app):
    engine.replies = ["first reply", "second reply"]
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "one")
        await settle(app, pilot)
        await type_and_send(pilot, "two")
        await settle(app, pilot)
        await open_sessions(app, pilot)
        await pilot.press("s")
        await settle(app, pilot)
        await pilot.press("down", "b")
        await answer(pilot, "fork")
        await settle(app, pilot)
        assert engine.session.name == "fork" and app.chat.session_name == "fork"
        assert shown(app) == [("user", "one", False), ("assistant", "first reply", False)]
        assert len(engine.store.open("test").messages) == 4


async def test_session_list_waits_for_a_running_reply(engine, make_app):
    engine.hold.set()
    app = make_app()
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await type_and_send(pilot, "long answer please")
        await pilot.pause(0.1)
        await pilot.press("f3")
        await pilot.pause(0.2)
        assert isinstance(app.screen, SessionsScreen) and table_names(app) == []
        app.stop_work()
        await settle(app, pilot)
        await pilot.pause(0.2)
        assert table_names(app) == ["test"]
