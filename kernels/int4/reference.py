"""Weights of four bits in groups along K, as GGUF's Q4_1 stores them (w = scale * code + low, codes 0..15,
one scale and low per group of 32): their recovery from dequantized values and, in PyTorch, the
specification of the matrix product on them (``__init__.int4_linear``).

The default model's checkpoint is a GGUF whose projections are Q4_1, converted to float32 on the first
start; the codes are recovered from those floats exactly (or not at all), so nothing is quantized here.
"""

from __future__ import annotations

import torch

GROUP = 32
CODES = 16
# The packed product takes w = scale * (code - 8) + zero: the codes centred, zero = low + 8 scale.
CENTRE = 8


Recovered = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def recover(weight: torch.Tensor, group: int = GROUP) -> Recovered | None:
    """The Q4_1 form of a float32 weight that is one, else None.

    weight: (N, K) float32 with K a multiple of ``group``. Returns (codes (N, K) uint8 in 0..15,
    scale (N, K / group) and low (N, K / group) float32, each a float16 value as GGUF stores them), such
    that ``scale * codes + low`` (a product then a sum, each rounded to float32, as GGUF's dequantization
    computes) equals ``weight`` exactly. Q4_1 maps each group's smallest value to code 0 and its largest
    to 15, which gives low and scale; any other weight does not reproduce and returns None.
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % group:
        return None
    n, k = weight.shape
    # A weight that is not Q4_1 shows it in its first row, most often: try that before the whole.
    if n > 1 and recover(weight[:1], group) is None:
        return None
    groups = weight.reshape(n, k // group, group)
    low, high = groups.aminmax(dim=-1)
    scale = ((high - low) / (CODES - 1)).to(torch.float16).float()
    # A constant group has scale 0 and codes 0: clamping the divisor keeps its 0 / 0 out.
    codes = ((groups - low[..., None]) / scale[..., None].clamp_min(torch.finfo(torch.float32).tiny)).round_()
    if not bool((codes <= CODES - 1).all()):
        return None
    recovered = codes.to(torch.uint8).reshape(n, k), scale, low
    return recovered if torch.equal(exact(*recovered, group), weight) else None


def exact(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """The float32 weight (N, K) of ``recover``'s (codes, scale, low): ``scale * codes + low`` per group,
    the product and the sum each rounded to float32 (GGUF's dequantization)."""
    n, k = codes.shape
    groups = codes.float().reshape(n, k // group, group)
    return (scale[..., None] * groups + low[..., None]).reshape(n, k)


def scale_zero(scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(scale, zero) per group in the layout the packed product takes: (K / group, N, 2) bfloat16, zero =
    low + 8 scale (the codes centred on 8). Rounding both to bfloat16 is where the packed weight
    departs from the float32 one: by about as much as rounding the weight itself to bfloat16 does."""
    return torch.stack([scale, low + CENTRE * scale], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def dequantize(codes: torch.Tensor, scales_zeros: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """codes (N, K) uint8, scales_zeros (K / group, N, 2) -> the weight (N, K) float32 the packed product
    multiplies by: scale * (code - 8) + zero."""
    scale, zero = scales_zeros.float().transpose(0, 1).unbind(-1)
    centred = (codes.float() - CENTRE).reshape(codes.shape[0], -1, group)
    return (centred * scale[..., None] + zero[..., None]).reshape(codes.shape)


def int4_linear(
    x: torch.Tensor, codes: torch.Tensor, scales_zeros: torch.Tensor, group: int = GROUP
) -> torch.Tensor:
    """x (..., K) -> x @ dequantize(codes, scales_zeros).T (..., N), accumulated in float32 and returned in
    x's dtype."""
    return (x.float() @ dequantize(codes, scales_zeros, group).T).to(x.dtype)
