"""A captured LoLA step: the whole model over a few new tokens, eviction and sampling included, replayed
as one CUDA graph.

LoLA memory has a fixed size, so every buffer a step touches can be allocated once. The token count
lives in a device tensor that the Triton kernels read, so one graph serves every position; the host
only has to know whether a step closes a chunk (then the graph with eviction is replayed). Four
graphs share one memory pool: one token, one token that closes a chunk, a whole chunk, and a block of
several whole chunks (the last two prefill from a chunk boundary). A block runs like the eager model:
layer by layer (each layer's projections and MLP over all of its tokens at once, its attention and
eviction chunk after chunk), or under a joint eviction policy chunk by chunk through the whole model,
each chunk's eviction ranking every layer's candidates. The decoder works on its own copies of the
state tensors; ``sync`` writes them back into the ``State``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from lola_chat.config import GenerationSettings
from lola_chat.errors import LolaError
from lola_chat.joint import joint_ranking
from lola_chat.kernels.lola import TRITON_POLICIES, FrameRotary
from lola_chat.memory import LolaMemory, State
from lola_chat.sampling import sample_on_device

GREEDY = GenerationSettings(temperature=0.0, top_p=1.0, repetition_penalty=1.0)
# Chunks per prefill block: enough rows that the projections run as full GEMMs (under a joint policy,
# which feeds the chunks one by one, fewer replays), few enough that the block's graph (about ten kernels
# per chunk and layer) stays quick to capture.
BLOCK_CHUNKS = 8


def require_capture(device: torch.device) -> None:
    """Captured steps need a CUDA device and the Triton kernels."""
    if device.type != "cuda":
        raise LolaError("captured decoding needs a CUDA GPU; on this device use the ordinary model step")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise LolaError("captured decoding needs Triton, which is not installed") from None


def capture_graphs(
    variants: dict[str, Callable[[], torch.Tensor]], generator: torch.Generator | None = None
) -> tuple[dict[str, torch.cuda.CUDAGraph], dict[str, torch.Tensor]]:
    """Capture each ``variants`` function as a CUDA graph, all sharing one memory pool (they are never
    replayed at the same time). Each function is run once first, on a side stream, so that kernels
    compile and libraries set up outside the capture; warm-up runs change the buffers the functions
    write, so callers reload their state afterwards. Returns the graphs and each one's output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for run in variants.values():
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graphs, outputs, pool = {}, {}, None
    with torch.no_grad():
        for name, run in variants.items():
            graph = torch.cuda.CUDAGraph()
            if generator is not None:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph, pool=pool):
                outputs[name] = run()
            pool = graph.pool()
            graphs[name] = graph
    return graphs, outputs


class _Counter:
    """Device-side token counts shared by the layers during one captured step. A step feeds one or more
    segments (one token, or whole chunks); ``marks`` (segments + 1,) holds the tokens seen before each
    segment and after the last, ``leaving`` (B, segments * C) the ids of the chunk each segment's eviction
    pushes out of the window. ``positions`` holds [seen, seen + 1], a one-token step's marks, so that such a
    step computes none; ``seen`` is its first element."""

    def __init__(self, tokens_seen: int, device: torch.device):
        self.positions = torch.tensor([tokens_seen, tokens_seen + 1], dtype=torch.int64, device=device)
        self.seen = self.positions[:1]
        self.marks = self.positions
        self.leaving: torch.Tensor | None = None
        self.evicting = False

    def set(self, tokens_seen: int) -> None:
        """Set the count (between steps, from the host)."""
        self.positions.copy_(torch.tensor([tokens_seen, tokens_seen + 1]))

    def advance(self, length: int) -> None:
        """Count ``length`` more tokens (the end of a captured step)."""
        self.positions.add_(length)


# The tensors a captured step keeps of each layer's memory.
STATIC_NAMES = LolaMemory.memory_names + ("cache_ids",)


class _StaticLayer:
    """Stands in for one layer's ``LolaMemory`` inside a captured step (``Block`` calls ``attend``): its
    slices of copies stacked over the layers (so that a joint eviction runs once over every layer),
    updated in place by the Triton kernels."""

    def __init__(
        self,
        memory: LolaMemory,
        counter: _Counter,
        stacked: dict[str, torch.Tensor],
        layer: int,
        rotary: FrameRotary,
    ):
        self.chunk = memory.settings.chunk
        self.normalizer = memory.settings.normalizer
        self.linear_cap = memory.settings.linear_cap
        # A joint policy's layers score alike and are evicted together by the decoder (``_evict_jointly``).
        self.policy = memory.settings.scoring
        self.joint = memory.settings.joint
        self.counter = counter
        # Every layer's: its tables are made at the first call (a warm-up, before any capture).
        self.rotary = rotary
        for name in STATIC_NAMES:
            setattr(self, name, stacked[name][layer])

    def load(self, memory: LolaMemory) -> None:
        for name in STATIC_NAMES:
            getattr(self, name).copy_(getattr(memory, name))

    def attend(self, q, k, v, attn, ids=None) -> torch.Tensor:
        from lola_chat.kernels.lola import attend_triton, evict_triton

        counter, chunk = self.counter, self.chunk
        segments = counter.marks.shape[0] - 1
        length = q.shape[2] // segments
        outputs = []
        for i in range(segments):
            part = slice(i * length, (i + 1) * length)
            # window_factor() keeps its sigmoid between calls, so the warm-up computes it and a capture
            # records no kernel for it.
            y, _, _ = attend_triton.attend(
                q[:, :, part], k[:, :, part], v[:, :, part], self.win_k, self.win_v, self.cache_k,
                self.cache_v, self.h, self.s, attn.fmap_q, attn.window_factor(), attn.inv_freq,
                counter.marks[i : i + 1], self.normalizer, self.linear_cap, self.rotary,
            )  # fmt: skip
            outputs.append(y)
            if counter.evicting and not self.joint:
                evict_triton.evict(
                    self.win_k, self.win_v, self.cache_k, self.cache_v, self.h, self.s, attn.fmap_k,
                    counter.marks[i + 1 : i + 2], self.policy, cache_ids=self.cache_ids,
                    leaving_ids=counter.leaving[:, i * chunk : (i + 1) * chunk],
                )  # fmt: skip
        return outputs[0] if segments == 1 else torch.cat(outputs, dim=2)


class _StaticState(State):
    """Static layers as the model's forward pass sees them: a step is one piece (it never crosses a chunk
    end), and the State evicts nothing itself (the layers do, or the decoder for a joint policy)."""

    def segments(self, length: int) -> list[tuple[int, int]]:
        return [(0, length)]

    def close_chunk(self, blocks) -> None:
        pass


class CapturedDecoder:
    """Decode (and chunk-aligned prefill) of a LoLA ``State`` by CUDA graph replay.

    ``step(token)`` feeds one token and returns the sampled next token as a (B,) int64 device tensor;
    that tensor is the decoder's input buffer, overwritten by the next step, so feeding it straight
    back costs no copy. ``prefill(tokens)`` feeds (B, N) tokens. ``sync()`` writes the memory back
    into the ``State`` it was built from (call it before reading, saving or otherwise using the state);
    ``rebind(state)`` makes the decoder work on another State of the same shapes.

    ``capture=False`` runs the very same step functions directly instead of replaying graphs of them, so
    the step logic also runs off the GPU (Triton's interpreter on a CPU, for tests). ``block_chunks``:
    the chunks of one prefill block (1: no block graph).
    """

    def __init__(
        self,
        model,
        state: State,
        sampling: GenerationSettings = GREEDY,
        capture: bool = True,
        block_chunks: int = BLOCK_CHUNKS,
    ):
        device = model.embed_tokens.weight.device
        if capture:
            require_capture(device)
        if state.kind != "lola":
            raise LolaError("captured decoding runs LoLA memory only")
        settings = state.layers[0].settings
        if settings.scoring not in TRITON_POLICIES:
            known = ", ".join(TRITON_POLICIES)
            raise LolaError(
                f"captured decoding runs the eviction policies {known} and their joint forms, "
                f"not {settings.policy}"
            )
        self.settings = settings
        self.model, self.state, self.sampling = model, state, sampling
        first = state.layers[0]
        self.chunk = first.settings.chunk
        self.batch = first.win_k.shape[0]
        self.tokens_seen = state.tokens_seen
        self.evictions = 0
        self.counter = _Counter(self.tokens_seen, device)
        self.window_ids = first.win_ids.clone()
        self.stacked = {name: torch.stack([getattr(m, name) for m in state.layers]) for name in STATIC_NAMES}
        # One rotary table for every layer: the layers' rotary frequencies are the model's, and the same.
        frequencies = [block.self_attn.inv_freq for block in model.layers]
        assert all(torch.equal(f, frequencies[0]) for f in frequencies), "layers rotate alike"
        rotary = FrameRotary(frequencies[0], self.chunk, first.settings.capacity)
        self.layers = [
            _StaticLayer(memory, self.counter, self.stacked, i, rotary)
            for i, (memory, _) in enumerate(zip(state.layers, model.layers, strict=True))
        ]
        self.static_state = _StaticState(self.layers)
        self.token = torch.zeros(self.batch, dtype=torch.int64, device=device)
        # Whole chunks a prefill feeds in one replay, largest first: (variant, its token buffer).
        sizes = ([("block", block_chunks)] if block_chunks > 1 else []) + [("chunk", 1)]
        self.prefill_variants = [
            (name, torch.zeros(self.batch, chunks * self.chunk, dtype=torch.int64, device=device))
            for name, chunks in sizes
        ]
        # Tokens of the reply being generated, for the repetition penalty; a prefill starts a new reply.
        self.penalized = torch.zeros(self.batch, model.cfg.vocab_size, dtype=torch.bool, device=device)
        self.in_reply = torch.zeros(self.batch, 1, dtype=torch.bool, device=device)
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.variants = {
            "token": partial(self._run, self.token[:, None], False),
            "token_evict": partial(self._run, self.token[:, None], True),
        }
        for name, tokens in self.prefill_variants:
            self.variants[name] = partial(self._run, tokens, True)
        # Per prefill step, the token counts before each of its segments (whole chunks) and after the last,
        # relative to the step's start (a one-token step's are the counter's ``positions``).
        self.offsets = {
            n: torch.arange(0, n + 1, self.chunk, device=device)
            for n in (tokens.shape[1] for _, tokens in self.prefill_variants)
        }
        self.graphs, self.outputs = self._capture() if capture else (None, {})
        if capture:
            # Replays need none of the step functions, which refer back to the decoder: without them a
            # decoder nobody holds is freed with its graphs and their memory at once, not whenever a later
            # garbage collection runs (which could be during another decoder's capture).
            self.variants = {}
        self.last = "token"

    def _run(self, tokens: torch.Tensor, evicting: bool) -> torch.Tensor:
        """The captured work: feed ``tokens`` (B, T) at the device-side position, sample into ``token``.
        Returns the last position's logits (B, vocab). A joint eviction ranks every layer's candidates of
        a chunk before the next chunk is attended, so under a joint policy a block's chunks go through
        the whole model one after another, inside the one graph."""
        chunk = self.chunk
        if self.settings.joint and tokens.shape[1] > chunk:
            for start in range(0, tokens.shape[1], chunk):
                logits = self._feed(tokens[:, start : start + chunk], evicting)
        else:
            logits = self._feed(tokens, evicting)
        penalized = None
        if self.sampling.repetition_penalty != 1.0:
            fed = tokens[:, -1:]
            self.penalized.scatter_(1, fed, self.penalized.gather(1, fed) | self.in_reply)
            penalized = self.penalized
        sample_on_device(logits, self.sampling, self.generator, penalized, out=self.token)
        return logits

    def _feed(self, tokens: torch.Tensor, evicting: bool) -> torch.Tensor:
        """Feed ``tokens`` (B, T) through the model (one token, or whole chunks that go through it
        together) and count them. Returns the last position's logits (B, vocab)."""
        counter, chunk, length = self.counter, self.chunk, tokens.shape[1]
        counter.evicting = evicting
        counter.marks = counter.positions if length == 1 else counter.seen + self.offsets[length]
        # The chunk each segment's eviction pushes out: the window's previous one, then each segment's.
        counter.leaving = self.window_ids[:, :chunk]
        if length > chunk:
            counter.leaving = torch.cat([counter.leaving, tokens[:, : length - chunk]], dim=1)
        if length == 1:
            # The token's slot in the window's current half (every other step is whole chunks).
            self.window_ids[:, chunk:].index_copy_(1, counter.seen % chunk, tokens)
        logits = self.model(tokens, self.static_state, last_only=True)[:, -1]
        if evicting and self.settings.joint:
            self._evict_jointly()
        if length >= chunk:
            self.window_ids[:, :chunk] = tokens[:, -chunk:]
            self.window_ids[:, chunk:] = -1
        elif evicting:
            self.window_ids[:, :chunk] = self.window_ids[:, chunk:]
            self.window_ids[:, chunk:] = -1
        counter.advance(length)
        return logits

    def _evict_jointly(self) -> None:
        """Close the chunk in every layer with one ranking: the Triton scores of every layer and query
        head pooled by ``joint.joint_ranking``, as ``joint.close_chunk_jointly`` does eagerly, each
        kernel launched once over the stacked layers."""
        from lola_chat.kernels.lola import evict_triton

        memory = [self.stacked[name] for name in LolaMemory.memory_names]
        # Stacked in the step (one copy kernel), so that the step reads the weights as they are now.
        fmap_k = torch.stack([block.self_attn.fmap_k.detach() for block in self.model.layers])
        seen, policy = self.counter.marks[1:2], self.layers[0].policy
        scores = evict_triton.candidate_scores(*memory, fmap_k, seen, policy)
        evict_triton.evict(
            *memory, fmap_k, seen, policy, cache_ids=self.stacked["cache_ids"],
            leaving_ids=self.counter.leaving[:, : self.chunk],
            scores=None if scores is None else joint_ranking(scores, self.settings).expand_as(scores),
        )  # fmt: skip

    def _capture(self) -> tuple[dict, dict]:
        def from_start(run):
            def warm_up_or_capture() -> torch.Tensor:
                # Warm-up runs from position 0 so that a whole-chunk step starts at a chunk boundary.
                if not torch.cuda.is_current_stream_capturing():
                    self.counter.set(0)
                return run()

            return warm_up_or_capture

        captured = capture_graphs(
            {name: from_start(run) for name, run in self.variants.items()}, self.generator
        )
        self.reload()
        return captured

    def _replay(self, name: str) -> None:
        if self.graphs is None:
            self.outputs[name] = self.variants[name]()
        else:
            self.graphs[name].replay()
        self.last = name

    def rebind(self, state: State) -> None:
        """Work on ``state`` from now on (same model and settings), starting from its memory."""
        self.state = state
        self.reload()

    def reload(self) -> None:
        """Discard the decoder's memory and take the State's again (after the State was restored)."""
        for layer, memory in zip(self.layers, self.state.layers, strict=True):
            layer.load(memory)
        self.window_ids.copy_(self.state.layers[0].win_ids)
        self.tokens_seen = self.state.tokens_seen
        self.counter.set(self.tokens_seen)
        self.penalized.zero_()
        self.in_reply.zero_()
        self.evictions = 0

    def step(self, token: torch.Tensor | int) -> torch.Tensor:
        """Feed one token per sequence ((B,) tensor or int); returns the next token, (B,) int64."""
        if token is not self.token:
            self.token.copy_(torch.as_tensor(token, device=self.token.device).expand(self.batch))
        evicting = (self.tokens_seen + 1) % self.chunk == 0
        self._replay("token_evict" if evicting else "token")
        self.tokens_seen += 1
        self.evictions += evicting
        return self.token

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed (B, N) tokens: single steps up to a chunk boundary, then whole blocks and chunks, then
        single steps. Returns the token sampled after the last one, (B,) int64. A prefill starts a new
        reply: the tokens ``step`` is fed after it count for the repetition penalty, the prefilled ones
        do not."""
        self.penalized.zero_()
        self.in_reply.zero_()
        start = 0
        while start < tokens.shape[1]:
            left = tokens.shape[1] - start
            if self.tokens_seen % self.chunk == 0:
                fits = [(name, buffer) for name, buffer in self.prefill_variants if buffer.shape[1] <= left]
            else:
                fits = []
            if fits:
                name, buffer = fits[0]
                length = buffer.shape[1]
                buffer.copy_(tokens[:, start : start + length])
                self._replay(name)
                self.tokens_seen += length
                self.evictions += length // self.chunk
                start += length
            else:
                self.step(tokens[:, start])
                start += 1
        self.in_reply.fill_(True)
        return self.token

    @property
    def logits(self) -> torch.Tensor:
        """The logits (B, vocab) fp32 of the last token fed, a static buffer of the last graph replayed."""
        return self.outputs[self.last]

    def sync(self) -> State:
        """Write the decoder's memory back into its State and return the State."""
        for layer, memory in zip(self.layers, self.state.layers, strict=True):
            tensors = {name: getattr(layer, name) for name in STATIC_NAMES}
            tensors["win_ids"] = self.window_ids
            memory.load(tensors, self.tokens_seen)
            memory.evictions += self.evictions
        self.evictions = 0
        return self.state
