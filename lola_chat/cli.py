"""The `lola-chat` command line: subcommands, flags and exit codes (0 ok, 1 runtime error, 2 usage error,
130 interrupted). Every error a user can cause is one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from importlib import import_module
from importlib.metadata import version
from pathlib import Path

from lola_chat.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, LolaError, UsageError

EXAMPLES = """examples:
  lola-chat                                   open the chat app on the last session
  lola-chat ask "What is the capital of France?"
  lola-chat ask --session work "My name is Zorblax. Please remember it."
  lola-chat feed --session work notes.txt     put a document into a session's memory
  lola-chat memory work --json                what the session's memory holds, in bytes
  lola-chat sessions list
  lola-chat --help / lola-chat COMMAND --help
"""
DEFAULT_SESSION = "default"
EXTENSIONS = ("lola_chat.linearize.command", "lola_chat.evals.command", "lola_chat.evals.bench")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("model and memory")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument("--model", type=Path, metavar="DIR", help="a local Llama-family checkpoint directory")
    group.add_argument(
        "--attention",
        choices=["lola", "softmax"],
        default="lola",
        help="softmax runs the unmodified base model with a growing KV cache",
    )
    group.add_argument("--linearization", default=None, help="name of a linearization in models/")
    group.add_argument(
        "--capacity", type=positive_int, help="sparse cache size G (default from the linearization)"
    )
    group.add_argument(
        "--chunk", type=positive_int, help="window chunk size C (default from the linearization)"
    )
    group.add_argument(
        "--normalizer",
        choices=["shared", "window"],
        help="how the linear term is weighed against the exact pairs: shared (the paper's) or window "
        "(against the window's best score); default: the linearization's (shared where it names none)",
    )
    group.add_argument(
        "--policy",
        help="how the sparse cache is chosen (default: the linearization's): joint-relative-novelty (one "
        "choice for every layer, the cache kept per KV head: better recall of facts in prose), "
        "relative-novelty (a choice per layer and head: faster eviction; --capacity 256 for the same "
        "bytes as the default), or the others listed when a name is unknown",
    )
    group.add_argument(
        "--linear-cap",
        type=positive_int,
        metavar="R",
        help="the hidden state weighs at most what it weighs after R folded pairs (0: no cap; default: "
        "the linearization's)",
    )
    group.add_argument(
        "--joint-power",
        type=positive_int,
        metavar="P",
        help="a joint policy ranks a position by the mean of its scores to the power P over layers and "
        "heads (1 to 8; 1: the plain mean; default: the linearization's)",
    )
    group.add_argument(
        "--joint-span",
        type=positive_int,
        metavar="S",
        help="a joint policy ranks a candidate at least as high as the candidates within S of it, in "
        "time order (0: none; default: the linearization's)",
    )
    gen = common.add_argument_group("generation")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument(
        "--no-repeat-ngram", type=positive_int, help="never repeat an n-gram of the reply (0: off)"
    )
    gen.add_argument("--max-new-tokens", type=positive_int)
    gen.add_argument("--seed", type=int)
    common.add_argument("--keep-snapshots", type=positive_int, default=10, help="snapshots kept per session")
    common.add_argument(
        "--traceback", action="store_true", help="show the full error on an unexpected failure"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="lola-chat",
        description="A terminal chatbot with lifelong LoLA memory.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lola-chat {version('lola-chat')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    chat = sub.add_parser("chat", parents=[common], help="open the chat app (the default command)")
    chat.add_argument("--session", help="session to open (default: the last one)")
    chat.add_argument("--rebuild", action="store_true", help="rebuild the memory from the transcript")
    chat.add_argument("--plain", action="store_true", help="a plain line-mode chat instead of the app")
    chat.set_defaults(func=run_chat)

    ask = sub.add_parser("ask", parents=[common], help="one turn: the reply goes to stdout")
    ask.add_argument("prompt", nargs="+")
    ask.add_argument("--session", default=DEFAULT_SESSION)
    ask.add_argument("--no-save", action="store_true", help="leave the session on disk unchanged")
    ask.add_argument("--rebuild", action="store_true", help="rebuild the memory from the transcript first")
    ask.set_defaults(func=run_ask)

    feed = sub.add_parser("feed", parents=[common], help="put a document into a session's memory")
    feed.add_argument("file", help="a text file, or - for stdin")
    feed.add_argument("--session", required=True)
    feed.set_defaults(func=run_feed)

    sessions = sub.add_parser(
        "sessions", parents=[common], help="list, show, remove, export, restore, branch"
    )
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="all sessions")
    for name, text in [("show", "a session's details and snapshots"), ("rm", "delete a session")]:
        actions.add_parser(name, help=text).add_argument("name")
    export = actions.add_parser("export", help="the transcript as Markdown or JSONL")
    export.add_argument("name")
    export.add_argument("--format", choices=["markdown", "jsonl"], default="markdown")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    restore = actions.add_parser("restore", help="go back to an earlier snapshot")
    restore.add_argument("name")
    restore.add_argument("snapshot")
    branch = actions.add_parser("branch", help="a new session from a snapshot")
    branch.add_argument("name")
    branch.add_argument("new_name")
    branch.add_argument("--snapshot", help="snapshot id (default: the latest)")
    sessions.set_defaults(func=run_sessions)

    memory = sub.add_parser("memory", parents=[common], help="bytes and fill of a session's memory")
    memory.add_argument("name")
    memory.add_argument("--json", action="store_true")
    memory.set_defaults(func=run_memory)

    paths = sub.add_parser("paths", parents=[common], help="where lola-chat keeps its files")
    paths.add_argument("--json", action="store_true")
    paths.set_defaults(func=run_paths)
    sub.add_parser("doctor", parents=[common], help="check the installation").set_defaults(func=run_doctor)

    for module in EXTENSIONS:
        import_module(module).register(sub, common)
    return parser


def build_config(args):
    from lola_chat.config import DEFAULT_LINEARIZATION, Config, GenerationSettings, Paths

    generation = {
        key: getattr(args, key)
        for key in ("temperature", "top_p", "repetition_penalty", "no_repeat_ngram", "max_new_tokens", "seed")
        if getattr(args, key, None) is not None
    }
    return Config(
        paths=Paths.from_env(),
        device=args.device,
        attention=args.attention,
        model_dir=args.model,
        linearization=args.linearization or (None if args.model else DEFAULT_LINEARIZATION),
        generation=GenerationSettings(**generation),
        generation_flags=frozenset(generation),
        keep_snapshots=args.keep_snapshots,
    )


def load_engine(config, args, progress: bool = True):
    from lola_chat.config import default_dtype, resolve_device, with_lola_flags
    from lola_chat.engine import Engine
    from lola_chat.sessions import SessionStore
    from lola_chat.weights import load_model

    device = resolve_device(config.device)
    loaded = load_model(config, device, default_dtype(device), progress=progress)
    loaded = dataclasses.replace(loaded, lola=with_lola_flags(loaded.lola, args))
    return Engine(config, loaded, SessionStore(config.paths.sessions, config.keep_snapshots), device)


def run_ask(args, config) -> int:
    engine = load_engine(config, args, progress=sys.stderr.isatty())
    engine.open(args.session, lock=not args.no_save, rebuild=args.rebuild)
    try:
        engine.chat(
            " ".join(args.prompt),
            on_piece=lambda piece: print(piece, end="", flush=True),
            save=not args.no_save,
        )
        print()
    finally:
        engine.close()
    return 0


def read_document(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


def run_feed(args, config) -> int:
    from tqdm import tqdm

    text = read_document(args.file)
    engine = load_engine(config, args)
    engine.open(args.session)
    try:
        with tqdm(total=0, unit="tok", desc="feeding", file=sys.stderr) as bar:

            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)

            tokens = engine.feed(text, on_progress=progress)
        print(f"fed {tokens} tokens into session {args.session!r}; memory holds {engine.state.tokens_seen}")
    finally:
        engine.close()
    return 0


def run_sessions(args, config) -> int:
    from lola_chat.sessions import SessionStore

    store = SessionStore(config.paths.sessions, config.keep_snapshots)
    if args.action == "list":
        for info in store.list():
            print(f"{info.name}\t{info.tokens_seen} tokens\t{info.messages} messages\t{info.nbytes} bytes")
    elif args.action == "show":
        session = store.open(args.name)
        print(f"session {session.name}: system prompt {session.system_prompt!r}")
        for snap in session.snapshots():
            print(f"  snapshot {snap.id}\t{snap.tokens_seen} tokens\t{snap.nbytes} bytes\t{snap.note}")
    elif args.action == "rm":
        store.delete(args.name)
        print(f"removed session {args.name!r}")
    elif args.action == "export":
        text = store.open(args.name).export(args.format)
        if args.output:
            args.output.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
    elif args.action == "restore":
        engine = load_engine(config, args)
        engine.open(args.name, create=False)
        try:
            engine.restore(args.snapshot)
        finally:
            engine.close()
        print(f"session {args.name!r} restored to snapshot {args.snapshot}")
    elif args.action == "branch":
        store.branch(args.name, args.new_name, args.snapshot)
        print(f"branched {args.new_name!r} from {args.name!r}")
    return 0


def run_memory(args, config) -> int:
    engine = load_engine(config, args, progress=False)
    engine.open(args.name, create=False, lock=False)
    report = engine.memory_report(detail=args.json)
    engine.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"session {report['session']}: {report['tokens_seen']} tokens seen, {report['attention']} memory")
    print(
        f"state {report['state_bytes']:,} bytes;",
        f"a full KV cache would need {report['kv_cache_bytes']:,} bytes",
    )
    if report.get("settings"):
        print("settings: " + ", ".join(f"{name} {value}" for name, value in report["settings"].items()))
    for layer in report["layers"]:
        print(
            f"  layer {layer['index']:2d}: window {layer['window_tokens']}/{layer['window_capacity']}"
            f"  cache {layer['cache_tokens']}/{layer['cache_capacity']}  folded {layer['folded_tokens']}"
            f"  bytes {layer['window_bytes'] + layer['cache_bytes'] + layer['hidden_state_bytes']:,}"
        )
    return 0


def run_paths(args, config) -> int:
    paths = config.paths.as_dict()
    print(json.dumps(paths, indent=2) if args.json else "\n".join(f"{k}\t{v}" for k, v in paths.items()))
    return 0


def run_doctor(args, config) -> int:
    from lola_chat.doctor import checks

    failed = 0
    for ok, name, detail in checks(config):
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'}  {name}: {detail}")
    return 1 if failed else 0


def run_chat(args, config) -> int:
    if args.plain or not sys.stdout.isatty():
        from lola_chat.plain import plain_chat

        engine = load_engine(config, args)
        return plain_chat(engine, args.session or DEFAULT_SESSION, args.rebuild)
    from lola_chat.tui.app import run_chat as run_app

    def engine_factory(progress):
        progress("loading the model", 0.0)
        engine = load_engine(config, args, progress=False)
        progress("ready", 1.0)
        return engine

    return run_app(engine_factory, args.session, config.paths.state_file)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Nothing but the explicit weights fetch may reach the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    if not any(a in parser._subparsers._group_actions[0].choices for a in argv if not a.startswith("-")):
        if not {"-h", "--help", "--version"} & set(argv):
            argv = ["chat", *argv]
    args = parser.parse_args(argv)
    try:
        return args.func(args, build_config(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LolaError as error:
        print(f"lola-chat: {error}", file=sys.stderr)
        return error.exit_code
    except (ValueError, TypeError) as error:
        if args.traceback:
            raise
        print(f"lola-chat: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if args.traceback:
            raise
        print(
            f"lola-chat: unexpected {type(error).__name__}: {error} (rerun with --traceback)", file=sys.stderr
        )
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
