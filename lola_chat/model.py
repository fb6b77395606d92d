"""A Llama-family transformer whose attention layers read and write a per-conversation memory
(LoLA's three memories, or the ordinary softmax KV cache). Parameter names follow Hugging Face's
Llama checkpoints (without the ``model.`` prefix) so weights load by name."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lola_chat.kernels import int4
from lola_chat.kernels.rmsnorm import rms_norm
from lola_chat.kernels.swiglu import swiglu
from lola_chat.linear import Derived, Linear, fused, stacked_linear, with_low_rank
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
        return rms_norm(x, self.weight, self.eps)


def _kept_sigmoid(logit: torch.Tensor) -> torch.Tensor:
    # A normal tensor even under inference_mode, so that a later autograd graph may save it.
    with torch.inference_mode(False), torch.no_grad():
        return torch.sigmoid(logit)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.dim, cfg.head_dim
        self.q_proj = Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = Linear(cfg.n_heads * hd, d, bias=False)
        self.qkv_proj: Linear | None = None  # q, k and v in one GEMM, once Transformer.pack_projections ran
        # The linearization: Hedgehog feature maps (identity at start, as in LoLCATs) and window gates.
        eye = torch.eye(hd).expand(cfg.n_heads, hd, hd)
        self.fmap_q = nn.Parameter(eye.clone())
        self.fmap_k = nn.Parameter(eye.clone())
        self.window_logit = nn.Parameter(torch.zeros(cfg.n_heads))
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._window_factor = Derived()

    def window_factor(self) -> torch.Tensor:
        """sigmoid(window_logit) (Hq,). While the logit is trained, computed on every call for autograd;
        otherwise once per value of the logit (its tensor, storage and version), as inference would
        otherwise launch one sigmoid per layer per token."""
        logit = self.window_logit
        if torch.is_grad_enabled() and logit.requires_grad:
            return torch.sigmoid(logit)
        return self._window_factor.get(logit, _kept_sigmoid)

    def project(
        self, x: torch.Tensor, norm: RMSNorm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, dim), normed by ``norm`` first when given -> un-rotated q (B, Hq, T, D), k and v
        (B, Hkv, T, D). Packed, the norm is the prologue of the one q/k/v GEMM."""
        b, t, _ = x.shape
        hq, hkv, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        if self.qkv_proj is not None:
            q, k, v = fused(self.qkv_proj, x, norm).split((hq * hd, hkv * hd, hkv * hd), dim=-1)
        else:
            x = x if norm is None else norm(x)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, hq, hd).transpose(1, 2)
        return q, k.view(b, t, hkv, hd).transpose(1, 2), v.view(b, t, hkv, hd).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, norm: RMSNorm, memory, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The residual stream x (B, T, dim) -> x + o_proj(attention over ``memory`` of norm(x))."""
        q, k, v = self.project(x, norm)
        y = memory.attend(q, k, v, self, ids).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        if self.qkv_proj is None:  # the separate projections, which training wraps (LoRA) and hooks
            return x + self.o_proj(y)
        return fused(self.o_proj, y, residual=x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.intermediate, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.intermediate, bias=False)
        self.down_proj = Linear(cfg.intermediate, cfg.dim, bias=False)
        self.gate_up_proj: Linear | None = None  # gate and up in one GEMM, once packed

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """The residual stream x (B, T, dim) -> x + down(swiglu(gate(norm(x)), up(norm(x)))). Packed, the
        norm is the prologue of the gate/up GEMM, the gating and the residual add those of down's."""
        if self.gate_up_proj is not None:
            return fused(self.down_proj, fused(self.gate_up_proj, x, norm), gated=True, residual=x)
        h = norm(x)
        return x + self.down_proj(swiglu(self.gate_proj(h), self.up_proj(h)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, memory, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream x (B, T, dim) through attention, then the MLP, each adding its output to x;
        each norm is applied by the projection after it."""
        x = self.self_attn(x, self.input_layernorm, memory, ids)
        return self.mlp(x, self.post_attention_layernorm)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def pack_projections(self) -> Transformer:
        """Compute each layer's q, k and v in one GEMM and its gate and up in another (see
        ``stacked_linear``): fewer, larger kernels per token, and with the norms, the SwiGLU gating and
        the residual adds fused into the projections (``fused_linear``), four GEMVs per layer when
        decoding on a GPU. For inference (it freezes those weights),
        once the weights are final (loaded, linearization merged) and on their device and dtype:
        ``Module.to`` afterwards converts the stacked weights and their views one by one (equal, but
        stored twice, and a later load into a view would miss the GEMM); packing again shares them
        again. Returns the model."""
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.qkv_proj = stacked_linear(attn.q_proj, attn.k_proj, attn.v_proj)
            mlp.gate_up_proj = stacked_linear(mlp.gate_proj, mlp.up_proj)
        return self

    def decode_projections(self) -> Iterator[tuple[Linear, list[str]]]:
        """Each Linear a packed decode step multiplies by, with the parameter names of the weights stacked
        in it (``pack_projections``), in order."""
        for i, block in enumerate(self.layers):
            attn, mlp, at = block.self_attn, block.mlp, f"layers.{i}."
            if attn.qkv_proj is not None:
                yield attn.qkv_proj, [f"{at}self_attn.{p}_proj.weight" for p in "qkv"]
            yield attn.o_proj, [f"{at}self_attn.o_proj.weight"]
            if mlp.gate_up_proj is not None:
                yield mlp.gate_up_proj, [f"{at}mlp.gate_proj.weight", f"{at}mlp.up_proj.weight"]
            yield mlp.down_proj, [f"{at}mlp.down_proj.weight"]
        yield self.lm_head, ["embed_tokens.weight" if self.cfg.tie_embeddings else "lm_head.weight"]

    def attach_int4(self, recovered: dict[str, tuple[torch.Tensor, ...]]) -> int:
        """Give the decode projections their weights in four bits where the checkpoint held them so:
        ``recovered`` maps parameter names to ``int4.recover``'s (codes, scale, low). A projection takes
        them only if every weight stacked in it was recovered and, dequantized and rounded to its dtype,
        they equal its weight; or, for weights a linearization's LoRA was merged into
        (``merged_low_rank``), they and the LoRA merged as ``load_linearization`` merges it equal its
        weight: the one-row product then reads the base in four bits and adds the LoRA's low-rank product
        in fp32, which differs from the merged bf16 weight's product by that weight's rounding. For a
        bf16 model on the CPU, after ``pack_projections``; elsewhere nothing happens. Returns the number
        of projections given one."""
        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not int4.available():
            return 0
        attached = 0
        for linear, names in self.decode_projections():
            if not all(name in recovered for name in names) or not int4.packable(*linear.weight.shape):
                continue
            parts = zip(*(recovered[name] for name in names), strict=True)
            codes, scale, low = (torch.cat(part) for part in parts)
            base = int4.exact(codes, scale, low).to(linear.weight.dtype)
            modules = [self.get_submodule(name.removesuffix(".weight")) for name in names]
            merged = [getattr(module, "merged_low_rank", None) for module in modules]
            low_rank = None
            if any(merged):
                rows = [module.weight.shape[0] for module in modules]
                base, low_rank = with_low_rank(base, rows, merged)
            if torch.equal(base, linear.weight):
                attached += linear.attach_int4(int4.Int4Weight.pack(codes, scale, low, low_rank=low_rank))
        return attached

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

    def forward(
        self, tokens: torch.Tensor, state: State, last_only: bool = False, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens: (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with ``last_only``.
        Advances ``state`` by T tokens. ``ids`` (B, T): what the memory records for each token (its
        window and cache ids), the tokens themselves by default. Under a joint eviction policy the tokens
        go through the layers chunk by chunk (``State.segments``)."""
        ids = tokens if ids is None else ids
        outputs = []
        for start, end in state.segments(tokens.shape[1]):
            x = self.embed_tokens(tokens[:, start:end])
            for block, memory in zip(self.layers, state.layers, strict=True):
                x = block(x, memory, ids[:, start:end])
            state.close_chunk(self.layers)
            outputs.append(x)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        if last_only:
            x = x[:, -1:]
        return fused(self.lm_head, x, self.norm, out_dtype=torch.float32)
