"""Tokens/s of the student trained by 1 process and by N processes (torchrun, DDP and FSDP2), back to back.

    python benchmarks/distributed.py                      # 1 and 2 processes on this machine's CPU cores
    python benchmarks/distributed.py --nproc 2 --steps 30 --hidden 256 --layers 4

Each run is `stratos distill` on the same data (random-weight tiny Llamas, built here: nothing is
downloaded), the same global batch and the same steps, teacher signal cached (the cache is built
before the timed runs, so every run reads it). Tokens/s is the engine's own figure (target tokens
trained per second of training, from result.json). One process gets all the machine's threads;
under torchrun each of N processes gets threads / N (OMP_NUM_THREADS), so the comparison is of the
same cores used two ways. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="rows per micro-batch (the global batch)")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from stratos.models.tiny import build_tokenizer, save_model, tiny_llama

    base = args.out or Path(tempfile.mkdtemp(prefix="stratos-dist-bench-"))
    tok = build_tokenizer(vocab_size=260)
    save_model(tiny_llama(tok, hidden_size=2 * args.hidden, num_hidden_layers=args.layers, seed=1), tok, base / "teacher")
    save_model(tiny_llama(tok, hidden_size=args.hidden, num_hidden_layers=args.layers, seed=2), tok, base / "student")
    with open(base / "data.jsonl", "w") as f:
        for i in range(args.records):
            a, b = (i * 7919) % 9973, (i * 104729) % 9967
            f.write(json.dumps({"prompt": f"What is {a} plus {b}? Answer with the sum.",
                                "response": f"{a} plus {b} is {a + b}."}) + "\n")
    threads = os.cpu_count() or 1
    rows = []
    for nproc, mode in [(1, "none"), (args.nproc, "ddp"), (args.nproc, "fsdp")]:
        spec = {"task": {"name": "arithmetic"}, "teachers": [{"model": str(base / "teacher")}],
                "students": [{"model": str(base / "student")}],
                "distill": {"parallel": "ddp" if mode == "none" else mode, "per_device_train_batch_size": args.batch,
                            "max_steps": args.steps, "save_steps": 10_000, "bf16": False, "learning_rate": 1e-3}}
        (base / "spec.yaml").write_text(yaml.safe_dump(spec))
        out = base / f"run-{nproc}-{mode}"
        env = {**os.environ, "STRATOS_CACHE": str(base / "cache"), "OMP_NUM_THREADS": str(max(1, threads // nproc))}
        cmd = [sys.executable, "-m", "stratos.cli", "distill", str(base / "spec.yaml"), "--data", str(base / "data.jsonl"),
               "--out", str(out), "--overwrite", "--nproc", str(nproc)]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)  # builds the cache the first time
        res = json.loads((out / "result.json").read_text())
        rows.append((nproc, mode, max(1, threads // nproc), res["tokens_per_second"], res["final_metrics"].get("loss")))
    base_tps = rows[0][3]
    print(f"\nstudent {args.layers} layers x {args.hidden} wide, teacher {2 * args.hidden} wide, {args.steps} steps of "
          f"{args.batch} rows, fp32, {threads} CPU threads, torch {torch.__version__}\n")
    print("| processes | parallel | threads each | tokens/s | vs 1 process | final loss |")
    print("|---|---|---|---|---|---|")
    for nproc, mode, th, tps, loss in rows:
        print(f"| {nproc} | {mode} | {th} | {tps:,.0f} | {tps / base_tps:.2f}x | {loss:.4f} |")


if __name__ == "__main__":
    main()
