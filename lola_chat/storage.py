"""Durable session files: atomic replacement, session names, the transcript's records and the
conversation they leave visible, the writer lock (snapshots are ``snapshots.py``).

A file is replaced atomically: written to a hidden temporary name in the same folder, fsynced, renamed
over the old one, and the folder fsynced, so that after a crash it is either the old file or the new one.
A transcript is JSON lines, one record each, appended to with fsync; an append first deals with the
last line a crash may have left without its newline. A writer holds an exclusive ``flock`` on a lock
file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import time
import unicodedata
from pathlib import Path

from lola_chat.errors import LolaError, SessionLocked, UsageError

FORMAT_VERSION = 1
ID_WIDTH = 6
MAX_NAME_LENGTH = 64
RECORD_TYPES = ("message", "undo", "restore", "system")
TMP_MARK = ".tmp-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: after a crash the file is either the old one or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
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
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_folder(folder: Path, target: Path, taken: str) -> None:
    """Rename ``folder`` to ``target`` durably; UsageError ``taken`` if ``target`` exists."""
    # os.rename would silently replace an empty folder, so look first.
    if target.exists():
        raise UsageError(taken)
    try:
        os.rename(folder, target)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise UsageError(taken) from None
        raise
    fsync_dir(target.parent)


def one_line(text, limit: int = 160) -> str:
    return " ".join(str(text).split())[:limit]


def parse_snapshot_id(value) -> str:
    """A snapshot id as a user or a transcript gave it, in its zero-padded form."""
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise UsageError(f"bad snapshot id {value!r}: snapshot ids are numbers such as 000042")
    return f"{int(text):0{ID_WIDTH}d}"


def parse_record(raw: bytes) -> dict | None:
    """A transcript line as a record (a JSON object with a ``type``), or None if it is not one."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "type" in record else None


def checked_record(record: dict) -> dict:
    """``record`` ready to append: its type and fields checked, missing ``time``/``snapshot``/``stopped``
    filled in."""
    kind = record.get("type")
    if kind not in RECORD_TYPES:
        raise ValueError(f"unknown transcript record type {kind!r}")
    record = {"time": time.time(), **record}
    if kind == "message":
        if record.get("role") not in ("user", "assistant") or not isinstance(record.get("content"), str):
            raise ValueError("a message record needs role 'user' or 'assistant' and str content")
        record.setdefault("stopped", False)
        snapshot = record.get("snapshot")
        record["snapshot"] = None if snapshot is None else parse_snapshot_id(snapshot)
    elif kind == "restore":
        record["snapshot"] = parse_snapshot_id(record.get("snapshot"))
    return record


def record_lines(records: list[dict]) -> str:
    """Records as transcript lines."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def append_record_line(path: Path, line: bytes) -> int:
    """Append one line to a transcript and fsync; return the file size found before. A last line left
    without its newline by a crash is ended if it is a whole record, else cut off so that it cannot
    swallow ``line``."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = os.pread(fd, size, 0)
            start = data.rfind(b"\n") + 1
            if parse_record(data[start:]) is None:
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


def read_records(path: Path, owner: str) -> list[dict]:
    """The records of the transcript of session ``owner``; a missing transcript has none."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        record = parse_record(raw)
        if record is None:
            if number == len(lines):
                break  # the torn tail of an append a crash interrupted
            raise LolaError(
                f"session {owner} has a damaged transcript: fix or remove line {number} of {path}"
            )
        records.append(record)
    return records


class WriterLock:
    """An exclusive ``flock`` on a lock file, re-entrant for its holder (each acquire() needs its
    release()). The file records the holder's pid; the kernel drops the lock when the process dies."""

    def __init__(self):
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self, path: Path, owner: str) -> None:
        """Lock ``path``, the lock file of session ``owner``; SessionLocked if anyone else holds it."""
        if self._depth:
            self._depth += 1
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            raise LolaError(f"no session named {owner}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            where = "elsewhere in this" if holder == str(os.getpid()) else "in another"
            raise SessionLocked(f"session {owner} is open {where} lola-chat process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._depth = fd, 1

    def release(self) -> None:
        if self._depth > 1:
            self._depth -= 1
        elif self._depth == 1:
            self.release_all()

    def release_all(self) -> None:
        fd, self._fd, self._depth = self._fd, None, 0
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


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


def visible_messages(records: list[dict]) -> list[dict]:
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
