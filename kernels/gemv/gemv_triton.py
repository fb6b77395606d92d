"""A linear layer for a few rows (decoding) in one Triton kernel, with the ops around it fused in: an
RMSNorm or the SwiGLU gating of x as the prologue, a residual add as the epilogue. Each program computes
BLOCK_N outputs of one row in one pass over K, dotting (BLOCK_N, BLOCK_K) weight tiles with the
transformed x tile in fp32. Every weight is read once per row, and the normed or gated x never goes to
memory. The output is a new tensor: nothing is written in place."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from lola_chat.kernels.dispatch import launch_options

# The configurations ``lola-chat bench`` times side by side per weight shape (``floor.gemv_sweep_us``), from
# which ``config_for`` is read. The default model's projections have N = 576 (o, down), 960 (qkv), 3072
# (gate_up) and 49152 (lm_head), K = 576 or 1536; an H200 has 132 SMs. A BLOCK_K of at least K reads a
# whole weight tile in one go (one memory round trip per program); short BLOCK_K bounds the registers of
# tall tiles.
CONFIGS = [
    triton.Config({"BLOCK_N": 2, "BLOCK_K": 1024}, num_warps=4),
    triton.Config({"BLOCK_N": 2, "BLOCK_K": 2048}, num_warps=8),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=4),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=2),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 1024}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 1024}, num_warps=8),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 2048}, num_warps=8),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 256}, num_warps=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8),
]
# Outputs past which a matrix has programs to spare even with taller tiles (an output projection).
WIDE_N = 16384


@functools.cache
def config_for(n: int, k: int) -> triton.Config:
    """The tiling for an (n, k) weight, a fixed rule rather than an autotuner (whose choice rests on one
    timing and changed between processes, and which stalls the first decoded token). In the H200 sweep
    of the default model's decode shapes (docs/results/bench-h200-pdl.json) four rows per program with
    the whole K in one tile was fastest for every shape but the output projection's, which wants 8 rows
    and 1024-wide tiles; 8 warps for the 2048-wide tiles (K = 1536)."""
    if n >= WIDE_N:
        return triton.Config({"BLOCK_N": 8, "BLOCK_K": 1024}, num_warps=4)
    block_k = min(max(triton.next_power_of_2(k), 16), 2048)
    return triton.Config({"BLOCK_N": 4, "BLOCK_K": block_k}, num_warps=4 if block_k <= 1024 else 8)


@triton.jit
def _fused_linear_kernel(
    x_ptr, w_ptr, norm_ptr, res_ptr, out_ptr, stride_x, stride_w, stride_res, N, eps, K: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # K is a compile-time constant: a layer's K never changes, the loops over it get a static trip count
    # (and Triton's interpreter cannot loop to a runtime bound).
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(1).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    x_row = x_ptr + row * stride_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    # The weight tile of the next K block is loaded one iteration ahead, and the first before waiting on
    # the kernel that writes x: weights never change during decoding, so their memory round trip
    # overlaps that kernel's end.
    k_next = tl.arange(0, BLOCK_K)
    w_next = tl.load(w_rows + k_next[None, :], mask=col_ok[:, None] & (k_next < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if RESIDUAL:
        residual = tl.load(res_ptr + row * stride_res + cols, mask=col_ok, other=0.0).to(tl.float32)
    # One pass over K, with no load waiting on another: a decode GEMV is bound by memory latency, not
    # bandwidth. The RMSNorm's 1/rms is a per-row scalar, so it multiplies the finished dot product
    # (sum w x g / rms) instead of x, and its sum of squares accumulates in the same pass; the normalized
    # x is then not rounded to the dtype before the norm weight multiplies it, as the reference does.
    squares = tl.zeros((BLOCK_K,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = w_next
        k_next = k + BLOCK_K
        w_next = tl.load(w_rows + k_next[None, :], mask=col_ok[:, None] & (k_next < K)[None, :], other=0.0)
        # Masked lanes load 0, and every prologue maps 0 to 0, so they add nothing.
        xk = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(x_row + K + k, mask=k_ok, other=0.0).to(tl.float32)
            # torch's silu formula and roundings: silu to the dtype, then the product.
            silu = (xk / (1.0 + tl.exp(-xk))).to(dtype).to(tl.float32)
            xk = (silu * up).to(dtype).to(tl.float32)
        if NORM:
            squares += xk * xk
            xk = xk * tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * xk[None, :]
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    y = y.to(dtype)
    if RESIDUAL:
        y = (residual + y.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    config: triton.Config | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.fused_linear``: x (..., K), or (..., 2K) = [gate | up] with ``gated``;
    weight (N, K); norm_weight (K,) (not with ``gated``); residual (..., N); all of one dtype with a unit
    stride in the last dim. Returns a new contiguous (..., N) tensor of that dtype, or of ``out_dtype``
    (the result rounded to x's dtype first, as the reference converts it). ``config`` (one of
    ``CONFIGS``, say) launches with that tiling instead of ``config_for``'s."""
    n, k = weight.shape
    assert norm_weight is None or not gated, "an RMSNorm and a SwiGLU prologue at once are not supported"
    assert x.shape[-1] == (2 * k if gated else k), "x (..., K), or (..., 2K) when gated"
    tensors = [t for t in (x, weight, norm_weight, residual) if t is not None]
    assert all(t.dtype == x.dtype and t.stride(-1) == 1 for t in tensors), "one dtype, unit last stride"
    assert norm_weight is None or norm_weight.shape == (k,)
    out = torch.empty(*x.shape[:-1], n, dtype=out_dtype or x.dtype, device=x.device)
    assert residual is None or residual.shape == out.shape, "residual (..., N)"
    rows = x.reshape(-1, x.shape[-1])
    residual_rows = residual.reshape(-1, n) if residual is not None else out.view(-1, n)
    if out.numel() == 0:
        return out
    args = (
        rows, weight, norm_weight if norm_weight is not None else weight, residual_rows, out,
        rows.stride(0), weight.stride(0), residual_rows.stride(0), n, eps, k,
    )  # fmt: skip
    flags = dict(NORM=norm_weight is not None, GATED=gated, RESIDUAL=residual is not None)
    flags |= launch_options(x)
    config = config or config_for(n, k)
    grid = (triton.cdiv(n, config.kwargs["BLOCK_N"]), rows.shape[0])
    _fused_linear_kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps)
    return out
