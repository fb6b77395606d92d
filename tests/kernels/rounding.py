"""What the elementwise kernel tests (RMSNorm, SwiGLU) share: the dtypes, a tolerance of about one ulp
of the output dtype, and the check that the kernel rounds at the reference's steps."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# One ulp of fp16; two of bf16, whose interpreter rounding differs (see rounds_as_the_reference).
LOW_PRECISION_TOLERANCE = {
    torch.float16: dict(atol=1e-3, rtol=2**-10),
    torch.bfloat16: dict(atol=1e-2, rtol=2**-6),
}


def rounds_as_the_reference(got: torch.Tensor, expected: torch.Tensor) -> None:
    """In fp16 and bf16 kernel and reference round the fp32 results at the same steps, so nearly every
    element is bit-equal; a kernel that rounded once at the end would differ in about a quarter of them.
    Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest, so bf16 off a GPU is held
    to the tolerance only."""
    if got.dtype == torch.float16 or (got.dtype == torch.bfloat16 and got.is_cuda):
        assert (got == expected).float().mean() > 0.99
