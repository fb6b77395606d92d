"""A tiny random Llama checkpoint with a small byte-level tokenizer and the ChatML template, built
offline in milliseconds, so that `--tiny` runs and the tests exercise the real linearize and eval
code paths on a CPU without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lola_chat.model import ModelConfig, Transformer

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Text the tokenizer's merges are learned from: a few phrases the evals and the data use often.
MERGE_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "One of the special magic numbers for the key is: 1234567. What is the special magic number? "
    "You are a helpful assistant. The user asked a question and the assistant answered it. "
    "It was the best of times, it was the worst of times, and the house stood by the river. "
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards. What is the special magic number for the key mentioned "
    "in the provided text? The special magic number mentioned in the provided text is 7654321. "
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (a few hundred tokens) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([MERGE_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_hf_config(vocab_size: int, n_layers: int = 2) -> dict:
    """A Hugging Face Llama config.json for a model small enough to train on a CPU in seconds."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def write_tiny_checkpoint(directory: Path, seed: int = 0, n_layers: int = 2) -> Path:
    """Write a random tiny Llama checkpoint (config.json, model.safetensors, tokenizer) to ``directory``
    in the Hugging Face layout that any base checkpoint directory has."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    hf_config = tiny_hf_config(len(tokenizer), n_layers)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hf_config))
    # Small embeddings (as trained models have) keep the tied output logits, and the perplexity, sane.
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.02)
    linearization_names = ("fmap_q", "fmap_k", "window_logit")
    tensors = {
        f"model.{name}": tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith("lm_head") and not name.endswith(linearization_names)
    }
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.save_pretrained(str(directory))
    return directory


def write_tiny_data(directory: Path, paragraphs: int = 120) -> Path:
    """A small dataset in the layout of ``../shared/data`` (books with Project Gutenberg header and footer
    lines, Alpaca-format instructions), for tests and --tiny runs on machines without the real data."""
    directory = Path(directory)
    (directory / "books").mkdir(parents=True, exist_ok=True)
    (directory / "instruct").mkdir(parents=True, exist_ok=True)
    for book, subject in (("river_tale", "river"), ("hill_story", "hill")):
        body = "\n\n".join(
            f"Paragraph {i} of the {subject} book. The {subject} was quiet on day {i}, and the keeper wrote "
            f"{i * 7 % 13} lines about it before the lamp went out."
            for i in range(paragraphs)
        )
        text = (
            f"The Project Gutenberg EBook of a {subject} book\r\n\r\n"
            f"*** START OF THIS PROJECT GUTENBERG EBOOK {subject.upper()} ***\r\n\r\n"
            f"{body.replace(chr(10), chr(13) + chr(10))}\r\n\r\n"
            f"*** END OF THIS PROJECT GUTENBERG EBOOK {subject.upper()} ***\r\n\r\nLicense text follows.\r\n"
        )
        (directory / "books" / f"{book}.txt").write_text(text, encoding="utf-8")
    examples = [
        {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a in range(6)
        for b in range(6)
    ]
    (directory / "instruct" / "sums.json").write_text(json.dumps(examples), encoding="utf-8")
    seeds = [
        {"instruction": "Name a colour.", "instances": [{"input": "", "output": "Blue."}]},
        {"instruction": "Reverse the word.", "instances": [{"input": "stone", "output": "enots"}]},
    ]
    (directory / "instruct" / "seeds.jsonl").write_text("\n".join(map(json.dumps, seeds)), encoding="utf-8")
    return directory
