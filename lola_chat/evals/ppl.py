"""Perplexity on held-out book text (the last part of each book, never trained on), in consecutive
windows of a fixed context length, each window read from an empty memory."""

from __future__ import annotations

import math
import sys
import time

import torch

from lola_chat.evals import running
from lola_chat.evals.arms import Arm, Models
from lola_chat.linearize.data import Book, encode


def heldout_windows(tokenizer, books: list[Book], context: int, limit: int | None) -> torch.Tensor:
    """Non-overlapping windows of ``context`` tokens from each book's held-out part, (N, context)."""
    windows = []
    for book in books:
        ids = encode(tokenizer, book.heldout)
        windows += [ids[start : start + context] for start in range(0, len(ids) - context + 1, context)]
    if limit is not None:
        windows = windows[:limit]
    return torch.tensor(windows, dtype=torch.long).view(len(windows), context)


def run_arm(models: Models, arm: Arm, windows: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (N, context - 1) of one configuration."""
    loaded = models.for_arm(arm)
    model = loaded.model
    element = model.embed_tokens.weight.element_size()
    per_batch = running.memory_budget(models.device) // running.bytes_per_sequence(
        model.cfg, arm, windows.shape[1], models.chunk, element, full_logits=True
    )
    torch.manual_seed(0)
    nll = []
    for part in running.batches(windows.shape[0], per_batch):
        tokens = windows[part].to(models.device)
        state = model.new_state(arm.attention, arm.settings(models.chunk), batch=tokens.shape[0])
        with torch.inference_mode():
            nll.append(running.token_nll(model, state, tokens, running.segment_length(arm)).cpu())
    return torch.cat(nll)


def evaluate(
    models: Models, arms: list[Arm], contexts: list[int], books: list[Book], limit: int | None
) -> list[dict]:
    """One row per (configuration, context): perplexity over all predicted tokens, and over the second
    half of each window alone (tokens that have at least half a window of context)."""
    tokenizer = models.loaded("lola").tokenizer
    rows = []
    for context in contexts:
        windows = heldout_windows(tokenizer, books, context, limit)
        if windows.shape[0] == 0:
            print(f"ppl {context}: the held-out text is shorter than one window; skipped", file=sys.stderr)
            continue
        for arm in arms:
            started = time.perf_counter()
            nll = run_arm(models, arm, windows)
            half = nll[:, context // 2 :]
            row = {
                "config": arm.name,
                "context": context,
                "windows": windows.shape[0],
                "tokens": nll.numel(),
                "nll": nll.mean().item(),
                "perplexity": math.exp(nll.mean().item()),
                "perplexity_second_half": math.exp(half.mean().item()),
                "seconds": round(time.perf_counter() - started, 2),
            }
            rows.append(row)
            print(
                f"ppl {context:>6} {arm.name:<10} {row['perplexity']:.3f}  ({row['seconds']:.1f} s)",
                file=sys.stderr,
            )
    return rows
