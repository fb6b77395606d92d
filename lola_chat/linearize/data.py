"""The text that linearization trains on and evaluation measures on: instruction sets formatted with
the chat template, and books split once into a training part and a held-out part (the held-out part is
never trained on; the evals read only it)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lola_chat.errors import UsageError

HELDOUT_FRACTION = 0.1
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)


def default_data_dir() -> Path:
    """``../shared/data`` next to the repository this package runs from."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve_data_dir(path: str | Path | None) -> Path:
    directory = Path(path).expanduser() if path else default_data_dir()
    if not (directory / "books").is_dir() or not (directory / "instruct").is_dir():
        raise UsageError(f"no training data at {directory} (expected books/ and instruct/); pass --data DIR")
    return directory


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg file: between the START and END marker lines, newlines normalized."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = GUTENBERG_START.search(text)
    end = GUTENBERG_END.search(text)
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip()


def split_book(text: str, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(training part, held-out part): the held-out part is the last ``heldout_fraction`` of the
    characters, starting at a paragraph break so that no paragraph is in both."""
    target = int(len(text) * (1.0 - heldout_fraction))
    cut = text.find("\n\n", target)
    if cut < 0:
        cut = target
    return text[:cut].rstrip(), text[cut:].strip()


@dataclass(frozen=True)
class Book:
    name: str
    train: str
    heldout: str


def read_books(data_dir: Path) -> list[Book]:
    books = []
    for path in sorted((Path(data_dir) / "books").glob("*.txt")):
        train, heldout = split_book(strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")))
        books.append(Book(path.stem, train, heldout))
    if not books:
        raise UsageError(f"no books (*.txt) in {Path(data_dir) / 'books'}")
    return books


def read_instructions(data_dir: Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from every Alpaca-format file (``.json`` lists, ``.jsonl`` seed tasks)."""
    pairs = []
    for path in sorted((Path(data_dir) / "instruct").iterdir()):
        if path.suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            records = [
                {"instruction": seed["instruction"], **seed["instances"][0]}
                for seed in map(json.loads, path.read_text(encoding="utf-8").splitlines())
                if seed.get("instances")
            ]
        else:
            continue
        for record in records:
            prompt = record["instruction"].strip()
            if record.get("input", "").strip():
                prompt += "\n\n" + record["input"].strip()
            pairs.append((prompt, record["output"].strip()))
    if not pairs:
        raise UsageError(f"no instruction files (*.json, *.jsonl) in {Path(data_dir) / 'instruct'}")
    return pairs


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``; special-token strings in it (the chat template's) become special tokens."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def chat_text(tokenizer, prompt: str, answer: str | None = None) -> str:
    """One exchange in the model's chat template; without an answer it ends with the reply header."""
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


def instruction_stream(tokenizer, pairs: list[tuple[str, str]], max_tokens: int, seed: int) -> list[int]:
    """Chat-formatted instruction examples in a seeded random order, concatenated up to ``max_tokens``."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    batch_size = 256
    for start in range(0, len(order), batch_size):
        texts = [chat_text(tokenizer, *pairs[i]) for i in order[start : start + batch_size]]
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
        if len(stream) >= max_tokens:
            break
    return stream[:max_tokens]


class TokenMixture:
    """Seeded random windows of ``seq_len`` tokens, each drawn from one token stream chosen by weight.
    Streams are packed documents, so a window may cross from one document into the next, as a
    lifelong conversation does."""

    def __init__(self, streams: dict[str, list[int]], weights: dict[str, float], seq_len: int, seed: int):
        self.names = [name for name in streams if weights.get(name, 0) > 0 and streams[name]]
        if not self.names:
            raise UsageError("no training text: every data source is empty")
        self.streams = {name: self._at_least(streams[name], seq_len) for name in self.names}
        self.weights = [weights[name] for name in self.names]
        self.seq_len = seq_len
        self.rng = random.Random(seed)

    @staticmethod
    def _at_least(ids: list[int], length: int) -> torch.Tensor:
        repeats = -(-length // len(ids))
        return torch.tensor(ids * max(1, repeats), dtype=torch.long)

    def tokens(self) -> dict[str, int]:
        return {name: len(stream) for name, stream in self.streams.items()}

    def batch(self, size: int) -> torch.Tensor:
        rows = []
        for _ in range(size):
            stream = self.streams[self.rng.choices(self.names, self.weights)[0]]
            start = self.rng.randrange(len(stream) - self.seq_len + 1)
            rows.append(stream[start : start + self.seq_len])
        return torch.stack(rows)
