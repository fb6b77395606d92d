"""Low-rank adapters on the attention projections, for the LoRA stage. They wrap the model's linear
layers during training only; the factors are saved and merged into the weights at load time."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraLinear(nn.Module):
    """y = W x + (alpha / r) B A x, with A (r, in) and B (out, r) in fp32; B starts at zero so training
    starts from the unmodified layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.enabled = True
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + ((x.to(self.A.dtype) @ self.A.T) @ self.B.T * self.scale).to(y.dtype)


def attach(model, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap q, k, v and o of every layer; returns the new trainable factors. A packed q/k/v GEMM
    (``Transformer.pack_projections``) would bypass the adapters, so it is dropped; the adapters' merge
    on detach writes into the base weights, which stay correct unpacked."""
    params = []
    for block in model.layers:
        block.self_attn.qkv_proj = None
        for name in LORA_TARGETS:
            adapter = LoraLinear(getattr(block.self_attn, name), rank, alpha)
            setattr(block.self_attn, name, adapter)
            params += [adapter.A, adapter.B]
    return params


def _adapters(model) -> Iterator[tuple[str, nn.Module, str, LoraLinear]]:
    for i, block in enumerate(model.layers):
        for name in LORA_TARGETS:
            module = getattr(block.self_attn, name)
            if isinstance(module, LoraLinear):
                yield f"layers.{i}.self_attn.{name}", block.self_attn, name, module


@contextmanager
def disabled(model):
    """Run the model without its adapters (the teacher)."""
    adapters = [adapter for *_, adapter in _adapters(model)]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"layers.{i}.self_attn.{proj}": (A (r, in), B (out, r))}, detached fp32 copies."""
    return {
        key: (a.A.detach().float().clone(), a.B.detach().float().clone()) for key, _, _, a in _adapters(model)
    }


def detach(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Remove the adapters, putting the original linear layers back; returns their factors."""
    result = factors(model)
    for _, attn, name, adapter in list(_adapters(model)):
        setattr(attn, name, adapter.base)
    return result
