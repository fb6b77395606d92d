"""A scripted, in-memory stand-in for ``lola_chat.engine.Engine`` and its session store, following the
contract in the interfaces brief, so the app can be driven by Pilot without weights."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lola_chat.engine import TurnStats
from lola_chat.errors import LolaError, SessionLocked, UsageError
from lola_chat.sessions import DEFAULT_SYSTEM_PROMPT, SessionInfo
from lola_chat.snapshots import SnapshotInfo
from lola_chat.storage import validate_name

BASE_TIME = 1_700_000_000.0
LAYERS = 4
CHUNK = 8
CAPACITY = 16
BYTES_PER_LAYER = 4096


@dataclass
class FakeSession:
    name: str
    created: float
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    messages: list[dict] = field(default_factory=list)
    # snapshot id -> (tokens_seen, visible message count)
    snapshot_marks: dict[str, tuple[int, int]] = field(default_factory=dict)
    tokens_seen: int = 0
    last_used: float = 0.0
    locked: bool = False

    def history(self) -> list[dict]:
        return [dict(message) for message in self.messages]

    def snapshots(self) -> list[SnapshotInfo]:
        return [
            SnapshotInfo(sid, self.created + 60 * int(sid), tokens, Path(f"/fake/{sid}"), 1000 + tokens, "")
            for sid, (tokens, _count) in self.snapshot_marks.items()
        ]

    def latest_snapshot(self) -> SnapshotInfo | None:
        return self.snapshots()[-1] if self.snapshot_marks else None

    def save_mark(self) -> str:
        sid = f"{len(self.snapshot_marks) + 1:06d}"
        self.snapshot_marks[sid] = (self.tokens_seen, len(self.messages))
        return sid

    def export(self, fmt: str) -> str:
        if fmt == "jsonl":
            return "".join(json.dumps(message) + "\n" for message in self.messages)
        return "".join(f"## {m['role']}\n\n{m['content']}\n\n" for m in self.messages)


class FakeStore:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.sessions: dict[str, FakeSession] = {}

    def list(self) -> list[SessionInfo]:
        infos = [
            SessionInfo(s.name, s.created, s.last_used, s.tokens_seen, len(s.snapshot_marks),
                        2000 + 10 * s.tokens_seen, s.system_prompt, len(s.messages))
            for s in self.sessions.values()
        ]  # fmt: skip
        return sorted(infos, key=lambda info: (-info.last_used, info.name))

    def exists(self, name: str) -> bool:
        return name in self.sessions

    def create(self, name: str, system_prompt: str = "You are a helpful assistant.") -> FakeSession:
        validate_name(name)
        if name in self.sessions:
            raise UsageError(f"a session named {name!r} already exists")
        now = self.clock()
        session = FakeSession(name, created=now, system_prompt=system_prompt, last_used=now)
        self.sessions[name] = session
        return session

    def open(self, name: str) -> FakeSession:
        if name not in self.sessions:
            raise LolaError(f"no session named {name}")
        return self.sessions[name]

    def rename(self, old: str, new: str) -> None:
        validate_name(new)
        if new in self.sessions:
            raise UsageError(f"a session named {new!r} already exists")
        session = self.open(old)
        session.name = new
        self.sessions[new] = self.sessions.pop(old)

    def delete(self, name: str) -> None:
        if self.open(name).locked:
            raise SessionLocked(f"session {name} is open in another lola-chat process (pid 1)")
        del self.sessions[name]

    def branch(self, source: str, new_name: str, snapshot_id: str | None = None) -> FakeSession:
        original = self.open(source)
        snapshot_id = snapshot_id or max(original.snapshot_marks)
        tokens, count = original.snapshot_marks[snapshot_id]
        session = self.create(new_name, original.system_prompt)
        session.messages = original.history()[:count]
        session.tokens_seen = tokens
        session.save_mark()
        return session


def words(text: str) -> list[str]:
    """The fake tokenizer: one token per word, spaces kept."""
    pieces = text.split(" ")
    return [piece + " " for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


class FakeEngine:
    """Replies are taken from ``replies`` in order (then "Reply N."), streamed one word at a time.

    ``hold``: when set, a reply (or a feed) waits after its first piece (chunk) until the cancel event is
    set, so a test can stop it midway. Every call is recorded in ``calls``.
    """

    def __init__(self, replies: Iterable[str] = (), clock: Callable[[], float] = lambda: BASE_TIME) -> None:
        self.store = FakeStore(clock)
        self.session: FakeSession | None = None
        self.device = "cpu (fake)"
        self.replies = list(replies)
        self.clock = clock
        self.hold = threading.Event()
        self.calls: list[tuple] = []
        self.cancel_seen = False
        self.generation: dict = {}
        self.evictions = 0
        self.closed = False

    def open(self, name: str, create: bool = True) -> None:
        self.calls.append(("open", name, create))
        if self.session is not None:
            self.session.locked = False
        if not self.store.exists(name):
            if not create:
                raise LolaError(f"no session named {name}")
            self.store.create(name)
        self.session = self.store.open(name)
        self.session.locked = True
        self.session.last_used = self.clock()

    def _reply(self, prompt_tokens: int, on_piece, cancel) -> TurnStats:
        text = self.replies.pop(0) if self.replies else f"Reply {len(self.session.messages) // 2 + 1}."
        said: list[str] = []
        stopped = False
        for index, piece in enumerate(words(text)):
            if cancel is not None and cancel.is_set():
                stopped = True
                break
            said.append(piece)
            if on_piece is not None:
                on_piece(piece)
            if index == 0 and self.hold.is_set() and cancel is not None:
                stopped = cancel.wait(timeout=10)
                self.cancel_seen = stopped
                break
        self.session.messages.append(
            {"type": "message", "role": "assistant", "content": "".join(said), "stopped": stopped}
        )
        if not stopped:
            self.session.tokens_seen += len(said)
            self.evictions = self.session.tokens_seen // CHUNK
        self.session.save_mark()
        return TurnStats(prompt_tokens, len(said), 1000.0, 50.0, stopped)

    def chat(self, text: str, on_piece=None, cancel: threading.Event | None = None) -> TurnStats:
        self.calls.append(("chat", text))
        self.session.messages.append({"type": "message", "role": "user", "content": text, "stopped": False})
        self.session.tokens_seen += len(words(text))
        return self._reply(len(words(text)), on_piece, cancel)

    def regenerate(self, on_piece=None, cancel: threading.Event | None = None) -> TurnStats:
        self.calls.append(("regenerate",))
        messages = self.session.messages
        if not messages or messages[-1]["role"] != "assistant":
            raise LolaError("there is no reply to regenerate")
        dropped = messages.pop()
        if not dropped["stopped"]:
            self.session.tokens_seen -= len(words(dropped["content"]))
        return self._reply(0, on_piece, cancel)

    def undo(self) -> None:
        self.calls.append(("undo",))
        messages = self.session.messages
        if len(messages) < 2:
            raise LolaError("there is nothing to undo")
        for message in (messages.pop(), messages.pop()):
            if not message["stopped"]:
                self.session.tokens_seen -= len(words(message["content"]))

    def feed(self, text: str, on_progress=None, cancel: threading.Event | None = None) -> int:
        self.calls.append(("feed", len(text)))
        tokens = words(text)
        done = 0
        for start in range(0, len(tokens), 100):
            if cancel is not None and cancel.is_set():
                break
            done = min(len(tokens), start + 100)
            if on_progress is not None:
                on_progress(done, len(tokens))
            if start == 0 and self.hold.is_set() and cancel is not None:
                self.cancel_seen = cancel.wait(timeout=10)
        if done:
            self.session.messages.append(
                {"type": "message", "role": "user", "content": text, "stopped": False, "document": True}
            )
        self.session.tokens_seen += done
        return done

    def set_system(self, text: str) -> None:
        self.calls.append(("set_system", text))
        self.session.system_prompt = text

    def set_generation(self, **settings) -> None:
        self.calls.append(("set_generation", settings))
        self.generation.update(settings)

    def restore(self, snapshot_id: str) -> None:
        self.calls.append(("restore", snapshot_id))
        tokens, count = self.session.snapshot_marks[snapshot_id]
        self.session.messages = self.session.messages[:count]
        self.session.tokens_seen = tokens

    def branch(self, new_name: str, snapshot_id: str | None = None) -> None:
        self.calls.append(("branch", new_name, snapshot_id))
        self.store.branch(self.session.name, new_name, snapshot_id)
        self.open(new_name, create=False)

    def history(self) -> list[dict]:
        return self.session.history()

    def memory_report(self, detail: bool = True) -> dict:
        seen = self.session.tokens_seen
        window = min(seen, 2 * CHUNK)
        cache = min(max(seen - window, 0), CAPACITY)
        report = {
            "session": self.session.name, "attention": "lola", "device": self.device,
            "device_free_bytes": 8_000_000_000, "tokens_seen": seen, "state_bytes": LAYERS * BYTES_PER_LAYER,
            "kv_cache_bytes": seen * LAYERS * 512, "chunk": CHUNK, "capacity": CAPACITY,
            "settings": {"chunk": CHUNK, "capacity": CAPACITY, "policy": "joint-relative-novelty"},
            "evictions_since_turn": self.evictions,
            "layers": [
                {"index": i, "window_tokens": window, "window_capacity": 2 * CHUNK, "cache_tokens": cache,
                 "cache_capacity": CAPACITY, "folded_tokens": max(seen - window - cache, 0),
                 "window_bytes": 1024, "cache_bytes": 1024, "hidden_state_bytes": 2048}
                for i in range(LAYERS)
            ],
        }  # fmt: skip
        if detail:
            report["cached_text"] = [f"layer {i} keeps \x1b[31mred\x1b[0m words" for i in range(LAYERS)]
            report["recall_error"] = {"edges": [0.0, 0.5, 1.0, 1.5], "counts": [3, 7 + seen % 5, 1]}
        return report

    def save(self) -> None:
        self.calls.append(("save",))
        self.session.save_mark()

    def close(self) -> None:
        self.closed = True
