"""The four-bit CPU product against its reference, and the recovery of Q4_1 weights from their floats."""

from __future__ import annotations

import pytest
import torch
from lola_chat.kernels import int4
from lola_chat.kernels.dispatch import force_reference
from lola_chat.kernels.int4 import reference

needs_op = pytest.mark.skipif(not int4.available(), reason="this PyTorch lacks the packed int4 CPU product")


def q4_1(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and low as a Q4_1 quantizer leaves them: each group's extremes at codes 0 and 15,
    float16 scales and lows."""
    g = torch.Generator().manual_seed(seed)
    groups = k // int4.GROUP
    codes = torch.randint(0, 16, (n, groups, int4.GROUP), generator=g, dtype=torch.uint8)
    codes[..., 3], codes[..., 17] = 0, 15
    scale = (0.01 * torch.rand(n, groups, generator=g)).half().float()
    low = (-0.1 * torch.rand(n, groups, generator=g)).half().float()
    return codes.view(n, k), scale, low


@pytest.mark.parametrize(("n", "k"), [(63, 96), (8, 32), (200, 576)])
def test_recover_returns_the_q4_1_form(n, k):
    codes, scale, low = q4_1(n, k)
    weight = int4.exact(codes, scale, low)
    got = int4.recover(weight)
    assert got is not None
    assert torch.equal(got[0], codes) and torch.equal(got[1], scale) and torch.equal(got[2], low)


def test_a_constant_group_recovers_with_scale_zero():
    codes, scale, low = q4_1(4, 64)
    codes[1, :32], scale[1, 0] = 0, 0.0
    got = int4.recover(int4.exact(codes, scale, low))
    assert got is not None and torch.equal(got[0], codes) and got[1][1, 0] == 0


def test_weights_that_are_not_q4_1_are_refused():
    codes, scale, low = q4_1(16, 64)
    weight = int4.exact(codes, scale, low)
    nudged = weight.clone()
    nudged[5, 7] = torch.nextafter(nudged[5, 7], torch.tensor(1.0))
    assert int4.recover(nudged) is None
    assert int4.recover(torch.randn(16, 64) * 0.02) is None
    assert int4.recover(weight.bfloat16()) is None, "bf16 values have lost the grid"
    assert int4.recover(weight[:, :48]) is None, "K is not a whole number of groups"
    assert int4.recover(weight[0]) is None


def test_the_packed_weight_departs_from_the_exact_one_by_bf16_rounding_only():
    codes, scale, low = q4_1(64, 128)
    exact = int4.exact(codes, scale, low)
    packed = reference.dequantize(codes, reference.scale_zero(scale, low))
    # scale and zero are rounded to bf16: at most half an ulp of each, the scale's times |code - 8| <= 8.
    bound = (8 * scale.abs() + (low + 8 * scale).abs()) * 2.0**-8
    assert ((packed - exact).abs().view(64, 4, 32) <= bound[..., None] * 1.0001).all()
    assert (packed - exact).abs().max() > 0, "the bound above is not vacuous: bf16 scales do round"


@needs_op
@pytest.mark.parametrize(("n", "k"), [(48, 96), (576, 1536), (16, 32)])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 1)])
def test_packed_product_matches_the_reference(n, k, rows):
    codes, scale, low = q4_1(n, k, seed=n + k)
    weight = int4.Int4Weight.pack(codes, scale, low)
    x = torch.randn(*rows, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = int4.int4_linear(x, weight)
    expected = reference.int4_linear(x, codes, weight.scales_zeros)
    assert got.shape == (*rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-3)


@needs_op
@pytest.mark.parametrize("rows", [(1,), (2, 3)])
def test_the_packed_product_adds_its_low_rank_correction(rows):
    n, k, rank = 48, 96, 5
    codes, scale, low = q4_1(n, k, seed=3)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(rank, k, generator=g) * 0.1, torch.randn(n, rank, generator=g) * 0.1
    corrected = int4.Int4Weight.pack(codes, scale, low, low_rank=(a, b))
    x = torch.randn(*rows, k, generator=g).bfloat16()
    got = int4.int4_linear(x, corrected)
    plain = reference.int4_linear(x, codes, corrected.scales_zeros).float()
    expected = plain + x.float() @ (b @ a).t()
    assert got.shape == (*rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=1e-3)
    assert (got.float() - plain).abs().max() > 0.05, "the correction is not vacuous at this tolerance"


@needs_op
def test_the_packed_product_is_refused_where_the_reference_is_forced():
    weight = int4.Int4Weight.pack(*q4_1(16, 32))
    with force_reference(), pytest.raises(AssertionError, match="reference is forced"):
        int4.int4_linear(torch.randn(1, 32).bfloat16(), weight)


@needs_op
def test_shapes_the_cpu_packing_cannot_take_are_refused_in_one_line():
    assert not int4.packable(63, 96) and not int4.packable(64, 48) and int4.packable(64, 96)
    with pytest.raises(ValueError, match=r"cannot pack a \(63, 96\) weight"):
        int4.Int4Weight.pack(*q4_1(63, 96))


@needs_op
def test_an_op_that_fails_or_computes_wrongly_on_this_machine_is_not_used(monkeypatch):
    def broken(*args):
        raise RuntimeError("not on this CPU")

    def wrong(x, packed, group, scales_zeros):
        return torch.zeros(x.shape[0], scales_zeros.shape[1], dtype=x.dtype)

    for fake in (broken, wrong):
        monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", fake)
        assert not int4.available.__wrapped__()
    monkeypatch.undo()
    assert int4.available.__wrapped__()
