"""`lola-chat eval`: recall (needle in a haystack), perplexity and state size of the softmax base model
and of LoLA configurations, written as JSON, PNG plots and a generated Markdown table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lola_chat.config import Config, default_dtype, resolve_device
from lola_chat.errors import UsageError
from lola_chat.evals import footprint, niah, ppl, report
from lola_chat.evals.arms import DEFAULT_ARMS, Models, parse_arms, parse_lengths
from lola_chat.evals.provenance import RESULTS_DIR, run_info
from lola_chat.linearization import resolve_linearization
from lola_chat.linearize import card
from lola_chat.linearize.data import read_books, resolve_data_dir
from lola_chat.linearize.tiny import write_tiny_checkpoint

FULL = {"lengths": "1K,2K,4K,8K,16K,32K", "prompts": 50, "contexts": "2K,8K", "ppl_windows": None}
TINY = {"lengths": "256,512", "prompts": 2, "contexts": "256,512", "ppl_windows": 4}


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "eval",
        parents=[common],
        help="measure recall, perplexity and memory (JSON, plots and tables under docs/results)",
        description="Runs the softmax base model and LoLA configurations. `report` only regenerates the "
        "tables, plots and the linearization card from existing results files. --seed (default 0) seeds "
        "the prompts.",
    )
    parser.add_argument("which", choices=["niah", "ppl", "memory", "all", "report"])
    parser.add_argument("--lengths", help=f"niah/memory prompt lengths (default {FULL['lengths']})")
    parser.add_argument(
        "--prompts", type=int, help=f"needle prompts per length and haystack ({FULL['prompts']})"
    )
    parser.add_argument("--contexts", help=f"perplexity context lengths (default {FULL['contexts']})")
    parser.add_argument("--ppl-windows", type=int, help="at most this many windows per context (default all)")
    parser.add_argument(
        "--softmax-max-length", help="niah: run the softmax base model only up to this length (default: all)"
    )
    parser.add_argument("--configs", default=DEFAULT_ARMS, help=f"configurations (default {DEFAULT_ARMS})")
    parser.add_argument("--out", type=Path, metavar="DIR", help="results folder (default docs/results)")
    parser.add_argument("--data", type=Path, metavar="DIR", help="book text (default ../shared/data)")
    parser.add_argument("--card", type=Path, metavar="DIR", help="linearization folder whose card to update")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny random model and tiny lengths (CPU check)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to the results file already in --out (rows of this run replace equal ones; each run's "
        "provenance is kept), so a long evaluation can run in parts",
    )
    parser.set_defaults(func=run)


def _option(args, name: str):
    value = getattr(args, name)
    return value if value is not None else (TINY if args.tiny else FULL)[name]


def _update_card(args, out: Path, linearization: str | None) -> None:
    # The shipped card shows the shipped results: it follows only docs/results unless --card says otherwise.
    shipped = linearization and not args.tiny and Path(out).resolve() == RESULTS_DIR.resolve()
    directory = args.card or (resolve_linearization(linearization) if shipped else None)
    if directory is not None:
        print(f"updated {card.write_card(directory, out)}", file=sys.stderr)


def run(args, config: Config) -> int:
    out = args.out or (config.paths.cache / "tiny-results" if args.tiny else RESULTS_DIR)
    if args.which == "report":
        if not out.is_dir():
            raise UsageError(f"no results folder {out}; run an evaluation first or pass --out")
        report.write_plots(out)
        print(f"wrote {report.write_readme(out)}")
        _update_card(args, out, config.linearization)
        return 0
    arms = parse_arms(args.configs)
    lengths = parse_lengths(_option(args, "lengths"))
    contexts = parse_lengths(_option(args, "contexts"))
    prompts = _option(args, "prompts")
    if prompts < 1:
        raise UsageError("--prompts must be at least 1")
    if args.tiny:
        tiny_dir = write_tiny_checkpoint(config.paths.cache / "tiny-model")
        config = dataclasses.replace(config, model_dir=tiny_dir, linearization=args.linearization)
    device = resolve_device(config.device)
    models = Models(config, device, default_dtype(device))
    seed = 0 if args.seed is None else args.seed
    which = ["niah", "ppl", "memory"] if args.which == "all" else [args.which]
    books = read_books(resolve_data_dir(args.data)) if {"niah", "ppl"} & set(which) else []
    info = run_info(device)

    earlier = report.read_results(out) if args.append else {}

    def save(name: str, settings: dict, rows: list[dict]) -> None:
        history = {}
        if name in earlier:
            rows = report.merge_rows(earlier[name]["rows"], rows)
            history = {"earlier_runs": report.run_history(earlier[name])}
        payload = {
            **info,
            **history,
            "model": models.describe(),
            "configs": [a.name for a in arms],
            "seed": seed,
            "settings": settings,
            "rows": rows,
        }
        print(f"wrote {report.write_result(out, name, payload)}", file=sys.stderr)

    # An oracle pins a needle: text and state sizes have none, so there it would repeat its arm's rows.
    without_oracles = [arm for arm in arms if not arm.oracle]
    for name in which:
        tokenizer = models.loaded("lola").tokenizer
        if name == "niah":
            haystacks = [niah.noise_haystack(tokenizer), niah.prose_haystack(tokenizer, books)]
            limit = parse_lengths(args.softmax_max_length)[0] if args.softmax_max_length else None
            settings = {
                "lengths": lengths,
                "prompts_per_haystack": prompts,
                "new_tokens": niah.NEW_TOKENS,
                "needle": niah.NEEDLE.strip(),
                "haystacks": [h.name for h in haystacks],
                "softmax_max_length": limit,
            }
            rows = niah.evaluate(
                models,
                arms,
                lengths,
                prompts,
                haystacks,
                seed,
                limit,
                on_length=lambda partial, settings=settings: save("niah", settings, partial),
            )
        elif name == "ppl":
            windows = _option(args, "ppl_windows")
            rows = ppl.evaluate(models, without_oracles, contexts, books, windows)
            settings = {"contexts": contexts, "books": [b.name for b in books], "max_windows": windows}
        else:
            model = models.loaded("lola").model
            dtype = model.embed_tokens.weight.dtype
            rows = footprint.evaluate(model.cfg, without_oracles, lengths, models.chunk, dtype)
            settings = {"lengths": lengths, "dtype": str(model.embed_tokens.weight.dtype)}
        save(name, settings, rows)
    report.write_plots(out)
    print(f"wrote {report.write_readme(out)}")
    _update_card(args, out, config.linearization)
    return 0
