"""A linear layer for a few rows (decoding) in one Triton kernel, with the ops around it fused in: an
RMSNorm or the SwiGLU gating of x as the prologue, a residual add as the epilogue. Each program computes
BLOCK_N outputs of one row in one pass over K, dotting (BLOCK_N, BLOCK_K) weight tiles with the
transformed x tile in fp32. Every weight is read once
per row, and the normed or gated x never goes to memory. The output is a new tensor: nothing is written in
place, so the autotuner may run the kernel as often as it likes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing
from lola_chat.kernels.dispatch import launch_options

# Nobody tunes this on the GPU here, so the list is short and each entry has a reason. The projections of
# the default model have N = 576 (o, down), 960 (qkv), 3072 (gate_up) and 49152 (lm_head) and K = 576 or
# 1536; an H200 has 132 SMs, and a GEMV wants at least one program per SM: BLOCK_N 4 gives N = 576 144
# programs, 8 gives N = 960 120 and 16 gives N = 3072 192; lm_head has programs to spare and wants longer
# tiles per program. A BLOCK_K of at least K reads the whole weight tile in one go (one memory round trip
# per program); the shorter ones bound the registers of the larger tiles.
CONFIGS = [
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=4),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 1024}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 1024}, num_warps=8),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 2048}, num_warps=8),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 256}, num_warps=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8),
]


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
    dtype = out_ptr.dtype.element_ty
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
    tl.store(out_ptr + row * N + cols, y, mask=col_ok)


def _benchmark(call, quantiles):
    """Times a configuration with fewer repetitions than Triton's default (25 ms warm-up, 100 ms runs): a
    GEMV takes microseconds, and each projection shape is tuned on the first decoded token."""
    return triton.testing.do_bench(call, warmup=5, rep=20, quantiles=quantiles)


_tuned_kernel = triton.autotune(configs=CONFIGS, key=["N", "K"], do_bench=_benchmark)(_fused_linear_kernel)


def tuned_configs() -> dict[str, str]:
    """The configuration the autotuner chose for each shape tuned so far in this process (its key, which
    starts with N and K, to the config), for benchmarks to record: the choice rests on a timing and can
    differ between processes."""
    return {str(key): str(config) for key, config in _tuned_kernel.cache.items()}


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.fused_linear``: x (..., K), or (..., 2K) = [gate | up] with ``gated``;
    weight (N, K); norm_weight (K,) (not with ``gated``); residual (..., N); all of one dtype with a unit
    stride in the last dim. Returns a new contiguous (..., N) tensor of that dtype. ``config`` (one of
    ``CONFIGS``, say) launches with that tiling instead of the autotuned one."""
    n, k = weight.shape
    assert norm_weight is None or not gated, "an RMSNorm and a SwiGLU prologue at once are not supported"
    assert x.shape[-1] == (2 * k if gated else k), "x (..., K), or (..., 2K) when gated"
    tensors = [t for t in (x, weight, norm_weight, residual) if t is not None]
    assert all(t.dtype == x.dtype and t.stride(-1) == 1 for t in tensors), "one dtype, unit last stride"
    assert norm_weight is None or norm_weight.shape == (k,)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
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
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), rows.shape[0])  # noqa: E731
        _tuned_kernel[grid](*args, **flags)
    else:
        grid = (triton.cdiv(n, config.kwargs["BLOCK_N"]), rows.shape[0])
        _fused_linear_kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps)
    return out
