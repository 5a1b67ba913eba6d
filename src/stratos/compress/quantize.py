"""Weight quantization with torchao, saved as an ordinary HF folder that loads again.

The folder's config.json carries a ``quantization_config`` (quant_method: torchao) and its
safetensors hold torchao tensors, so ``AutoModelForCausalLM.from_pretrained`` and hence
``stratos.models.load``, the evaluator and the server load it with no extra step.

Methods:
- ``bf16``: every weight cast to bfloat16 (no torchao): half the size, and on a CPU with bf16
  matmuls (AVX512-BF16, AMX) the fastest to decode. The folder's config.json says
  ``"stratos": {"dtype": "bfloat16"}``, so ``stratos.models.load`` keeps it in bf16 instead of
  its usual float32.
Then the CPU-capable torchao configs:
- ``int8``: weight-only int8, per output channel;
- ``int8-dynamic``: int8 weights and int8 activations quantized per token at run time;
- ``int4``: weight-only int4 in groups of 32 (``IntxWeightOnlyConfig``). torchao's
  ``Int4WeightOnlyConfig`` needs GPU kernels (mslk/tinygemm); the intx form runs anywhere but
  stores each 4-bit value in an int8, so on disk it is no smaller than int8.
Embeddings and the (often tied) output head stay in full precision.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUANT_METHODS: dict[str, Callable[[], Any]] = {}


def register_quant(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register a function returning a torchao ``AOBaseConfig`` under ``name``."""

    def deco(fn: Callable[[], Any]) -> Callable[[], Any]:
        QUANT_METHODS[name] = fn
        return fn

    return deco


@register_quant("int8")
def _int8() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


@register_quant("int8-dynamic")
def _int8_dynamic() -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


@register_quant("int4")
def _int4() -> Any:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def _quiet_torchao() -> None:
    # torchao probes optional CUDA kernels at import and prints a line for each it cannot load.
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)


def quantize_folder(src: str | os.PathLike, dst: str | os.PathLike, method: str) -> Path:
    """Quantize the HF folder ``src`` with ``method`` into ``dst`` (weights, config, tokenizer)."""
    if method == "bf16":
        return _cast_folder(Path(src), Path(dst), "bfloat16")
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization {method!r}; known: {', '.join(['bf16', *sorted(QUANT_METHODS)])}")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise RuntimeError("quantization needs torchao: pip install torchao") from None
    import torch
    from transformers import AutoModelForCausalLM, TorchAoConfig

    _quiet_torchao()
    src, dst = Path(src), Path(dst)
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=TorchAoConfig(QUANT_METHODS[method]()), dtype=torch.float32, use_safetensors=True
    )
    return _save(model, src, dst)


def _cast_folder(src: Path, dst: Path, dtype: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), use_safetensors=True)
    model.config.stratos = {**(getattr(model.config, "stratos", None) or {}), "dtype": dtype}
    return _save(model, src, dst)


def _save(model: Any, src: Path, dst: Path) -> Path:
    """Save ``model`` into ``dst`` atomically, with the tokenizer files and whatever else ``src`` carried."""
    from stratos.io import replace_dir

    tmp = dst.with_name(f".tmp-{dst.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in src.iterdir():  # tokenizer files and anything else the model folder carried
        if f.is_file() and not (tmp / f.name).exists() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, dst)
    return dst
