"""Needle in a haystack, RULER style: one 7-digit "special magic number" hidden at a chosen depth in
a noise or prose haystack, asked for at the end in the chat template, answered by greedy decoding and
scored by exact match. Every prompt of one length has exactly that many tokens, so all of them run
as one batch."""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lola_chat.errors import UsageError
from lola_chat.evals import running
from lola_chat.evals.arms import Arm, Models
from lola_chat.linearize.data import Book, chat_text, encode

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
NEW_TOKENS = 12
PLACEHOLDER = "\u2063CONTEXT\u2063"
ADJECTIVES = (
    "quiet",
    "bright",
    "hollow",
    "amber",
    "swift",
    "silent",
    "crimson",
    "gentle",
    "brave",
    "frozen",
    "golden",
    "lucky",
    "rusty",
    "velvet",
    "wild",
    "ancient",
    "curious",
    "distant",
    "hidden",
    "jolly",
)
NOUNS = (
    "harbor",
    "lantern",
    "meadow",
    "falcon",
    "canyon",
    "orchard",
    "glacier",
    "compass",
    "violin",
    "island",
    "thimble",
    "beacon",
    "willow",
    "comet",
    "quarry",
    "saddle",
    "pebble",
    "tunnel",
    "garden",
    "anchor",
)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class Haystack:
    """Filler text as a cycle of sentences, each tokenized with its leading space."""

    def __init__(self, name: str, tokenizer, sentences: list[str]):
        self.name = name
        texts = [" " + s.strip() for s in sentences if s.strip()]
        self.sentences = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def take(self, start: int, count: int) -> list[list[int]]:
        """Sentences from index ``start`` on (wrapping around) holding exactly ``count`` tokens; the last
        one is cut short where needed."""
        taken, total, index = [], 0, start
        while total < count:
            ids = self.sentences[index % len(self.sentences)][: count - total]
            taken.append(ids)
            total += len(ids)
            index += 1
        return taken


def noise_haystack(tokenizer) -> Haystack:
    return Haystack("noise", tokenizer, SENTENCE_END.split(NOISE))


def prose_haystack(tokenizer, books: list[Book]) -> Haystack:
    """Held-out book text only (the part linearization never trained on)."""
    text = " ".join(" ".join(book.heldout.split()) for book in books)
    return Haystack("prose", tokenizer, SENTENCE_END.split(text))


@dataclass(frozen=True)
class NeedlePrompt:
    ids: list[int]
    key: str
    value: str
    depth: float
    needle_start: int
    needle_tokens: int
    haystack_start: int
    haystack_tokens: int


def template_parts(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after the user's message (with the reply header)."""
    head, tail = chat_text(tokenizer, PLACEHOLDER).split(PLACEHOLDER)
    return head, tail


def build_prompt(
    tokenizer, haystack: Haystack, length: int, depth: float, key: str, value: str, start_sentence: int = 0
) -> NeedlePrompt:
    """A prompt of exactly ``length`` tokens with the needle at the sentence boundary nearest to
    ``depth`` (0 = first, 1 = last) of the haystack."""
    head_text, tail_text = template_parts(tokenizer)
    head = encode(tokenizer, head_text + INSTRUCTION)
    needle = encode(tokenizer, NEEDLE.format(key=key, value=value))
    tail = encode(tokenizer, QUESTION.format(key=key) + tail_text + ANSWER_PREFIX.format(key=key))
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 1:
        raise UsageError(
            f"length {length} is too short for a needle prompt ({length - budget + 1} tokens at least)"
        )
    sentences = haystack.take(start_sentence, budget)
    boundaries = [0]
    for ids in sentences:
        boundaries.append(boundaries[-1] + len(ids))
    cut = min(range(len(boundaries)), key=lambda i: abs(boundaries[i] - depth * budget))
    filler = [token for ids in sentences for token in ids]
    split = boundaries[cut]
    ids = head + filler[:split] + needle + filler[split:] + tail
    assert len(ids) == length
    return NeedlePrompt(ids, key, value, depth, len(head) + split, len(needle), len(head), budget)


def prompt_set(tokenizer, haystack: Haystack, length: int, count: int, seed: int) -> list[NeedlePrompt]:
    """``count`` prompts with depths evenly from 0% to 100%, keys, values and prose offsets drawn from a
    generator seeded by (seed, haystack, length): every configuration sees the same prompts."""
    rng = random.Random(f"{seed}-{haystack.name}-{length}")
    prompts = []
    for i in range(count):
        depth = i / (count - 1) if count > 1 else 0.5
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        value = str(rng.randint(1_000_000, 9_999_999))
        start = rng.randrange(len(haystack.sentences))
        prompts.append(build_prompt(tokenizer, haystack, length, depth, key, value, start))
    return prompts


def is_correct(tokenizer, reply_ids: list[int], value: str) -> bool:
    """The value appears as a whole number in the reply (up to its end-of-turn token)."""
    stop = {tokenizer.eos_token_id, *encode(tokenizer, "<|im_end|>")}
    cut = next((i for i, token in enumerate(reply_ids) if token in stop), len(reply_ids))
    reply = tokenizer.decode(reply_ids[:cut], skip_special_tokens=True)
    return re.search(rf"(?<!\d){value}(?!\d)", reply) is not None


def run_arm(
    models: Models, arm: Arm, prompts: list[NeedlePrompt], seed: int
) -> tuple[list[bool], int, list[float] | None]:
    """Answers of one configuration to equal-length prompts. Returns (correct per prompt, state bytes
    per sequence measured on the state after the prompt, the share of each needle's tokens a LoLA
    memory holds exactly once the prompt is in, or None for the softmax cache)."""
    loaded = models.for_arm(arm)
    model, tokenizer, device = loaded.model, loaded.tokenizer, models.device
    length = len(prompts[0].ids)
    element = model.embed_tokens.weight.element_size()
    per_batch = running.memory_budget(device) // running.bytes_per_sequence(
        model.cfg, arm, length, models.chunk, element, full_logits=False
    )
    torch.manual_seed(seed)
    correct, state_bytes, held = [], 0, []
    for part in running.batches(len(prompts), per_batch):
        batch = prompts[part]
        tokens = torch.tensor([p.ids for p in batch], dtype=torch.long, device=device)
        first = torch.tensor([p.needle_start for p in batch], device=device)
        count = torch.tensor([p.needle_tokens for p in batch], device=device)
        state = model.new_state(arm.attention, arm.settings(models.chunk), batch=len(batch))
        if arm.oracle:
            # The memory records positions (``running.greedy`` with ``after_prompt``): the needle's.
            for memory in state.layers:
                memory.pin_ids(first, count)

        def measure_needle(state, first=first, count=count):
            held.append(running.memory_holds(state, first, count))

        with torch.inference_mode():
            replies = running.greedy(
                model, state, tokens, NEW_TOKENS, running.segment_length(arm), measure_needle
            ).tolist()
        state_bytes = state.nbytes() // len(batch)
        correct += [is_correct(tokenizer, reply, p.value) for reply, p in zip(replies, batch, strict=True)]
        del state
    return correct, state_bytes, None if None in held else [share for shares in held for share in shares]


def _rows(
    arm: Arm, haystacks: list[Haystack], length: int, count: int, outcome, error: str | None
) -> list[dict]:
    correct, state_bytes, held, seconds = outcome
    rows = []
    for index, haystack in enumerate(haystacks):
        row = {
            "config": arm.name,
            "haystack": haystack.name,
            "length": length,
            "prompts": count,
            "seconds": seconds,
            "state_bytes": state_bytes,
        }
        if error:
            row.update(correct=None, accuracy=None, error=error)
        else:
            answers = correct[index * count : (index + 1) * count]
            # In prompt order, so by needle depth (``prompt_set``: prompt i at depth i / (count - 1)).
            row.update(correct=sum(answers), accuracy=sum(answers) / count, correct_by_depth=answers)
            if held is not None:
                # The share of the needle's tokens the memory held exactly once the prompt (the question
                # and the answer's prefix included) was in.
                row.update(needle_held=sum(held[index * count : (index + 1) * count]) / count)
        rows.append(row)
    return rows


def evaluate(
    models: Models,
    arms: list[Arm],
    lengths: list[int],
    count: int,
    haystacks: list[Haystack],
    seed: int,
    softmax_max_length: int | None = None,
    on_length: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """One row per (configuration, haystack, length). The softmax arm is not run past
    ``softmax_max_length``, and is reported as out of memory where a single prompt does not fit.
    ``on_length`` gets the rows so far after every length, so a run cut short keeps what it measured."""
    tokenizer = models.loaded("lola").tokenizer
    rows = []
    for length in lengths:
        prompts = {h.name: prompt_set(tokenizer, h, length, count, seed) for h in haystacks}
        batch = [p for h in haystacks for p in prompts[h.name]]
        for arm in arms:
            started = time.perf_counter()
            outcome, error = (None, None, None), None
            if arm.attention == "softmax" and softmax_max_length and length > softmax_max_length:
                error = "not run"
            else:
                try:
                    outcome = run_arm(models, arm, batch, seed)
                except torch.OutOfMemoryError:
                    error = "out of memory"
                    torch.cuda.empty_cache()
            seconds = round(time.perf_counter() - started, 2)
            rows += _rows(arm, haystacks, length, count, (*outcome, seconds), error)
            summary = ", ".join(f"{r['haystack']} {r['correct']}/{count}" for r in rows[-len(haystacks) :])
            print(f"niah {length:>6} {arm.name:<10} {error or summary}  ({seconds:.1f} s)", file=sys.stderr)
        if on_length:
            on_length(rows)
    return rows
