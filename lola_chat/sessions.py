"""Named sessions on disk: settings, an append-only transcript and safetensors snapshots of the state.

A session is the folder ``<root>/<name>/`` holding ``session.json`` (system prompt, settings and a small
summary, so that listing many sessions reads no tensors), ``transcript.jsonl``,
``snapshots/<id>.safetensors`` and ``lock``. Files are replaced atomically; the transcript is only
appended to, except that an append cuts off the unreadable tail a crash mid-append may have left.

Writers hold an exclusive ``flock`` on ``lock``; the kernel drops it when the process dies. A mutating
call on a Session object that does not hold the lock takes it for the length of the call, so it raises
SessionLocked while anyone else (another process, or another Session object of this process) holds it.

A snapshot's ``sha256`` metadata entry covers its other metadata entries (sorted key/value pairs as
JSON) and then, per tensor in name order, ``[name, dtype, shape]`` as JSON followed by the tensor's raw
bytes, so a changed byte anywhere in the header or the data is detected.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shlex
import shutil
import tempfile
import time
import unicodedata
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from lola_chat.errors import LolaError, SessionLocked, SnapshotError, UsageError

FORMAT_VERSION = 1
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MAX_NAME_LENGTH = 64
ID_WIDTH = 6
SESSION_FILE = "session.json"
TRANSCRIPT_FILE = "transcript.jsonl"
SNAPSHOT_DIR = "snapshots"
LOCK_FILE = "lock"
_SNAPSHOT_NAME = re.compile(r"([0-9]+)\.safetensors")
_TMP_MARK = ".tmp-"
_RESERVED_META = ("format_version", "created", "note", "sha256")
_RECORD_TYPES = ("message", "undo", "restore", "system")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class SnapshotInfo:
    id: str
    created: float
    tokens_seen: int
    path: Path
    nbytes: int
    note: str


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


def validate_name(name: str) -> str:
    """The session name in NFC form, or UsageError saying what is wrong with it."""
    if not isinstance(name, str) or not name:
        raise UsageError("a session name may not be empty")
    name = unicodedata.normalize("NFC", name)
    reason = None
    if len(name) > MAX_NAME_LENGTH:
        reason = f"longer than {MAX_NAME_LENGTH} characters"
    elif "/" in name or "\\" in name:
        reason = "it may not contain '/' or '\\'"
    elif ".." in name:
        reason = "it may not contain '..'"
    elif name.startswith("."):
        reason = "it may not start with '.'"
    elif any(unicodedata.category(ch).startswith("C") for ch in name):
        reason = "it may not contain control characters"
    elif not all(ch.isalnum() or ch in "-_. " for ch in name):
        reason = "use only letters, digits, '-', '_', '.' and spaces"
    elif name != name.strip():
        reason = "it may not start or end with a space"
    if reason:
        raise UsageError(f"bad session name {name!r}: {reason}")
    return name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: after a crash the file is either the old one or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(text, limit: int = 160) -> str:
    return " ".join(str(text).split())[:limit]


def _snapshot_id(value) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise UsageError(f"bad snapshot id {value!r}: snapshot ids are numbers such as 000042")
    return f"{int(text):0{ID_WIDTH}d}"


def _read_metadata(f: BinaryIO) -> dict[str, str]:
    """The ``__metadata__`` table of a safetensors stream, reading only its header."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(prefix, "little")
    if size > _MAX_HEADER_BYTES:
        raise ValueError(f"implausible header length {size}")
    raw = f.read(size)
    if len(raw) < size:
        raise ValueError("header cut short")
    try:
        header = json.loads(raw)
    except ValueError:
        raise ValueError("header is not valid JSON") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("header metadata is not a table of strings")
    return metadata


def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """See the module docstring. ``tensors`` must be contiguous CPU tensors."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k != "sha256")).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _parse_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "type" in record else None


def _checked_record(record: dict) -> dict:
    kind = record.get("type")
    if kind not in _RECORD_TYPES:
        raise ValueError(f"unknown transcript record type {kind!r}")
    record = {"time": time.time(), **record}
    if kind == "message":
        if record.get("role") not in ("user", "assistant") or not isinstance(record.get("content"), str):
            raise ValueError("a message record needs role 'user' or 'assistant' and str content")
        record.setdefault("stopped", False)
        snapshot = record.get("snapshot")
        record["snapshot"] = None if snapshot is None else _snapshot_id(snapshot)
    elif kind == "restore":
        record["snapshot"] = _snapshot_id(record.get("snapshot"))
    return record


def _append_line(path: Path, line: bytes) -> int:
    """Append one line and fsync; return the file size found before. A last line left without its
    newline by a crash is ended if it is a whole record, else cut off so that it cannot swallow ``line``."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = os.pread(fd, size, 0)
            start = data.rfind(b"\n") + 1
            if _parse_record(data[start:]) is None:
                os.ftruncate(fd, start)
            else:
                line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _replay(records: list[dict]) -> list[dict]:
    """The visible conversation: messages, minus undone exchanges and what a restore went back past."""
    visible: list[dict] = []
    for record in records:
        kind = record.get("type")
        if kind == "message":
            visible.append(record)
        elif kind == "undo":
            users = [i for i, m in enumerate(visible) if m.get("role") == "user"]
            if users:
                del visible[users[-1] :]
        elif kind == "restore":
            # A message without a snapshot of its own (a user turn saved together with its reply)
            # stays only if a later message at or before the restored snapshot stays.
            limit, cut = int(record["snapshot"]), 0
            for i, m in enumerate(visible):
                if m.get("snapshot") is not None and int(m["snapshot"]) <= limit:
                    cut = i + 1
            del visible[cut:]
    return visible


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
        self._lock_fd: int | None = None
        self._lock_depth = 0

    @property
    def holds_lock(self) -> bool:
        return self._lock_depth > 0

    def lock(self) -> None:
        """Take the writer lock; re-entrant for this object (each lock() needs its unlock())."""
        if self._lock_depth:
            self._lock_depth += 1
            return
        try:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            raise LolaError(f"no session named {self.name}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            where = "elsewhere in this" if holder == str(os.getpid()) else "in another"
            raise SessionLocked(
                f"session {self.name} is open {where} lola-chat process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd, self._lock_depth = fd, 1

    def unlock(self) -> None:
        if self._lock_depth > 1:
            self._lock_depth -= 1
        elif self._lock_depth == 1:
            self._release()

    def _release(self) -> None:
        fd, self._lock_fd, self._lock_depth = self._lock_fd, None, 0
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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
            raise LolaError(
                f"session {self.name} is damaged: {path} is unreadable ({_one_line(e)})"
            ) from None

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
        record = _checked_record(record)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        transcript = self.dir / TRANSCRIPT_FILE
        with self._writing():
            meta = self._read_meta()
            size_before = _append_line(transcript, line)
            if record["type"] == "message" and meta.get("transcript_bytes") == size_before:
                messages = meta.get("messages", 0) + 1
            else:
                messages = len(self.history())
            self._write_meta(messages=messages, transcript_bytes=transcript.stat().st_size)

    def records(self) -> list[dict]:
        path = self.dir / TRANSCRIPT_FILE
        try:
            lines = path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        records = []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            record = _parse_record(raw)
            if record is None:
                if number == len(lines):
                    break  # the torn tail of an append a crash interrupted
                raise LolaError(
                    f"session {self.name} has a damaged transcript: fix or remove line {number} of {path}"
                )
            records.append(record)
        return records

    def history(self) -> list[dict]:
        return _replay(self.records())

    def _snapshot_path(self, snapshot_id: str) -> Path:
        return self.dir / SNAPSHOT_DIR / f"{snapshot_id}.safetensors"

    def _snapshot_ids(self) -> list[str]:
        try:
            names = os.listdir(self.dir / SNAPSHOT_DIR)
        except FileNotFoundError:
            return []
        return sorted((m.group(1) for m in map(_SNAPSHOT_NAME.fullmatch, names) if m), key=int)

    def _snapshot_info(self, snapshot_id: str) -> SnapshotInfo | None:
        path = self._snapshot_path(snapshot_id)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        try:
            with open(path, "rb") as f:
                meta = _read_metadata(f)
            created, tokens_seen = float(meta["created"]), int(meta.get("tokens_seen", 0))
        except (OSError, ValueError, KeyError) as e:
            return SnapshotInfo(
                snapshot_id, stat.st_mtime, 0, path, stat.st_size, f"damaged ({_one_line(e)})"
            )
        return SnapshotInfo(snapshot_id, created, tokens_seen, path, stat.st_size, meta.get("note", ""))

    def snapshots(self) -> list[SnapshotInfo]:
        infos = (self._snapshot_info(i) for i in self._snapshot_ids())
        return [info for info in infos if info is not None]

    def latest_snapshot(self) -> SnapshotInfo | None:
        for snapshot_id in reversed(self._snapshot_ids()):
            info = self._snapshot_info(snapshot_id)
            if info is not None:
                return info
        return None

    def _current_id(self) -> str:
        """The snapshot load_snapshot() loads by default: the last saved or restored one."""
        head = self._read_meta().get("head")
        ids = self._snapshot_ids()
        if head is None and not ids:
            raise SnapshotError(
                f"session {self.name} has no snapshot yet; run with --rebuild to rebuild the state "
                "from the transcript"
            )
        return head if head is not None else ids[-1]

    def _refusal(self, snapshot_id: str, problem: str, advice: str = "") -> SnapshotError:
        advice = advice or (
            f"restore an earlier one with `lola-chat sessions restore {shlex.quote(self.name)} ID` "
            "or rebuild with --rebuild"
        )
        return SnapshotError(
            f"snapshot {snapshot_id} of session {self.name} {problem}; its file is left untouched; {advice}"
        )

    def _verified(self, snapshot_id: str) -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
        """File bytes, CPU tensors and metadata of a snapshot whose checksum and format are good."""
        path = self._snapshot_path(snapshot_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._refusal(snapshot_id, "is missing") from None
        except OSError as e:
            raise self._refusal(snapshot_id, f"is unreadable ({_one_line(e.strerror)})") from None
        try:
            metadata = _read_metadata(io.BytesIO(data))
            version = metadata.get("format_version", "")
            if not version.isdecimal():
                raise ValueError(f"format_version {version!r} is not a number")
        except ValueError as e:
            raise self._refusal(snapshot_id, f"is damaged ({_one_line(e)})") from None
        if int(version) > FORMAT_VERSION:
            raise self._refusal(
                snapshot_id,
                f"was written in format {int(version)}, newer than format {FORMAT_VERSION} that this "
                "lola-chat reads",
                "upgrade lola-chat",
            )
        try:
            tensors = safetensors.torch.load(data)
        except Exception as e:  # safetensors reports bad files with several exception types
            raise self._refusal(snapshot_id, f"is damaged ({_one_line(e)})") from None
        if metadata.get("sha256") != _digest(metadata, tensors):
            raise self._refusal(snapshot_id, "is damaged (sha256 mismatch)")
        return data, tensors, metadata

    def load_snapshot(
        self, expect: dict[str, str], snapshot_id: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        snapshot_id = self._current_id() if snapshot_id is None else _snapshot_id(snapshot_id)
        _, tensors, metadata = self._verified(snapshot_id)
        for key, ours in expect.items():
            theirs = metadata.get(key)
            if theirs != ours:
                raise self._refusal(
                    snapshot_id,
                    f"was made with a different {key} ({_one_line(theirs, 60)} != {_one_line(ours, 60)})",
                    "use the matching model and settings, or rebuild with --rebuild",
                )
        return tensors, metadata

    def save_snapshot(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], note: str = "") -> str:
        bad = [k for k, v in meta.items() if k in _RESERVED_META or not isinstance(v, str)]
        if bad:
            raise ValueError(f"snapshot metadata must be str values and not use {_RESERVED_META}: {bad}")
        tensors = {
            name: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for name, t in tensors.items()
        }
        metadata = {**meta, "format_version": str(FORMAT_VERSION), "created": repr(time.time()), "note": note}
        metadata["sha256"] = _digest(metadata, tensors)
        data = safetensors.torch.save(tensors, metadata)
        with self._writing():
            ids = self._snapshot_ids()
            last = max([self._read_meta().get("last_id", 0), *(int(i) for i in ids)])
            snapshot_id = f"{last + 1:0{ID_WIDTH}d}"
            (self.dir / SNAPSHOT_DIR).mkdir(mode=0o700, exist_ok=True)
            atomic_write_bytes(self._snapshot_path(snapshot_id), data)
            tokens_seen = int(meta.get("tokens_seen", 0))
            self._write_meta(head=snapshot_id, last_id=last + 1, tokens_seen=tokens_seen)
            self._prune([*ids, snapshot_id], keep={snapshot_id})
        return snapshot_id

    def _prune(self, ids: list[str], keep: set[str]) -> None:
        """Delete all but the newest ``keep_snapshots`` snapshots (and ``keep``) and stale temp files."""
        keep = keep | set(ids[-self.keep_snapshots :])
        doomed = [self._snapshot_path(i) for i in ids if i not in keep]
        folder = self.dir / SNAPSHOT_DIR
        doomed += [folder / n for n in os.listdir(folder) if n.startswith(".") and _TMP_MARK in n]
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            _fsync_dir(folder)

    def restore(self, snapshot_id: str) -> None:
        snapshot_id = _snapshot_id(snapshot_id)
        with self._writing():
            info = self._snapshot_info(snapshot_id)
            if info is None:
                have = ", ".join(self._snapshot_ids()) or "none"
                raise UsageError(f"session {self.name} has no snapshot {snapshot_id} (it has: {have})")
            self.append({"type": "restore", "snapshot": snapshot_id})
            self._write_meta(head=snapshot_id, tokens_seen=info.tokens_seen)

    def export(self, fmt: str) -> str:
        history = self.history()
        if fmt == "jsonl":
            return "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in history)
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
            snapshots=len(self._snapshot_ids()),
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
            (tmp / SNAPSHOT_DIR).mkdir(mode=0o700)
            for snapshot_id, data in snapshots.items():
                atomic_write_bytes(tmp / SNAPSHOT_DIR / f"{snapshot_id}.safetensors", data)
            atomic_write_bytes(tmp / TRANSCRIPT_FILE, transcript)
            atomic_write_json(tmp / SESSION_FILE, meta)
            _fsync_dir(tmp)
            self._move(tmp, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _move(self, folder: Path, name: str) -> None:
        target = self.root / name
        # os.rename would silently replace an empty folder, so look first.
        if target.exists():
            raise UsageError(f"a session named {name} already exists")
        try:
            os.rename(folder, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise UsageError(f"a session named {name} already exists") from None
            raise
        _fsync_dir(self.root)

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
            self._move(session.dir, new)
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
            _fsync_dir(self.root)
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
        snapshot_id = src._current_id() if snapshot_id is None else _snapshot_id(snapshot_id)
        data, _, metadata = src._verified(snapshot_id)
        history = _replay([*src.records(), {"type": "restore", "snapshot": snapshot_id}])
        transcript = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in history).encode()
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
