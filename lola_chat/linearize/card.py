"""The card (README.md) of a linearization folder, generated from its config.json (how it was made, as
recorded by the training run) and from the evaluation results files that measured this exact
linearization (matched by fingerprint). Nothing in it is typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from lola_chat import linearization
from lola_chat.evals.provenance import RESULTS_DIR
from lola_chat.evals.report import read_results, results_markdown
from lola_chat.joint import describe_pooling


def fingerprint(directory: Path) -> str:
    """The fingerprint of the linearization in ``directory``, as loading it reports."""
    return linearization.fingerprint((Path(directory) / linearization.LINEARIZATION_FILE).read_bytes())


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _how_made(meta: dict) -> str:
    training = meta.get("training", {})
    settings = training.get("settings", {})
    data = training.get("data", {})
    stages = training.get("stages", {})
    transfer, lora = stages.get("transfer", {}), stages.get("lora", {})
    lola = meta.get("lola", {})
    get = lambda d, key: _number(d.get(key, "?"))
    tokens = ", ".join(f"{name} {count:,}" for name, count in data.get("tokens", {}).items())
    mixture = ", ".join(f"{name} {weight:g}" for name, weight in data.get("mixture", {}).items())
    books = ", ".join(data.get("books", []))
    heldout = 100 * data.get("heldout_fraction", 0)
    trained_capacity = settings.get("train_capacity", 0) if isinstance(settings, dict) else 0
    cache = (
        f"a sparse cache of G = {trained_capacity} ({settings.get('normalizer', 'shared')} normalizer)"
        if trained_capacity
        else "no sparse cache (G = 0)"
    )
    lines = [
        f"- Command: `{get(training, 'command')}`",
        f"- Device: {get(training, 'device')}; commit `{get(training, 'commit')}`; "
        f"{get(training, 'created')}; wall time {get(training, 'wall_seconds')} s (attention transfer "
        f"{get(transfer, 'seconds')} s, LoRA {get(lora, 'seconds')} s)",
        f"- Seed {get(settings, 'seed')}; sequences of {get(settings, 'seq_len')} tokens, batches of "
        f"{get(settings, 'batch')}; LoLA chunk {get(settings, 'chunk')}, {cache} in training",
        f"- Stage 1, attention transfer: {get(transfer, 'steps')} steps, AdamW lr "
        f"{get(settings, 'lr_transfer')}; each layer's LoLA attention output (before o_proj) fitted to its "
        "softmax output by MSE on the teacher's own hidden states; trainable: Hedgehog feature maps and "
        "window factors; MSE "
        f"{get(transfer, 'first_loss')} -> {get(transfer, 'final_loss')}",
        f"- Stage 2, LoRA: {get(lora, 'steps')} steps, AdamW lr {get(settings, 'lr_lora')}; rank "
        f"{get(settings, 'lora_rank')}, alpha {get(settings, 'lora_alpha')} on q, k, v, o, with the feature "
        f"maps and window factors still training; loss KL(teacher || student) + {get(settings, 'ce_weight')} "
        f"x next-token cross entropy; {get(lora, 'first_loss')} -> {get(lora, 'final_loss')}",
        f"- Data ({get(data, 'data_dir')}): books {books} (training part only; the last {heldout:.0f}% of "
        f"each book is held out for evaluation), {get(data, 'instruction_examples')} instruction examples in "
        f"the chat template, and {get(data, 'self_generated_conversations')} conversations the teacher wrote "
        f"during the run. Tokens available: {tokens}; sampling weights: {mixture}",
        f"- Inference settings shipped: chunk {get(lola, 'chunk')}, sparse cache G = "
        f"{get(lola, 'capacity')}, eviction by {get(lola, 'policy')}"
        + describe_pooling(lola.get("joint_power", 1), lola.get("joint_span", 0))
        + f", {lola.get('normalizer', 'shared')} normalizer"
        + (f", hidden state capped at {lola['linear_cap']} folded pairs" if lola.get("linear_cap") else ""),
    ]
    versions = training.get("versions", {})
    if versions:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def write_card(directory: Path, results_dir: Path | None = RESULTS_DIR) -> Path:
    """(Re)write ``directory``/README.md. The scores section lists the results in ``results_dir`` that
    were measured with this linearization; it says so when there are none yet."""
    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    mine = fingerprint(directory)
    results = {
        name: payload
        for name, payload in (
            read_results(results_dir) if results_dir and Path(results_dir).is_dir() else {}
        ).items()
        if payload.get("model", {}).get("linearization_fingerprint") == mine
    }
    scores = (
        results_markdown(results, heading="###")
        if results
        else "No evaluation results for this linearization yet: run `lola-chat eval all` and this section is "
        "regenerated from its results files."
    )
    lora = meta.get("lora", {})
    text = f"""# {directory.name}: a LoLA linearization

The linearized attention that lola-chat runs on base model `{meta.get("base_model", "?")}`: per layer and
query head a Hedgehog feature map for queries and for keys and a window factor, plus LoRA factors
(rank {lora.get("rank", "?")}, alpha {lora.get("alpha", "?")}, on {", ".join(lora.get("targets", []))})
that are merged into the base weights at load time. File fingerprint `{mine}`.

## How it was made

Generated from `config.json`, which the training run (`lola-chat linearize`) wrote.

{_how_made(meta)}

## Scores

{scores}
"""
    path = directory / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
