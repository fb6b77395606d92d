"""The linear layers of the model: ``Linear`` (nn.Linear with the CPU paths measured fastest for bf16
inference, and a four-bit weight for single rows), several projections stacked into one GEMM
(``stacked_linear``), a projection with the ops around it fused (``fused``), and how a LoRA is merged
into a weight (``lora_merged``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lola_chat.kernels import int4
from lola_chat.kernels.dispatch import reference_forced
from lola_chat.kernels.gemv import fused_linear
from lola_chat.kernels.lola.reference import accumulator

if TYPE_CHECKING:
    from lola_chat.model import RMSNorm


def lora_merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """weight + scale * B @ A, computed in fp32 or wider, in weight's dtype: how a linearization's LoRA
    is merged (``linearization.merge_lora``)."""
    acc = accumulator(weight.dtype)
    return (weight.to(acc) + scale * (b.to(weight.device, acc) @ a.to(weight.device, acc))).to(weight.dtype)


def with_low_rank(
    base: torch.Tensor, rows: list[int], merged: list
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``base`` (N, K), the stacked parts' weights (``rows`` each), with each part's merged LoRA
    ((A, B, scale) or None) added as ``load_linearization`` adds it; and the LoRAs as one low-rank
    correction (A stacked (R, K), B (N, R) block-diagonal with the scales folded in) for
    ``int4.Int4Weight``."""
    weights, a_parts, b_parts = [], [], []
    for part, low_rank in zip(base.split(rows), merged, strict=True):
        if low_rank is None:
            weights.append(part)
            b_parts.append(torch.zeros(part.shape[0], 0))
        else:
            a, b, scale = low_rank
            weights.append(lora_merged(part, a, b, scale))
            a_parts.append(a.float())
            b_parts.append(scale * b.float())
    return torch.cat(weights), (torch.cat(a_parts), torch.block_diag(*b_parts))


class Linear(nn.Linear):
    """nn.Linear with the fastest CPU path measured for bf16 inference (no autograd, no bias), each
    accumulating in fp32 as ``F.linear`` does. Rows multiply with a copy of the weight laid out once for
    oneDNN, as ``F.linear`` re-lays the weight out on every call; that product also reads a single row's
    weight (decoding) faster than ``torch.mv`` (docs/results/bench-cpu-packed-row). The copy is
    made on the first call and remade whenever the weight tensor changes; an inference tensor, whose
    changes cannot be seen, keeps no copy, so one row then is ``torch.mv`` rather than a fresh layout
    per token. A layer given its weight in four bits (``attach_int4``) multiplies one row by that
    instead, a quarter of the bytes to read, for as long as the weight is unchanged."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self._packed = Derived()
        self._int4: tuple | None = None  # (the weight tensor, its version, its Int4Weight)
        # (A, B, scale) of a LoRA merged into the weight (``load_linearization``): what a four-bit form of
        # the base weight adds apart (``Transformer.attach_int4``).
        self.merged_low_rank: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def attach_int4(self, weight: int4.Int4Weight) -> bool:
        """Multiply single bf16 rows on the CPU by ``weight``, the same weight in four bits, until this
        layer's weight changes (replaced or written in place). Not for an inference tensor, whose changes
        cannot be seen. Returns whether it was attached."""
        if self.weight.is_inference() or (weight.out_features, weight.in_features) != self.weight.shape:
            return False
        self._int4 = (self.weight, self.weight._version, weight)
        return True

    def int4_weight(self) -> int4.Int4Weight | None:
        """The attached four-bit weight while it still matches this layer's weight, else None."""
        kept = self._int4
        if kept is not None and (kept[0] is not self.weight or kept[1] != self.weight._version):
            self._int4 = kept = None
        return None if kept is None else kept[2]

    def _bf16_cpu_inference(self, x: torch.Tensor) -> bool:
        weight = self.weight
        return (
            x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.bfloat16
            and self.bias is None
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        )

    def packed_weight(self) -> torch.Tensor:
        return self._packed.get(self.weight, _reorder_for_onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._bf16_cpu_inference(x):
            return super().forward(x)
        if x.numel() == x.shape[-1]:
            weight = self.int4_weight()
            if weight is not None and not reference_forced():
                return int4.int4_linear(x, weight)
            if self.weight.is_inference() or not packed_linear_available():
                return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
        if packed_linear_available():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), None, "none", [], "")
        return super().forward(x)


class Derived:
    """A value computed from one tensor, kept until that tensor may have changed: it is replaced, or its
    storage or version counter moves (an in-place write, a load). An inference tensor has no version
    counter, so nothing computed from it is kept."""

    def __init__(self):
        self._kept: tuple | None = None  # (tensor, its storage and version, the value)

    def get(self, tensor: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        stamp = None if tensor.is_inference() else (tensor.data_ptr(), tensor._version)
        kept = self._kept
        if stamp is not None and kept is not None and kept[0] is tensor and kept[1] == stamp:
            return kept[2]
        value = compute(tensor)
        self._kept = None if stamp is None else (tensor, stamp, value)
        return value


@torch.no_grad()
def _reorder_for_onednn(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


@functools.cache
def packed_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def stacked_linear(*parts: Linear) -> Linear:
    """One Linear computing the outputs of ``parts`` side by side in one GEMM: their weights stacked by
    rows. Each part's weight becomes a view into the stacked one, so nothing is stored twice and loading
    a part's weight in place (``load_state_dict``, a LoRA merge) updates what the GEMM reads. The stacked
    weight is a non-persistent buffer: parameters and state_dicts keep only the parts' names. The parts'
    weights stop requiring grad: the stacked GEMM does not backpropagate into them."""
    weight = torch.cat([part.weight.detach() for part in parts])
    with torch.device("meta"):
        stacked = Linear(parts[0].in_features, weight.shape[0], bias=False)
    del stacked.weight
    stacked.register_buffer("weight", weight, persistent=False)
    for part, view in zip(parts, weight.split([part.out_features for part in parts]), strict=True):
        part.weight = nn.Parameter(view, requires_grad=False)
    return stacked


def fused(
    linear: Linear,
    x: torch.Tensor,
    norm: RMSNorm | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """residual + linear(norm(x) or swiglu of x = [gate | up]) through ``fused_linear``: one GEMV kernel
    where it dispatches to one (decoding on a GPU), else the same ops one by one, ``linear`` itself the
    GEMM (its CPU weight layout, cuBLAS, its hooks); converted to ``out_dtype`` when given."""
    norm_weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    return fused_linear(
        x, linear.weight, norm_weight=norm_weight, eps=eps, gated=gated, residual=residual, matmul=linear,
        out_dtype=out_dtype,
    )  # fmt: skip
