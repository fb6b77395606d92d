"""Where a result came from: the command, the device, the commit and the library versions. Every
results file and every linearization card carries this, so no number stands without its origin."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "docs" / "results"
# A copy of the working tree without .git (for example on a remote GPU machine) cannot ask git; the
# commit can be passed in this variable instead.
COMMIT_ENV = "LOLA_CHAT_COMMIT"


def git_commit() -> str:
    """$LOLA_CHAT_COMMIT when set (a copy of the tree run elsewhere, whose git metadata, if any, may be
    stale); else HEAD's hash, with "-dirty" when tracked files differ from it; or "unknown"."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return head + ("-dirty" if changes else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def command_line() -> str:
    return shlex.join(["lola-chat", *sys.argv[1:]])


def run_info(device: torch.device) -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "device": device_name(device),
        "commit": git_commit(),
        "versions": {
            "lola-chat": _version("lola-chat"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda or "none",
            "transformers": _version("transformers"),
            "triton": _version("triton"),
        },
    }
