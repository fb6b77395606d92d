"""Slash commands typed into the chat input: their table (for /help) and argument parsing."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from lola_chat.errors import LolaError, UsageError

EXPORT_FORMATS = {"markdown": "md", "jsonl": "jsonl"}


@dataclass(frozen=True)
class SlashCommand:
    name: str
    usage: str
    help: str


SLASH_COMMANDS = (
    SlashCommand("help", "/help", "show keys and commands"),
    SlashCommand("new", "/new [NAME]", "start a new session (a fresh memory)"),
    SlashCommand("rename", "/rename NAME", "rename this session"),
    SlashCommand("system", "/system TEXT", "set the system prompt of this session"),
    SlashCommand(
        "set",
        "/set KEY VALUE",
        "temperature, top_p, repetition_penalty, no_repeat_ngram, max_new_tokens, seed",
    ),
    SlashCommand("memory", "/memory", "show or hide the memory inspector"),
    SlashCommand("save", "/save", "save a snapshot of the memory now"),
    SlashCommand("export", "/export [markdown|jsonl] [PATH]", "write the conversation to a file"),
    SlashCommand("feed", "/feed PATH", "read a text file into memory without a reply (Escape stops)"),
    SlashCommand("copy", "/copy [code]", "copy the last reply (or its last code block) to the clipboard"),
    SlashCommand("sessions", "/sessions", "list, open, rename, delete and restore sessions"),
)
_BY_NAME = {command.name: command for command in SLASH_COMMANDS}


@dataclass(frozen=True)
class Setting:
    kind: type
    low: float | None
    high: float | None
    allow_none: bool = False


SETTINGS = {
    "temperature": Setting(float, 0.0, 10.0),
    "top_p": Setting(float, 0.0, 1.0),
    "repetition_penalty": Setting(float, 1.0, 5.0),
    "no_repeat_ngram": Setting(int, 0, 64),
    "max_new_tokens": Setting(int, 1, 1_000_000),
    "seed": Setting(int, 0, 2**63 - 1, allow_none=True),
}


def parse(text: str) -> tuple[str, str] | None:
    """``("name", "rest")`` for a slash command, None for a chat message.

    A message that starts with ``//`` is sent with one slash, so a user can still say ``/etc/hosts``.
    """
    if not is_command(text):
        return None
    name, _, rest = text[1:].partition(" ")
    name = name.strip().lower()
    if name not in _BY_NAME:
        raise UsageError(f"unknown command /{name}; /help lists the commands (start with // to send a slash)")
    return name, rest.strip()


def message_text(text: str) -> str:
    return text[1:] if text.startswith("//") else text


def is_command(text: str) -> bool:
    return text.startswith("/") and not text.startswith("//")


def typed_prompts(history: list[dict]) -> list[str]:
    """The user's messages in a session history as they were typed: a leading slash doubled again, fed
    documents left out."""
    return [
        "/" + message["content"] if message["content"].startswith("/") else message["content"]
        for message in history
        if message.get("role") == "user" and not message.get("document") and message.get("content")
    ]


def parse_setting(rest: str) -> dict[str, float | int | None]:
    """``"temperature 0.7"`` -> ``{"temperature": 0.7}``, checked against the allowed range."""
    parts = rest.split()
    if len(parts) != 2:
        raise UsageError(f"usage: /set KEY VALUE with KEY one of {', '.join(SETTINGS)}")
    key, raw = parts[0].lower(), parts[1]
    setting = SETTINGS.get(key)
    if setting is None:
        raise UsageError(f"unknown setting {key!r}; use one of {', '.join(SETTINGS)}")
    if setting.allow_none and raw.lower() == "none":
        return {key: None}
    try:
        value = setting.kind(raw)
    except ValueError:
        raise UsageError(f"{key} needs a {setting.kind.__name__} value, not {raw!r}") from None
    if (setting.low is not None and value < setting.low) or (
        setting.high is not None and value > setting.high
    ):
        raise UsageError(f"{key} must be between {setting.low} and {setting.high}")
    return {key: value}


def parse_export(rest: str) -> tuple[str, str | None]:
    """``"[markdown|jsonl] [PATH]"`` -> (format, path or None)."""
    try:
        parts = shlex.split(rest)
    except ValueError as error:
        raise UsageError(f"/export: {error}") from None
    fmt = "markdown"
    if parts and parts[0].lower() in EXPORT_FORMATS:
        fmt = parts.pop(0).lower()
    if len(parts) > 1:
        raise UsageError("usage: /export [markdown|jsonl] [PATH]")
    return fmt, parts[0] if parts else None


def one_path(rest: str, command: str) -> str:
    try:
        parts = shlex.split(rest)
    except ValueError as error:
        raise UsageError(f"/{command}: {error}") from None
    if len(parts) != 1:
        raise UsageError(f"usage: /{command} PATH")
    return parts[0]


def export_target(path: str | None, directory: Path, session: str, fmt: str) -> Path:
    """The file an export writes: ``path`` as given, or ``<session>.<ext>`` in ``directory`` (or in ``path``
    when it names a folder), never replacing an earlier export."""
    extension = EXPORT_FORMATS[fmt]
    if path:
        target = Path(path).expanduser()
        if not target.is_dir():
            return target
        directory = target
    candidate = directory / f"{session}.{extension}"
    number = 1
    while candidate.exists():
        candidate = directory / f"{session}-{number}.{extension}"
        number += 1
    return candidate


def write_text_file(target: Path, content: str) -> Path:
    try:
        target.write_text(content, encoding="utf-8")
    except OSError as error:
        raise LolaError(f"could not write {target}: {error.strerror or error}") from None
    return target.resolve()


def read_text_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise LolaError(f"could not read {path}: {error.strerror or error}") from None
