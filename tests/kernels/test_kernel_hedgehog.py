"""The Triton Hedgehog feature map against ``reference.hedgehog``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lola_chat.kernels.lola import hedgehog_triton, reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length,dim,expand", [(37, 16, 16), (1, 32, 16), (80, 16, 32)])
def test_hedgehog_matches_reference(device, dtype, length, dim, expand):
    gen = torch.Generator().manual_seed(length)
    heads = 3
    # A transposed view, as the model's projections produce it.
    x = torch.randn(2, length, heads, dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    weight = (torch.randn(heads, dim, expand, generator=gen) * dim**-0.5).to(device=device, dtype=dtype)
    got = hedgehog_triton.hedgehog(x, weight)
    expected = reference.hedgehog(x, weight)
    assert got.dtype == torch.float32 and got.shape == (2, heads, length, 2 * expand)
    # Both compute in fp32 from the same inputs; only the order of summation differs.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
