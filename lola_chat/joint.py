"""A joint eviction policy's one choice for the whole model: every layer's candidate scores pooled into
one ranking (``joint_ranking``), and each layer's chunk closed with it (``close_chunk_jointly``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lola_chat.memory import LolaMemory, LolaSettings

# Settings that shape a joint policy's pooling, at the values that leave it a plain mean. Recorded (in
# snapshots, linearization configs) only when a joint policy sets them otherwise, so that what was
# written before they existed still reads as what it is.
JOINT_POOLING = {"joint_power": 1, "joint_span": 0}
# The largest power tried (docs/DESIGN.md); far larger ones overflow fp32 (an error of 100 to the 20th
# power is inf) and would tie the candidates.
MAX_JOINT_POWER = 8


def describe_pooling(power: int, span: int) -> str:
    """The pooling's words for labels and cards: "" for the plain mean."""
    words = f", ranked by mean score to the power {power}" if power != 1 else ""
    return words + (f", kept with the candidates within {span}" if span else "")


def joint_ranking(scores: torch.Tensor, settings: LolaSettings) -> torch.Tensor:
    """One ranking from every layer's candidate scores (L, B, Hq, G + C), the same for every head,
    (B, Hq, G + C): the mean of their ``joint_power``-th powers over layers and query heads, then each
    candidate's at least that of the candidates within ``joint_span`` of it. The candidates are the
    cached pairs then the leaving chunk, each in time order, so a candidate's neighbours are the pairs
    kept or leaving next to it, not necessarily adjacent words. Candidates that are not there (-inf in
    every layer and head) stay -inf, and count as 0 for their neighbours: scores are recall errors,
    never negative. Fixed shapes and no host sync: a captured step runs it."""
    absent = (scores == float("-inf")).all(dim=2).all(dim=0)
    ranking = scores.clamp_min(0.0)
    if settings.joint_power != 1:
        ranking = ranking.pow(settings.joint_power)
    ranking = ranking.mean(dim=(0, 2))
    span = settings.joint_span
    if span:
        ranking = F.max_pool1d(ranking[:, None], 2 * span + 1, stride=1, padding=span)[:, 0]
    ranking = ranking.masked_fill(absent, float("-inf"))
    return ranking[:, None].expand(-1, scores.shape[2], -1)


def close_chunk_jointly(memories: list[LolaMemory], attentions: list) -> None:
    """Close the chunk every layer has just filled with one choice for all of them: the candidates'
    scores pooled over layers and query heads (``joint_ranking``) rank the candidates of every layer and
    head alike. The candidates are the same positions everywhere as long as every eviction was joint
    (equal rankings keep equal slots)."""
    scores = [memory.candidate_scores(attn) for memory, attn in zip(memories, attentions, strict=True)]
    shared = None if scores[0] is None else joint_ranking(torch.stack(scores), memories[0].settings)
    for memory, attn in zip(memories, attentions, strict=True):
        memory.close_chunk(attn, memory.pending, shared)
