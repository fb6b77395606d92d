"""Matrix products on 4-bit grouped weights (GGUF's Q4_1) for decoding on a CPU: a decode step reads
every weight once per token, and on a CPU that read, not the arithmetic, sets its speed, so weights that
the checkpoint holds in four bits are read in four bits (a quarter of bfloat16's bytes). The PyTorch
reference (``reference.py``) is the specification; the fast path is PyTorch's packed int4 product for
CPUs, for one row (with more rows the bfloat16 GEMM is faster, so prefill keeps it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from lola_chat.kernels.dispatch import reference_forced
from lola_chat.kernels.int4 import reference
from lola_chat.kernels.int4.reference import GROUP, exact, recover

__all__ = ["GROUP", "Int4Weight", "available", "exact", "packable", "int4_linear", "recover"]


# PyTorch's CPU packing takes whole tiles of 16 outputs.
TILE_N = 16


def packable(out_features: int, in_features: int, group: int = GROUP) -> bool:
    """Whether an (N, K) weight can be packed: N whole tiles, K whole groups."""
    return out_features % TILE_N == 0 and in_features % group == 0


@functools.cache
def available() -> bool:
    """Whether this PyTorch has the packed int4 product for CPUs and it computes what the reference does:
    checked once on a small weight, so that a build whose op is missing or broken on this machine
    keeps the bf16 path instead of failing mid-conversation."""
    names = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    if not all(hasattr(torch.ops.aten, name) for name in names):
        return False
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (TILE_N, 2 * GROUP), generator=g, dtype=torch.uint8)
    scale, low = torch.rand(TILE_N, 2, generator=g) / 16, -torch.rand(TILE_N, 2, generator=g) / 2
    x = torch.randn(3, 2 * GROUP, generator=g).bfloat16()
    try:
        weight = Int4Weight.pack(codes, scale, low)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight.packed, GROUP, weight.scales_zeros)
    except RuntimeError:
        return False
    expected = reference.int4_linear(x, codes, weight.scales_zeros)
    return bool(torch.allclose(got.float(), expected.float(), rtol=2**-6, atol=2**-6))


@dataclass(frozen=True)
class Int4Weight:
    """An (N, K) weight packed for the CPU product: ``packed`` (N, K / 2) uint8 in PyTorch's layout,
    ``scales_zeros`` (K / group, N, 2) bfloat16 (``reference.scale_zero``). ``low_rank``: (A (R, K),
    B (N, R)) float32, a correction the product adds (x A^T B^T): a LoRA merged into a four-bit base
    weight, kept apart so that the base is still read in four bits."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    group: int
    out_features: int
    in_features: int
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def pack(cls, codes, scale, low, group: int = GROUP, low_rank=None) -> Int4Weight:
        """From ``reference.recover``'s codes (N, K) uint8, scale and low (N, K / group), and an optional
        ``low_rank`` correction; needs ``available()`` and ``packable`` shapes."""
        if not packable(*codes.shape, group):
            raise ValueError(f"cannot pack a {tuple(codes.shape)} weight in groups of {group}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        if low_rank is not None:
            a, b = (factor.float().contiguous() for factor in low_rank)
            assert a.shape[1] == codes.shape[1] and b.shape == (codes.shape[0], a.shape[0]), "low rank shapes"
            low_rank = (a, b)
        return cls(packed, reference.scale_zero(scale, low), group, *codes.shape, low_rank)


def int4_linear(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """x (..., K) bfloat16 on the CPU -> (..., N) bfloat16: x times the packed weight transposed, as
    ``reference.int4_linear`` computes it from the codes (float32 accumulation), plus the weight's
    low-rank correction (in float32, the sum rounded once more). Raises where the reference is forced
    (``dispatch.reference_forced``): callers then multiply by the bfloat16 weight."""
    assert not reference_forced(), "the reference is forced: multiply by the bfloat16 weight instead"
    assert x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[-1] == weight.in_features
    rows = x.reshape(-1, weight.in_features)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.packed, weight.group, weight.scales_zeros)
    if weight.low_rank is not None:
        a, b = weight.low_rank
        out = torch.addmm(out.float(), rows.float() @ a.t(), b.t()).to(out.dtype)
    return out.view(*x.shape[:-1], weight.out_features)
