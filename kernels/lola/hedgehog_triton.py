"""Hedgehog feature map in Triton: phi(x) = [softmax(x W), softmax(-x W)] per head, on fp32 data (tile
products to fp32 accuracy, see ``matmul``).

``features`` is the building block the attention and eviction kernels call on tiles they already
hold; ``hedgehog`` is the standalone op with the reference's signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def matmul(a, b, ONE_ROW: tl.constexpr):
    """a (M, K) @ b (K, N) in fp32. tl.dot needs 16 rows; a single row (a decode step) is a broadcast
    product and a sum instead, which does 1/16 of the work and needs no operand layout changes.

    Tiles run on the tensor cores as three TF32 products (the operands split into a TF32 head and tail,
    the tail-by-tail product dropped): fp32 accuracy to about 2^-22, where a plain fp32 ("ieee") product
    is a chain of scalar multiply-adds that leaves the prefill and eviction kernels waiting on it."""
    if ONE_ROW:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def features(x, w, ONE_ROW: tl.constexpr):
    """x: (BLOCK, D) fp32 tile, w: (D, E) fp32 tile -> (softmax(x w), softmax(-x w)), each (BLOCK, E)."""
    z = matmul(x, w, ONE_ROW)
    up = tl.exp(z - tl.max(z, axis=1)[:, None])
    down = tl.exp(tl.min(z, axis=1)[:, None] - z)
    return up / tl.sum(up, axis=1)[:, None], down / tl.sum(down, axis=1)[:, None]


@triton.jit
def load_feature_map(w_ptr, head, D: tl.constexpr, E: tl.constexpr):
    """The (D, E) weight of one head from a contiguous (H, D, E) tensor, as fp32."""
    rows = tl.arange(0, D)
    cols = tl.arange(0, E)
    return tl.load(w_ptr + head * D * E + rows[:, None] * E + cols[None, :]).to(tl.float32)


@triton.jit
def _hedgehog_kernel(
    x_ptr, w_ptr, out_ptr, T, H,
    stride_xb, stride_xh, stride_xt,
    D: tl.constexpr, E: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    batch = pid // H
    head = pid % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    dims = tl.arange(0, D)
    x = tl.load(
        x_ptr + batch * stride_xb + head * stride_xh + t[:, None] * stride_xt + dims[None, :],
        mask=t_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    up, down = features(x, load_feature_map(w_ptr, head, D, E), False)
    cols = tl.arange(0, E)
    out = out_ptr + (pid * T + t[:, None]) * (2 * E) + cols[None, :]
    tl.store(out, up, mask=t_ok[:, None])
    tl.store(out + E, down, mask=t_ok[:, None])


def block_rows(n: int, limit: int = 64) -> int:
    """A power-of-two tile height for n rows: at least 16 (the smallest tl.dot tile), at most ``limit``."""
    return max(16, min(limit, triton.next_power_of_2(max(n, 1))))


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map phi(x) = [softmax(x W), softmax(-x W)], computed in fp32.

    x: (B, H, T, D) any float dtype, last dim contiguous; weight: (H, D, E). D and E powers of two >= 16.
    Returns (B, H, T, 2E) float32, like ``reference.hedgehog``.
    """
    batch, heads, length, dim = x.shape
    expand = weight.shape[-1]
    assert x.stride(-1) == 1, "the feature dimension must be contiguous"
    out = torch.empty(batch, heads, length, 2 * expand, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    block = block_rows(length)
    grid = (batch * heads, triton.cdiv(length, block))
    _hedgehog_kernel[grid](
        x, weight.contiguous(), out, length, heads, x.stride(0), x.stride(1), x.stride(2),
        D=dim, E=expand, BLOCK_T=block,
    )  # fmt: skip
    return out
