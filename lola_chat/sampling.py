"""Choosing a reply's next token from the model's logits: greedy or nucleus sampling, with a repetition
penalty and a rule against repeating an n-gram."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lola_chat.config import GenerationSettings


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
