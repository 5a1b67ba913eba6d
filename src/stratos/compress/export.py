"""Exports of a compressed model folder to other runtimes' formats.

Each exporter returns a status dict ``{"format", "ok", "path" | "reason"}``: an export that is
not possible here (a missing package, an architecture or tokenizer the format's reader does not
know, a quantized folder) says why instead of failing the stage.

- ``onnx``: ``torch.onnx.export`` (TorchScript exporter, opset 17) of the forward pass,
  input_ids + attention_mask -> logits, dynamic batch and length, no KV cache; checked against
  PyTorch with onnxruntime when it is installed. Needs the ``onnx`` package (extra ``export``).
- ``gguf``: a llama.cpp GGUF file (f32 or f16) written with the ``gguf`` package for Llama /
  Mistral-family models with a byte-level BPE (GPT-2 style) tokenizer, e.g. SmolLM2's;
  checked by loading it back with transformers' GGUF reader.
- ``gptq`` / ``awq``: W4A16 checkpoints for vLLM on GPUs via llm-compressor; skipped with a
  note when llm-compressor is not installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Exporter = Callable[..., dict[str, Any]]
EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    def deco(fn: Exporter) -> Exporter:
        EXPORTERS[name] = fn
        return fn

    return deco


class ExportError(Exception):
    """An export that cannot be done here; the message says why."""


def export_model(fmt: str, model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run one exporter; its failure becomes a status with the reason, never an exception."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; registered: {', '.join(sorted(EXPORTERS))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return {"format": fmt, "ok": True, **EXPORTERS[fmt](Path(model_dir), out_dir, records=records)}
    except ExportError as e:
        return {"format": fmt, "ok": False, "reason": str(e)}


def _quantized(model_dir: Path) -> str | None:
    cfg = json.loads((model_dir / "config.json").read_text())
    q = cfg.get("quantization_config")
    return q.get("quant_method", "quantized") if q else None


# --------------------------------------------------------------------------- ONNX


@register_exporter("onnx")
def export_onnx(model_dir: Path, out_dir: Path, *, records: Any = None, opset: int = 17) -> dict[str, Any]:
    import torch

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'stratos[export]'") from None
    if q := _quantized(model_dir):
        raise ExportError(f"the model is {q}-quantized; export the unquantized folder to ONNX and quantize with onnxruntime")
    from stratos.models import load

    model, tok = load(model_dir)
    model.eval()

    class Logits(torch.nn.Module):  # one plain forward: tensors in, logits out
        def __init__(self, m: Any):
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = tok(["Hello, world! 1+1=2"], return_tensors="pt")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    dyn = {0: "batch", 1: "sequence"}
    from stratos.known_warnings import known

    with known("onnx-export"):  # the tracer's warnings we cannot fix, each with its reason; others still show
        torch.onnx.export(
            Logits(model), (ids["input_ids"], ids["attention_mask"]), str(path), dynamo=False, opset_version=opset,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "logits": dyn},
        )
    tok.save_pretrained(out_dir / "onnx-tokenizer")
    info: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size + sum(
        f.stat().st_size for f in out_dir.glob("*.onnx.data"))}
    try:
        import onnxruntime as ort
    except ImportError:
        info["checked"] = "onnxruntime not installed; not run"
        return info
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = tok(["A different, longer probe sentence: 12+34=46."], return_tensors="pt")
    got = sess.run(None, {"input_ids": probe["input_ids"].numpy(), "attention_mask": probe["attention_mask"].numpy()})[0]
    with torch.no_grad():
        ref = Logits(model)(probe["input_ids"], probe["attention_mask"]).numpy()
    info["max_abs_diff_vs_torch"] = float(abs(got - ref).max())
    return info


# --------------------------------------------------------------------------- GGUF (llama.cpp)

# HF config model_type -> llama.cpp architecture; llama.cpp converts Mistral as llama.
_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _to_gguf_rope(w: Any, n_head: int) -> Any:
    """HF stores each rotary head as two halves; llama.cpp ('llama' arch) wants them interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bpe_vocab(tok: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    import gguf

    state = json.loads(tok.backend_tokenizer.to_str())
    model = state.get("model", {})
    pre = json.dumps(state.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ExportError("GGUF export writes byte-level BPE (GPT-2 style) tokenizers only; this one is "
                          f"{model.get('type', 'unknown')} without a ByteLevel pre-tokenizer (use llama.cpp's convert_hf_to_gguf.py)")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    # Added tokens that are not special (e.g. a domain's symbols kept whole): llama.cpp matches USER_DEFINED
    # tokens in the text as transformers does; as NORMAL tokens it would build them from merges, or not at all.
    added = {t.content for t in tok.added_tokens_decoder.values() if not t.special}
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if t is None else gguf.TokenType.CONTROL if t in special
                     else gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


@register_exporter("gguf")
def export_gguf(model_dir: Path, out_dir: Path, *, records: Any = None, dtype: str = "f16") -> dict[str, Any]:
    """Write ``model.gguf`` (weights in f16 or f32, norms in f32) and check it through transformers' GGUF reader."""
    import gguf
    import numpy as np
    import torch

    if q := _quantized(model_dir):
        raise ExportError(f"the model is {q}-quantized; GGUF needs the unquantized folder (quantize with llama-quantize)")
    from stratos.models import load

    model, tok = load(model_dir)
    cfg = model.config
    arch = _GGUF_ARCH.get(cfg.model_type)
    if arch is None:
        raise ExportError(f"GGUF export knows {sorted(_GGUF_ARCH)} models, not {cfg.model_type!r}")
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens, types, merges = _bpe_vocab(tok, cfg.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(model_dir.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    # A plain ByteLevel pre-tokenizer splits with GPT-2's regex: llama.cpp's 'gpt-2'. Others (e.g. Digits then
    # ByteLevel, as SmolLM2's hub tokenizer) need their own llama.cpp name; 'default' splits digit runs into threes.
    pre = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    w.add_tokenizer_pre("gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(w, f"add_{name}_token_id")(tid)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)

    def put(name: str, t: torch.Tensor) -> None:
        a = t.detach().float().numpy()
        w.add_tensor(name, a.astype(np.float16) if dtype == "f16" and a.ndim == 2 else a)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _GGUF_NAMES.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf}.{kind}")
                if t is None:
                    continue
                if arch == "llama" and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                    n = cfg.num_attention_heads if hf == "self_attn.q_proj" else cfg.num_key_value_heads
                    t = _to_gguf_rope(t, n)
                put(f"blk.{i}.{gg}.{kind}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(path), "bytes": path.stat().st_size, "dtype": dtype, **_check_gguf(path, model, tok)}


def _check_gguf(path: Path, model: Any, tok: Any) -> dict[str, Any]:
    """Read the file back with transformers' GGUF loader: same tokens, logits within f16 rounding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # the reader's own limits (an architecture or field it does not map)
        return {"checked": f"transformers could not read it back: {type(e).__name__}: {str(e)[:300]}", "verified": False}
    probe = "What is 12 + 34? Answer: 46"
    ids = tok(probe, return_tensors="pt", add_special_tokens=False)["input_ids"]
    same_tokens = back_tok(probe, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        diff = float((back(ids).logits - model(ids).logits).abs().max())
    return {"checked": "transformers GGUF reader", "same_tokens": same_tokens, "max_abs_diff_vs_torch": diff,
            "verified": bool(same_tokens and diff < 0.05)}


# --------------------------------------------------------------------------- llm-compressor (GPU serving)


def _llmcompressor(model_dir: Path, out_dir: Path, records: Any, scheme: str) -> dict[str, Any]:
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError:
        raise ExportError(
            f"{scheme} needs llm-compressor (pip install llmcompressor, normally on a GPU machine); skipped"
        ) from None
    if q := _quantized(model_dir):
        raise ExportError(f"the model is already {q}-quantized; give llm-compressor the unquantized folder")
    if not records:
        raise ExportError(f"{scheme} needs calibration records")
    from datasets import Dataset

    from stratos.models import load

    model, tok = load(model_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
                                     tokenize=False) for r in records[:256] if "prompt" in r and "response" in r]
    ds = Dataset.from_dict({"text": texts})
    modifier = (GPTQModifier if scheme == "gptq" else AWQModifier)(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    path = out_dir / f"{scheme}-w4a16"
    oneshot(model=model, dataset=ds, recipe=modifier, max_seq_length=512, num_calibration_samples=len(texts))
    model.save_pretrained(path, save_compressed=True)
    tok.save_pretrained(path)
    return {"path": str(path), "scheme": "W4A16", "note": "compressed-tensors format, for vLLM on GPUs"}


@register_exporter("gptq")
def export_gptq(model_dir: Path, out_dir: Path, *, records: Any = None) -> dict[str, Any]:
    return _llmcompressor(model_dir, out_dir, records, "gptq")


@register_exporter("awq")
def export_awq(model_dir: Path, out_dir: Path, *, records: Any = None) -> dict[str, Any]:
    return _llmcompressor(model_dir, out_dir, records, "awq")
