"""Export a model folder to GGUF with `stratos.compress.export.export_gguf`, run it in llama.cpp
(llama-cpp-python, in another venv: --llama-python), and compare with the transformers model on a run's eval
questions: llama.cpp's tokens for the prompt text, logits, greedy answers from the same prompt tokens and from
llama.cpp's own tokens, and their grades. What it printed is in docs/compress.md (Exports).

    .venv/bin/python scripts/gguf_llamacpp_check.py runs/mahjong-demo-check/distill/model \
        --run runs/mahjong-demo-check --llama-python /tmp/llama-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stratos.compress.export import export_gguf  # noqa: E402
from stratos.models import load  # noqa: E402
from stratos.spec import load_spec  # noqa: E402
from stratos.tasks import task_from_spec  # noqa: E402
from stratos.tasks.base import grade, messages  # noqa: E402
from tests.test_gguf_llamacpp import hf_reference, run_llama  # noqa: E402  (the test's llama.cpp side)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="an unquantized model folder")
    ap.add_argument("--run", type=Path, required=True, help="a run directory: its spec's task gives the questions")
    ap.add_argument("--llama-python", required=True, help="a Python with llama_cpp")
    ap.add_argument("-n", type=int, default=8, help="eval questions")
    ap.add_argument("--out", type=Path, default=Path("gguf-llamacpp-check.json"))
    a = ap.parse_args()

    spec = load_spec(a.run / "spec.yaml")
    task = task_from_spec(spec.task)
    questions = task.examples("eval", a.n, seed=spec.task.seed)
    model, tok = load(a.model)
    model.eval()
    n_new = spec.eval.max_new_tokens
    texts = [tok.apply_chat_template(messages(task, q), add_generation_prompt=True, tokenize=False) for q in questions]
    prompts = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    refs = [hf_reference(model, p["ids"], n_new, stop_at=tok.eos_token_id) for p in prompts]
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, kv_f32 in (("f16", False), ("f32", False), ("f32", True)):
            info = export_gguf(a.model, Path(tmp) / dtype, dtype=dtype)
            got = run_llama(a.llama_python, Path(info["path"]), prompts, n_new, stop_at_eos=True, kv_f32=kv_f32)
            rows = []
            for q, p, r, (logits, greedy) in zip(questions, prompts, got["results"], refs):
                hf_text = tok.decode(greedy, skip_special_tokens=True)
                rows.append({"same_prompt_tokens": r["tokens"] == p["ids"], "same_greedy": r["greedy"] == greedy,
                             "same_answer_from_text": r["text_own"] == hf_text,
                             "max_abs_logit_diff": float((torch.tensor(r["logits"]) - logits).abs().max()),
                             "logit_scale": float(logits.abs().max()),
                             "correct": [grade(task, q, t)[1].correct for t in (hf_text, r["text"], r["text_own"])]})
            key = f"{dtype} weights, {'f32' if kv_f32 else 'f16'} KV cache"
            summary[key] = {"llama_cpp": got["llama_cpp_version"], "gguf_bytes": info["bytes"],
                            "transformers_read_back": info.get("verified"),
                            "same_prompt_tokens": sum(x["same_prompt_tokens"] for x in rows),
                            "same_greedy_from_same_tokens": sum(x["same_greedy"] for x in rows),
                            "same_answer_from_text": sum(x["same_answer_from_text"] for x in rows),
                            "max_abs_logit_diff": max(x["max_abs_logit_diff"] for x in rows),
                            "logit_scale": max(x["logit_scale"] for x in rows),
                            "correct_transformers_llama_llama_from_text": [sum(x["correct"][i] for x in rows) for i in range(3)],
                            "n": len(rows), "rows": rows}
            print(key, json.dumps({k: v for k, v in summary[key].items() if k != "rows"}), flush=True)
    a.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
