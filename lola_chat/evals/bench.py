"""`lola-chat bench`: decode and prefill speed of LoLA against softmax attention, side by side in one process.

Arms: LoLA through the PyTorch reference, through the Triton kernels, and as a captured CUDA graph
(``lola_chat.graphs``); the unmodified model through Hugging Face ``generate`` and as a captured
static-cache decode. At each memory length the LoLA state is made by prefilling that many random
tokens (the prefill measurement); decoding is greedy, timed per token with CUDA events (wall clock on
the CPU), the arms interleaved within each repeat. Writes JSON, a Markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

from lola_chat.config import DEFAULT_LINEARIZATION, Config, default_dtype, resolve_device, with_lola_flags
from lola_chat.errors import UsageError
from lola_chat.evals.arms import parse_lengths
from lola_chat.evals.bench_arms import ARMS, BenchModel, LolaArm, make_arms
from lola_chat.evals.bench_report import table_row, write
from lola_chat.evals.profiling import step_profile
from lola_chat.evals.provenance import REPO_ROOT, run_info
from lola_chat.evals.weights_pass import gemv_sweep, weight_read_floor
from lola_chat.kernels import int4
from lola_chat.kernels.lola.reference import accumulator
from lola_chat.linearization import (
    linearization_lora,
    linearization_settings,
    merge_lora,
    resolve_linearization,
)
from lola_chat.memory import LolaSettings
from lola_chat.model import ModelConfig, Transformer

DEFAULT_LENGTHS = {"cuda": "1024,8192,32768,131072", "cpu": "256,1024,2048"}
# The default model's shapes, for speed runs with random weights (speed does not depend on values).
DEFAULT_SHAPES = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                             intermediate=1536, norm_eps=1e-5, rope_theta=100000.0)  # fmt: skip
TINY_SHAPES = ModelConfig(
    vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate=128
)


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "bench",
        parents=[common],
        help="decode and prefill speed of LoLA and softmax attention, side by side",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--lengths", help="tokens in memory (default 1K,8K,32K,128K on a GPU)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per repeat and arm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results", help="results folder")
    parser.add_argument("--name", help="file name stem (default bench-<device>)")
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--tiny", action="store_true", help="a tiny random model: checks the code on a CPU")
    shapes.add_argument(
        "--random-default-shapes", action="store_true", help="random weights of the default model's shapes"
    )
    parser.set_defaults(func=run)


def random_model(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, four_bit: bool = False
) -> Transformer:
    """Random weights of ``cfg``'s shapes. ``four_bit``: the projections drawn as the default model
    holds them (GGUF Q4_1, groups of 32 sharing a float16 scale and low, values of about the spread of
    the other weights' normal(0, 0.02)), a random LoRA of the shipped linearization's rank and scale
    merged into the attention's as a linearization's is, and the model returned packed
    (``pack_projections``) with those weights attached for decoding in four bits (``attach_int4``)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    recovered = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2:
                continue
            if four_bit and name.endswith("_proj.weight"):
                recovered[name] = _four_bit_form(*param.shape)
                param.copy_(int4.exact(*recovered[name]))
            else:
                param.normal_(0.0, 0.02)
    model = model.to(device=device, dtype=dtype).eval()
    # As weights.build_model: the linearization and the rotary frequencies stay in fp32 or wider.
    for block in model.layers:
        attn = block.self_attn
        for name in ("fmap_q", "fmap_k", "window_logit"):
            getattr(attn, name).data = getattr(attn, name).data.to(accumulator(dtype))
        attn.inv_freq = attn.inv_freq.to(accumulator(dtype))
    if four_bit:
        shipped = resolve_linearization(DEFAULT_LINEARIZATION)
        rank, scale = linearization_lora(shipped) if shipped is not None else (0, 0.0)
        attention = ("q_proj", "k_proj", "v_proj", "o_proj") if rank else ()
        for block in model.layers:
            for name in attention:
                linear = getattr(block.self_attn, name)
                a = torch.randn(rank, linear.in_features) * 0.02
                merge_lora(linear, a, torch.randn(linear.out_features, rank) * 0.02, scale)
        model.pack_projections().attach_int4(recovered)
    return model


def _four_bit_form(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (codes, scale, low) of an (n, k) weight, as ``int4.recover`` returns them."""
    groups = k // int4.GROUP
    scale = (0.0046 * (0.5 + torch.rand(n, groups))).half().float()
    low = (-7.5 * scale).half().float()
    codes = torch.randint(0, 16, (n, groups, int4.GROUP), dtype=torch.uint8)
    # Q4_1 gives each group's smallest value code 0 and its largest code 15.
    codes[..., 0], codes[..., 1] = 0, 15
    return codes.view(n, k), scale, low


def load(args, config: Config, device: torch.device, dtype: torch.dtype) -> BenchModel:
    if args.tiny:
        return BenchModel(
            random_model(TINY_SHAPES, device, dtype, four_bit=True),
            with_lola_flags(LolaSettings(chunk=16, capacity=24), args),
            "tiny random",
        )
    if args.random_default_shapes:
        # The settings the chat runs: the default linearization's, unless flags say otherwise.
        shipped = resolve_linearization(config.linearization)
        settings = linearization_settings(shipped) if shipped is not None else config.lola
        return BenchModel(
            random_model(DEFAULT_SHAPES, device, dtype, four_bit=True),
            with_lola_flags(settings, args),
            "random weights, default model shapes",
        )
    from lola_chat.weights import load_model

    loaded = load_model(config, device, dtype)
    settings = with_lola_flags(loaded.lola, args)
    return BenchModel(loaded.model.eval(), settings, f"{loaded.model_dir.name} ({loaded.linearization})")


def gpu_clocks() -> dict:
    """SM and memory clocks now and at most, as nvidia-smi reports them; empty where it cannot."""
    fields = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in out.splitlines()[0].split(",")), strict=False))


def measure(arms: list, length: int, decode_tokens: int, repeats: int, vocab: int, device) -> list[dict]:
    """Prefill ``length`` random tokens in each LoLA arm that affords it, then decode ``decode_tokens``
    per arm, arms interleaved, ``repeats`` times. Returns one record per arm; an arm that fails at this
    length (out of memory, say) is recorded with its error and left out of the remaining repeats."""
    gen = torch.Generator().manual_seed(length)
    tokens = torch.randint(0, vocab, (1, length), generator=gen).to(device)
    records = {arm.name: {"arm": arm.name, "label": arm.label, "length": length} for arm in arms}

    def attempt(arm, work):
        try:
            return work()
        except RuntimeError as error:
            records[arm.name]["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    base_state = None
    for arm in sorted((a for a in arms if isinstance(a, LolaArm)), key=lambda a: -a.speed_rank):
        if length > arm.max_prefill and base_state is not None:
            continue
        done = attempt(arm, lambda arm=arm: arm.prefill(tokens))
        if done is not None:
            seconds, state = done
            records[arm.name].update(prefill_s=seconds, prefill_tokens_per_s=length / seconds)
            if base_state is None:
                base_state = state
    samples = {arm.name: [] for arm in arms}
    for _ in range(repeats):
        for arm in arms:
            if arm.holds(length) and "error" not in records[arm.name] and base_state is not None:
                run = attempt(arm, lambda arm=arm: arm.decode(base_state, tokens, decode_tokens))
                if run is not None:
                    samples[arm.name].append(run)
    out = []
    for arm in arms:
        record = records[arm.name]
        if samples[arm.name]:
            record.update(summarize(samples[arm.name]))
            if "prefill_tokens_per_s" not in record and "prefill_s" in record:
                record["prefill_tokens_per_s"] = length / record["prefill_s"]
            record.update(arm.footprint())
        if samples[arm.name] or "error" in record:
            out.append(record)
    return out


def summarize(runs: list[dict]) -> dict:
    """Per-token milliseconds of each repeat -> medians of repeats, pooled p99, eviction steps apart."""
    ordinary = [torch.tensor(r["ordinary_ms"]) for r in runs if r["ordinary_ms"]]
    evicting = [t for r in runs for t in r["eviction_ms"]]
    pooled = torch.cat(ordinary) if ordinary else torch.zeros(0)
    median = float(torch.tensor([o.median() for o in ordinary]).median()) if ordinary else float("nan")
    summary = {
        "decode_median_ms": median,
        "decode_p99_ms": float(pooled.quantile(0.99)) if pooled.numel() else float("nan"),
        "decode_tokens_per_s": 1000.0 / median,
        "decode_steps": int(pooled.numel()),
        "eviction_median_ms": float(torch.tensor(evicting).median()) if evicting else None,
        "eviction_steps": len(evicting),
    }
    extra = [r["prefill_s"] for r in runs if r.get("prefill_s")]
    if extra:
        summary["prefill_s"] = float(torch.tensor(extra).median())
    return summary


def run(args, config: Config) -> int:
    device = resolve_device(config.device)
    dtype = default_dtype(device)
    bench_lengths = parse_lengths(args.lengths or DEFAULT_LENGTHS[device.type])
    wanted = [name.strip() for name in args.arms.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(ARMS))
    if unknown:
        raise UsageError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.decode_tokens < 2 or args.repeats < 1:
        raise UsageError("--decode-tokens must be at least 2 and --repeats at least 1")
    bench = load(args, config, device, dtype)
    arms, skipped = make_arms(wanted, bench, device, max(bench_lengths) + args.decode_tokens + 1)
    info = run_info(device) | {"clocks": gpu_clocks() if device.type == "cuda" else {}}
    results = {
        "run": info,
        "model": bench.description,
        "shapes": bench.model.cfg.as_dict(),
        "lola": bench.settings.as_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "skipped": skipped,
        "records": [],
    }
    with torch.inference_mode():
        if any(arm.name.startswith("lola") for arm in arms):
            results["profile"] = step_profile(bench, device)
            print(f"where a step's time goes: {results['profile']}", flush=True)
        # Warm-up: every arm once over a short memory that closes chunks (kernels compile, libraries
        # initialise, graphs capture), untimed.
        measure(arms, 2 * bench.settings.chunk + 8, 4, 1, bench.model.cfg.vocab_size, device)
        for length in bench_lengths:
            started = time.perf_counter()
            records = measure(
                arms, length, args.decode_tokens, args.repeats, bench.model.cfg.vocab_size, device
            )
            results["records"].extend(records)
            print(f"{length} tokens: {time.perf_counter() - started:.1f} s", flush=True)
            for record in records:
                print("  " + table_row(record), flush=True)
            # After every length, so that a run cut short still leaves what it measured.
            if device.type == "cuda":
                info["clocks_after"] = gpu_clocks()
            write(results, args.out, args.name or f"bench-{device.type}")
        # Last, so that the arms' results are written whatever happens here.
        results["floor"] = weight_read_floor(bench.model, device)
        if device.type == "cuda":
            results["floor"]["gemv_sweep_us"] = gemv_sweep(bench.model, device)
        write(results, args.out, args.name or f"bench-{device.type}")
    return 0
