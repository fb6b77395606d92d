"""Choosing a reply's next token from the model's logits: greedy or nucleus sampling, with a repetition
penalty and a rule against repeating an n-gram (``sample``, on the host), and the same without the
n-gram rule as device work a CUDA graph can capture (``sample_on_device``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lola_chat.config import GenerationSettings
from lola_chat.kernels.argmax import argmax as device_argmax


def repeated_ngram_followers(tokens: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``tokens`` (a loop breaker for greedy decoding)."""
    if n <= 1 or len(tokens) < n:
        return []
    prefix = tokens[len(tokens) - n + 1 :]
    last = prefix[-1]
    # Runs once per generated token over the whole reply: a cheap test of one token first, so that only
    # the few candidates that pass it make a slice to compare.
    return [
        tokens[i + n - 1]
        for i in range(len(tokens) - n + 1)
        if tokens[i + n - 2] == last and tokens[i : i + n - 1] == prefix
    ]


def sample(
    logits: torch.Tensor,
    settings: GenerationSettings,
    generator: torch.Generator | None,
    recent: list[int],
    argmax: Callable[[], int | None] | None = None,
) -> int:
    """logits: (vocab,). Tokens already in this reply (``recent``) are penalised (CTRL-style); then greedy
    at temperature 0, else nucleus sampling. ``argmax``: gives the logits' argmax where the caller has it
    already (the captured decoder computes it in its graph), or None; greedy decoding without a penalty
    takes it unless the n-gram rule bans it, sparing a reduction and its launch per token. It is called
    only then, as reading it from a device waits for the device."""
    banned = repeated_ngram_followers(recent, settings.no_repeat_ngram)
    if argmax is not None and settings.temperature <= 0 and settings.repetition_penalty == 1.0:
        token = argmax()
        if token is not None and token not in banned:
            return token
    if recent and settings.repetition_penalty != 1.0:
        ids = torch.tensor(sorted(set(recent)), device=logits.device)
        picked = logits[ids]
        penalty = settings.repetition_penalty
        logits = logits.index_put((ids,), torch.where(picked > 0, picked / penalty, picked * penalty))
    if banned:
        logits = logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
    if settings.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > settings.top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(order[choice])


def sample_on_device(
    logits: torch.Tensor,
    settings: GenerationSettings,
    generator: torch.Generator | None,
    penalized: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, vocab) -> token ids (B,), on the device with no host synchronisation, written into
    ``out`` ((B,) int64) when given. Tokens marked in ``penalized`` (B, vocab) bool get the engine's
    repetition penalty; then greedy at temperature 0 (one kernel on a GPU, ``kernels.argmax``), else
    nucleus sampling by the exponential race (argmax of p / Exp(1) noise)."""
    if penalized is not None and settings.repetition_penalty != 1.0:
        penalty = settings.repetition_penalty
        logits = torch.where(penalized, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if settings.temperature <= 0:
        return device_argmax(logits, out=out)
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > settings.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return device_argmax(probs / noise, out=out)
