"""Stage 1, attention transfer (LoLCATs): every layer's LoLA attention, by default without a sparse
cache (G = 0: sliding window + linear attention; ``capacity`` trains with one), learns to reproduce
that layer's softmax attention output, on the teacher's own hidden states. Only the Hedgehog feature
maps and the window factors train.

The student runs through ``LolaMemory`` -- the very code inference runs. All layers train at once on
detached inputs, so they are independent; stacking the layers along the head axis (layer l's query
head h becomes head l * Hq + h, its key/value head j becomes l * Hkv + j, which keeps the grouped-query
pairing) runs all of them through one memory and one chunk loop instead of one per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lola_chat.linearize.teacher import capture_attention
from lola_chat.memory import LolaMemory, LolaSettings


@dataclass
class StackedAttention:
    """The attributes ``LolaMemory`` reads from an attention module, for all layers at once."""

    fmap_q: torch.Tensor
    fmap_k: torch.Tensor
    window_logit: torch.Tensor
    inv_freq: torch.Tensor

    @classmethod
    def of(cls, model) -> StackedAttention:
        attns = [block.self_attn for block in model.layers]
        return cls(
            fmap_q=torch.cat([a.fmap_q for a in attns]),
            fmap_k=torch.cat([a.fmap_k for a in attns]),
            window_logit=torch.cat([a.window_logit for a in attns]),
            inv_freq=attns[0].inv_freq,
        )

    def window_factor(self) -> torch.Tensor:
        return torch.sigmoid(self.window_logit)


def transfer_parameters(model) -> list[torch.nn.Parameter]:
    return [
        p
        for block in model.layers
        for p in (block.self_attn.fmap_q, block.self_attn.fmap_k, block.self_attn.window_logit)
    ]


def _heads_first(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H * D) -> (B, H, T, D)."""
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def transfer_loss(
    model, tokens: torch.Tensor, chunk: int, capacity: int = 0, normalizer: str = "shared"
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE between the LoLA attention output (G = ``capacity``, 0 by default: window + linear only) and
    the softmax attention output, both taken before o_proj, over all layers. Returns (loss, per-layer
    MSE (n_layers,) detached)."""
    cfg = model.cfg
    inputs, targets = capture_attention(model, tokens)
    with torch.no_grad():
        projected = [block.self_attn.project(x) for block, x in zip(model.layers, inputs, strict=True)]
        q, k, v = (torch.cat(parts, dim=1) for parts in zip(*projected, strict=True))
        target = torch.cat([_heads_first(t, cfg.n_heads) for t in targets], dim=1)
    memory = LolaMemory(
        tokens.shape[0],
        cfg.n_layers * cfg.n_heads,
        cfg.n_layers * cfg.n_kv_heads,
        cfg.head_dim,
        cfg.feature_dim,
        LolaSettings(chunk=chunk, capacity=capacity, normalizer=normalizer),
        q.dtype,
        q.device,
    )
    output = memory.attend(q, k, v, StackedAttention.of(model))
    error = F.mse_loss(output.float(), target.float(), reduction="none")
    per_layer = error.view(error.shape[0], cfg.n_layers, -1).mean(dim=(0, 2))
    return per_layer.mean(), per_layer.detach()
