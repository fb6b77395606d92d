"""Where a LoLA step's time goes, for `lola-chat bench`: on a GPU, the kernels one step of the captured
decoder launches and their device time; on a CPU, the operators one step of the model runs and their
own CPU time. Three steps: an ordinary decode step, a decode step that closes a chunk (its eviction),
and a whole chunk fed at once as a prefill feeds it (its eviction included)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from lola_chat.evals.bench_arms import BenchModel

# Each profiled step's ``source``: what ran, and so what its counts and times are of. Files written before
# the key existed hold the eager model's step on a GPU.
CAPTURED_STEP = "captured-step"
CPU_OPERATORS = "cpu-operators"
TOP = 8


def _captured_feeder(bench: BenchModel, state, fed: int) -> Callable[[], None]:
    """One step of a captured decoder built on ``state``, run without its graphs (the very kernels a
    replay launches, in order). A prefill of several tokens also zeroes the reply's marks and copies the
    tokens in (a few small kernels outside the replayed graph)."""
    from lola_chat.graphs import CapturedDecoder

    decoder = CapturedDecoder(bench.model, state, capture=False)
    tokens = torch.zeros(1, fed, dtype=torch.int64, device=state.layers[0].win_k.device)

    def feed() -> None:
        # The decoder's own token buffer: a step fed it copies nothing in.
        decoder.prefill(tokens) if fed > 1 else decoder.step(decoder.token)

    feed()  # kernels compile
    decoder.reload()
    return feed


def _model_feeder(bench: BenchModel, state, fed: int) -> Callable[[], None]:
    """One step of the model itself (the CPU path), after a first, untimed one: a step that closes a
    chunk runs again from a checkpoint taken before the first (its eviction is what is measured), an
    ordinary step is the one after the first (so that what a step keeps for the next is there, as in a
    conversation)."""
    tokens = torch.zeros(1, fed, dtype=torch.int64, device=state.layers[0].win_k.device)
    closes = (state.tokens_seen + fed) % bench.settings.chunk == 0
    warm = state.checkpoint() if closes else None
    bench.model(tokens, state, last_only=True)
    if warm is not None:
        state.restore(warm)
    return lambda: bench.model(tokens, state, last_only=True)


def profile_step(bench: BenchModel, device: torch.device, before: int, fed: int = 1) -> dict:
    """One step of ``fed`` tokens after ``before``: on CUDA the captured decoder's kernels (count, summed
    device time, the slowest by name), elsewhere the model's operators (calls, summed own CPU time, the
    slowest by name)."""
    state = bench.model.new_state("lola", bench.settings)
    if before:
        bench.model(torch.zeros(1, before, dtype=torch.int64, device=device), state, last_only=True)
    gpu = device.type == "cuda"
    feed = (_captured_feeder if gpu else _model_feeder)(bench, state, fed)
    if gpu:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        feed()
        if gpu:
            torch.cuda.synchronize()
    if gpu:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        timed = [(e.name, e.device_time / 1000.0) for e in events]
    else:
        # Own time only, so that an operator calling another is not counted twice.
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
        timed = [(e.name, e.self_cpu_time_total / 1000.0) for e in events]
    by_name: dict[str, float] = {}
    for name, ms in timed:
        by_name[name] = by_name.get(name, 0.0) + ms
    top = sorted(by_name.items(), key=lambda item: -item[1])[:TOP]
    return {
        "kernels_per_token": len(timed),
        "kernel_time_ms": sum(by_name.values()),
        "top_kernels_ms": {name[:80]: round(ms, 4) for name, ms in top},
    }


def step_profile(bench: BenchModel, device: torch.device) -> dict:
    """``profile_step`` of a decode step; under ``eviction``, of a step that closes a chunk; under
    ``prefill_chunk``, of a whole chunk fed at once. The last two start with the sparse cache full and
    a chunk in the window that will leave it, as every eviction of a long conversation does (the first
    evictions search fewer candidates, and on a CPU keep nothing from an earlier one yet). ``source``
    says which form ran."""
    chunk = bench.settings.chunk
    full = (bench.settings.capacity // chunk + 2) * chunk
    result = profile_step(bench, device, 0)
    result["eviction"] = profile_step(bench, device, full - 1)
    result["prefill_chunk"] = profile_step(bench, device, full, fed=chunk)
    result["source"] = CAPTURED_STEP if device.type == "cuda" else CPU_OPERATORS
    return result
