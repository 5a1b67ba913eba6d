"""Architecture-level helpers that work across Hugging Face causal LMs."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


def backbone(model: Any) -> nn.Module:
    """The decoder stack of a causal LM (what produces the last, normalised hidden states).

    Calling it instead of the full model avoids the full [B, T, V] logits tensor.
    """
    if hasattr(model, "get_base_model"):  # peft wrapper
        model = model.get_base_model()
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if inner is None or inner is model:
        raise ValueError(f"cannot find the decoder stack of {type(model).__name__}")
    return inner


def cache_arg(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword a causal LM's forward takes its KV cache by: ``cache`` in current transformers
    (which deprecates ``past_key_values`` and drops it in 5.40), ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``total``, always including the first and the last."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def keep_layers(model: Any, indices: list[int]) -> Any:
    """Keep only the decoder layers at ``indices`` (in order); the config follows, so the model
    saves and reloads as an ordinary, shallower model of the same architecture."""
    stack = backbone(model)
    layers = stack.layers
    stack.layers = nn.ModuleList([layers[i] for i in indices])
    for new_idx, layer in enumerate(stack.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by it
    cfg = model.config
    cfg.num_hidden_layers = len(indices)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in indices]
    return model
