"""Results on disk: one JSON file per evaluation (rows plus where they came from), PNG plots, and the
Markdown tables of ``README.md`` -- all generated from the JSON files, never typed by hand."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from lola_chat.evals.arms import label_of

EVALS = ("niah", "ppl", "memory")
TITLES = {
    "niah": "Needle in a haystack (exact match of a 7-digit value)",
    "ppl": "Perplexity on held-out book text",
    "memory": "Conversation state bytes per sequence",
}


def write_result(out_dir: Path, name: str, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"eval": name, **payload}, indent=2) + "\n", encoding="utf-8")
    return path


def read_results(out_dir: Path) -> dict[str, dict]:
    """The results files in ``out_dir`` by eval name (files that are not eval results are skipped)."""
    results = {}
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if isinstance(payload, dict) and payload.get("eval") in EVALS and "rows" in payload:
            results[payload["eval"]] = payload
    return results


ROW_KEY = ("config", "haystack", "length", "context")
RUN_KEYS = ("created", "command", "device", "commit")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows not measured again in ``new``, then ``new``'s."""
    measured = {tuple(row.get(key) for key in ROW_KEY) for row in new}
    return [row for row in old if tuple(row.get(key) for key in ROW_KEY) not in measured] + new


def run_history(payload: dict) -> list[dict]:
    """The provenance of every run whose rows a results file holds, oldest first."""
    own = {key: payload.get(key) for key in RUN_KEYS}
    return [*payload.get("earlier_runs", []), own]


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _configs(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["config"] for row in rows))


def niah_table(payload: dict) -> str:
    rows = payload["rows"]
    lengths = sorted({row["length"] for row in rows})
    cells = {(r["config"], r["haystack"], r["length"]): r for r in rows}
    body = []
    for haystack in dict.fromkeys(row["haystack"] for row in rows):
        for config in _configs(rows):
            line = [label_of(config), haystack]
            for length in lengths:
                row = cells.get((config, haystack, length))
                if row is None:
                    line.append("")
                elif row.get("accuracy") is None:
                    line.append(row.get("error", "failed"))
                else:
                    cell = f"{100 * row['accuracy']:.0f}% ({row['correct']}/{row['prompts']})"
                    if row.get("needle_held") is not None:
                        cell += f", holds {100 * row['needle_held']:.0f}%"
                    line.append(cell)
            body.append(line)
    table = _table(["configuration", "haystack", *map(length_label, lengths)], body)
    if any(row.get("needle_held") is not None for row in rows):
        table += (
            '\n\n"holds": the share of the needle sentence\'s tokens a LoLA memory holds exactly (sparse'
            " cache or window) once the prompt is in, averaged over prompts, layers and query heads."
        )
    return table


def ppl_table(payload: dict) -> str:
    rows = payload["rows"]
    contexts = sorted({row["context"] for row in rows})
    cells = {(r["config"], r["context"]): r for r in rows}
    base = {r["context"]: r["perplexity"] for r in rows if r["config"] == "softmax"}
    body = []
    for config in _configs(rows):
        line = [label_of(config)]
        for context in contexts:
            row = cells.get((config, context))
            if row is None:
                line.append("")
                continue
            ratio = f" ({100 * (row['perplexity'] / base[context] - 1):+.1f}%)" if context in base else ""
            line.append(f"{row['perplexity']:.2f}{ratio if config != 'softmax' else ''}")
        body.append(line)
    return _table(["configuration", *(f"{length_label(c)} context" for c in contexts)], body)


def byte_size(count: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def memory_table(payload: dict) -> str:
    rows = payload["rows"]
    lengths = sorted({row["length"] for row in rows})
    cells = {(r["config"], r["length"]): r for r in rows}
    body = []
    for config in _configs(rows):
        line = [label_of(config)]
        for length in lengths:
            row = cells[(config, length)]
            ratio = "" if config == "softmax" else f" (KV cache / state = {row['ratio']:.1f}x)"
            line.append(byte_size(row["state_bytes"]) + ratio)
        body.append(line)
    return _table(["configuration", *map(length_label, lengths)], body)


TABLES = {"niah": niah_table, "ppl": ppl_table, "memory": memory_table}


def provenance_line(payload: dict) -> str:
    versions = payload.get("versions", {})
    device, commit, created = (payload.get(key, "?") for key in ("device", "commit", "created"))
    command = payload.get("command", "?")
    line = f"{device}, commit `{commit}`, {created}, torch {versions.get('torch', '?')}; command: `{command}`"
    for run in reversed(payload.get("earlier_runs", [])):
        line += f"; with rows of an earlier run ({run.get('device')}, commit `{run.get('commit')}`, "
        line += f"{run.get('created')}; command: `{run.get('command')}`)"
    return line


def results_markdown(results: dict[str, dict], heading: str = "##") -> str:
    """Every eval's table with its provenance, in a fixed order."""
    parts = []
    for name in EVALS:
        if name in results:
            payload = results[name]
            model = payload.get("model", {})
            parts.append(
                f"{heading} {TITLES[name]}\n\n{TABLES[name](payload)}\n\n"
                f"Made on {provenance_line(payload)}. Linearization `{model.get('linearization', '?')}` "
                f"(fingerprint `{model.get('linearization_fingerprint', '?')}`)."
            )
    return "\n\n".join(parts)


def write_readme(out_dir: Path) -> Path:
    results = read_results(out_dir)
    plots = [f"![{name}]({name}.png)" for name in EVALS if (Path(out_dir) / f"{name}.png").is_file()]
    speed = [f"- [{path.stem}]({path.name})" for path in sorted(Path(out_dir).glob("bench-*.md"))]
    tabled = {f"{name}.json" for name in results}
    others = [
        f"- [{path.name}]({path.name})"
        for path in sorted(Path(out_dir).glob("*.json"))
        if path.name not in tabled and not path.name.startswith("bench-")
    ]
    others += [
        f"- [{path.name}]({path.name})"
        for path in sorted(Path(out_dir).glob("*.md"))
        if path.stem.isupper() and path.name != "README.md"
    ]
    text = (
        "# Evaluation results\n\nGenerated by `lola-chat eval` from the JSON files in this folder; "
        "do not edit by hand (rerun the eval, or `lola-chat eval report`, to regenerate).\n\n"
        + results_markdown(results)
        + ("\n\n## Plots\n\n" + "\n\n".join(plots) if plots else "")
        + ("\n\n## Speed\n\nMeasured by `lola-chat bench`:\n\n" + "\n".join(speed) if speed else "")
        + ("\n\n## Other files\n\nNot in the tables above:\n\n" + "\n".join(others) if others else "")
        + "\n"
    )
    path = Path(out_dir) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def _length_axis(ax, lengths: list[int], label: str) -> None:
    ax.set_xscale("log")
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel(label)


def _plot_niah(plt, rows: list[dict]):
    haystacks = list(dict.fromkeys(r["haystack"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(haystacks), figsize=(6 * len(haystacks), 4.5), squeeze=False)
    for ax, haystack in zip(axes[0], haystacks, strict=True):
        series = defaultdict(list)
        for r in rows:
            if r["haystack"] == haystack and r.get("accuracy") is not None:
                series[r["config"]].append((r["length"], 100 * r["accuracy"]))
        for config, points in series.items():
            ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label_of(config))
        _length_axis(ax, lengths, "prompt tokens")
        ax.set(ylabel="accuracy (%)", ylim=(-3, 103), title=f"{haystack} haystack")
    axes[0][0].legend(fontsize=7)
    return fig


def _plot_ppl(plt, rows: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    contexts = sorted({r["context"] for r in rows})
    configs = _configs(rows)
    width = 0.8 / len(contexts)
    values = {(r["config"], r["context"]): r["perplexity"] for r in rows}
    for i, context in enumerate(contexts):
        heights = [values.get((config, context), 0.0) for config in configs]
        ax.bar(
            [x + i * width for x in range(len(configs))],
            heights,
            width,
            label=f"{length_label(context)} context",
        )
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(configs))], configs)
    ax.set(ylabel="perplexity", title="held-out book text")
    ax.legend()
    return fig


def _plot_memory(plt, rows: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = defaultdict(list)
    for r in rows:
        series[r["config"]].append((r["length"], r["state_bytes"] / 2**20))
    for config, points in series.items():
        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label_of(config))
    _length_axis(ax, sorted({r["length"] for r in rows}), "tokens in the conversation")
    ax.set(yscale="log", ylabel="state per sequence (MB)")
    ax.legend(fontsize=7)
    return fig


PLOTS = {"niah": _plot_niah, "ppl": _plot_ppl, "memory": _plot_memory}


def write_plots(out_dir: Path) -> list[Path]:
    """One PNG per eval present in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, payload in read_results(out_dir).items():
        fig = PLOTS[name](plt, payload["rows"])
        fig.suptitle(TITLES[name], fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
