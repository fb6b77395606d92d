"""Errors a user can act on. The command line prints their message on one line and exits with
their code; nothing else should reach the user as a traceback."""

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class LolaError(Exception):
    """A failure with a one-line, actionable message."""

    exit_code = EXIT_RUNTIME


class UsageError(LolaError):
    """The user asked for something malformed (bad name, bad flag value)."""

    exit_code = EXIT_USAGE


class SnapshotError(LolaError):
    """A snapshot is missing, damaged or does not match this model and settings. It is left untouched."""


class SessionLocked(LolaError):
    """Another process is writing this session."""
