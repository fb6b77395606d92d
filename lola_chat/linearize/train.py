"""The linearization run: data, the two training stages, checkpoints, the metrics log, the output.

Precision: on CUDA the frozen base model runs in bf16, as at inference; every trainable tensor
(feature maps, window logits, LoRA factors) is fp32 and the LoLA reference keeps its own fp32
accumulation. There is no autocast: it would turn the reference's fp32 matmuls into bf16 ones, so
training would no longer compute the formula inference computes."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from lola_chat.errors import LolaError
from lola_chat.linearization import save_linearization
from lola_chat.linearize import data, lora
from lola_chat.linearize.distill import distill_loss
from lola_chat.linearize.teacher import self_generated_conversations
from lola_chat.linearize.transfer import transfer_loss, transfer_parameters
from lola_chat.memory import LolaSettings


@dataclass(frozen=True)
class TrainSettings:
    steps_transfer: int = 300
    steps_lora: int = 80
    seq_len: int = 1024
    batch: int = 16
    seed: int = 0
    chunk: int = 64
    # Sparse cache and normalizer the student trains with (G = 0: the LoLCATs recipe, cache off).
    train_capacity: int = 0
    normalizer: str = "shared"
    lr_transfer: float = 1e-2
    lr_lora: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    ce_weight: float = 1.0
    warmup_fraction: float = 0.05
    checkpoint_every: int = 100
    generated_conversations: int = 64
    generated_tokens: int = 256
    mixture: dict[str, float] = field(
        default_factory=lambda: {"instructions": 0.5, "books": 0.3, "self_generated": 0.2}
    )


class MetricsLog:
    """One JSON object per line; the file is started afresh for each run."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _schedule(steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _save_checkpoint(model, directory: Path, stage: str, step: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad
    }
    save_file(
        tensors,
        str(directory / f"{stage}-{step:06d}.safetensors"),
        metadata={"stage": stage, "step": str(step)},
    )


def optimize(
    model,
    stage: str,
    params: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    loss_fn: Callable[[], tuple[torch.Tensor, dict]],
    settings: TrainSettings,
    log: MetricsLog,
    checkpoints: Path,
) -> dict:
    """AdamW on ``params`` for ``steps`` steps of ``loss_fn``. Returns the stage's summary."""
    if steps <= 0:
        return {"steps": 0}
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps, settings.warmup_fraction))
    times, first_loss, record = [], None, {}
    bar = tqdm(range(1, steps + 1), desc=stage, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        started = time.perf_counter()
        loss, extras = loss_fn()
        value = loss.item()
        if not math.isfinite(value):
            raise LolaError(
                f"{stage}: the loss became {value} at step {step}; try another --seed or fewer steps"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - started
        times.append(seconds)
        first_loss = value if first_loss is None else first_loss
        record = {
            "stage": stage,
            "step": step,
            "loss": value,
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(seconds, 4),
            **extras,
        }
        log.write(record)
        bar.set_postfix(loss=f"{value:.4g}", step_s=f"{seconds:.2f}")
        if step % settings.checkpoint_every == 0 or step == steps:
            _save_checkpoint(model, checkpoints, stage, step)
    bar.close()
    median = statistics.median(times)
    print(f"{stage}: {steps} steps, median {median:.3f} s/step, {sum(times):.1f} s", file=sys.stderr)
    return {
        "steps": steps,
        "first_loss": first_loss,
        "final_loss": record["loss"],
        "median_step_seconds": round(median, 4),
        "seconds": round(sum(times), 1),
    }


def prepare_data(loaded, settings: TrainSettings, data_dir: Path) -> tuple[data.TokenMixture, dict]:
    """The training mixture (book training parts, chat-formatted instructions, conversations the
    teacher writes now) and a description of it for the card."""
    started = time.perf_counter()
    tokenizer = loaded.tokenizer
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    books = data.read_books(data_dir)
    book_stream = [t for book in books for t in data.encode(tokenizer, book.train) + eos]
    pairs = data.read_instructions(data_dir)
    needed = (settings.steps_transfer + settings.steps_lora) * settings.batch * settings.seq_len
    instructions = data.instruction_stream(tokenizer, pairs, max(needed, settings.seq_len), settings.seed)
    generation_started = time.perf_counter()
    generated, conversations = self_generated_conversations(
        loaded.model,
        tokenizer,
        [prompt for prompt, _ in pairs],
        settings.generated_conversations,
        settings.generated_tokens,
        settings.seed,
    )
    generation_seconds = time.perf_counter() - generation_started
    streams = {"instructions": instructions, "books": book_stream, "self_generated": generated}
    mixture = data.TokenMixture(streams, settings.mixture, settings.seq_len, settings.seed)
    description = {
        "data_dir": str(data_dir),
        "books": [book.name for book in books],
        "heldout_fraction": data.HELDOUT_FRACTION,
        "instruction_examples": len(pairs),
        "tokens": {name: len(ids) for name, ids in streams.items()},
        "mixture": settings.mixture,
        "self_generated_conversations": conversations,
        "self_generated_max_new_tokens": settings.generated_tokens,
        "self_generated_seconds": round(generation_seconds, 1),
    }
    sizes = ", ".join(f"{name} {count:,}" for name, count in description["tokens"].items())
    print(
        f"data: {sizes} tokens; {conversations} self-generated conversations in {generation_seconds:.1f} s; "
        f"ready in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return mixture, description


def linearize(
    loaded, settings: TrainSettings, data_dir: Path, out_dir: Path, inference: LolaSettings, provenance: dict
) -> dict:
    """Train a linearization of ``loaded.model`` (loaded with untrained feature maps) and write it to
    ``out_dir`` with ``inference`` as its LoLA settings. Returns the training record that config.json
    and the card carry (``provenance``: command, device, commit, versions)."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = loaded.model
    model.requires_grad_(False)
    device = model.embed_tokens.weight.device
    mixture, description = prepare_data(loaded, settings, data_dir)
    log = MetricsLog(out_dir / "metrics.jsonl")
    checkpoints = out_dir / "checkpoints"
    try:

        def transfer_step():
            tokens = mixture.batch(settings.batch).to(device)
            loss, per_layer = transfer_loss(
                model, tokens, settings.chunk, settings.train_capacity, settings.normalizer
            )
            return loss, {"layer_mse": [round(x, 6) for x in per_layer.tolist()]}

        transfer = optimize(
            model,
            "transfer",
            transfer_parameters(model),
            settings.steps_transfer,
            settings.lr_transfer,
            transfer_step,
            settings,
            log,
            checkpoints,
        )
        adapters = lora.attach(model, settings.lora_rank, settings.lora_alpha) if settings.steps_lora else []

        def distill_step():
            tokens = mixture.batch(settings.batch).to(device)
            return distill_loss(
                model,
                tokens,
                settings.chunk,
                settings.ce_weight,
                settings.train_capacity,
                settings.normalizer,
            )

        distill = optimize(
            model,
            "lora",
            adapters + transfer_parameters(model),
            settings.steps_lora,
            settings.lr_lora,
            distill_step,
            settings,
            log,
            checkpoints,
        )
    finally:
        log.close()
    factors = lora.detach(model) if settings.steps_lora else None
    model.requires_grad_(False)
    record = {
        **provenance,
        "settings": {k: v for k, v in asdict(settings).items() if k != "mixture"},
        "data": description,
        "stages": {"transfer": transfer, "lora": distill},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    save_linearization(
        model,
        out_dir,
        factors,
        settings.lora_alpha,
        settings.lora_rank,
        inference,
        {"base_model": loaded.model_fingerprint, "training": record},
    )
    return record
