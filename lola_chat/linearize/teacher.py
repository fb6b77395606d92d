"""What the softmax teacher provides: each layer's attention inputs and outputs on a batch, and
conversations it writes itself. The teacher is the same model run with a softmax state (and, in the
LoRA stage, with the adapters switched off), so it is exactly the base model."""

from __future__ import annotations

import random
from collections import defaultdict

import torch

from lola_chat.linearize.data import chat_text, encode


@torch.no_grad()
def capture_attention(model, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the softmax model on ``tokens`` (B, T). Returns, per layer, the attention input (the normed
    hidden state, (B, T, dim)) and the attention output before o_proj ((B, T, Hq * D))."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    hooks = []
    for block in model.layers:
        # The attention takes the block's input and its norm (a packed model applies the norm in the q/k/v
        # GEMM, never storing the normed state), so the normed state is computed here.
        hooks.append(
            block.register_forward_pre_hook(lambda m, args: inputs.append(m.input_layernorm(args[0])))
        )
        hooks.append(
            block.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: outputs.append(args[0]))
        )
    try:
        model(tokens, model.new_state("softmax", batch=tokens.shape[0]), last_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, outputs


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): greedy at temperature 0, else temperature sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model, prompt_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int], temperature: float, seed: int
) -> list[list[int]]:
    """Continue a batch of equal-length prompts (B, T) with a growing softmax KV cache. Returns each
    reply up to and including its first stop token."""
    device = prompt_ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    state = model.new_state("softmax", batch=prompt_ids.shape[0])
    logits = model(prompt_ids, state, last_only=True)[:, -1]
    replies = torch.empty(prompt_ids.shape[0], 0, dtype=torch.long, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device)
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = _sample(logits, temperature, generator)
        replies = torch.cat([replies, token[:, None]], dim=1)
        finished |= torch.isin(token, stops)
        if bool(finished.all()):
            break
        logits = model(token[:, None], state, last_only=True)[:, -1]
    result = []
    for row in replies.tolist():
        ends = [i for i, token in enumerate(row) if token in stop_ids]
        result.append(row[: ends[0] + 1] if ends else row)
    return result


def self_generated_conversations(
    model,
    tokenizer,
    prompts: list[str],
    count: int,
    max_new_tokens: int,
    seed: int,
    max_prompt_tokens: int = 256,
    group_size: int = 32,
) -> tuple[list[int], int]:
    """The teacher answers ``count`` of ``prompts`` (chosen with ``seed``). The model state has no
    padding mask, so prompts are batched by exact token count: the most common lengths first.
    Returns the conversations' token ids concatenated, and the number of conversations."""
    if count <= 0:
        return [], 0
    device = model.embed_tokens.weight.device
    candidates = list(prompts)
    random.Random(seed).shuffle(candidates)
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    for prompt in candidates[: max(count * 32, 512)]:
        ids = encode(tokenizer, chat_text(tokenizer, prompt))
        if len(ids) <= max_prompt_tokens:
            by_length[len(ids)].append(ids)
    stop_ids = {tokenizer.eos_token_id, *encode(tokenizer, "<|im_end|>")} - {None}
    stream: list[int] = []
    made = 0
    for group_index, length in enumerate(sorted(by_length, key=lambda n: (-len(by_length[n]), n))):
        group = by_length[length][: min(group_size, count - made)]
        prompt_ids = torch.tensor(group, dtype=torch.long, device=device)
        replies = generate(
            model, prompt_ids, max_new_tokens, stop_ids, temperature=0.7, seed=seed + group_index
        )
        for prompt, reply in zip(group, replies, strict=True):
            stream.extend(prompt + reply)
        made += len(group)
        if made >= count:
            break
    return stream, made
