"""A Llama-family transformer whose attention layers read and write a per-conversation memory
(LoLA's three memories, or the ordinary softmax KV cache). Parameter names follow Hugging Face's
Llama checkpoints (without the ``model.`` prefix) so weights load by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lola_chat.memory import MEMORY_KINDS, LolaSettings, State


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    max_positions: int = 8192

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads", n_heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            intermediate=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            max_positions=hf.get("max_position_embeddings", 8192),
        )

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def feature_dim(self) -> int:
        """Hedgehog features per head: softmax(xW) and softmax(-xW), head_dim each."""
        return 2 * self.head_dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.dim, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        # The linearization: Hedgehog feature maps (identity at start, as in LoLCATs) and window gates.
        eye = torch.eye(hd).expand(cfg.n_heads, hd, hd)
        self.fmap_q = nn.Parameter(eye.clone())
        self.fmap_k = nn.Parameter(eye.clone())
        self.window_logit = nn.Parameter(torch.zeros(cfg.n_heads))
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def window_factor(self) -> torch.Tensor:
        return torch.sigmoid(self.window_logit)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> un-rotated q (B, Hq, T, D), k and v (B, Hkv, T, D)."""
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.cfg.n_kv_heads, hd).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, memory, ids: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x)
        y = memory.attend(q, k, v, self, ids)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, memory, ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), memory, ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_state(self, kind: str = "lola", settings: LolaSettings | None = None, batch: int = 1) -> State:
        """Empty memory for a new conversation, on this model's device and dtype."""
        c = self.cfg
        weight = self.embed_tokens.weight
        memory = MEMORY_KINDS[kind]
        return State(
            [
                memory(
                    batch,
                    c.n_heads,
                    c.n_kv_heads,
                    c.head_dim,
                    c.feature_dim,
                    settings or LolaSettings(),
                    weight.dtype,
                    weight.device,
                )
                for _ in range(c.n_layers)
            ]
        )

    def forward(self, tokens: torch.Tensor, state: State, last_only: bool = False) -> torch.Tensor:
        """tokens: (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with ``last_only``.
        Advances ``state`` by T tokens."""
        x = self.embed_tokens(tokens)
        for block, memory in zip(self.layers, state.layers, strict=True):
            x = block(x, memory, tokens)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()
