"""The model's memory of a conversation: per layer either LoLA's three memories (fixed size) or an
ordinary growing softmax KV cache (the baseline). Byte accounting and conversion to/from tensors
for snapshots live here too."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lola_chat.errors import LolaError, UsageError
from lola_chat.joint import JOINT_POOLING, MAX_JOINT_POWER, close_chunk_jointly
from lola_chat.kernels import lola
from lola_chat.kernels.lola.evict_reference import RECALL_POLICIES, CacheMemo
from lola_chat.kernels.lola.reference import FrameRotary, accumulator, expand_heads

# "joint-" before a recall policy: one choice for the whole model. Every layer and query head keeps the
# same positions, ranked by a pooling of their scores (``joint.joint_ranking``), so a span is held in
# every layer or in none; at equal G this recalls far more needles in prose than choices made per layer
# and head (docs/results).
JOINT = "joint-"
POLICIES = (*RECALL_POLICIES, *(JOINT + policy for policy in RECALL_POLICIES), "random", "recent")
NORMALIZERS = ("shared", "window")


@dataclass(frozen=True)
class LolaSettings:
    """How a LoLA memory is shaped. Part of every snapshot, which loads only with settings that agree
    (``Engine.expectations`` says which may differ)."""

    chunk: int = 64
    capacity: int = 128
    policy: str = "sre"
    # "shared": the paper's normalizer; "window": the linear term is weighed against the window's best
    # score (see reference.attend). A linearization's config names the one it was trained for.
    normalizer: str = "shared"
    # The hidden state weighs at most what it weighs after this many folded pairs (0: no cap); see
    # reference.attend. Without it the linear term outgrows the exact memories in a long conversation.
    linear_cap: int = 0
    # A joint policy ranks a position by the mean of its scores' ``joint_power``-th powers over layers and
    # query heads (1: the mean; higher lets the layers that recall it worst weigh more), then at least as
    # high as the candidates within ``joint_span`` of it (in time order), so that what is kept next to a
    # fact stays with it (``joint.joint_ranking``). Ignored by other policies.
    joint_power: int = 1
    joint_span: int = 0

    def __post_init__(self):
        if self.chunk < 1 or self.capacity < 0 or self.linear_cap < 0:
            raise UsageError(
                "LoLA chunk must be at least 1, capacity and linear cap at least 0, not "
                f"{self.chunk}/{self.capacity}/{self.linear_cap}"
            )
        if not 1 <= self.joint_power <= MAX_JOINT_POWER or self.joint_span < 0:
            raise UsageError(
                f"joint pooling power must be 1 to {MAX_JOINT_POWER} and span at least 0, not "
                f"{self.joint_power}/{self.joint_span}"
            )
        if self.policy not in POLICIES:
            raise UsageError(f"unknown eviction policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.normalizer not in NORMALIZERS:
            raise UsageError(f"unknown normalizer {self.normalizer!r}; known: {', '.join(NORMALIZERS)}")

    def as_dict(self) -> dict:
        """The settings by name, less the joint pooling's where they change nothing (``JOINT_POOLING``)."""
        settings = asdict(self)
        for name, neutral in JOINT_POOLING.items():
            if not self.joint or settings[name] == neutral:
                del settings[name]
        return settings

    @property
    def joint(self) -> bool:
        return self.policy.startswith(JOINT)

    @property
    def scoring(self) -> str:
        """The policy each memory scores its candidates by (a joint policy's scores are then pooled)."""
        return self.policy.removeprefix(JOINT)


class LolaMemory:
    """One layer's sliding window, sparse cache and hidden state, allocated once."""

    kind = "lola"

    def __init__(self, batch, n_heads, n_kv_heads, head_dim, feature_dim, settings, dtype, device):
        self.settings = settings
        c, g = settings.chunk, settings.capacity
        self.win_k = torch.zeros(batch, n_kv_heads, 2 * c, head_dim, dtype=dtype, device=device)
        self.win_v = torch.zeros_like(self.win_k)
        # Under a joint policy every query head of a KV group keeps the same pairs: one copy per KV head.
        cache_heads = n_kv_heads if settings.joint else n_heads
        self.cache_k = torch.zeros(batch, cache_heads, g, head_dim, dtype=dtype, device=device)
        self.cache_v = torch.zeros_like(self.cache_k)
        acc = accumulator(dtype)
        self.h = torch.zeros(batch, n_heads, feature_dim, head_dim, dtype=acc, device=device)
        self.s = torch.zeros(batch, n_heads, feature_dim, dtype=acc, device=device)
        # Token ids of what the window and cache hold, so a user can read what is remembered exactly.
        self.win_ids = torch.full((batch, 2 * c), -1, dtype=torch.int64, device=device)
        self.cache_ids = torch.full((batch, cache_heads, g), -1, dtype=torch.int64, device=device)
        self.tokens_seen = 0
        self.evictions = 0
        # (first (B,), count (B,)): the ids first[b] .. first[b] + count[b] - 1 of sequence b are kept
        # through every eviction (``pin_ids``); never saved.
        self.pinned_ids: tuple[torch.Tensor, torch.Tensor] | None = None
        # Rotary tables and rotated keys the reference keeps between calls (see FrameRotary).
        self._rotary: FrameRotary | None = None
        # What the reference keeps about the cached keys between evictions (features, nearest keys);
        # never saved.
        self._memo = CacheMemo()
        # What a CPU decode step keeps between tokens (see kernels/lola/decode_cpu); never saved. It knows
        # the tensors and rotary it was made from, so it needs no forgetting.
        self._decode = lola.DecodeFrame()
        # Under a joint policy: the length of the segment that filled the chunk, until the whole model's
        # eviction closes it (``joint.close_chunk_jointly``); None otherwise.
        self.pending: int | None = None

    names = ("win_k", "win_v", "cache_k", "cache_v", "h", "s", "win_ids", "cache_ids")
    memory_names = ("win_k", "win_v", "cache_k", "cache_v", "h", "s")

    def attend(self, q, k, v, attn, ids: torch.Tensor | None = None) -> torch.Tensor:
        """q: (B, Hq, T, D), k and v: (B, Hkv, T, D) un-rotated; ids: (B, T) token ids or None.
        Returns (B, Hq, T, D)."""
        chunk = self.settings.chunk
        if self._rotary is None or self._rotary.inv_freq is not attn.inv_freq:
            self._rotary = FrameRotary(attn.inv_freq, chunk, self.settings.capacity)
        outputs = []
        start = 0
        while start < q.shape[2]:
            if self.pending is not None:
                raise LolaError("a joint eviction must close the full chunk before more tokens are attended")
            length = min(q.shape[2] - start, chunk - self.tokens_seen % chunk)
            end = start + length
            y, self.win_k, self.win_v = lola.attend(
                q[:, :, start:end],
                k[:, :, start:end],
                v[:, :, start:end],
                self.win_k,
                self.win_v,
                self.cache_k,
                self.cache_v,
                self.h,
                self.s,
                attn.fmap_q,
                attn.window_factor(),
                attn.inv_freq,
                self.tokens_seen,
                self._rotary,
                self.settings.normalizer,
                self.settings.linear_cap,
                self._decode,
            )
            outputs.append(y)
            if ids is not None:
                slot = chunk + self.tokens_seen % chunk
                self.win_ids[:, slot : slot + length] = ids[:, start:end]
            self.tokens_seen += length
            if self.tokens_seen % chunk == 0:
                if self.settings.joint:
                    self.pending = length
                else:
                    self.close_chunk(attn, length)
            start = end
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat(outputs, dim=2) if outputs else q[:, :, :0]

    def pin_ids(self, first: torch.Tensor, count: torch.Tensor) -> None:
        """Keep the pairs whose recorded ids (the ids ``attend`` is given) fall in first[b] ..
        first[b] + count[b] - 1 in the sparse cache through every eviction of sequence b, ahead of any
        score (the earliest, where more than its capacity are pinned). For an evaluation's oracle: what
        the memory recalls when a span is never evicted. Eviction then runs the PyTorch reference."""
        self.pinned_ids = (first, count)

    def _candidate_ids(self) -> torch.Tensor:
        """(B, Hq, G + C): the ids of an eviction's candidates, the cache slots, then the leaving chunk."""
        leaving = self.win_ids[:, None, : self.settings.chunk].expand(-1, self.cache_ids.shape[1], -1)
        return torch.cat([self.cache_ids, leaving], dim=2)

    def _pinned_candidates(self) -> torch.Tensor | None:
        """(B, Hq, G + C) bool: which eviction candidates are pinned (``pin_ids``)."""
        if self.pinned_ids is None:
            return None
        first, count = (x.to(self.cache_ids.device)[:, None, None] for x in self.pinned_ids)
        ids = self._candidate_ids()
        return expand_heads((ids >= first) & (ids < first + count), self.h.shape[1])

    def close_chunk(self, attn, length: int, score: torch.Tensor | None = None) -> None:
        """Evict at the end of a full chunk that a segment of ``length`` tokens completed, ranking the
        candidates by ``score`` where given (``evict_reference.evict``)."""
        self._evict(attn, score)
        self.pending = None
        if length == 1:
            memory = (self.win_k, self.win_v, self.cache_k, self.cache_v, self.h, self.s)
            lola.prepare_decode(self._decode, self._rotary, *memory, self.tokens_seen)

    def candidate_scores(self, attn) -> torch.Tensor | None:
        """(B, Hq, G + C): how this memory's eviction would rank its candidates now, by its settings'
        ``scoring`` (``evict_reference.candidate_scores``); None where it ranks nothing."""
        memory = (self.win_k, self.win_v, self.cache_k, self.cache_v, self.h, self.s)
        return lola.candidate_scores(
            *memory, attn.fmap_k, self.tokens_seen, self.settings.scoring, memo=self._memo
        )

    def _evict(self, attn, score: torch.Tensor | None = None) -> None:
        chunk = self.settings.chunk
        if self._rotary is not None:
            self._rotary.forget()
        *memories, keep = lola.evict(
            self.win_k,
            self.win_v,
            self.cache_k,
            self.cache_v,
            self.h,
            self.s,
            attn.fmap_k,
            self.tokens_seen,
            self.settings.scoring,
            memo=self._memo,
            pinned=self._pinned_candidates(),
            score=score,
        )
        self.win_k, self.win_v, self.cache_k, self.cache_v, self.h, self.s = memories
        if keep is not None:
            # A cache per KV head kept what the first query head of each group kept (all of them alike).
            group = keep.shape[1] // self.cache_ids.shape[1]
            self.cache_ids = self._candidate_ids().gather(2, keep[:, ::group])
        self.win_ids = torch.cat([self.win_ids[:, chunk:], torch.full_like(self.win_ids[:, chunk:], -1)], 1)
        self.evictions += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.names}

    def kept(self) -> tuple | None:
        """What the reference keeps about the cached keys now (``CacheMemo.export``), for a checkpoint."""
        return self._memo.export(self.cache_k)

    def adopt(self, kept: tuple) -> None:
        """Take ``kept`` (``kept()`` of the memory this one was just loaded from, as it was then)."""
        self._memo.adopt(self.cache_k, kept)

    def load(self, tensors: dict[str, torch.Tensor], tokens_seen: int) -> None:
        for name in self.names:
            if tensors[name].shape != getattr(self, name).shape:
                raise LolaError(
                    f"the saved memory's {name} is shaped {tuple(tensors[name].shape)}, this memory's "
                    f"{tuple(getattr(self, name).shape)}: it was made with other LoLA settings "
                    "(a joint eviction policy keeps its cache per KV head)"
                )
        for name in self.names:
            current = getattr(self, name)
            setattr(self, name, tensors[name].to(dtype=current.dtype, device=current.device).clone())
        self.tokens_seen = tokens_seen
        if self._rotary is not None:
            self._rotary.forget()
        self._memo.forget()
        self.pending = None

    def recall_errors(self, attn) -> torch.Tensor:
        """Self-recall error of each cached pair against the current hidden state: (B, Hq, G), NaN
        where a slot is empty. For inspection; eviction recomputes these itself."""
        cached, _, _ = lola.frame(self.tokens_seen, self.settings.chunk, self.settings.capacity)
        n_heads = self.h.shape[1]
        phi = lola.hedgehog(expand_heads(self.cache_k, n_heads), attn.fmap_k)
        error = lola.self_recall_error(phi, expand_heads(self.cache_v, n_heads), self.h, self.s)
        empty = torch.arange(error.shape[-1], device=error.device) < error.shape[-1] - cached
        return error.masked_fill(empty, float("nan"))

    def nbytes(self) -> dict[str, int]:
        return {
            "window": self.win_k.nbytes + self.win_v.nbytes,
            "sparse_cache": self.cache_k.nbytes + self.cache_v.nbytes,
            "hidden_state": self.h.nbytes + self.s.nbytes,
        }

    def fill(self) -> dict[str, int]:
        cached, previous, current = lola.frame(self.tokens_seen, self.settings.chunk, self.settings.capacity)
        return {"sparse_cache": cached, "window": previous + current, "hidden_state": self.folded()}

    def folded(self) -> int:
        return lola.reference.folded(self.tokens_seen, self.settings.chunk, self.settings.capacity)


class SoftmaxMemory:
    """The unmodified model's KV cache (rotated keys, true positions); grows with every token."""

    kind = "softmax"
    names = ("k", "v")

    def __init__(self, batch, n_heads, n_kv_heads, head_dim, feature_dim, settings, dtype, device):
        self.k = torch.zeros(batch, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.tokens_seen = 0
        self.evictions = 0

    def attend(self, q, k, v, attn, ids: torch.Tensor | None = None) -> torch.Tensor:
        length = q.shape[2]
        pos = torch.arange(self.tokens_seen, self.tokens_seen + length, device=q.device)
        self.k = torch.cat([self.k, lola.rotate(k, pos, attn.inv_freq)], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        self.tokens_seen += length
        total = self.k.shape[2]
        q = lola.rotate(q, pos, attn.inv_freq)
        # The fused kernels need no explicit mask: a single token sees everything, a first prefill is causal.
        if length == 1 or length == total:
            return F.scaled_dot_product_attention(q, self.k, self.v, is_causal=length > 1, enable_gqa=True)
        mask = torch.ones(length, total, dtype=torch.bool, device=q.device).tril(total - length)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask, enable_gqa=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v}

    def load(self, tensors: dict[str, torch.Tensor], tokens_seen: int) -> None:
        self.k = tensors["k"].to(dtype=self.k.dtype, device=self.k.device).clone()
        self.v = tensors["v"].to(dtype=self.v.dtype, device=self.v.device).clone()
        self.tokens_seen = tokens_seen

    def nbytes(self) -> dict[str, int]:
        return {"kv_cache": self.k.nbytes + self.v.nbytes}

    def fill(self) -> dict[str, int]:
        return {"kv_cache": self.tokens_seen}


MEMORY_KINDS = {"lola": LolaMemory, "softmax": SoftmaxMemory}


class State:
    """A whole model's memory of one conversation: one memory per layer."""

    def __init__(self, layers: list):
        self.layers = layers

    @property
    def kind(self) -> str:
        return self.layers[0].kind

    @property
    def tokens_seen(self) -> int:
        return self.layers[0].tokens_seen

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"layers.{i}.{name}": tensor.contiguous()
            for i, layer in enumerate(self.layers)
            for name, tensor in layer.tensors().items()
        }

    def load(self, tensors: dict[str, torch.Tensor], tokens_seen: int) -> None:
        for i, layer in enumerate(self.layers):
            layer.load({name: tensors[f"layers.{i}.{name}"] for name in layer.names}, tokens_seen)

    def nbytes(self) -> int:
        return sum(sum(layer.nbytes().values()) for layer in self.layers)

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], int, list]:
        """An exact copy of the state in memory (a cancelled feed goes back to it, the bench's repeats
        start from it), with what its layers keep between evictions, so that a state restored from it
        need not compute that all again at its next eviction."""
        tensors = {name: t.clone() for name, t in self.tensors().items()}
        kept = [layer.kept() if isinstance(layer, LolaMemory) else None for layer in self.layers]
        return tensors, self.tokens_seen, kept

    def restore(self, checkpoint: tuple[dict[str, torch.Tensor], int, list]) -> None:
        """Load a ``checkpoint`` (this state's or another of the same shapes)."""
        tensors, tokens_seen, kept = checkpoint
        self.load(tensors, tokens_seen)
        for layer, layer_kept in zip(self.layers, kept, strict=True):
            if layer_kept is not None:
                layer.adopt(layer_kept)

    def evictions(self) -> int:
        return sum(layer.evictions for layer in self.layers)

    @property
    def joint(self) -> bool:
        return self.kind == "lola" and self.layers[0].settings.joint

    def segments(self, length: int) -> list[tuple[int, int]]:
        """How a forward pass over ``length`` new tokens is cut: under a joint policy at every chunk end
        (each chunk goes through every layer before the whole model's eviction), else in one piece."""
        if not self.joint or length == 0:
            return [(0, length)]
        chunk = self.layers[0].settings.chunk
        ends = range(chunk - self.tokens_seen % chunk, length, chunk)
        cuts = [0, *ends, length]
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def close_chunk(self, blocks) -> None:
        """After a segment went through every layer: where it filled a chunk of a joint policy's memory,
        that chunk's eviction (``joint.close_chunk_jointly``). ``blocks``: the model's layers."""
        if self.joint and self.layers[0].pending is not None:
            close_chunk_jointly(self.layers, [block.self_attn for block in blocks])
