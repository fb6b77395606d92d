"""Settings and locations. Built once in ``main()`` and passed down; nothing here runs at import."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import torch

from lola_chat.errors import UsageError
from lola_chat.memory import LolaSettings

APP_NAME = "lola-chat"
HOME_ENV = "LOLA_CHAT_HOME"
DEFAULT_LINEARIZATION = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Paths:
    """Where lola-chat keeps its files. ``LOLA_CHAT_HOME`` relocates all of them under one folder."""

    data: Path
    cache: Path
    config: Path

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Paths:
        environ = os.environ if environ is None else environ
        home = environ.get(HOME_ENV)
        if home:
            root = Path(home).expanduser()
            return cls(data=root / "data", cache=root / "cache", config=root / "config")
        return cls(
            data=Path(platformdirs.user_data_dir(APP_NAME)),
            cache=Path(platformdirs.user_cache_dir(APP_NAME)),
            config=Path(platformdirs.user_config_dir(APP_NAME)),
        )

    @property
    def sessions(self) -> Path:
        return self.data / "sessions"

    @property
    def weights(self) -> Path:
        return self.cache / "weights"

    @property
    def state_file(self) -> Path:
        """Small app state, such as the last session opened."""
        return self.config / "state.json"

    def as_dict(self) -> dict[str, str]:
        return {
            "data": str(self.data),
            "sessions": str(self.sessions),
            "cache": str(self.cache),
            "weights": str(self.weights),
            "config": str(self.config),
        }


@dataclass(frozen=True)
class GenerationSettings:
    # Greedy: a 135M model spreads its first-token probability thinly, so sampling wanders off. Greedy
    # decoding loops instead; refusing to repeat a 6-gram of the reply breaks loops without bending
    # the first tokens the way a repetition penalty does.
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 6
    max_new_tokens: int = 512
    seed: int | None = None


@dataclass(frozen=True)
class Config:
    paths: Paths
    device: str = "auto"
    attention: str = "lola"
    model_dir: Path | None = None
    # A linearization belongs to one base model: the command line names the shipped one for the default
    # model; a Config for any other checkpoint starts without one (untrained feature maps).
    linearization: str | None = None
    lola: LolaSettings = field(default_factory=LolaSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # Generation settings given on the command line; they win over a session's stored settings.
    generation_flags: frozenset[str] = frozenset()
    keep_snapshots: int = 10


# The command-line flags that override the LoLA settings a linearization ships (LolaSettings fields).
LOLA_FLAGS = ("capacity", "chunk", "normalizer", "policy", "joint_power", "joint_span", "linear_cap")


def lola_overrides(args) -> dict:
    """The LoLA settings the command line ``args`` names (flags left out are None), by field name."""
    return {name: getattr(args, name) for name in LOLA_FLAGS if getattr(args, name, None) is not None}


def with_lola_flags(settings: LolaSettings, args) -> LolaSettings:
    """``settings`` with the LoLA flags of ``args`` applied. LolaSettings refuses bad values (a chunk of
    0, a pooling power of 0) with a usage error; so is a joint pooling flag where the resulting policy
    is not joint, which would otherwise be accepted and ignored."""
    overrides = lola_overrides(args)
    result = dataclasses.replace(settings, **overrides)
    pooling = sorted(set(overrides) & {"joint_power", "joint_span"})
    if pooling and not result.joint:
        flags = " and ".join("--" + name.replace("_", "-") for name in pooling)
        verb = "apply" if len(pooling) > 1 else "applies"
        raise UsageError(f"{flags} {verb} to a joint policy (joint-...), not {result.policy}")
    return result


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is usable, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from lola_chat.errors import UsageError

        raise UsageError("--device cuda was asked for, but no CUDA GPU is usable here; try --device cpu")
    return torch.device(name)


DTYPE_ENV = "LOLA_CHAT_DTYPE"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): there bf16 halves the
    bytes a decode step reads and runs prefill matmuls several times faster than fp32 (AMX tiles).
    Elsewhere bf16 is emulated and slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def default_dtype(device: torch.device, environ: dict | None = None) -> torch.dtype:
    """Weights and state dtype: bf16 on CUDA and on CPUs with bf16 matrix hardware, fp32 on other CPUs.
    ``LOLA_CHAT_DTYPE=float32`` (or ``bfloat16``) in the environment overrides the choice."""
    environ = os.environ if environ is None else environ
    forced = environ.get(DTYPE_ENV)
    if forced:
        if forced not in DTYPES:
            from lola_chat.errors import UsageError

            raise UsageError(
                f"{DTYPE_ENV}={forced} is not a dtype lola-chat runs in; use one of {', '.join(DTYPES)}"
            )
        return DTYPES[forced]
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32
