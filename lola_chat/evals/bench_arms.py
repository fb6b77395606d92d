"""The arms ``lola-chat bench`` runs side by side: how each prefills, decodes and reports its footprint."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from lola_chat.kernels import lola
from lola_chat.kernels.dispatch import dependent_launch
from lola_chat.memory import LolaSettings, State

# Arms that run the Triton kernels on a GPU.
TRITON_ARMS = ("lola-triton", "lola-captured", "lola-captured-serial")
# The CPU path: the reference, with one-row products in four bits where the weights have them.
CPU_ARMS = ("lola-cpu",)
ARMS = ("lola-reference", *CPU_ARMS, *TRITON_ARMS, "lola-chat", "softmax-hf", "softmax-captured")
# Longest prefill timed per eager LoLA arm on a GPU: beyond it the state comes from a faster arm
# (a Python loop over 64-token chunks costs seconds per 8K tokens in the reference). The chat arm
# measures decoding only: it prefills only when it runs alone (``LolaArm``).
MAX_PREFILL = {"lola-reference": 8192, "lola-triton": 32768}
HF_DECODE_TOKENS = 32
# Which LoLA arm's state is the fastest to make (the prefill that serves the others).
SPEED_RANK = {"reference": 1, "cpu": 2, "triton": 2, "captured-serial": 3, "captured": 4, "chat": 0}


@dataclass
class BenchModel:
    model: torch.nn.Module
    settings: LolaSettings
    description: str


class Clock:
    """Marks on the device timeline (CUDA events) or the host clock (CPU); ``intervals`` in ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1000.0 for a, b in zip(self.marks, self.marks[1:], strict=False)]


class Arm:
    name = ""
    label = ""
    speed_rank = 0

    def __init__(self, bench: BenchModel, device: torch.device):
        self.bench, self.device = bench, device
        self.model = bench.model
        self.peak = 0
        self.state_bytes = 0

    @contextlib.contextmanager
    def tracked(self):
        """Peak device memory over this arm's calls."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        yield
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    def holds(self, length: int) -> bool:
        return True

    def footprint(self) -> dict:
        return {"state_bytes": self.state_bytes, "peak_memory_bytes": self.peak or None}


class LolaArm(Arm):
    """LoLA memory through the reference, the CPU path, the Triton kernels (eager) or the captured
    decoder, the latter with its kernels launched as programmatic dependent launches (where the GPU has
    them) or, "serial", strictly one after another; or, "chat", decoded as the chat decodes (its token
    feeder, and its sampling with the default settings on the logits the feeder returns)."""

    def __init__(self, name: str, bench: BenchModel, device: torch.device):
        super().__init__(bench, device)
        self.name = name
        self.kind = name.removeprefix("lola-")
        self.label = {
            "reference": "LoLA, PyTorch reference",
            "cpu": "LoLA, CPU path (four-bit decode products)",
            "triton": "LoLA, Triton kernels",
            "captured": "LoLA, Triton + CUDA graph",
            "captured-serial": "LoLA, Triton + CUDA graph, no dependent launch",
            "chat": "LoLA as the chat decodes: its token feeder, then its sampling",
        }[self.kind]
        self.speed_rank = SPEED_RANK[self.kind]
        self.captured = self.kind.startswith("captured")
        self.max_prefill = MAX_PREFILL.get(name, float("inf")) if device.type == "cuda" else float("inf")
        if self.kind == "chat":
            self.max_prefill = 0
        self._decoder = None
        self._feeder = None

    def new_state(self) -> State:
        return self.model.new_state("lola", self.bench.settings)

    @contextlib.contextmanager
    def _dispatch(self):
        with lola.force_reference(self.kind == "reference"), dependent_launch(self.kind != "captured-serial"):
            yield

    def prefill(self, tokens: torch.Tensor) -> tuple[float, State]:
        from lola_chat.graphs import CapturedDecoder

        state = self.new_state()
        clock = Clock(self.device)
        with self.tracked(), self._dispatch():
            if self.captured:
                decoder = CapturedDecoder(self.model, state)
                clock.mark()
                decoder.prefill(tokens)
                clock.mark()
                decoder.sync()
            else:
                clock.mark()
                self.model(tokens, state, last_only=True)
                clock.mark()
        self.state_bytes = state.nbytes()
        return clock.intervals()[0] / 1000.0, state

    def _captured(self, base: State):
        from lola_chat.graphs import CapturedDecoder

        if self._decoder is None or self._decoder.state is not base:
            self._decoder = None
            self._decoder = CapturedDecoder(self.model, base)
        self._decoder.reload()
        return self._decoder

    def _decode_as_chat(self, base: State, tokens: torch.Tensor, count: int, clock: Clock) -> None:
        """The chat's decode loop (``Engine._reply``) without the tokenizer: sample from the logits on the
        reply so far (greedy, no repeated n-gram: the chat's defaults), then feed the token; the first
        step feeds the prompt's last token."""
        from lola_chat.config import GenerationSettings
        from lola_chat.decoding import TokenFeeder
        from lola_chat.sampling import sample

        if self._feeder is None:
            self._feeder = TokenFeeder(self.model)
        state = self.new_state()
        state.restore(base.checkpoint())
        self._feeder.bind(state)
        # Untimed, as the other arms' decoders reload before their clocks start.
        self._feeder.prepare()
        self.state_bytes = state.nbytes()
        settings, reply, logits = GenerationSettings(), [], None
        for _ in range(count):
            clock.mark()
            if logits is None:
                token = int(tokens[0, -1])
            else:
                token = sample(logits, settings, None, reply, self._feeder.argmax)
                reply.append(token)
            logits = self._feeder.feed([token])

    def decode(self, base: State, tokens: torch.Tensor, count: int) -> dict:
        chunk = self.bench.settings.chunk
        seen = base.tokens_seen
        clock = Clock(self.device)
        token = tokens[:, -1]
        with self.tracked(), self._dispatch():
            if self.kind == "chat":
                self._decode_as_chat(base, tokens, count, clock)
            elif self.captured:
                decoder = self._captured(base)
                for _ in range(count):
                    clock.mark()
                    token = decoder.step(token)
            else:
                state = self.new_state()
                state.restore(base.checkpoint())
                token = token[:, None]
                for _ in range(count):
                    clock.mark()
                    token = self.model(token, state, last_only=True)[:, -1].argmax(-1, keepdim=True)
            clock.mark()
        steps = clock.intervals()
        evicting = [(seen + i + 1) % chunk == 0 for i in range(count)]
        return {
            "ordinary_ms": [t for t, e in zip(steps, evicting, strict=True) if not e],
            "eviction_ms": [t for t, e in zip(steps, evicting, strict=True) if e],
        }


def hf_llama(model: torch.nn.Module, max_positions: int):
    """A transformers LlamaForCausalLM with the same weights (softmax attention, the unmodified model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings, max_position_embeddings=max(c.max_positions, max_positions),
    )  # fmt: skip
    weight = model.embed_tokens.weight
    hf = LlamaForCausalLM(config).to(device=weight.device, dtype=weight.dtype).eval()
    linearization = ("fmap_q", "fmap_k", "window_logit")
    weights = {
        (name if name == "lm_head.weight" else f"model.{name}"): tensor
        for name, tensor in model.state_dict().items()
        if not name.endswith(linearization)
    }
    hf.load_state_dict(weights, strict=True)
    return hf


class SoftmaxHFArm(Arm):
    """The unmodified model through Hugging Face ``generate`` (greedy, its default dynamic KV cache).
    Its prefill is the generate call's first step; it decodes fewer tokens, once per length."""

    name = "softmax-hf"
    label = "softmax, HF transformers generate"

    def __init__(self, bench: BenchModel, device: torch.device, max_positions: int):
        super().__init__(bench, device)
        self.hf = hf_llama(bench.model, max_positions)
        self.done: set[int] = set()

    def holds(self, length: int) -> bool:
        return length not in self.done

    def decode(self, base: State, tokens: torch.Tensor, count: int) -> dict:
        from transformers import StoppingCriteria, StoppingCriteriaList

        clock = Clock(self.device)

        class Marker(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                clock.mark()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        count = min(count, HF_DECODE_TOKENS)
        with self.tracked():
            clock.mark()
            self.hf.generate(
                tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=count, min_new_tokens=count,
                do_sample=False, stopping_criteria=StoppingCriteriaList([Marker()]), pad_token_id=0,
            )  # fmt: skip
        steps = clock.intervals()
        self.done.add(tokens.shape[1])
        c = self.bench.model.cfg
        element = self.bench.model.embed_tokens.weight.element_size()
        self.state_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * element * (tokens.shape[1] + count)
        return {"ordinary_ms": steps[1:], "eviction_ms": [], "prefill_s": steps[0] / 1000.0}


class SoftmaxCapturedArm(Arm):
    """The unmodified model with a static KV cache, one CUDA graph per token
    (``softmax_graphs.SoftmaxDecoder``). Decode speed does not depend on the cached values, so its cache is
    taken as filled without a prefill."""

    name = "softmax-captured"
    label = "softmax, static KV cache, split-KV decode kernel + CUDA graph"

    def __init__(self, bench: BenchModel, device: torch.device):
        super().__init__(bench, device)
        self._decoder = None

    def decode(self, base: State, tokens: torch.Tensor, count: int) -> dict:
        from lola_chat.softmax_graphs import SoftmaxDecoder

        length = tokens.shape[1]
        clock = Clock(self.device)
        with self.tracked():
            if self._decoder is None or self._decoder.start != length:
                self._decoder = None
                torch.cuda.empty_cache()
                self._decoder = SoftmaxDecoder(self.model, 1, length + count + 1, length)
                self._decoder.start = length
            decoder = self._decoder
            decoder.counter.set(length)
            decoder.tokens_seen = length
            token = tokens[:, -1]
            for _ in range(count):
                clock.mark()
                token = decoder.step(token)
            clock.mark()
        self.state_bytes = decoder.nbytes()
        return {"ordinary_ms": clock.intervals(), "eviction_ms": []}


def make_arms(wanted: list[str], bench: BenchModel, device: torch.device, max_positions: int):
    """The arms that can run here, and why the others cannot."""
    arms, skipped = [], {}
    has_triton = True
    try:
        import triton  # noqa: F401
    except ImportError:
        has_triton = False
    for name in wanted:
        needs_gpu = name in TRITON_ARMS + ("softmax-captured",)
        if needs_gpu and device.type != "cuda":
            skipped[name] = "needs a CUDA GPU"
        elif name in CPU_ARMS and device.type != "cpu":
            skipped[name] = "runs on a CPU"
        elif name in TRITON_ARMS and not has_triton:
            skipped[name] = "Triton is not installed"
        elif name.startswith("lola-"):
            arms.append(LolaArm(name, bench, device))
        elif name == "softmax-hf":
            arms.append(SoftmaxHFArm(bench, device, max_positions))
        else:
            arms.append(SoftmaxCapturedArm(bench, device))
    return arms, skipped
