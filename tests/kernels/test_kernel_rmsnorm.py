"""The Triton RMSNorm against ``kernels/rmsnorm/reference.py``, and which of the two ``rms_norm`` runs."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

from lola_chat.kernels import dispatch, rmsnorm  # noqa: E402
from lola_chat.kernels.rmsnorm import reference, rmsnorm_triton  # noqa: E402
from rounding import DTYPE_IDS, DTYPES, LOW_PRECISION_TOLERANCE, rounds_as_the_reference  # noqa: E402

# fp32: the same operations, in another order.
TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=1e-5), **LOW_PRECISION_TOLERANCE}


def inputs(device, dtype, shape, weight_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 3).to(device, dtype)
    weight = (1 + torch.randn(shape[-1], generator=gen) / 4).to(device, weight_dtype or dtype)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape", [(63, 200), (2, 5, 576), (1, 1, 64), (3, 1)], ids=["63-rows", "batch-time", "decode", "N1"]
)
def test_rms_norm_matches_reference(device, dtype, shape):
    x, weight = inputs(device, dtype, shape)
    expected = reference.rms_norm(x, weight, 1e-5)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    got = rmsnorm_triton.rms_norm(x, weight, 1e-5, out=out)
    assert got is out and got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    rounds_as_the_reference(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_weight_promotes_like_the_reference(device, dtype):
    x, weight = inputs(device, dtype, (9, 96), weight_dtype=torch.float32)
    got, expected = rmsnorm_triton.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)
    assert got.dtype == expected.dtype == torch.float32
    # x / rms is rounded to x's dtype first in both; the product with the weight is exact-ish in fp32.
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_strided_rows_are_read_in_place(device):
    wide, weight = inputs(device, torch.float32, (37, 160))
    x = wide[:, 16:112]
    weight = weight[:96]
    assert not x.is_contiguous()
    torch.testing.assert_close(
        rmsnorm_triton.rms_norm(x, weight, 1e-5),
        reference.rms_norm(x, weight, 1e-5),
        **TOLERANCE[torch.float32],
    )


def cuda_like(dtype=torch.float32, requires_grad=False):
    """What ``dispatch.fast_path`` reads of a tensor, for a CUDA tensor on a machine without one."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, requires_grad=requires_grad)


def test_fast_path_rule(monkeypatch):
    assert dispatch.fast_path(cuda_like(), cuda_like())
    assert not dispatch.fast_path(cuda_like(), torch.zeros(2))
    assert not dispatch.fast_path(cuda_like(torch.float64))
    assert not dispatch.fast_path(cuda_like(requires_grad=True))
    with torch.no_grad():
        assert dispatch.fast_path(cuda_like(requires_grad=True))
    with dispatch.force_reference():
        assert not dispatch.fast_path(cuda_like())
    monkeypatch.setenv(dispatch.REFERENCE_ENV, "1")
    assert not dispatch.fast_path(cuda_like())


def test_cpu_runs_the_reference_and_backpropagates():
    x, weight = inputs("cpu", torch.float32, (4, 32))
    torch.testing.assert_close(
        rmsnorm.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), atol=0, rtol=0
    )
    weight.requires_grad_(True)
    rmsnorm.rms_norm(x, weight, 1e-5).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_dispatch_runs_the_kernel_where_the_rule_allows(monkeypatch, device):
    # Off the GPU, CPU tensors stand in for CUDA ones and the kernel runs in the interpreter.
    calls = []
    monkeypatch.setattr(rmsnorm, "fast_path", lambda *tensors: calls.append(tensors) or True)
    kernel = rmsnorm_triton.rms_norm
    monkeypatch.setattr(rmsnorm_triton, "rms_norm", lambda *args: ("kernel", kernel(*args)))
    x, weight = inputs(device, torch.float32, (3, 5, 48))
    tag, got = rmsnorm.rms_norm(x, weight, 1e-5)
    assert tag == "kernel" and calls[0][0] is x and calls[0][1] is weight
    torch.testing.assert_close(got, reference.rms_norm(x, weight, 1e-5), **TOLERANCE[torch.float32])
    # A feature dimension with a stride the kernel does not take stays on the reference.
    strided = rmsnorm.rms_norm(x.transpose(1, 2), weight[:5], 1e-5)
    assert isinstance(strided, torch.Tensor)  # not the tagged kernel result
