"""Named sessions on disk: settings, an append-only transcript and safetensors snapshots of the state.

A session is the folder ``<root>/<name>/`` holding ``session.json`` (system prompt, settings and a small
summary, so that listing many sessions reads no tensors), ``transcript.jsonl``,
``snapshots/<id>.safetensors`` and ``lock``. Files are replaced atomically; the transcript is only
appended to, except that an append cuts off the unreadable tail a crash mid-append may have left. How
files are written, the transcript's record format, the lock and the snapshot format are in
``lola_chat.storage``; this module is what sessions do with them.

Writers hold an exclusive ``flock`` on ``lock``; the kernel drops it when the process dies. A mutating
call on a Session object that does not hold the lock takes it for the length of the call, so it raises
SessionLocked while anyone else (another process, or another Session object of this process) holds it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lola_chat.errors import LolaError, SnapshotError, UsageError
from lola_chat.snapshots import SnapshotFolder, SnapshotInfo, encode_snapshot
from lola_chat.storage import (
    FORMAT_VERSION,
    WriterLock,
    append_record_line,
    atomic_write_bytes,
    atomic_write_json,
    checked_record,
    fsync_dir,
    move_folder,
    one_line,
    parse_snapshot_id,
    read_records,
    record_lines,
    validate_name,
    visible_messages,
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
SESSION_FILE = "session.json"
TRANSCRIPT_FILE = "transcript.jsonl"
SNAPSHOT_DIR = "snapshots"
LOCK_FILE = "lock"


@dataclass
class SessionInfo:
    name: str
    created: float
    last_used: float
    tokens_seen: int
    snapshots: int
    nbytes: int
    system_prompt: str
    messages: int


def _new_meta(system_prompt: str, **fields) -> dict:
    now = time.time()
    meta = {"format_version": FORMAT_VERSION, "created": now, "last_used": now, "settings": {},
            "system_prompt": system_prompt, "messages": 0, "transcript_bytes": 0, "tokens_seen": 0,
            "head": None, "last_id": 0}  # fmt: skip
    return {**meta, **fields}


class Session:
    """One session folder. Reads are lock-free; writes hold the session lock (see the module docstring)."""

    def __init__(self, path: Path, keep_snapshots: int = 10):
        self.dir = Path(path)
        self.name = self.dir.name
        self.keep_snapshots = keep_snapshots
        self._lock = WriterLock()

    @property
    def holds_lock(self) -> bool:
        return self._lock.held

    def lock(self) -> None:
        """Take the writer lock; re-entrant for this object (each lock() needs its unlock())."""
        self._lock.acquire(self.dir / LOCK_FILE, self.name)

    def unlock(self) -> None:
        self._lock.release()

    def _release(self) -> None:
        self._lock.release_all()

    def __enter__(self) -> Session:
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    @contextmanager
    def _writing(self):
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def _read_meta(self) -> dict:
        path = self.dir / SESSION_FILE
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            raise LolaError(f"no session named {self.name}") from None
        except ValueError as e:
            raise LolaError(f"session {self.name} is damaged: {path} is unreadable ({one_line(e)})") from None

    def _write_meta(self, **changes) -> None:
        atomic_write_json(self.dir / SESSION_FILE, {**self._read_meta(), **changes, "last_used": time.time()})

    @property
    def system_prompt(self) -> str:
        return self._read_meta().get("system_prompt", DEFAULT_SYSTEM_PROMPT)

    def set_system_prompt(self, text: str) -> None:
        """Store the prompt in session.json; recording the change in the transcript is the caller's."""
        with self._writing():
            self._write_meta(system_prompt=text)

    @property
    def settings(self) -> dict:
        return dict(self._read_meta().get("settings", {}))

    def update_settings(self, **kw) -> None:
        """Merge ``kw`` into the stored settings; a value of None removes that setting."""
        with self._writing():
            settings = self.settings
            for key, value in kw.items():
                if value is None:
                    settings.pop(key, None)
                else:
                    settings[key] = value
            self._write_meta(settings=settings)

    def append(self, record: dict) -> None:
        """Append a transcript record (missing ``time``/``snapshot``/``stopped`` are filled in)."""
        record = checked_record(record)
        line = record_lines([record]).encode()
        transcript = self.dir / TRANSCRIPT_FILE
        with self._writing():
            meta = self._read_meta()
            size_before = append_record_line(transcript, line)
            if record["type"] == "message" and meta.get("transcript_bytes") == size_before:
                messages = meta.get("messages", 0) + 1
            else:
                messages = len(self.history())
            self._write_meta(messages=messages, transcript_bytes=transcript.stat().st_size)

    def records(self) -> list[dict]:
        return read_records(self.dir / TRANSCRIPT_FILE, self.name)

    def history(self) -> list[dict]:
        return visible_messages(self.records())

    @property
    def _snapshots(self) -> SnapshotFolder:
        return SnapshotFolder(self.dir / SNAPSHOT_DIR, self.name)

    def _snapshot_path(self, snapshot_id: str) -> Path:
        return self._snapshots.path(snapshot_id)

    def snapshots(self) -> list[SnapshotInfo]:
        return self._snapshots.infos()

    def latest_snapshot(self) -> SnapshotInfo | None:
        return self._snapshots.latest()

    def _current_id(self) -> str:
        """The snapshot load_snapshot() loads by default: the last saved or restored one."""
        head = self._read_meta().get("head")
        ids = self._snapshots.ids()
        if head is None and not ids:
            raise SnapshotError(
                f"session {self.name} has no snapshot yet; run with --rebuild to rebuild the state "
                "from the transcript"
            )
        return head if head is not None else ids[-1]

    def load_snapshot(
        self, expect: dict[str, str], snapshot_id: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        snapshot_id = self._current_id() if snapshot_id is None else parse_snapshot_id(snapshot_id)
        return self._snapshots.load(snapshot_id, expect)

    def save_snapshot(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], note: str = "") -> str:
        data = encode_snapshot(tensors, meta, note)
        with self._writing():
            snapshots = self._snapshots
            snapshot_id = snapshots.add(data, after=self._read_meta().get("last_id", 0))
            tokens_seen = int(meta.get("tokens_seen", 0))
            self._write_meta(head=snapshot_id, last_id=int(snapshot_id), tokens_seen=tokens_seen)
            snapshots.prune(self.keep_snapshots, keep={snapshot_id})
        return snapshot_id

    def restore(self, snapshot_id: str) -> None:
        snapshot_id = parse_snapshot_id(snapshot_id)
        with self._writing():
            info = self._snapshots.info(snapshot_id)
            if info is None:
                have = ", ".join(self._snapshots.ids()) or "none"
                raise UsageError(f"session {self.name} has no snapshot {snapshot_id} (it has: {have})")
            self.append({"type": "restore", "snapshot": snapshot_id})
            self._write_meta(head=snapshot_id, tokens_seen=info.tokens_seen)

    def export(self, fmt: str) -> str:
        history = self.history()
        if fmt == "jsonl":
            return record_lines(history)
        if fmt == "markdown":
            blocks = [f"# {self.name}\n\n"]
            for m in history:
                speaker = "User" if m["role"] == "user" else "Assistant"
                stopped = " *(stopped)*" if m.get("stopped") else ""
                blocks.append(f"**{speaker}:** {m['content']}{stopped}\n\n")
            return "".join(blocks)
        raise UsageError(f"unknown export format {fmt!r}; use markdown or jsonl")

    def info(self) -> SessionInfo:
        """Summary from session.json and file sizes; reads no tensors."""
        try:
            meta = self._read_meta()
        except LolaError:
            meta = {}
        try:
            size = (self.dir / TRANSCRIPT_FILE).stat().st_size
            cached = meta.get("transcript_bytes") == size
            messages = meta.get("messages", 0) if cached else len(self.history())
        except (FileNotFoundError, LolaError):
            messages = 0
        files = [e for d in (self.dir, self.dir / SNAPSHOT_DIR) if d.is_dir() for e in os.scandir(d)]
        return SessionInfo(
            name=self.name,
            created=float(meta.get("created", 0.0)),
            last_used=float(meta.get("last_used", 0.0)),
            tokens_seen=int(meta.get("tokens_seen", 0)),
            snapshots=len(self._snapshots.ids()),
            nbytes=sum(e.stat().st_size for e in files if e.is_file()),
            system_prompt=meta.get("system_prompt", ""),
            messages=messages,
        )


class SessionStore:
    """The sessions under ``root``, one folder each."""

    def __init__(self, root: Path, keep_snapshots: int = 10):
        if keep_snapshots < 1:
            raise UsageError("keep_snapshots must be at least 1")
        self.root = Path(root)
        self.keep_snapshots = keep_snapshots
        # Sessions handed out, so rename/delete can act through the one this process holds locked.
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()

    def _session(self, name: str) -> Session:
        session = Session(self.root / name, self.keep_snapshots)
        self._sessions.add(session)
        return session

    def list(self) -> list[SessionInfo]:
        if not self.root.is_dir():
            return []
        infos = [
            Session(Path(entry.path), self.keep_snapshots).info()
            for entry in os.scandir(self.root)
            if not entry.name.startswith(".") and os.path.isfile(os.path.join(entry.path, SESSION_FILE))
        ]
        return sorted(infos, key=lambda info: info.last_used, reverse=True)

    def exists(self, name) -> bool:
        try:
            name = validate_name(name)
        except UsageError:
            return False
        return (self.root / name / SESSION_FILE).is_file()

    def create(self, name, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Session:
        name = validate_name(name)
        self._install(name, _new_meta(system_prompt), b"", {})
        return self._session(name)

    def open(self, name) -> Session:
        name = validate_name(name)
        if not self.exists(name):
            raise LolaError(f"no session named {name}")
        return self._session(name)

    def _install(self, name: str, meta: dict, transcript: bytes, snapshots: dict[str, bytes]) -> None:
        """Build a session folder under a hidden name, then rename it into place in one step."""
        if (self.root / name).exists():
            raise UsageError(f"a session named {name} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        try:
            snapshot_folder = SnapshotFolder(tmp / SNAPSHOT_DIR, name)
            snapshot_folder.folder.mkdir(mode=0o700)
            for snapshot_id, data in snapshots.items():
                atomic_write_bytes(snapshot_folder.path(snapshot_id), data)
            atomic_write_bytes(tmp / TRANSCRIPT_FILE, transcript)
            atomic_write_json(tmp / SESSION_FILE, meta)
            fsync_dir(tmp)
            move_folder(tmp, self.root / name, f"a session named {name} already exists")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _writer(self, name: str) -> Session:
        """A Session of ``name`` holding the lock: the one this store handed out and that holds it, or a
        fresh one (SessionLocked if anyone else holds it). The caller unlocks it."""
        if not self.exists(name):
            raise LolaError(f"no session named {name}")
        holder = next((s for s in self._sessions if s.name == name and s.holds_lock), None)
        session = holder or Session(self.root / name, self.keep_snapshots)
        session.lock()
        return session

    def rename(self, old, new) -> None:
        old, new = validate_name(old), validate_name(new)
        session = self._writer(old)
        try:
            move_folder(session.dir, self.root / new, f"a session named {new} already exists")
        finally:
            session.unlock()
        for s in [*self._sessions, session]:
            if s.name == old:
                s.dir, s.name = self.root / new, new

    def delete(self, name) -> None:
        name = validate_name(name)
        session = self._writer(name)
        grave = self.root / f".deleted-{secrets.token_hex(6)}"
        try:
            os.rename(session.dir, grave)
            fsync_dir(self.root)
            shutil.rmtree(grave, ignore_errors=True)
        except BaseException:
            session.unlock()
            raise
        session._release()

    def branch(self, source: str, new_name: str, snapshot_id: str | None = None) -> Session:
        """A new session from ``snapshot_id`` of ``source`` (default: the one load_snapshot() would load,
        i.e. the latest unless a restore is pending) with the visible history up to that snapshot."""
        new_name = validate_name(new_name)
        if self.exists(new_name):
            raise UsageError(f"a session named {new_name} already exists")
        src = self.open(source)
        snapshot_id = src._current_id() if snapshot_id is None else parse_snapshot_id(snapshot_id)
        data, _, metadata = src._snapshots.verified(snapshot_id)
        history = visible_messages([*src.records(), {"type": "restore", "snapshot": snapshot_id}])
        transcript = record_lines(history).encode()
        meta = _new_meta(
            src.system_prompt,
            settings=src.settings,
            messages=len(history),
            transcript_bytes=len(transcript),
            tokens_seen=int(metadata.get("tokens_seen", 0)),
            head=snapshot_id,
            last_id=int(snapshot_id),
        )
        self._install(new_name, meta, transcript, {snapshot_id: data})
        return self._session(new_name)
