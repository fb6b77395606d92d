"""Shared fixtures: a tiny random Llama model with a tiny byte-level ChatML tokenizer (no downloads),
and a private LOLA_CHAT_HOME per test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lola_chat.memory import LolaSettings
from lola_chat.model import ModelConfig, Transformer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class TinyLoaded:
    """Stands in for weights.LoadedModel."""

    model: Transformer
    tokenizer: Any
    model_dir: Path
    model_fingerprint: str = "tiny0001"
    linearization: str = "untrained"
    linearization_fingerprint: str = "untrained"
    lola: LolaSettings = LolaSettings(chunk=8, capacity=12)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["hello world, what is my name? Paris is the capital."] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        additional_special_tokens=SPECIALS,
    )


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate=64
    )
    return Transformer(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_loaded(tokenizer, tmp_path):
    return TinyLoaded(model=tiny_model(len(tokenizer)), tokenizer=tokenizer, model_dir=tmp_path / "tiny")


@pytest.fixture
def lola_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LOLA_CHAT_HOME", str(home))
    return home
