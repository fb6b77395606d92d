"""The bytes of conversation state each configuration holds at a given length, next to the softmax
KV cache at the same length. Both come from ``State.nbytes()`` of the real memory classes, built on
the meta device so that a million-token KV cache costs no memory to measure."""

from __future__ import annotations

import torch

from lola_chat.evals.arms import Arm
from lola_chat.memory import MEMORY_KINDS, State


def state_at(cfg, arm: Arm, chunk: int, length: int, dtype: torch.dtype) -> State:
    """A one-sequence state of ``arm`` holding ``length`` tokens (contents irrelevant: meta tensors)."""
    meta = torch.device("meta")
    kind = MEMORY_KINDS[arm.attention]
    layers = [
        kind(1, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.feature_dim, arm.settings(chunk), dtype, meta)
        for _ in range(cfg.n_layers)
    ]
    state = State(layers)
    if arm.attention == "softmax":
        shape = (1, cfg.n_kv_heads, length, cfg.head_dim)
        kv = {
            f"layers.{i}.{name}": torch.empty(shape, dtype=dtype, device=meta)
            for i in range(cfg.n_layers)
            for name in ("k", "v")
        }
        state.load(kv, length)
    return state


def evaluate(cfg, arms: list[Arm], lengths: list[int], chunk: int, dtype: torch.dtype) -> list[dict]:
    """One row per (configuration, length): state bytes, the softmax KV cache bytes, their ratio."""
    softmax = Arm("softmax", "softmax")
    rows = []
    for length in lengths:
        kv_bytes = state_at(cfg, softmax, chunk, length, dtype).nbytes()
        for arm in arms:
            state_bytes = state_at(cfg, arm, chunk, length, dtype).nbytes()
            rows.append(
                {
                    "config": arm.name,
                    "length": length,
                    "state_bytes": state_bytes,
                    "softmax_kv_bytes": kv_bytes,
                    "ratio": kv_bytes / state_bytes,
                }
            )
    return rows
