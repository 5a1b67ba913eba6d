"""Model sizes and tokenizer identities, read from configs and tokenizer files; no weights loaded."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from stratos.plan.costmodel import ModelShape


def shape_from_config(name: str, config: Any, tokenizer: Any = None) -> ModelShape:
    """Count parameters exactly by building the model on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text, "head_dim", None) or (hidden // heads if hidden else 0))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return ModelShape(
        name=name, params=float(params), hidden=hidden, layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        vocab=int(getattr(text, "vocab_size", 0) or 0), kv_dim=kv_heads * head_dim,
        tokenizer=tokenizer_identity(tokenizer) if tokenizer is not None else None,
    )


def tokenizer_identity(tokenizer: Any) -> str:
    """Two tokenizers are the same for logit KD when their vocabularies map the same strings to the same ids."""
    from stratos.io import sha256_text

    return sha256_text(sorted(tokenizer.get_vocab().items()))[:16]


def model_shape(spec: Any, *, api_params_b: float | None = None) -> ModelShape:
    """The shape of a ``TeacherSpec`` or ``StudentSpec``. A student's ``config_overrides`` apply."""
    if getattr(spec, "backend", "hf") == "openai":
        return ModelShape(name=spec.label, params=(api_params_b or 0) * 1e9, api=True)
    from transformers import AutoConfig

    from stratos.errors import ModelError
    from stratos.models import load_tokenizer, resolve

    location, _ = resolve(spec.model, weights=getattr(spec, "init", "pretrained") != "random")
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{spec.label}: cannot read the model config of {spec.model!r}: {str(e).splitlines()[0]}") from None
    for key, value in getattr(spec, "config_overrides", {}).items():
        if not hasattr(config, key):
            raise ModelError(f"{spec.label}: config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    if getattr(spec, "init", None) == "pruned":  # the shape pruning gives (which channels survive needs data, not this)
        from stratos.compress.prune import count_params, pruned_config

        p = spec.prune
        try:
            config = pruned_config(config, int(count_params(config) * p.keep), p.method, p.width_axes)
        except ValueError as e:
            raise ModelError(f"{spec.label}: prune: {e}") from None
    pretrained = getattr(spec, "init", "pretrained") != "random"
    if getattr(spec, "tokenizer", "model") == "task":
        # Its own vocabulary, trained on the task: about this many rows, and never a teacher's.
        config.vocab_size = spec.tokenizer_vocab_size
        return replace(shape_from_config(spec.label, config, None), pretrained=pretrained)
    try:
        tok = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, ModelError):
        tok = None  # unknown tokenizer: the pair falls back to text distillation
    return replace(shape_from_config(spec.label, config, tok), pretrained=pretrained)
