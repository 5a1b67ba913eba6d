"""A GGUF export run by llama.cpp itself (llama-cpp-python), not only read back by transformers: the same
prompt tokens, the same logits within float rounding, and the same greedy tokens as the transformers model.

llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores, more on a busy machine), so it
is not a dependency. Give the test a Python that has it, e.g. a separate venv:

    python3 -m venv /tmp/llama-venv && /tmp/llama-venv/bin/pip install llama-cpp-python
    STRATOS_LLAMA_PYTHON=/tmp/llama-venv/bin/python .venv/bin/python -m pytest -q tests/test_gguf_llamacpp.py

Without STRATOS_LLAMA_PYTHON it uses this Python when `llama_cpp` imports here, and skips otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Run by the Python that has llama_cpp: reads {"gguf", "prompts": [{"text", "ids"}], "new_tokens"} on stdin and
# writes, per prompt, llama.cpp's tokens for the text, its logits at every prompt position (from the given ids),
# and its greedy continuations (argmax at every step, like the reference) of the given ids and of its own tokens.
LLAMA_SCRIPT = r'''
import json, sys
import numpy as np
from llama_cpp import Llama, __version__

job = json.load(sys.stdin)
kv = {"type_k": 0, "type_v": 0} if job.get("kv_f32") else {}  # GGML_TYPE_F32; llama.cpp's default KV cache is f16
llm = Llama(model_path=job["gguf"], n_ctx=job.get("n_ctx", 512), n_threads=2, logits_all=True, verbose=False, **kv)
out = {"llama_cpp_version": __version__, "results": []}
for p in job["prompts"]:
    llm.reset()
    llm.eval(p["ids"])
    logits = np.array(llm.scores[: len(p["ids"])], dtype=np.float32)
    own = llm.tokenize(p["text"].encode(), add_bos=False, special=True)
    row = {"tokens": own, "logits": logits.tolist()}
    for key, text_key, ids in (("greedy", "text", p["ids"]), ("greedy_own", "text_own", own)):
        new = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            new.append(int(tok))
            if len(new) == job["new_tokens"] or (job.get("stop_at_eos") and tok == llm.token_eos()):
                break
        row[key] = new
        row[text_key] = llm.detokenize(new).decode("utf-8", errors="replace")
    out["results"].append(row)
print(json.dumps(out))
'''


def llama_python() -> str | None:
    """A Python with llama_cpp: $STRATOS_LLAMA_PYTHON, else this one when it has it."""
    if os.environ.get("STRATOS_LLAMA_PYTHON"):
        return os.environ["STRATOS_LLAMA_PYTHON"]
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def run_llama(python: str, gguf: Path, prompts: list[dict], new_tokens: int, **job) -> dict:
    done = subprocess.run([python, "-c", LLAMA_SCRIPT], input=json.dumps({"gguf": str(gguf), "prompts": prompts,
                                                                         "new_tokens": new_tokens, **job}),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@torch.no_grad()
def hf_reference(model, ids: list[int], new_tokens: int, stop_at: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """The transformers model's logits at every prompt position and its greedy continuation (plain argmax)."""
    x = torch.tensor([ids])
    logits = model(x).logits[0]
    new: list[int] = []
    while len(new) < new_tokens:
        tok = int(model(x).logits[0, -1].argmax())
        new.append(tok)
        if tok == stop_at:
            break
        x = torch.cat([x, torch.tensor([[tok]])], 1)
    return logits, new


@pytest.fixture(scope="module")
def python():
    py = llama_python()
    if py is None:
        pytest.skip("llama_cpp is not importable here and STRATOS_LLAMA_PYTHON is not set (see this file's docstring)")
    return py


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llamacpp_runs_our_gguf_like_transformers(python, tiny_tokenizer, tmp_path, dtype):
    """f32: weights and KV cache in f32, so the logits agree to float rounding. f16 (the export's default) with
    llama.cpp's defaults (f16 KV cache, f16 activations in its f16 matmuls): within ~1% of the logits' scale."""
    from stratos.compress.export import export_gguf
    from stratos.models import load
    from stratos.models.tiny import save_model, tiny_llama

    # Peaked next-token distributions (like a trained LM's), so greedy decoding is not a coin toss on near-ties.
    folder = save_model(tiny_llama(tiny_tokenizer, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, initializer_range=0.3, seed=3), tiny_tokenizer, tmp_path / "m")
    info = export_gguf(folder, tmp_path / "gguf", dtype=dtype)
    assert info["verified"], info  # transformers' own reader agrees (the check the export always runs)
    model, tok = load(folder)
    model.eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("What is 12+34?", "17+25=", "Add 3 and 99.")]
    prompts = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    got = run_llama(python, Path(info["path"]), prompts, new_tokens=16, kv_f32=dtype == "f32")

    for p, r in zip(prompts, got["results"]):
        assert r["tokens"] == p["ids"]  # llama.cpp's tokenizer reads our vocabulary and merges the same way
        ref_logits, ref_greedy = hf_reference(model, p["ids"], 16)
        diff = float((torch.tensor(r["logits"]) - ref_logits).abs().max())
        scale = float(ref_logits.abs().max())
        assert diff < (1e-4 if dtype == "f32" else 0.02) * scale, (diff, scale)
        assert r["greedy"] == ref_greedy, (r["greedy"], ref_greedy)


def test_llamacpp_tokenizes_added_tokens_and_punctuation_like_transformers(python, tmp_path):
    from stratos.compress.export import export_gguf
    from stratos.models import load_tokenizer
    from stratos.models.tiny import build_tokenizer, save_model, tiny_llama
    from tests.conftest import addition_records

    tiles = ["1m", "2m", "3m", "4z"]
    tok = build_tokenizer([r["prompt"] + r["response"] for r in addition_records(200)], vocab_size=320, added_tokens=tiles)
    folder = save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=1), tok, tmp_path / "m")
    info = export_gguf(folder, tmp_path / "gguf", dtype="f32")
    tok = load_tokenizer(folder)
    texts = ["Hand (14 tiles): 1m 2m 3m 4z", "1m 2m", "What is 1234+5678? (12)"]
    prompts = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    got = run_llama(python, Path(info["path"]), prompts, new_tokens=1)
    assert [r["tokens"] for r in got["results"]] == [p["ids"] for p in prompts]
