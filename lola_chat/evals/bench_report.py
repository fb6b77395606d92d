"""The files `lola-chat bench` writes: its results as JSON, a Markdown table with the profile and the
bandwidth floor in words, and a PNG plot of decode speed against memory length."""

from __future__ import annotations

import json
from pathlib import Path

from lola_chat.evals.profiling import CAPTURED_STEP, CPU_OPERATORS

# The profiled steps beside the ordinary decode step: the profile's key, and the step in words.
PROFILED_STEPS = {
    "eviction": "A step that closes a chunk",
    "prefill_chunk": "A whole chunk fed at once, as a prefill feeds it, eviction included,",
}
COLUMNS = ("arm", "memory (tokens)", "prefill tok/s", "decode tok/s", "median ms", "p99 ms",
           "eviction step ms", "state MiB", "peak GPU MiB")  # fmt: skip


def _profile_lines(profile: dict) -> list[str]:
    """The profile (``evals.profiling.step_profile``'s) in words: what each profiled step runs, and the
    slowest of it."""
    source = profile.get("source")
    runs, time = "launches {} kernels", "{:.3f} ms of device time"
    how = "Triton path, eager"
    if source == CAPTURED_STEP:
        how = "the captured step's kernels launched one by one"
    elif source == CPU_OPERATORS:
        runs, time = "calls {} operators", "{:.3f} ms of their own CPU time"
        how = "the model's step on the CPU"
    lines = [
        "",
        f"One decode step {runs.format(profile['kernels_per_token'])}, "
        f"{time.format(profile['kernel_time_ms'])} in all ({how}).",
    ]
    for key, step in PROFILED_STEPS.items():
        if key in profile:
            top = list(profile[key]["top_kernels_ms"].items())[:4]
            slowest = ", ".join(f"{name} {ms:.3f} ms" for name, ms in top)
            lines += [
                "",
                f"{step} {runs.format(profile[key]['kernels_per_token'])}, "
                f"{time.format(profile[key]['kernel_time_ms'])} (slowest: {slowest}).",
            ]
    return lines


def _fmt(value, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def table_row(r: dict) -> str:
    if "decode_median_ms" not in r:
        return f"| {r['arm']} | {r['length']:,} | failed: {r['error']} |"
    cells = [
        r["arm"], f"{r['length']:,}", _fmt(r.get("prefill_tokens_per_s"), ",.0f"),
        _fmt(r["decode_tokens_per_s"], ",.1f"), _fmt(r["decode_median_ms"], ".3f"),
        _fmt(r["decode_p99_ms"], ".3f"),
        _fmt(r["eviction_median_ms"], ".3f"), _fmt(r["state_bytes"] / 2**20, ".2f"),
        _fmt(r["peak_memory_bytes"] / 2**20 if r.get("peak_memory_bytes") else None, ",.0f"),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _as_read(floor: dict) -> str:
    """How many of the weights' bytes decoding reads, where four-bit forms make it fewer."""
    read = floor.get("read_bytes", floor["weight_bytes"])
    return (
        ""
        if read == floor["weight_bytes"]
        else f"; {read / 1e6:,.1f} MB as decoding reads them, in four bits where it can"
    )


def markdown(results: dict) -> str:
    run = results["run"]
    lines = [
        f"# lola-chat bench: {results['model']}",
        "",
        f"`{run['command']}` on {run['device']}, commit `{run['commit']}`, {run['created']}; "
        f"{results['dtype']}, LoLA {results['lola']}, {results['decode_tokens']} greedy tokens decoded "
        f"x {results['repeats']} repeats per arm and length (median of repeats; p99 over all ordinary steps; "
        "steps that close a chunk and evict are reported apart).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *(table_row(r) for r in results["records"]),
    ]
    if results["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items()) + "."]
    if "profile" in results:
        lines += _profile_lines(results["profile"])
    if "floor" in results:
        floor = results["floor"]
        fastest = max(
            (r["decode_tokens_per_s"] for r in results["records"] if "decode_median_ms" in r), default=0
        )
        lines += [
            "",
            f"Bandwidth floor: all {floor['weight_matrices']} weight matrices "
            f"({floor['weight_bytes'] / 1e6:,.1f} MB{_as_read(floor)}) read once at the "
            f"{floor['copy_bandwidth_gb_per_s']:,.0f} GB/s of a large copy on this device take "
            f"{floor['floor_ms']:.3f} ms, a ceiling of "
            f"{floor['tokens_per_s']:,.0f} decode tokens/s at batch 1; the fastest decode above reaches "
            f"{fastest / floor['tokens_per_s']:.1%} of it. One token through every matrix as decoding "
            f"computes it takes {floor['gemv_pass_ms']:.3f} ms.",
        ]
        if floor.get("gemv_sweep_us"):
            fastest_config = {
                shape: min(times, key=times.get) for shape, times in floor["gemv_sweep_us"].items()
            }
            best = "; ".join(
                f"{shape}: {config} ({floor['gemv_sweep_us'][shape][config]:.2f} us)"
                for shape, config in fastest_config.items()
            )
            lines += ["", f"Fastest GEMV configuration per weight shape, per matrix (JSON: all): {best}."]
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    lines += ["", f"Versions: {versions}. Clocks: {run.get('clocks') or 'not available'}.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (decode, prefill) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in dict.fromkeys(r["arm"] for r in results["records"]):
        rows = [r for r in results["records"] if r["arm"] == arm and "decode_median_ms" in r]
        decode.plot([r["length"] for r in rows], [r["decode_tokens_per_s"] for r in rows], "o-", label=arm)
        filled = [r for r in rows if r.get("prefill_tokens_per_s")]
        if filled:
            prefill.plot(
                [r["length"] for r in filled], [r["prefill_tokens_per_s"] for r in filled], "o-", label=arm
            )
    for axis, title in ((decode, "decode, batch 1 (tokens/s)"), (prefill, "prefill (tokens/s)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens in memory")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"{results['model']} on {results['run']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md and .png")
