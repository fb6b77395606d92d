"""`lola-chat doctor`: what works on this machine, one line each."""

from __future__ import annotations

import platform
import sys
import tempfile


def checks(config):
    """Yields (ok, name, detail)."""
    import torch

    yield sys.version_info >= (3, 10), "python", platform.python_version()
    yield True, "torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"
    if torch.cuda.is_available():
        yield True, "gpu", torch.cuda.get_device_name(0)
    else:
        yield True, "gpu", "none usable; lola-chat runs on the CPU"
    try:
        import triton

        yield True, "triton", triton.__version__
    except ImportError:
        yield True, "triton", "not installed; the PyTorch reference path is used"
    from lola_chat.fetch import weights_status

    status = weights_status(config.paths)
    yield bool(status.get("verified")), "default weights", status.get("detail", str(status))
    sessions = config.paths.sessions
    try:
        sessions.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=sessions):
            pass
        yield True, "data directory", f"{sessions} is writable"
    except OSError as error:
        yield False, "data directory", f"{sessions} is not writable ({error.strerror})"
