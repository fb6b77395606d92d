"""Durable session files: atomic replacement, the transcript's records, the writer lock, snapshots.

A file is replaced atomically: written to a hidden temporary name in the same folder, fsynced, renamed
over the old one, and the folder fsynced, so that after a crash it is either the old file or the new one.
A transcript is JSON lines, one record each, appended to with fsync; an append first deals with the
last line a crash may have left without its newline. A writer holds an exclusive ``flock`` on a lock
file.

A snapshot is ``<snapshots folder>/<id>.safetensors``, ids being zero-padded numbers. Its ``sha256``
metadata entry covers its other metadata entries (sorted key/value pairs as JSON) and then, per tensor
in name order, ``[name, dtype, shape]`` as JSON followed by the tensor's raw bytes, so a changed byte
anywhere in the header or the data is detected.
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from lola_chat.errors import LolaError, SessionLocked, SnapshotError, UsageError

FORMAT_VERSION = 1
ID_WIDTH = 6
RECORD_TYPES = ("message", "undo", "restore", "system")
_SNAPSHOT_NAME = re.compile(r"([0-9]+)\.safetensors")
_TMP_MARK = ".tmp-"
_RESERVED_META = ("format_version", "created", "note", "sha256")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


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


def read_metadata(f: BinaryIO) -> dict[str, str]:
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


def digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """See the module docstring. ``tensors`` must be contiguous CPU tensors."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k != "sha256")).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def encode_snapshot(tensors: dict[str, torch.Tensor], meta: dict[str, str], note: str = "") -> bytes:
    """The safetensors bytes of a snapshot of ``tensors`` with the caller's ``meta`` (str values)."""
    bad = [k for k, v in meta.items() if k in _RESERVED_META or not isinstance(v, str)]
    if bad:
        raise ValueError(f"snapshot metadata must be str values and not use {_RESERVED_META}: {bad}")
    tensors = {
        name: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for name, t in tensors.items()
    }
    metadata = {**meta, "format_version": str(FORMAT_VERSION), "created": repr(time.time()), "note": note}
    metadata["sha256"] = digest(metadata, tensors)
    return safetensors.torch.save(tensors, metadata)


def agrees(theirs: str | None, ours: str) -> bool:
    """A snapshot's metadata value ``theirs`` meets an expectation ``ours``: equal strings, or, where ours
    is a JSON object, the same value for every field it names (a snapshot may record more fields)."""
    if theirs == ours:
        return True
    try:
        old, new = json.loads(theirs or ""), json.loads(ours)
    except ValueError:
        return False
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return False
    return all(k in old and old[k] == v for k, v in new.items())


def describe_difference(theirs: str | None, ours: str) -> str:
    """ "theirs != ours", or for JSON objects only the fields ours names that differ ("normalizer: none !=
    shared"): fields only the snapshot records play no part in ``agrees``."""
    try:
        old, new = json.loads(theirs or ""), json.loads(ours)
    except ValueError:
        old = new = None
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{one_line(theirs, 60)} != {one_line(ours, 60)}"
    fields = sorted(k for k in new if old.get(k) != new[k])
    return ", ".join(
        f"{k}: {one_line(json.dumps(old.get(k)), 30)} != {one_line(json.dumps(new.get(k)), 30)}"
        for k in fields
    )


@dataclass
class SnapshotInfo:
    id: str
    created: float
    tokens_seen: int
    path: Path
    nbytes: int
    note: str


class SnapshotFolder:
    """The snapshots of session ``owner`` in ``folder``; the owner's name goes into refusal messages."""

    def __init__(self, folder: Path, owner: str):
        self.folder = Path(folder)
        self.owner = owner

    def path(self, snapshot_id: str) -> Path:
        return self.folder / f"{snapshot_id}.safetensors"

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted((m.group(1) for m in map(_SNAPSHOT_NAME.fullmatch, names) if m), key=int)

    def info(self, snapshot_id: str) -> SnapshotInfo | None:
        """What the header says about a snapshot; None if it does not exist."""
        path = self.path(snapshot_id)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        try:
            with open(path, "rb") as f:
                meta = read_metadata(f)
            created, tokens_seen = float(meta["created"]), int(meta.get("tokens_seen", 0))
        except (OSError, ValueError, KeyError) as e:
            return SnapshotInfo(snapshot_id, stat.st_mtime, 0, path, stat.st_size, f"damaged ({one_line(e)})")
        return SnapshotInfo(snapshot_id, created, tokens_seen, path, stat.st_size, meta.get("note", ""))

    def infos(self) -> list[SnapshotInfo]:
        infos = (self.info(i) for i in self.ids())
        return [info for info in infos if info is not None]

    def latest(self) -> SnapshotInfo | None:
        for snapshot_id in reversed(self.ids()):
            info = self.info(snapshot_id)
            if info is not None:
                return info
        return None

    def refusal(self, snapshot_id: str, problem: str, advice: str = "") -> SnapshotError:
        advice = advice or (
            f"restore an earlier one with `lola-chat sessions restore {shlex.quote(self.owner)} ID` "
            "or rebuild with --rebuild"
        )
        return SnapshotError(
            f"snapshot {snapshot_id} of session {self.owner} {problem}; its file is left untouched; {advice}"
        )

    def verified(self, snapshot_id: str) -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
        """File bytes, CPU tensors and metadata of a snapshot whose checksum and format are good."""
        try:
            data = self.path(snapshot_id).read_bytes()
        except FileNotFoundError:
            raise self.refusal(snapshot_id, "is missing") from None
        except OSError as e:
            raise self.refusal(snapshot_id, f"is unreadable ({one_line(e.strerror)})") from None
        try:
            metadata = read_metadata(io.BytesIO(data))
            version = metadata.get("format_version", "")
            if not version.isdecimal():
                raise ValueError(f"format_version {version!r} is not a number")
        except ValueError as e:
            raise self.refusal(snapshot_id, f"is damaged ({one_line(e)})") from None
        if int(version) > FORMAT_VERSION:
            raise self.refusal(
                snapshot_id,
                f"was written in format {int(version)}, newer than format {FORMAT_VERSION} that this "
                "lola-chat reads",
                "upgrade lola-chat",
            )
        try:
            tensors = safetensors.torch.load(data)
        except Exception as e:  # safetensors reports bad files with several exception types
            raise self.refusal(snapshot_id, f"is damaged ({one_line(e)})") from None
        if metadata.get("sha256") != digest(metadata, tensors):
            raise self.refusal(snapshot_id, "is damaged (sha256 mismatch)")
        return data, tensors, metadata

    def load(
        self, snapshot_id: str, expect: dict[str, str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A verified snapshot's tensors and metadata, refused unless its metadata agrees with ``expect``
        (see ``agrees``)."""
        _, tensors, metadata = self.verified(snapshot_id)
        for key, ours in expect.items():
            theirs = metadata.get(key)
            if not agrees(theirs, ours):
                raise self.refusal(
                    snapshot_id,
                    f"was made with a different {key} ({describe_difference(theirs, ours)})",
                    "use the matching model and settings, or rebuild with --rebuild",
                )
        return tensors, metadata

    def add(self, data: bytes, after: int) -> str:
        """Write ``data`` as the snapshot numbered one past ``after`` and every existing id; return its id.
        The caller holds the session lock."""
        last = max([after, *(int(i) for i in self.ids())])
        snapshot_id = f"{last + 1:0{ID_WIDTH}d}"
        self.folder.mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(self.path(snapshot_id), data)
        return snapshot_id

    def prune(self, keep_newest: int, keep: set[str]) -> None:
        """Delete all but the newest ``keep_newest`` snapshots (and ``keep``) and stale temp files."""
        ids = self.ids()
        keep = keep | set(ids[-keep_newest:])
        doomed = [self.path(i) for i in ids if i not in keep]
        doomed += [self.folder / n for n in os.listdir(self.folder) if n.startswith(".") and _TMP_MARK in n]
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            fsync_dir(self.folder)
