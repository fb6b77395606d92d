"""Linearizations: the trained feature maps, window gates and LoRA factors that turn a base model's
softmax attention into LoLA. Each is a small folder of its own, ``config.json`` plus
``linearization.safetensors``; the shipped ones live in the repository's models/ folder."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes

from lola_chat.errors import UsageError
from lola_chat.linear import lora_merged
from lola_chat.memory import LolaSettings
from lola_chat.model import Transformer
from lola_chat.storage import atomic_write_bytes

LINEARIZATION_FILE = "linearization.safetensors"
LINEARIZATION_FORMAT = 1
FEATURE_MAP_NAMES = ("fmap_q", "fmap_k", "window_logit")


def linearizations_root() -> Path:
    """The shipped linearizations: the repository's models/ folder, installed as lola_chat.models."""
    return Path(str(importlib.resources.files("lola_chat.models")))


def resolve_linearization(name: str | None) -> Path | None:
    """A shipped linearization by name (None while it has not been trained and shipped yet), or an
    explicit folder path."""
    if not name:
        return None
    if "/" in name or os.sep in name or name.startswith((".", "~")):
        path = Path(name).expanduser()
        if not (path / LINEARIZATION_FILE).is_file():
            raise UsageError(f"no linearization at {path} (expected {LINEARIZATION_FILE} and config.json)")
        return path
    path = linearizations_root() / name
    return path if (path / LINEARIZATION_FILE).is_file() else None


def fingerprint(data: bytes) -> str:
    """How snapshots and result files name a linearization: 16 hex digits of its file's sha256."""
    return hashlib.sha256(data).hexdigest()[:16]


def save_linearization(
    model: Transformer,
    directory: Path,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
    lora_alpha: float,
    lora_rank: int,
    lola: LolaSettings,
    extra: dict,
) -> None:
    """Write the trained feature maps, window gates and LoRA factors (fp32) and their config.
    ``lora`` maps "layers.{i}.self_attn.q_proj" to (A (rank, in), B (out, rank))."""
    tensors = {}
    for i, block in enumerate(model.layers):
        for name in FEATURE_MAP_NAMES:
            tensors[f"layers.{i}.self_attn.{name}"] = getattr(block.self_attn, name).detach().float().cpu()
    for module, (a, b) in (lora or {}).items():
        if a.shape[0] != lora_rank or b.shape[1] != lora_rank:
            raise ValueError(f"LoRA of {module} is {tuple(b.shape)} x {tuple(a.shape)}, not rank {lora_rank}")
        tensors[f"{module}.lora_a"] = a.detach().float().cpu()
        tensors[f"{module}.lora_b"] = b.detach().float().cpu()
    targets = sorted({module.rsplit(".", 1)[-1] for module in lora or {}})
    meta = {"format_version": LINEARIZATION_FORMAT, "lola": lola.as_dict(),
            "lora": {"rank": lora_rank, "alpha": lora_alpha, "targets": targets}, **extra}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, {"format_version": "1"})
    atomic_write_bytes(directory / LINEARIZATION_FILE, data)
    # Not atomic_write_json: it sorts the keys, and the shipped config.json keeps the order written here.
    atomic_write_bytes(directory / "config.json", (json.dumps(meta, indent=2) + "\n").encode())


def linearization_settings(directory: Path) -> LolaSettings:
    """The LoLA settings a linearization's config.json ships with, without loading its tensors."""
    try:
        return LolaSettings(**json.loads((directory / "config.json").read_text()).get("lola", {}))
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise UsageError(f"{directory} has no readable LoLA settings: {error}") from None


def _lora_rank_scale(meta: dict) -> tuple[int, float]:
    """(rank, scale = alpha / rank) of the LoRA a linearization's config names; (0, 0.0) for none."""
    lora = meta.get("lora") or {}
    rank = lora.get("rank", 0)
    return rank, (lora["alpha"] / rank if rank else 0.0)


def linearization_lora(directory: Path) -> tuple[int, float]:
    """(rank, scale = alpha / rank) of the LoRA a linearization's config.json names; (0, 0.0) for none."""
    try:
        return _lora_rank_scale(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as error:
        raise UsageError(f"{directory} has no readable LoRA settings: {error}") from None


@torch.no_grad()
def merge_lora(linear: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """W += scale * B @ A in place, computed in fp32 or wider; ``linear`` keeps (A, B, scale) as
    ``merged_low_rank`` (``Transformer.attach_int4`` adds them apart from a four-bit base)."""
    linear.weight.copy_(lora_merged(linear.weight, a, b, scale))
    linear.merged_low_rank = (a, b, scale)


def load_linearization(model: Transformer, directory: Path) -> tuple[str, LolaSettings]:
    """Install a linearization into ``model``: feature maps and gates replaced, LoRA merged into the
    base projections (W += alpha/rank * B @ A, in fp32 or wider; each projection keeps (A, B, alpha/rank)
    as ``merged_low_rank``, so that a four-bit form of its base weight can add them apart, see
    ``Transformer.attach_int4``). Everything is checked before the model is touched. Returns
    (fingerprint: 16 hex of the safetensors file's sha256, settings)."""
    from safetensors.torch import load as load_safetensors

    try:
        meta = json.loads((directory / "config.json").read_text())
        data = (directory / LINEARIZATION_FILE).read_bytes()
        tensors = load_safetensors(data)
    except (OSError, ValueError, SafetensorError) as error:
        raise UsageError(f"{directory} is not a readable linearization: {error}") from None
    try:
        if meta.get("format_version", 0) > LINEARIZATION_FORMAT:
            raise UsageError(
                f"linearization {directory} is format {meta['format_version']}; update lola-chat"
            )
        settings = LolaSettings(**meta.get("lola", {}))
        rank, scale = _lora_rank_scale(meta)
    except (AttributeError, KeyError, TypeError) as error:
        raise UsageError(f"linearization {directory} has a malformed config.json ({error!r})") from None
    cfg = model.cfg
    shape = f"{cfg.n_layers} layers, {cfg.n_heads} heads x {cfg.head_dim}, dim {cfg.dim}"
    made_for = meta.get("base_model", "another model")
    about = f"linearization {directory} (for {made_for}) does not fit this model ({shape})"
    params = dict(model.named_parameters())
    wanted = {f"layers.{i}.self_attn.{name}" for i in range(cfg.n_layers) for name in FEATURE_MAP_NAMES}
    merges = []
    for key in sorted(tensors.keys() - wanted):
        module, _, part = key.rpartition(".")
        paired = f"{module}.lora_a" in tensors and f"{module}.lora_b" in tensors
        if part not in ("lora_a", "lora_b") or f"{module}.weight" not in params or not paired:
            raise UsageError(f"{about}: unexpected {key}")
        if part == "lora_b":
            continue
        weight, a, b = params[f"{module}.weight"], tensors[key], tensors[f"{module}.lora_b"]
        if (a.shape[1], b.shape[0], a.shape[0], b.shape[1]) != (weight.shape[1], weight.shape[0], rank, rank):
            raise UsageError(f"{about}: {module} LoRA is {tuple(b.shape)} x {tuple(a.shape)}, "
                             f"the weight is {tuple(weight.shape)}")  # fmt: skip
        merges.append((module, a, b))
    for key in sorted(wanted):
        if key not in tensors or tensors[key].shape != params[key].shape:
            found = tuple(tensors[key].shape) if key in tensors else "missing"
            raise UsageError(f"{about}: {key} is {found}, needs {tuple(params[key].shape)}")
    with torch.no_grad():
        for key in wanted:
            params[key].copy_(tensors[key])
        for module, a, b in merges:
            merge_lora(model.get_submodule(module), a, b, scale)
    return fingerprint(data), settings
