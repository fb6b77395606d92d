"""The configurations an evaluation compares ("arms"): the softmax base model with its growing KV
cache, and the linearized model with LoLA memories of several sparse-cache sizes and eviction
policies. Each arm knows which model it needs and what memory to give it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from lola_chat.config import Config
from lola_chat.errors import UsageError
from lola_chat.joint import describe_pooling
from lola_chat.memory import LolaSettings
from lola_chat.weights import load_model

DEFAULT_ARMS = (
    "softmax,g0,g64,g128,g256,window128,window256,random128,recent128,window-random128,window-recent128"
)
LENGTH = re.compile(r"^(\d+)([kKmM]?)$")
ARM_PATTERN = re.compile(r"^([a-z-]+)(\d+)(?:-cap(\d+))?(?:-p(\d+))?(?:-span(\d+))?(-oracle)?$")
# An arm name's prefix -> (eviction policy, normalizer).
ARM_KINDS = {
    "g": ("sre", "shared"),
    "sre": ("sre", "shared"),
    "novelty": ("novelty", "shared"),
    "random": ("random", "shared"),
    "recent": ("recent", "shared"),
    "window": ("sre", "window"),
    "window-novelty": ("novelty", "window"),
    "window-random": ("random", "window"),
    "window-recent": ("recent", "window"),
    "window-relative-sre": ("relative-sre", "window"),
    "window-relative-novelty": ("relative-novelty", "window"),
    "window-joint-sre": ("joint-sre", "window"),
    "window-joint-relative-novelty": ("joint-relative-novelty", "window"),
}
POLICY_LABELS = {
    "sre": "self-recall error",
    "novelty": "self-recall or cache-recall error",
    "random": "random eviction",
    "recent": "keep most recent",
    "relative-sre": "self-recall error relative to the value",
    "relative-novelty": "relative self-recall or cache-recall error",
    "joint-sre": "self-recall error, one choice for all layers and heads",
    "joint-relative-novelty": (
        "relative self-recall or cache-recall error, one choice for all layers and heads"
    ),
}


@dataclass(frozen=True)
class Arm:
    name: str
    attention: str
    capacity: int = 0
    policy: str = "sre"
    normalizer: str = "shared"
    linear_cap: int = 0
    # A joint policy's pooling (``LolaSettings.joint_power`` and ``joint_span``).
    joint_power: int = 1
    joint_span: int = 0
    # Needle prompts only: the needle's tokens are never evicted (``LolaMemory.pin_ids``), an upper bound
    # on what any eviction policy could recall.
    oracle: bool = False

    def settings(self, chunk: int) -> LolaSettings:
        return LolaSettings(
            chunk=chunk,
            capacity=self.capacity,
            policy=self.policy,
            normalizer=self.normalizer,
            linear_cap=self.linear_cap,
            joint_power=self.joint_power,
            joint_span=self.joint_span,
        )

    @property
    def label(self) -> str:
        if self.attention == "softmax":
            return "softmax base (full KV cache)"
        if self.capacity == 0:
            return "linearized, G=0 (window + linear)"
        window = ", window normalizer" if self.normalizer == "window" else ""
        cap = f", hidden state capped at {self.linear_cap} pairs" if self.linear_cap else ""
        pooling = describe_pooling(self.joint_power, self.joint_span)
        oracle = ", needle never evicted (oracle)" if self.oracle else ""
        return f"LoLA G={self.capacity} ({POLICY_LABELS[self.policy]}{pooling}{window}{cap}{oracle})"


def parse_arms(text: str) -> list[Arm]:
    """ "softmax", "g<G>" (or "sre<G>"), "random<G>", "recent<G>" (the shared normalizer), and the same
    with the window normalizer: "window<G>" (self-recall error), "window-random<G>", "window-recent<G>";
    "novelty<G>" and "window-novelty<G>" for the novelty policy; "window-relative-sre<G>" and
    "window-relative-novelty<G>" for the relative policies (window normalizer only), and
    "window-joint-sre<G>" and "window-joint-relative-novelty<G>" for their joint forms (one choice of
    positions for every layer and head, ``memory.JOINT``); any LoLA arm may
    end in "-cap<R>" (the hidden state's weight capped at R folded pairs), a joint one then in "-p<P>"
    and "-span<S>" (its pooling: ``LolaSettings.joint_power`` and ``joint_span``), then any in "-oracle"
    (needle prompts: the needle is never evicted). Comma-separated."""
    arms = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name == "softmax":
            arms.append(Arm(name, "softmax"))
            continue
        match = ARM_PATTERN.match(name)
        if not match or match[1] not in ARM_KINDS:
            kinds = ", ".join(f"{kind}<G>" for kind in ARM_KINDS)
            raise UsageError(
                f"unknown configuration {name!r}; use softmax or one of {kinds}, each optionally "
                "followed by -cap<R>, -p<P> and -span<S> (joint policies) and -oracle"
            )
        policy, normalizer = ARM_KINDS[match[1]]
        power, span = int(match[4] or 1), int(match[5] or 0)
        if (match[4] or match[5]) and not policy.startswith("joint-"):
            raise UsageError(f"{name}: -p<P> and -span<S> shape a joint policy's pooling only")
        LolaSettings(policy=policy, joint_power=power, joint_span=span)  # refuses a bad pooling now
        arms.append(
            Arm(
                name, "lola", capacity=int(match[2]), policy=policy, normalizer=normalizer,
                linear_cap=int(match[3] or 0), joint_power=power, joint_span=span, oracle=bool(match[6]),
            )
        )  # fmt: skip
    if not arms:
        raise UsageError("--configs is empty")
    return arms


def label_of(name: str) -> str:
    return parse_arms(name)[0].label


class Models:
    """The two models the arms run on, each loaded once on first use: the unmodified base (softmax)
    and the linearized model (LoRA merged, trained feature maps)."""

    def __init__(self, config: Config, device: torch.device, dtype: torch.dtype, progress: bool = True):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self._loaded: dict[str, object] = {}

    def loaded(self, attention: str):
        if attention not in self._loaded:
            config = dataclasses.replace(self.config, attention=attention)
            self._loaded[attention] = load_model(config, self.device, self.dtype, progress=self.progress)
        return self._loaded[attention]

    def for_arm(self, arm: Arm):
        return self.loaded(arm.attention)

    @property
    def chunk(self) -> int:
        return self.loaded("lola").lola.chunk

    def describe(self) -> dict:
        """Which weights the results come from, for the results files."""
        lola = self.loaded("lola")
        return {
            "model_dir": str(lola.model_dir),
            "model_fingerprint": lola.model_fingerprint,
            "linearization": lola.linearization,
            "linearization_fingerprint": lola.linearization_fingerprint,
            "lola": lola.lola.as_dict(),
        }


def parse_lengths(text: str) -> list[int]:
    """ "1K,2K,512,1M" -> [1024, 2048, 512, 1048576] (K = 1024 tokens, M = 1024K)."""
    lengths = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = LENGTH.match(part)
        if not match or int(match[1]) == 0:
            raise UsageError(f"bad length {part!r}: use token counts such as 512, 1K, 32K, 1M")
        lengths.append(int(match[1]) * {"": 1, "k": 1024, "m": 2**20}[match[2].lower()])
    if not lengths:
        raise UsageError("no lengths given")
    return lengths
