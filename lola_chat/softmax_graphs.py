"""The softmax baseline of ``lola-chat bench`` as a captured step: the unmodified model decoding with a
static KV cache, one CUDA graph per token (the LoLA step is ``graphs.CapturedDecoder``)."""

from __future__ import annotations

import torch

from lola_chat.graphs import _Counter, _StaticState, capture_graphs, require_capture
from lola_chat.kernels.argmax import argmax


class _StaticKVLayer:
    """Stands in for a ``SoftmaxMemory`` inside a captured step: a preallocated KV cache of rotated keys."""

    def __init__(self, batch, n_kv_heads, capacity, head_dim, dtype, device, counter: _Counter):
        self.k = torch.zeros(batch, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.counter = counter

    def attend(self, q, k, v, attn, ids=None) -> torch.Tensor:
        from lola_chat.kernels import softmax
        from lola_chat.kernels.lola import rotate

        pos = self.counter.seen
        self.k.index_copy_(2, pos, rotate(k, pos, attn.inv_freq))
        self.v.index_copy_(2, pos, v)
        return softmax.decode(rotate(q, pos, attn.inv_freq), self.k, self.v, pos + 1)


class SoftmaxDecoder:
    """The baseline for ``lola-chat bench``: the unmodified model decoding with a static KV cache of
    ``capacity`` positions (the first ``tokens_seen`` of them taken as filled), one CUDA graph per token;
    attention is the split-KV decode kernel (kernels/softmax), which reads only the filled prefix. Greedy."""

    def __init__(self, model, batch: int, capacity: int, tokens_seen: int):
        weight = model.embed_tokens.weight
        require_capture(weight.device)
        cfg = model.cfg
        self.model = model
        self.counter = _Counter(tokens_seen, weight.device)
        self.layers = [
            _StaticKVLayer(
                batch, cfg.n_kv_heads, capacity, cfg.head_dim, weight.dtype, weight.device, self.counter
            )
            for _ in range(cfg.n_layers)
        ]
        self.static_state = _StaticState(self.layers)
        self.token = torch.zeros(batch, dtype=torch.int64, device=weight.device)
        self.tokens_seen = tokens_seen
        self.graphs, self.outputs = capture_graphs({"token": self._run})
        self.counter.set(tokens_seen)

    def _run(self) -> torch.Tensor:
        logits = self.model(self.token[:, None], self.static_state, last_only=True)[:, -1]
        self.counter.advance(1)
        argmax(logits, out=self.token)
        return logits

    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)

    def step(self, token: torch.Tensor | int) -> torch.Tensor:
        if token is not self.token:
            self.token.copy_(torch.as_tensor(token, device=self.token.device).expand(self.token.shape[0]))
        self.graphs["token"].replay()
        self.tokens_seen += 1
        return self.token
