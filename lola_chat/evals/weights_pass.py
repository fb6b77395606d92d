"""One token through every weight matrix of a model: the bandwidth floor of a decode step at batch 1,
the time of the pass as decoding computes it, and that time per GEMV configuration and weight shape."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lola_chat.evals.bench_arms import Clock
from lola_chat.graphs import capture_graphs
from lola_chat.kernels.dispatch import triton_module
from lola_chat.kernels.gemv import fused_linear

# Large enough that a copy streams from memory on any GPU (an H200's L2 holds 50 MB) or CPU cache.
BANDWIDTH_PROBE_BYTES = 512 * 2**20


def median_ms(run: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    """Median over ``repeats`` timed calls of ``run``, after two untimed ones."""
    for _ in range(2):
        run()
    clock = Clock(device)
    for _ in range(repeats):
        clock.mark()
        run()
    clock.mark()
    return float(torch.tensor(clock.intervals()).median())


def weight_matrices(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Every weight matrix once: packed projections (not their views), the tied output projection once."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    return [m for m in linears if m.weight.nbytes == m.weight.untyped_storage().nbytes()]


def time_pass(linears: list[torch.nn.Linear], device: torch.device, project, repeats: int = 10) -> float:
    """Milliseconds of one token through ``linears``, each by ``project(x, module)``, timed as a whole pass
    so that the weights stream from memory as in a decode step (one GEMV repeated over one matrix can sit
    in a cache); on CUDA one graph replay, so launches do not count."""
    inputs = [torch.randn(1, m.in_features, dtype=m.weight.dtype, device=device) for m in linears]

    def read_all() -> torch.Tensor:
        return [project(x, m) for m, x in zip(linears, inputs, strict=True)][-1]

    run = read_all
    if device.type == "cuda":
        graphs, _ = capture_graphs({"read": read_all})
        run = graphs["read"].replay
    return median_ms(run, device, repeats)


def read_bytes(module: torch.nn.Linear) -> int:
    """Bytes of this matrix one decoded token reads: its attached four-bit form's (with its low-rank
    correction's), else its weight's."""
    four_bit = module.int4_weight() if hasattr(module, "int4_weight") else None
    if four_bit is None:
        return module.weight.nbytes
    correction = sum(factor.nbytes for factor in four_bit.low_rank or ())
    return four_bit.packed.nbytes + four_bit.scales_zeros.nbytes + correction


def weight_read_floor(model: torch.nn.Module, device: torch.device) -> dict:
    """The bandwidth floor at batch 1: every weight matrix of the model read once, as decoding reads it (four
    bits where a four-bit form is attached, ``read_bytes``), at the memory bandwidth this device reaches in
    a large copy (read plus write bytes over its time). No decode step can beat it.
    Beside it, the time of one token through every matrix as decoding computes it (``fused_linear``: the
    Triton GEMV on a GPU, the Linear module elsewhere)."""
    linears = weight_matrices(model)
    gemv_ms = time_pass(linears, device, lambda x, m: fused_linear(x, m.weight, matmul=m))
    source = torch.empty(BANDWIDTH_PROBE_BYTES, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source), device)
    bandwidth = 2 * BANDWIDTH_PROBE_BYTES / (copy_ms / 1000.0)
    weight_bytes = sum(module.weight.nbytes for module in linears)
    decode_bytes = sum(read_bytes(module) for module in linears)
    floor_ms = decode_bytes / bandwidth * 1000.0
    return {
        "weight_matrices": len(linears),
        "weight_bytes": weight_bytes,
        "read_bytes": decode_bytes,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "floor_ms": floor_ms,
        "tokens_per_s": 1000.0 / floor_ms,
        "gemv_pass_ms": gemv_ms,
    }


def gemv_sweep(model: torch.nn.Module, device: torch.device, configs=None, repeats: int = 10) -> dict:
    """Microseconds per matrix of the Triton GEMV (no prologue or epilogue) with each configuration forced,
    for each weight shape "NxK" of the model: a pass over every matrix of that shape, as ``time_pass``.
    Side by side in one run, so that ``gemv_triton.config_for``'s fixed choice can be checked against
    them. ``configs``: default ``gemv_triton.CONFIGS``. Empty where Triton cannot be imported."""
    kernel = triton_module("lola_chat.kernels.gemv.gemv_triton")
    if kernel is None:
        return {}
    shapes: dict[tuple[int, int], list[torch.nn.Linear]] = {}
    for module in weight_matrices(model):
        shapes.setdefault(tuple(module.weight.shape), []).append(module)
    sweep = {}
    for (n, k), linears in shapes.items():
        row = {}
        for config in configs or kernel.CONFIGS:

            def forced(x: torch.Tensor, module: torch.nn.Linear, config=config) -> torch.Tensor:
                return kernel.fused_linear(x, module.weight, config=config)

            row[config_label(config)] = 1000.0 * time_pass(linears, device, forced, repeats) / len(linears)
        sweep[f"{n}x{k}"] = row
    return sweep


def config_label(config) -> str:
    """A Triton GEMV configuration as "BLOCK_N x BLOCK_K, warps"."""
    return f"{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']}, {config.num_warps} warps"
