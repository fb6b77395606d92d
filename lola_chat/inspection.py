"""What the memory holds, as plain data for `lola-chat memory` and the app's inspector."""

from __future__ import annotations

import torch

HISTOGRAM_BINS = 12


def kv_cache_bytes(cfg, tokens: int, dtype: torch.dtype) -> int:
    """Bytes a full softmax KV cache needs for ``tokens`` tokens."""
    element = torch.empty((), dtype=dtype).element_size()
    return tokens * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * element


def device_free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def memory_report(engine, detail: bool = True) -> dict:
    """The memory_report schema of the engine contract."""
    state, model = engine.state, engine.model
    settings = engine.loaded.lola
    lola = state.kind == "lola"
    layers = []
    for index, layer in enumerate(state.layers):
        fill, sizes = layer.fill(), layer.nbytes()
        layers.append(
            {
                "index": index,
                "window_tokens": fill.get("window", fill.get("kv_cache", 0)),
                "window_capacity": 2 * settings.chunk if lola else fill.get("kv_cache", 0),
                "cache_tokens": fill.get("sparse_cache", 0),
                "cache_capacity": settings.capacity if lola else 0,
                "folded_tokens": fill.get("hidden_state", 0),
                "window_bytes": sizes.get("window", sizes.get("kv_cache", 0)),
                "cache_bytes": sizes.get("sparse_cache", 0),
                "hidden_state_bytes": sizes.get("hidden_state", 0),
            }
        )
    report = {
        "session": engine.session.name,
        "attention": state.kind,
        "device": engine.device,
        "device_free_bytes": device_free_bytes(engine.torch_device),
        "tokens_seen": state.tokens_seen,
        "state_bytes": state.nbytes(),
        "kv_cache_bytes": kv_cache_bytes(model.cfg, state.tokens_seen, model.embed_tokens.weight.dtype),
        "chunk": settings.chunk,
        "capacity": settings.capacity,
        # Every LoLA setting the memory runs under (eviction policy, its pooling, normalizer, cap).
        "settings": settings.as_dict() if lola else None,
        "evictions_since_turn": state.evictions() - engine._evictions_at_turn,
        "layers": layers,
    }
    if detail and lola:
        report["cached_text"] = [cached_text(engine, layer) for layer in state.layers]
        report["recall_error"] = recall_error_histogram(engine)
    return report


def cached_text(engine, layer) -> str:
    ids = layer.cache_ids[0, 0]
    return engine.template.decode([int(i) for i in ids if i >= 0])


@torch.inference_mode()
def recall_error_histogram(engine) -> dict:
    errors = torch.cat(
        [
            layer.recall_errors(block.self_attn).flatten().float().cpu()
            for layer, block in zip(engine.state.layers, engine.model.layers, strict=True)
        ]
    )
    errors = errors[~errors.isnan()]
    if errors.numel() == 0:
        return {"edges": [], "counts": []}
    low, high = float(errors.min()), float(errors.max())
    counts = torch.histc(errors, bins=HISTOGRAM_BINS, min=low, max=max(high, low + 1e-6))
    step = (max(high, low + 1e-6) - low) / HISTOGRAM_BINS
    return {"edges": [low + i * step for i in range(HISTOGRAM_BINS + 1)], "counts": [int(c) for c in counts]}
