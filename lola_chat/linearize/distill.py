"""Stage 2: the whole linearized model (G = 0 LoLA state, LoRA on q, k, v, o, feature maps and window
factors still training) is distilled from the softmax teacher's logits, plus the next-token loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lola_chat.linearize import lora
from lola_chat.memory import LolaSettings


def distill_loss(
    model, tokens: torch.Tensor, chunk: int, ce_weight: float, capacity: int = 0, normalizer: str = "shared"
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL(teacher || student) per token plus ``ce_weight`` times next-token cross entropy, the student
    running LoLA with a sparse cache of ``capacity`` (0: none). Returns (loss, {"kl": ..., "ce": ...})."""
    with torch.no_grad(), lora.disabled(model):
        teacher = model(tokens, model.new_state("softmax", batch=tokens.shape[0]))
        teacher_logp = torch.log_softmax(teacher, dim=-1)
    del teacher
    settings = LolaSettings(chunk=chunk, capacity=capacity, normalizer=normalizer)
    state = model.new_state("lola", settings, batch=tokens.shape[0])
    student_logp = torch.log_softmax(model(tokens, state), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1).mean()
    ce = F.nll_loss(student_logp[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return kl + ce_weight * ce, {"kl": kl.item(), "ce": ce.item()}
