"""Turning engine data into display strings: pure functions, so screens stay small and tests exact."""

from __future__ import annotations

import re

# C0 and C1 control characters except tab and newline: shown as \xNN so that escape sequences from the
# model or a paste are displayed, never executed by the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_BYTE_UNITS = ("B", "KB", "MB", "GB", "TB")


def visible(text: str) -> str:
    """Text with line endings normalised and every control character written out as an escape."""
    text = text.replace("\r\n", "\n")
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def one_line(text: str) -> str:
    """``visible`` with line breaks drawn as symbols, for text that must stay on one line."""
    return visible(text).replace("\n", "⏎").replace("\t", "→")


def human_bytes(nbytes: int | None) -> str:
    if nbytes is None:
        return "n/a"
    size = float(nbytes)
    for unit in _BYTE_UNITS:
        if abs(size) < 1000 or unit == _BYTE_UNITS[-1]:
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def human_count(count: int) -> str:
    return f"{count:,}"


def ago(then: float, now: float) -> str:
    """How long ago ``then`` was, coarse enough to read at a glance."""
    seconds = max(0.0, now - then)
    if seconds < 60:
        return "just now"
    for unit_seconds, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= unit_seconds:
            return f"{int(seconds // unit_seconds)} {unit} ago"
    raise AssertionError("unreachable")


def rate(tokens_per_second: float | None) -> str:
    """Tokens per second, rounded; a dash when not measured."""
    return "–" if not tokens_per_second else f"{tokens_per_second:,.0f}"


def bar_chart(edges: list[float], counts: list[int], width: int = 24) -> list[str]:
    """One text line per histogram bin: range, a bar scaled to the largest bin, and the count."""
    peak = max(counts, default=0)
    lines = []
    for index, count in enumerate(counts):
        low, high = edges[index], edges[index + 1]
        filled = 0 if peak == 0 else round(width * count / peak)
        if count and not filled:
            filled = 1
        lines.append(f"{low:6.2f}–{high:<6.2f} {'█' * filled}{' ' * (width - filled)} {count:,}")
    return lines


def shorten(text: str, limit: int) -> str:
    """At most ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… ({len(text) - limit:,} more characters)"
