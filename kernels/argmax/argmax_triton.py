"""The greedy token of a decode step in Triton: the index of the first largest logit of each row in one
kernel launch. PyTorch's way inside the captured step (two reductions, a gather, an add and a copy into
the step's token buffer) launches several kernels, each costing the step a launch's latency; this one
writes the token straight into that buffer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A row is read in unrolled blocks of at least MIN_BLOCK lanes (a shorter row in one block of its own
# size), and in wider ones where a row would take over MAX_BLOCKS, which bounds the unrolled code. In an
# ad-hoc timing on an H200 (a 49152-logit row inside a CUDA graph) unrolled blocks of 2048 lanes were
# faster than the whole row in one block (which spills registers at any number of warps) and than a loop
# the compiler does not unroll, and several times faster than PyTorch's argmax and copy.
MIN_BLOCK = 2048
MAX_BLOCKS = 64
# Values each thread holds of one block: 2 puts a block of 2048 lanes on 1024 threads (32 warps, the most
# one program may have), so that each block is a single load per thread and nothing spills.
LANES_PER_THREAD = 2


@triton.jit
def _argmax_kernel(logits_ptr, out_ptr, stride_row, stride_out, V, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    lanes = tl.arange(0, BLOCK)
    # Padding lanes read -inf: never above a logit, and where a whole row is -inf their columns (V and
    # beyond) lose the tie to every real one.
    best = tl.load(row_ptr + lanes, mask=lanes < V, other=-float("inf")).to(tl.float32)
    best_col = lanes
    # Unrolled, so that the loads of every block are in flight together.
    for block in tl.static_range(1, BLOCKS):
        cols = block * BLOCK + lanes
        values = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        # Strictly greater: on a tie each lane keeps the earlier column it already holds.
        better = values > best
        best = tl.where(better, values, best)
        best_col = tl.where(better, cols, best_col)
    top = tl.max(best, axis=0)
    # The first column holding the maximum, computed explicitly: tl.argmax does not promise the first on
    # ties.
    first = tl.min(tl.where(best == top, best_col, V - 1), axis=0)
    # Held below V so that a row holding NaN, where no lane or only a padding lane may match, still gives
    # a valid token id.
    tl.store(out_ptr + row * stride_out, tl.minimum(first, V - 1).to(tl.int64))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``reference.argmax`` for finite or -inf logits: logits (B, V) float with a unit
    stride in V -> (B,) int64, written into ``out`` when given ((B,) int64 on logits' device) and
    returned."""
    assert logits.dim() == 2, f"logits must be (B, V), got shape {tuple(logits.shape)}"
    assert logits.is_floating_point(), f"logits must be floating point, got {logits.dtype}"
    batch, vocab = logits.shape
    assert vocab >= 1, "logits must have at least one column"
    assert logits.stride(1) == 1 or vocab == 1, "the last dimension of logits must be contiguous"
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    assert out.shape == (batch,), f"out must have shape ({batch},), got {tuple(out.shape)}"
    assert out.dtype == torch.int64, f"out must be int64, got {out.dtype}"
    assert out.device == logits.device, f"out is on {out.device} but logits on {logits.device}"
    if batch == 0:
        return out
    # Blocks of MIN_BLOCK lanes, wider where a row would take more than MAX_BLOCKS of them.
    block = max(MIN_BLOCK, triton.next_power_of_2(triton.cdiv(vocab, MAX_BLOCKS)))
    block = min(block, triton.next_power_of_2(vocab))
    blocks = triton.cdiv(vocab, block)
    warps = min(32, max(1, block // (32 * LANES_PER_THREAD)))
    _argmax_kernel[(batch,)](
        logits, out, logits.stride(0), out.stride(0), vocab, BLOCK=block, BLOCKS=blocks, num_warps=warps
    )
    return out
