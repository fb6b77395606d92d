"""A chat turn on top of the model's memory: template only the new turn, prefill only its tokens, sample a
streamed reply, and keep the session's transcript and snapshots on disk."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lola_chat.config import Config, GenerationSettings
from lola_chat.decoding import TokenFeeder
from lola_chat.errors import LolaError
from lola_chat.joint import JOINT_POOLING
from lola_chat.memory import State
from lola_chat.sampling import sample
from lola_chat.sessions import DEFAULT_SYSTEM_PROMPT, Session, SessionStore

PREFILL_PIECE = 1024
GENERATION_KEYS = ("temperature", "top_p", "repetition_penalty", "no_repeat_ngram", "max_new_tokens", "seed")


@dataclass
class TurnStats:
    prompt_tokens: int
    new_tokens: int
    prefill_tps: float
    decode_tps: float
    stopped: bool


class ChatTemplate:
    """ChatML, one turn at a time. User text is tokenized with special tokens split, so a user cannot
    forge turn boundaries."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_ids = set(self._special("<|im_end|>"))
        if tokenizer.eos_token_id is not None:
            self.end_ids.add(tokenizer.eos_token_id)

    def _special(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def block(self, role: str, content: str) -> list[int]:
        return self._special(f"<|im_start|>{role}\n") + self._plain(content) + self.close()

    def reply_prefix(self) -> list[int]:
        return self._special("<|im_start|>assistant\n")

    def close(self) -> list[int]:
        return self._special("<|im_end|>\n")

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def default_system_prompt(self) -> str:
        """The system prompt the model was tuned with, read from its chat template (small models
        follow their own default prompt much better than a generic one)."""
        try:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        except Exception:  # noqa: BLE001 - a tokenizer without a usable template
            return DEFAULT_SYSTEM_PROMPT
        found = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.DOTALL)
        return found.group(1) if found else DEFAULT_SYSTEM_PROMPT


class Engine:
    """One open conversation: a model, its memory, and the session that persists it. ``decoding`` picks how
    tokens are fed (see ``lola_chat.decoding``); by default graph replay where it applies."""

    def __init__(
        self, config: Config, loaded, store: SessionStore, device: torch.device, decoding: str = "auto"
    ):
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.template = ChatTemplate(loaded.tokenizer)
        self.store = store
        self.torch_device = device
        self.device = (
            str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
        )
        self.session: Session | None = None
        self._feeder = TokenFeeder(self.model, decoding)
        self.state: State | None = None
        self.generation = config.generation
        self._generator: torch.Generator | None = None
        self._evictions_at_turn = 0

    @property
    def state(self) -> State | None:
        """The conversation's memory, up to date whenever no turn is running."""
        return self._feeder.state

    @state.setter
    def state(self, state: State | None) -> None:
        self._feeder.bind(state)

    # Sessions ---------------------------------------------------------------------------------------

    def expectations(self) -> dict[str, str]:
        """Metadata a snapshot must match to be loaded into this engine. The LoLA settings must match
        except the eviction policy, a joint policy's pooling and the hidden state's cap: the first two
        decide only which pairs later evictions fold, the cap only how much attention weighs the hidden
        state, so a state made under one is a valid state under another of the same cache layout (and
        a new default does not refuse a user's conversations), though not the one a rebuild under the
        new settings would compute. The layout does count: a joint policy's
        cache is kept per KV head (``_recorded_settings``)."""
        settings = self._recorded_settings()
        for name in ("policy", "linear_cap", *JOINT_POOLING):
            settings.pop(name, None)
        return {
            "model": self.loaded.model_fingerprint,
            "linearization": self.loaded.linearization_fingerprint,
            "attention": self.config.attention,
            "lola": json.dumps(settings, sort_keys=True),
        }

    def new_state(self) -> State:
        return self.model.new_state(self.config.attention, self.loaded.lola)

    def open(self, name: str, create: bool = True, rebuild: bool = False, lock: bool = True) -> None:
        """Make ``name`` the open conversation (creating it if asked) and load its latest snapshot."""
        if self.session is not None:
            self.close()
        if self.store.exists(name) or not create:
            session = self.store.open(name)
        else:
            session = self.store.create(name, self.template.default_system_prompt())
        if lock:
            session.lock()
        try:
            self.session = session
            self.generation = GenerationSettings(
                **{
                    **vars(self.config.generation),
                    **{
                        k: v
                        for k, v in session.settings.items()
                        if k in GENERATION_KEYS and k not in self.config.generation_flags
                    },
                }
            )
            if rebuild:
                self.rebuild()
            else:
                self.state = self._load_latest()
        except BaseException:
            if lock:
                session.unlock()
            self.session = None
            raise
        self._evictions_at_turn = self.state.evictions()

    def _load_latest(self) -> State:
        state = self.new_state()
        if self.session.latest_snapshot() is None:
            if any(r.get("role") for r in self.session.history()):
                raise LolaError(
                    f"session {self.session.name!r} has a transcript but no snapshot; run with --rebuild"
                )
            return state
        tensors, meta = self.session.load_snapshot(self.expectations())
        state.load({k: v.to(self.torch_device) for k, v in tensors.items()}, int(meta["tokens_seen"]))
        return state

    def rebuild(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Recompute the state from the transcript (when a snapshot is refused or lost) and save it."""
        self.state = self.new_state()
        history = self.session.history()
        for i, record in enumerate(history):
            ids = self._turn_prefix() + self.template.block(record["role"], record["content"])
            self._prefill(ids)
            if on_progress:
                on_progress(i + 1, len(history))
        self.save(note="rebuilt from transcript")

    def close(self) -> None:
        if self.session is not None:
            self.session.unlock()
        self.session, self.state = None, None

    def _recorded_settings(self) -> dict:
        """The LoLA settings a snapshot records. A joint policy keeps its sparse cache per KV head, so its
        snapshots also say so: a state of the other layout has other shapes (``LolaMemory.load``)."""
        settings = self.loaded.lola.as_dict()
        if self.loaded.lola.joint:
            settings["cache"] = "per KV head"
        return settings

    def save(self, note: str = "") -> str:
        meta = {
            **self.expectations(),
            "lola": json.dumps(self._recorded_settings(), sort_keys=True),
            "tokens_seen": str(self.state.tokens_seen),
        }
        return self.session.save_snapshot(self.state.tensors(), meta, note=note)

    def history(self) -> list[dict]:
        return self.session.history()

    def set_system(self, text: str) -> None:
        self.session.set_system_prompt(text)
        self.session.append({"type": "system", "content": text, "time": time.time()})

    def set_generation(self, **settings) -> None:
        unknown = set(settings) - set(GENERATION_KEYS)
        if unknown:
            raise LolaError(f"unknown setting {sorted(unknown)[0]!r}; known: {', '.join(GENERATION_KEYS)}")
        self.generation = GenerationSettings(**{**vars(self.generation), **settings})
        self.session.update_settings(**settings)
        self._generator = None

    def restore(self, snapshot_id: str) -> None:
        tensors, meta = self.session.load_snapshot(self.expectations(), snapshot_id)
        self.session.restore(snapshot_id)
        state = self.new_state()
        state.load({k: v.to(self.torch_device) for k, v in tensors.items()}, int(meta["tokens_seen"]))
        self.state = state

    def branch(self, new_name: str, snapshot_id: str | None = None) -> None:
        self.store.branch(self.session.name, new_name, snapshot_id)
        self.open(new_name, create=False)

    # Turns ------------------------------------------------------------------------------------------

    def _turn_prefix(self) -> list[int]:
        """The system block opens a conversation: it is prefilled before the first turn only."""
        if self.state.tokens_seen:
            return []
        return self.template.block("system", self.session.system_prompt)

    @torch.inference_mode()
    def _prefill(self, ids: list[int], on_progress=None, cancel=None) -> torch.Tensor | None:
        logits = None
        for start in range(0, len(ids), PREFILL_PIECE):
            if cancel is not None and cancel.is_set():
                return None
            logits = self._feeder.feed(ids[start : start + PREFILL_PIECE])
            if on_progress:
                on_progress(min(start + PREFILL_PIECE, len(ids)), len(ids))
        self._feeder.sync()
        return logits

    def _sampler_generator(self) -> torch.Generator | None:
        if self.generation.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=self.torch_device).manual_seed(self.generation.seed)
        return self._generator

    @torch.inference_mode()
    def _reply(self, prompt_ids: list[int], on_piece, cancel) -> tuple[str, TurnStats]:
        start = time.perf_counter()
        logits = self._prefill(prompt_ids)
        prefill_seconds = time.perf_counter() - start
        generated: list[int] = []
        shown = ""
        stopped = False
        decode_start = time.perf_counter()
        generator = self._sampler_generator()
        for _ in range(self.generation.max_new_tokens):
            if cancel is not None and cancel.is_set():
                stopped = True
                break
            token = sample(logits, self.generation, generator, generated, self._feeder.argmax)
            if token in self.template.end_ids:
                break
            generated.append(token)
            logits = self._feeder.feed([token])
            text = self.template.decode(generated)
            if not text.endswith("\ufffd") and len(text) > len(shown):
                if on_piece:
                    on_piece(text[len(shown) :])
                shown = text
        decode_seconds = time.perf_counter() - decode_start
        reply = self.template.decode(generated)
        if on_piece and reply.startswith(shown) and len(reply) > len(shown):
            on_piece(reply[len(shown) :])  # whatever was held back as an incomplete character
        self._prefill(self.template.close())
        stats = TurnStats(
            prompt_tokens=len(prompt_ids),
            new_tokens=len(generated),
            prefill_tps=len(prompt_ids) / max(prefill_seconds, 1e-9),
            decode_tps=len(generated) / max(decode_seconds, 1e-9),
            stopped=stopped,
        )
        return reply, stats

    def chat(self, text: str, on_piece=None, cancel: threading.Event | None = None, save: bool = True):
        """One exchange: prefill the user turn, stream the reply, save a snapshot. On ``cancel`` the reply
        ends where it was (the state holds exactly the text kept, closed as a finished turn)."""
        self._evictions_at_turn = self.state.evictions()
        prompt = self._turn_prefix() + self.template.block("user", text) + self.template.reply_prefix()
        reply, stats = self._reply(prompt, on_piece, cancel)
        if save:
            self._record_exchange(text, reply, stats.stopped)
        return stats

    def _record_exchange(self, text: str, reply: str, stopped: bool) -> None:
        now = time.time()
        self.session.append(
            {
                "type": "message",
                "role": "user",
                "content": text,
                "time": now,
                "tokens_seen": None,
                "snapshot": None,
                "stopped": False,
            }
        )
        snapshot = self.save()
        self.session.append(
            {
                "type": "message",
                "role": "assistant",
                "content": reply,
                "time": now,
                "tokens_seen": self.state.tokens_seen,
                "snapshot": snapshot,
                "stopped": stopped,
            }
        )

    def _state_before_last_exchange(self) -> tuple[State, str]:
        """The state just before the last user message, from the snapshot of the message before it."""
        history = self.session.history()
        positions = [i for i, r in enumerate(history) if r.get("role") in ("user", "assistant")]
        if len(positions) < 2 or history[positions[-1]]["role"] != "assistant":
            raise LolaError("there is no exchange to undo or regenerate")
        question = positions[-2]
        earlier = [r for r in history[:question] if r.get("snapshot")]
        state = self.new_state()
        if earlier:
            tensors, meta = self.session.load_snapshot(self.expectations(), earlier[-1]["snapshot"])
            state.load({k: v.to(self.torch_device) for k, v in tensors.items()}, int(meta["tokens_seen"]))
        return state, history[question]["content"]

    def undo(self) -> None:
        self.state, _ = self._state_before_last_exchange()
        self.session.append({"type": "undo", "time": time.time()})
        self.save(note="undo")

    def regenerate(self, on_piece=None, cancel: threading.Event | None = None) -> TurnStats:
        self.state, text = self._state_before_last_exchange()
        self.session.append({"type": "undo", "time": time.time()})
        return self.chat(text, on_piece, cancel)

    def feed(self, text: str, on_progress=None, cancel: threading.Event | None = None) -> int:
        """Ingest a document as a user turn without a reply. Cancelling leaves the state as it was."""
        ids = self._turn_prefix() + self.template.block("user", text)
        before = self.state.checkpoint()
        if self._prefill(ids, on_progress, cancel) is None and ids:
            self.state.restore(before)
            self._feeder.bind(self.state)  # a decoder's copy ran ahead of the restored State
            return 0
        snapshot = self.save(note="feed")
        self.session.append(
            {
                "type": "message",
                "role": "user",
                "content": text,
                "time": time.time(),
                "tokens_seen": self.state.tokens_seen,
                "snapshot": snapshot,
                "stopped": False,
                "document": True,
            }
        )
        return len(ids)

    # Inspection -------------------------------------------------------------------------------------

    def memory_report(self, detail: bool = True) -> dict:
        from lola_chat.inspection import memory_report

        return memory_report(self, detail)
