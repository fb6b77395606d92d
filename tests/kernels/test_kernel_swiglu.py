"""The Triton SwiGLU gating against ``kernels/swiglu/reference.py`` (``F.silu(gate) * up``), on the two
halves of one packed projection's output and on separate tensors, and which of the two ``swiglu`` runs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lola_chat.kernels import swiglu  # noqa: E402
from lola_chat.kernels.swiglu import reference, swiglu_triton  # noqa: E402
from rounding import DTYPE_IDS, DTYPES, LOW_PRECISION_TOLERANCE, rounds_as_the_reference  # noqa: E402

# fp32: the same operations, in another order.
TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=1e-6), **LOW_PRECISION_TOLERANCE}


def check(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Close, and rounded where the reference rounds: silu to the dtype, then the product."""
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous()
    torch.testing.assert_close(got, expected, **TOLERANCE[got.dtype])
    rounds_as_the_reference(got, expected)


def packed(device, dtype, rows_shape, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*rows_shape, 2 * n, generator=gen) * 4).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "rows_shape,n",
    [((63,), 300), ((2, 5), 1536), ((1, 1), 64), ((4,), 1)],
    ids=["63-rows", "I1536", "decode", "N1"],
)
def test_packed_halves_match_reference(device, dtype, rows_shape, n):
    gate, up = packed(device, dtype, rows_shape, n).chunk(2, dim=-1)
    out = torch.full(gate.shape, float("nan"), dtype=dtype, device=device)
    got = swiglu_triton.swiglu(gate, up, out=out)
    assert got is out
    check(got, reference.swiglu(gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_separate_tensors_match_reference(device, dtype):
    gate, up = packed(device, dtype, (3, 7), 80).chunk(2, dim=-1)
    gate, up = gate.contiguous(), up.contiguous()
    check(swiglu_triton.swiglu(gate, up), reference.swiglu(gate, up))


# The interpreter computes exp with numpy, which warns where it overflows to inf, as the test means it to.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_saturated_gates(device):
    # exp(-gate) overflows to inf for very negative gates (silu -> -0) and vanishes for large ones.
    gate = torch.tensor([[-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0]], device=device)
    up = torch.full_like(gate, 3.0)
    got = swiglu_triton.swiglu(gate, up)
    assert torch.isfinite(got).all()
    check(got, reference.swiglu(gate, up))


def test_cpu_runs_the_reference_and_backpropagates():
    gate, up = packed("cpu", torch.float32, (4,), 16).chunk(2, dim=-1)
    torch.testing.assert_close(swiglu.swiglu(gate, up), reference.swiglu(gate, up), atol=0, rtol=0)
    gate = gate.detach().requires_grad_(True)
    swiglu.swiglu(gate, up).sum().backward()
    assert gate.grad is not None and torch.isfinite(gate.grad).all()


def test_dispatch_runs_the_kernel_where_the_rule_allows(monkeypatch, device):
    # Off the GPU, CPU tensors stand in for CUDA ones and the kernel runs in the interpreter.
    calls = []
    monkeypatch.setattr(swiglu, "fast_path", lambda *tensors: calls.append(tensors) or True)
    kernel = swiglu_triton.swiglu
    monkeypatch.setattr(swiglu_triton, "swiglu", lambda *args: ("kernel", kernel(*args)))
    gate, up = packed(device, torch.float32, (2, 3), 48).chunk(2, dim=-1)
    tag, got = swiglu.swiglu(gate, up)
    assert tag == "kernel" and calls[0][0] is gate and calls[0][1] is up
    check(got, reference.swiglu(gate, up))
    # Shapes that broadcast, or mixed dtypes, stay on the reference.
    assert isinstance(swiglu.swiglu(gate, up[:1]), torch.Tensor)
    assert isinstance(swiglu.swiglu(gate, up.double()), torch.Tensor)
