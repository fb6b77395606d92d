"""Snapshots of a session's memory: ``<snapshots folder>/<id>.safetensors``, ids being zero-padded
numbers, written atomically and read back only when they match (``SnapshotFolder``).

A snapshot's ``sha256`` metadata entry covers its other metadata entries (sorted key/value pairs as
JSON) and then, per tensor in name order, ``[name, dtype, shape]`` as JSON followed by the tensor's raw
bytes, so a changed byte anywhere in the header or the data is detected.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from lola_chat.errors import SnapshotError
from lola_chat.storage import FORMAT_VERSION, ID_WIDTH, TMP_MARK, atomic_write_bytes, fsync_dir, one_line

_SNAPSHOT_NAME = re.compile(r"([0-9]+)\.safetensors")
_RESERVED_META = ("format_version", "created", "note", "sha256")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


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
        doomed += [self.folder / n for n in os.listdir(self.folder) if n.startswith(".") and TMP_MARK in n]
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            fsync_dir(self.folder)
