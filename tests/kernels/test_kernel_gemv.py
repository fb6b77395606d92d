"""The Triton fused GEMV against ``kernels/gemv/reference.py`` (RMSNorm or SwiGLU prologue, residual
epilogue, each combination), and which of the two ``fused_linear`` runs."""

from __future__ import annotations

import pytest
import torch
import triton
from lola_chat.kernels import gemv
from lola_chat.kernels.gemv import gemv_triton, reference
from lola_chat.kernels.rmsnorm import reference as rmsnorm_reference

# Tiles smaller than the test shapes, so that K spans several tiles and N several programs, both with a
# ragged end.
SMALL_TILES = triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)
# fp32: the same products summed in another order. bf16: the interpreter truncates where a GPU rounds
# (see rounding.py), at each of the prologue's roundings; a few ulps of the output.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
PROLOGUES = ["none", "norm", "gated"]


def padded(values: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
    """``values`` as a view into a NaN-filled buffer with ``cols`` more columns and ``rows`` more rows: a
    kernel whose masks let a lane read past the view picks up a NaN."""
    pad = (0, cols, 0, rows) if rows else (0, cols)
    buffer = torch.nn.functional.pad(values, pad, value=float("nan"))
    return buffer[tuple(slice(0, size) for size in values.shape)]


def operands(device, dtype, rows_shape, n, k, prologue, residual, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = 2 * k if prologue == "gated" else k
    args = {
        "x": padded((torch.randn(*rows_shape, width, generator=gen) * 2).to(device, dtype), cols=5),
        "weight": padded((torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype), rows=3, cols=7),
    }
    if prologue == "norm":
        args["norm_weight"] = padded((1 + torch.randn(k, generator=gen) / 4).to(device, dtype), cols=3)
        args["eps"] = 1e-5
    args["gated"] = prologue == "gated"
    if residual:
        args["residual"] = padded(torch.randn(*rows_shape, n, generator=gen).to(device, dtype), cols=2)
    return args


def check(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous()
    assert not got.isnan().any(), "a masked lane read past its tensor"
    torch.testing.assert_close(got, expected, **TOLERANCE[got.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize(
    "rows_shape,n,k", [((1,), 63, 200), ((2, 1), 100, 63), ((3,), 5, 130)], ids=["N63-K200", "N100-K63", "N5"]
)
def test_kernel_matches_reference(device, dtype, residual, prologue, rows_shape, n, k):
    args = operands(device, dtype, rows_shape, n, k, prologue, residual)
    expected = reference.fused_linear(**args)
    check(gemv_triton.fused_linear(**args, config=SMALL_TILES), expected)
    if residual:
        torch.testing.assert_close(
            args["residual"], operands(device, dtype, rows_shape, n, k, prologue, True)["residual"]
        )


@pytest.mark.parametrize(
    "config",
    gemv_triton.CONFIGS,
    ids=lambda c: f"N{c.kwargs['BLOCK_N']}-K{c.kwargs['BLOCK_K']}-w{c.num_warps}",
)
def test_every_configuration_matches_reference(device, config):
    args = operands(device, torch.float32, (2,), 150, 300, "norm", residual=True)
    check(gemv_triton.fused_linear(**args, config=config), reference.fused_linear(**args))


def test_the_default_tiling_matches_reference(device):
    args = operands(device, torch.float32, (1, 1), 40, 24, "gated", residual=True)
    check(gemv_triton.fused_linear(**args), reference.fused_linear(**args))


@pytest.mark.parametrize("n,k", [(576, 576), (960, 576), (576, 1536), (3072, 576), (49152, 576), (8, 5000)])
def test_the_tiling_rule_covers_k_in_one_tile_up_to_2048(n, k):
    config = gemv_triton.config_for(n, k)
    assert config.kwargs["BLOCK_K"] >= min(k, 2048)
    # Every tiling the rule picks for real shapes is one the bench's sweep times.
    assert config in gemv_triton.CONFIGS
    # Tall tiles only where the matrix has programs to spare.
    assert config.kwargs["BLOCK_N"] == (8 if n >= gemv_triton.WIDE_N else 4)


def test_cpu_runs_the_reference_and_backpropagates():
    args = operands("cpu", torch.float32, (2,), 12, 8, "norm", residual=True)
    torch.testing.assert_close(gemv.fused_linear(**args), reference.fused_linear(**args), atol=0, rtol=0)
    weight = args["weight"].clone().requires_grad_(True)
    gemv.fused_linear(**{**args, "weight": weight}).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_the_unfused_path_multiplies_with_matmul():
    linear = torch.nn.Linear(8, 12, bias=False)
    seen = []
    linear.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0]))
    args = operands("cpu", torch.float32, (2, 3), 12, 8, "norm", residual=True)
    args["weight"] = linear.weight.detach()
    with torch.no_grad():
        got = gemv.fused_linear(**args, matmul=linear)
    assert len(seen) == 1
    torch.testing.assert_close(
        seen[0], rmsnorm_reference.rms_norm(args["x"], args["norm_weight"], 1e-5), atol=0, rtol=0
    )
    torch.testing.assert_close(got, reference.fused_linear(**args), atol=0, rtol=0)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Lets CPU tensors stand in for CUDA ones (the kernel runs in the interpreter, with SMALL_TILES).
    Returns the list it fills with ("fast_path", tensors given) and ("kernel", arguments) as they happen."""
    calls = []
    monkeypatch.setattr(gemv, "fast_path", lambda *tensors: calls.append(("fast_path", tensors)) or True)
    kernel = gemv_triton.fused_linear

    def tagged(*args, **kwargs):
        calls.append(("kernel", args))
        return kernel(*args, **kwargs, config=SMALL_TILES)

    monkeypatch.setattr(gemv_triton, "fused_linear", tagged)
    return calls


@pytest.mark.parametrize("prologue", PROLOGUES)
def test_dispatch_runs_the_kernel_for_a_few_rows(device, kernel_calls, prologue):
    args = operands(device, torch.float32, (gemv.MAX_FUSED_ROWS, 1), 33, 40, prologue, residual=True)
    unused = lambda x: pytest.fail("matmul ran on the fused path")  # noqa: E731
    got = gemv.fused_linear(**args, matmul=unused)
    (_, given), (kind, _) = kernel_calls
    assert kind == "kernel" and given[0] is args["x"] and given[1] is args["weight"]
    assert any(t is args["residual"] for t in given)
    check(got, reference.fused_linear(**args))


@pytest.mark.parametrize("case", ["many-rows", "dtypes-differ", "strided-x", "strided-weight"])
def test_dispatch_composes_the_ops_elsewhere(kernel_calls, case):
    rows = gemv.MAX_FUSED_ROWS + 1 if case == "many-rows" else 1
    args = operands("cpu", torch.float32, (rows,), 12, 8, "norm", residual=True)
    if case == "dtypes-differ":
        args["residual"] = args["residual"].double()
    elif case == "strided-x":
        args["x"] = args["x"].repeat_interleave(2, dim=-1)[..., ::2]
    elif case == "strided-weight":
        args["weight"] = args["weight"].t().contiguous().t()
    used = []
    matmul = lambda x: used.append(x) or torch.nn.functional.linear(x, args["weight"])  # noqa: E731
    got = gemv.fused_linear(**args, matmul=matmul)
    assert len(used) == 1 and all(kind != "kernel" for kind, _ in kernel_calls)
    torch.testing.assert_close(got, reference.fused_linear(**args), atol=0, rtol=0)


def test_both_prologues_at_once_are_refused():
    args = operands("cpu", torch.float32, (1,), 4, 4, "norm", residual=False)
    with pytest.raises(AssertionError, match="at once"):
        gemv.fused_linear(**{**args, "x": torch.randn(1, 8), "gated": True})


@pytest.mark.parametrize("prologue", ["norm", "gated"])
def test_fp32_output_is_the_rounded_result_converted(device, prologue):
    # The logits of a bf16 model: rounded to bf16 as the reference rounds, then stored as fp32.
    args = operands(device, torch.bfloat16, (1,), 63, 200, prologue, residual=False)
    got = gemv_triton.fused_linear(**args, out_dtype=torch.float32, config=SMALL_TILES)
    expected = reference.fused_linear(**args, out_dtype=torch.float32)
    assert got.dtype == expected.dtype == torch.float32 and not got.isnan().any()
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.bfloat16])
    assert torch.equal(got, got.bfloat16().float()), "not rounded to x's dtype first"
