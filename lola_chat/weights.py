"""Base weights: building and loading models from a Llama-family checkpoint directory.

Without ``--model DIR`` the default model is used, fetched and converted on first use by
``lola_chat.fetch``. ``load_model`` then installs a linearization (see ``lola_chat.linearization``)
when LoLA attention is asked for."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lola_chat.config import Config
from lola_chat.errors import LolaError, UsageError
from lola_chat.fetch import READY_FILE, ensure_default_weights, offline_hub
from lola_chat.kernels import int4
from lola_chat.kernels.lola.reference import accumulator
from lola_chat.linearization import (
    FEATURE_MAP_NAMES,
    load_linearization,
    resolve_linearization,
)
from lola_chat.memory import LolaSettings
from lola_chat.model import ModelConfig, Transformer

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


def _read_checkpoint(
    files: list[Path],
    device: torch.device,
    dtype: torch.dtype,
    recovered: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors by Transformer parameter name, each moved to device and dtype as it is read. Into
    ``recovered``, when given, the four-bit form (``int4.recover``) of each projection weight stored
    as float32 values that have one (the default model's, converted from its GGUF)."""
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    name, tensor = key.removeprefix("model."), reader.get_tensor(key)
                    if recovered is not None and name.endswith("_proj.weight"):
                        form = int4.recover(tensor)
                        if form is not None:
                            recovered[name] = form
                    state[name] = tensor.to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as error:
            raise LolaError(f"could not read {file}: {error}") from None
    return state


def build_model(
    hf: dict,
    files: list[Path],
    device: torch.device,
    dtype: torch.dtype,
    recovered: dict | None = None,
) -> Transformer:
    """A Transformer holding the checkpoint's weights on ``device`` in ``dtype``. The linearization
    parameters, which a base checkpoint lacks, keep Transformer's initial values (identity feature
    maps); they and the buffers are kept in fp32 or wider, as the kernels compute with them in fp32.
    ``recovered``: see ``_read_checkpoint``."""
    state = _read_checkpoint(files, device, dtype, recovered)
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
    offline_hub()
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
    # A CPU decode step reads the weights the GGUF held in four bits as four bits (Transformer.attach_int4).
    four_bit = device.type == "cpu" and dtype == torch.bfloat16 and int4.available()
    recovered = {} if four_bit else None
    directory = resolve_linearization(config.linearization) if config.attention == "lola" else None
    model = build_model(hf, files, device, dtype, recovered)
    loaded = LoadedModel(
        model=model, tokenizer=load_tokenizer(model_dir), model_dir=model_dir,
        model_fingerprint=model_fingerprint(model_dir, files),
        linearization="none", linearization_fingerprint="none", lola=config.lola,
    )  # fmt: skip
    if config.attention == "lola":
        if directory is None:
            loaded.linearization = loaded.linearization_fingerprint = "untrained"
        else:
            loaded.linearization_fingerprint, loaded.lola = load_linearization(model, directory)
            loaded.linearization = config.linearization
    model.pack_projections()
    if recovered:
        model.attach_int4(recovered)
    return loaded
