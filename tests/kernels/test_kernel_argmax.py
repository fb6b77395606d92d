"""The Triton greedy-token kernel against ``kernels/argmax/reference.py`` (``torch.argmax``): awkward
sizes, ties, rows of -inf, the decode step's own token buffer as ``out``, and which of the two
``argmax`` runs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lola_chat.kernels import argmax, dispatch  # noqa: E402
from lola_chat.kernels.argmax import argmax_triton, reference  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
# Past MIN_BLOCK * MAX_BLOCKS columns the launcher widens its blocks instead of unrolling more of them.
WIDE_VOCAB = argmax_triton.MIN_BLOCK * argmax_triton.MAX_BLOCKS + 3


def random_logits(device, dtype, batch, vocab, seed=0):
    """(batch, vocab) logits, spread so that bf16 rounding leaves few ties."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=gen) * 8).to(device, dtype)


def garbage_tokens(device, batch):
    """A (batch,) int64 token buffer holding no valid token, as a stale decode buffer might."""
    return torch.full((batch,), -7, dtype=torch.int64, device=device)


def check(got: torch.Tensor, logits: torch.Tensor) -> None:
    expected = reference.argmax(logits)
    assert got.shape == expected.shape and got.dtype == torch.int64
    assert torch.equal(got.cpu(), expected.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [1, 3], ids=["B1", "B3"])
@pytest.mark.parametrize("vocab", [1, 63, 2049, 49152], ids=["V1", "V63", "V2049", "V49152"])
def test_matches_reference_into_out(device, dtype, batch, vocab):
    logits = random_logits(device, dtype, batch, vocab)
    out = garbage_tokens(device, batch)
    got = argmax_triton.argmax(logits, out=out)
    assert got is out
    check(got, logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_wide_vocabulary(device, dtype):
    logits = random_logits(device, dtype, 1, WIDE_VOCAB, seed=1)
    check(argmax_triton.argmax(logits), logits)


@pytest.mark.parametrize("vocab", [63, 49152], ids=["V63", "V49152"])
def test_ties_give_the_first(device, vocab):
    # Equal maxima within one block and, for the long row, across blocks: in another lane (3000 is lane
    # 952 of block 1, 5000 lane 904 of block 2) and in the same lane (5000 and 7048).
    logits = random_logits(device, torch.float32, 3, vocab, seed=2)
    columns = [5, 40, 62] if vocab == 63 else [3000, 5000, 5000 + 2048, 49151]
    logits[0, columns] = 100.0
    logits[1, columns[1:]] = 100.0
    logits[2] = 1.5
    got = argmax_triton.argmax(logits)
    assert got.tolist() == [columns[0], columns[1], 0]
    check(got, logits)


@pytest.mark.parametrize("vocab", [63, 49152], ids=["V63", "V49152"])
def test_all_minus_inf_but_one(device, vocab):
    logits = torch.full((3, vocab), float("-inf"), device=device)
    logits[0, vocab - 1] = -1e30
    logits[1, vocab // 2] = 0.0
    out = garbage_tokens(device, 3)
    got = argmax_triton.argmax(logits, out=out)
    # A row of -inf alone: every column ties, so the first.
    assert got.tolist() == [vocab - 1, vocab // 2, 0]
    check(got, logits)


def test_rows_with_a_stride(device):
    # The last position's logits of (B, T, V), a view whose rows lie T * V apart.
    logits = random_logits(device, torch.float32, 2 * 3, 300, seed=3).view(2, 3, 300)[:, -1]
    check(argmax_triton.argmax(logits), logits)


# The interpreter's numpy warns where NaN meets the comparisons, as the test means it to.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("vocab", [63, 49152], ids=["V63", "V49152"])
def test_nan_rows_give_a_valid_token(device, vocab):
    logits = random_logits(device, torch.float32, 3, vocab, seed=4)
    logits[0, 7] = float("nan")
    logits[1] = float("nan")
    logits[2, vocab - 1] = float("nan")
    got = argmax_triton.argmax(logits)
    assert ((got >= 0) & (got < vocab)).all()


def test_bad_arguments_are_refused(device):
    logits = random_logits(device, torch.float32, 2, 64)
    with pytest.raises(AssertionError, match="contiguous"):
        argmax_triton.argmax(logits.t())
    with pytest.raises(AssertionError, match="int64"):
        argmax_triton.argmax(logits, out=torch.empty(2, dtype=torch.int32, device=device))
    with pytest.raises(AssertionError, match="shape"):
        argmax_triton.argmax(logits, out=torch.empty(3, dtype=torch.int64, device=device))


def test_cpu_runs_the_reference(monkeypatch):
    monkeypatch.setattr(argmax_triton, "argmax", lambda *args, **kwargs: pytest.fail("kernel ran on CPU"))
    logits = random_logits("cpu", torch.float32, 3, 63)
    check(argmax.argmax(logits), logits)
    out = garbage_tokens("cpu", 3)
    assert argmax.argmax(logits, out=out) is out
    check(out, logits)


def test_dispatch_runs_the_kernel_where_the_rule_allows(monkeypatch, device):
    # Off the GPU, CPU tensors stand in for CUDA ones and the kernel runs in the interpreter; the stand-in
    # rule still honours force_reference.
    monkeypatch.setattr(argmax, "fast_path", lambda *tensors: not dispatch.reference_forced())
    calls = []
    kernel = argmax_triton.argmax
    monkeypatch.setattr(
        argmax_triton, "argmax", lambda *args, **kwargs: calls.append(args) or kernel(*args, **kwargs)
    )
    logits = random_logits(device, torch.float32, 3, 63)
    out = garbage_tokens(device, 3)
    assert argmax.argmax(logits, out=out) is out
    assert len(calls) == 1 and calls[0][0] is logits
    check(out, logits)
    with dispatch.force_reference():
        out = garbage_tokens(device, 3)
        assert argmax.argmax(logits, out=out) is out
    assert len(calls) == 1
    check(out, logits)
    # Rows whose columns are not contiguous stay on the reference.
    check(argmax.argmax(logits.t().contiguous().t()), logits)
    assert len(calls) == 1
