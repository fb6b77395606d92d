"""`lola-chat linearize`: turn a softmax Llama-family model into a LoLA one (GPU training; a --tiny
run works on a CPU)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lola_chat.config import Config, default_dtype, resolve_device, with_lola_flags
from lola_chat.errors import UsageError
from lola_chat.evals.provenance import run_info
from lola_chat.linearization import linearizations_root
from lola_chat.linearize import card
from lola_chat.linearize.data import resolve_data_dir
from lola_chat.linearize.tiny import write_tiny_checkpoint
from lola_chat.linearize.train import TrainSettings, linearize
from lola_chat.weights import load_model

DEFAULTS = TrainSettings()
MINIMUMS = {
    "steps_transfer": 0,
    "steps_lora": 0,
    "seq_len": 1,
    "batch": 1,
    "lora_rank": 1,
    "self_generated": 0,
    "reply_tokens": 1,
    "train_capacity": 0,
}


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "linearize",
        parents=[common],
        help="train a linearization (feature maps, window factors, LoRA) of a softmax model",
        description="Stage 1 attention transfer, then stage 2 LoRA distillation; writes a linearization "
        "folder with its card. --seed (default 0) seeds everything.",
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: models/<name>)")
    parser.add_argument("--data", type=Path, metavar="DIR", help="training data (default: ../shared/data)")
    parser.add_argument("--steps-transfer", type=int, default=DEFAULTS.steps_transfer, metavar="N")
    parser.add_argument("--steps-lora", type=int, default=DEFAULTS.steps_lora, metavar="M")
    parser.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, metavar="L")
    parser.add_argument("--batch", type=int, default=DEFAULTS.batch, metavar="B")
    parser.add_argument(
        "--ce-weight",
        type=float,
        default=DEFAULTS.ce_weight,
        metavar="W",
        help="LoRA stage loss: KL to the teacher + W x next-token cross entropy",
    )
    parser.add_argument("--lora-rank", type=int, default=DEFAULTS.lora_rank, metavar="R")
    parser.add_argument(
        "--self-generated",
        type=int,
        default=DEFAULTS.generated_conversations,
        metavar="N",
        help="conversations the teacher writes for the training mix",
    )
    parser.add_argument(
        "--reply-tokens",
        type=int,
        default=DEFAULTS.generated_tokens,
        metavar="N",
        help="longest reply the teacher writes for a self-generated conversation",
    )
    parser.add_argument(
        "--train-capacity",
        type=int,
        default=DEFAULTS.train_capacity,
        metavar="G",
        help="train with a sparse cache of G pairs (default 0: the LoLCATs recipe; --normalizer applies "
        "to training and is saved for inference)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every, metavar="N")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny random model: checks the code path on a CPU"
    )
    parser.set_defaults(func=run)


def settings_from(args) -> TrainSettings:
    for name, least in MINIMUMS.items():
        if getattr(args, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}")
    chunk = args.chunk or DEFAULTS.chunk
    if args.seq_len % chunk:
        raise UsageError(f"--seq-len must be a multiple of the chunk size {chunk}")
    return dataclasses.replace(
        DEFAULTS,
        steps_transfer=args.steps_transfer,
        steps_lora=args.steps_lora,
        seq_len=args.seq_len,
        batch=args.batch,
        seed=0 if args.seed is None else args.seed,
        chunk=chunk,
        train_capacity=args.train_capacity,
        normalizer=args.normalizer or DEFAULTS.normalizer,
        lora_rank=args.lora_rank,
        ce_weight=args.ce_weight,
        lora_alpha=2.0 * args.lora_rank,
        generated_conversations=args.self_generated,
        generated_tokens=args.reply_tokens,
        checkpoint_every=max(1, args.checkpoint_every),
    )


def output_dir(args, config: Config) -> Path:
    if args.out:
        return args.out
    if args.tiny:
        return config.paths.cache / "tiny-linearization"
    if config.model_dir is not None:
        raise UsageError("--out is needed when linearizing a model other than the default")
    return linearizations_root() / (config.linearization or "smollm2-135m-instruct")


def run(args, config: Config) -> int:
    settings = settings_from(args)
    data_dir = resolve_data_dir(args.data)
    out_dir = output_dir(args, config)
    if args.tiny:
        config = dataclasses.replace(
            config, model_dir=write_tiny_checkpoint(config.paths.cache / "tiny-model")
        )
    device = resolve_device(config.device)
    loaded = load_model(
        dataclasses.replace(config, attention="lola", linearization=None), device, default_dtype(device)
    )
    # What the chat will run with it: the LoLA flags given (policy, capacity, cap, pooling), trained with
    # the chunk and normalizer it was trained with.
    inference = dataclasses.replace(
        with_lola_flags(config.lola, args), chunk=settings.chunk, normalizer=settings.normalizer
    )
    record = linearize(loaded, settings, data_dir, out_dir, inference, run_info(device))
    card.write_card(out_dir)
    print(f"wrote {out_dir} in {record['wall_seconds']:.0f} s")
    return 0
