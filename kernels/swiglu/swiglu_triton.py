"""SwiGLU's gating in Triton: silu(gate) * up in one kernel (PyTorch launches two), fp32 arithmetic with
PyTorch's roundings (silu to the dtype, then the product). gate and up may be the two halves of one
packed gate/up projection's output: each is read through its own row stride, nothing is copied."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    # torch's silu formula, so that fp32 results agree to the last bit where exp does.
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=ok)


def swiglu(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``reference.swiglu``: gate and up (..., N) of one dtype, each with a unit stride
    in N. Returns a contiguous tensor of their shape and dtype, written into ``out`` when given."""
    n = gate.shape[-1]
    assert gate.shape == up.shape and gate.dtype == up.dtype, "gate and up must have one shape and dtype"
    assert gate.stride(-1) == up.stride(-1) == 1, "the last dimension must be contiguous"
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    assert out.shape == gate.shape and out.dtype == gate.dtype and out.is_contiguous()
    gate_rows, up_rows = gate.reshape(-1, n), up.reshape(-1, n)
    if out.numel() == 0:
        return out
    block = min(triton.next_power_of_2(n), 1024)
    grid = (gate_rows.shape[0], triton.cdiv(n, block))
    _swiglu_kernel[grid](gate_rows, up_rows, out, gate_rows.stride(0), up_rows.stride(0), n, BLOCK=block)
    return out
