"""Fixtures for driving the app with the fake engine."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from fake_engine import BASE_TIME, FakeEngine

from lola_chat.tui.app import LolaChatApp


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_app(engine, tmp_path, monkeypatch):
    """An app around ``engine`` with its state and exports in tmp_path and a fixed clock."""
    monkeypatch.setenv("LOLA_CHAT_HOME", str(tmp_path / "home"))

    def make(session: str | None = "test", **kwargs) -> LolaChatApp:
        def factory(progress):
            progress("loading fake weights", 0.5)
            return engine

        kwargs.setdefault("clock", lambda: BASE_TIME + 3600)
        kwargs.setdefault("export_dir", tmp_path)
        return LolaChatApp(factory, session, tmp_path / "state.json", **kwargs)

    return make


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run ``async def`` tests here on a fresh event loop (no async plugin is a dependency)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**arguments))
    return True
