"""A line-mode chat for terminals without the app (or when output is not a terminal)."""

from __future__ import annotations

import sys
import threading


def plain_chat(engine, session: str, rebuild: bool = False) -> int:
    engine.open(session, rebuild=rebuild)
    print(
        f"session {session!r}: {engine.state.tokens_seen} tokens in memory.",
        "Ctrl+D quits, Ctrl+C stops a reply.",
    )
    try:
        while True:
            try:
                text = input("you> ")
            except EOFError:
                print()
                return 0
            if not text.strip():
                continue
            cancel = threading.Event()
            print("lola> ", end="", flush=True)
            try:
                engine.chat(text, on_piece=lambda piece: print(piece, end="", flush=True), cancel=cancel)
            except KeyboardInterrupt:
                cancel.set()
                print(" [stopped]", file=sys.stderr)
            print()
    finally:
        engine.close()
