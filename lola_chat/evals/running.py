"""Running a batch of equal-length sequences through a model and its memory: segmented prefill, greedy
decoding, and how many sequences fit in one batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lola_chat.evals.arms import Arm

# Prefill segment lengths. The softmax memory attends each segment to the whole cache with an explicit
# mask (the math kernel: fp32 scores of segment x length per head), so its segments are shorter.
SOFTMAX_SEGMENT = 512
LOLA_SEGMENT = 2048
CPU_BUDGET_BYTES = 2 * 2**30


def segment_length(arm: Arm) -> int:
    return SOFTMAX_SEGMENT if arm.attention == "softmax" else LOLA_SEGMENT


def memory_budget(device: torch.device) -> int:
    """Bytes one batch may use: half of what the GPU has free now, or a fixed amount on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return CPU_BUDGET_BYTES


def bytes_per_sequence(cfg, arm: Arm, length: int, chunk: int, element: int, full_logits: bool) -> int:
    """A generous estimate of the device memory one sequence needs at ``length`` tokens."""
    segment = min(segment_length(arm), length)
    activations = segment * (8 * cfg.dim + 3 * cfg.intermediate) * element
    logits = segment * cfg.vocab_size * 4 * 3 if full_logits else cfg.vocab_size * 4 * 3
    if arm.attention == "softmax":
        cache = 2 * cfg.n_layers * cfg.n_kv_heads * length * cfg.head_dim * element
        scratch = 4 * cfg.n_heads * segment * length * 4
    else:
        keys = arm.capacity + 2 * chunk
        cache = cfg.n_layers * cfg.n_heads * (2 * keys * cfg.head_dim * element + 3 * cfg.head_dim**2 * 4)
        scratch = 8 * cfg.n_heads * chunk * (keys + 2 * cfg.head_dim) * 4
    return activations + logits + cache + scratch


def batches(count: int, per_batch: int) -> Iterator[slice]:
    per_batch = max(1, min(count, per_batch))
    for start in range(0, count, per_batch):
        yield slice(start, min(count, start + per_batch))


def _positions(tokens: torch.Tensor, first: int) -> torch.Tensor:
    return torch.arange(first, first + tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)


def prefill(model, state, tokens: torch.Tensor, segment: int, positions: bool = False) -> torch.Tensor:
    """Feed ``tokens`` (B, T) in segments; returns the last position's logits (B, vocab). With
    ``positions`` a LoLA memory records each token's position in the sequence instead of its id, so
    that what it holds can be located (``memory_holds``)."""
    logits = None
    for start in range(0, tokens.shape[1], segment):
        piece = tokens[:, start : start + segment]
        logits = model(piece, state, last_only=True, ids=_positions(piece, start) if positions else None)
    return logits[:, -1]


def greedy(
    model, state, tokens: torch.Tensor, new_tokens: int, segment: int, after_prompt=None
) -> torch.Tensor:
    """Prefill ``tokens`` then decode ``new_tokens`` greedily, one token at a time. Returns (B, new).
    ``after_prompt``, when given, is called with the state once the prompt is in; the memory then
    records positions (see ``prefill``)."""
    positions = after_prompt is not None
    logits = prefill(model, state, tokens, segment, positions)
    if positions:
        after_prompt(state)
    out = []
    for step in range(new_tokens):
        token = logits.argmax(dim=-1)
        out.append(token)
        if step + 1 < new_tokens:
            ids = _positions(token[:, None], tokens.shape[1] + step) if positions else None
            logits = model(token[:, None], state, last_only=True, ids=ids)[:, -1]
    return torch.stack(out, dim=1)


def memory_holds(state, first: torch.Tensor, count: torch.Tensor) -> list[float] | None:
    """For each sequence b, the share of positions first[b] .. first[b] + count[b] - 1 that a LoLA memory
    holds exactly (in its sparse cache or its window), averaged over layers and query heads; the
    memory must have recorded positions (``prefill``). None for the softmax KV cache, which holds
    everything."""
    if state.kind != "lola":
        return None
    span = first[:, None] + torch.arange(int(count.max()), device=first.device)
    in_span = torch.arange(span.shape[1], device=first.device) < count[:, None]
    shares = []
    for memory in state.layers:
        window = memory.win_ids[:, None].expand(-1, memory.cache_ids.shape[1], -1)
        held = torch.cat([memory.cache_ids, window], dim=2)
        found = (held[:, :, None, :] == span[:, None, :, None]).any(dim=-1) & in_span[:, None]
        shares.append(found.sum(dim=-1) / count[:, None])
    return torch.stack(shares).mean(dim=(0, 2)).tolist()


def token_nll(model, state, tokens: torch.Tensor, segment: int) -> torch.Tensor:
    """Negative log-likelihood of tokens[:, 1:] given everything before them: (B, T - 1), fp32."""
    nll = []
    previous = None
    for start in range(0, tokens.shape[1], segment):
        piece = tokens[:, start : start + segment]
        logp = torch.log_softmax(model(piece, state), dim=-1)
        if previous is not None:
            nll.append(-previous.gather(-1, piece[:, :1, None])[..., 0])
        nll.append(-logp[:, :-1].gather(-1, piece[:, 1:, None])[..., 0])
        previous = logp[:, -1:]
    return torch.cat(nll, dim=1)
