"""Tokens/s of the student trained by 1 process and by N processes (torchrun, DDP and FSDP2), back to back.

    python benchmarks/distributed.py                      # 1 and 2 processes on this machine's CPU cores
    python benchmarks/distributed.py --nproc 2 --steps 30 --hidden 256 --layers 4
    python benchmarks/distributed.py --gpu                # one GPU: the plain engine vs FSDP2 over that GPU
                                                          # (torchrun, one process); with --nproc N and N GPUs,
                                                          # DDP and FSDP2 over them too. Not yet run on a GPU.

Each run is `stratos distill` on the same data (random-weight tiny Llamas, built here: nothing is
downloaded), the same global batch and the same steps, teacher signal cached (the cache is built
before the timed runs, so every run reads it). Tokens/s is the engine's own figure (target tokens
trained per second of training, from result.json). One process gets all the machine's threads;
under torchrun each of N processes gets threads / N (OMP_NUM_THREADS), so the comparison is of the
same cores used two ways. Run it on a quiet machine.

With ``--gpu`` every run trains on CUDA in bf16 (a larger random student by default: 12 layers x 1024,
about 190M parameters on the 260-token byte vocabulary, its teacher 2048 wide, about 760M; nothing is
downloaded) and the first comparison is FSDP2 against the single-process engine on the same one GPU:
torchrun with one process and ``parallel: fsdp`` (docs/distributed.md), so what FSDP2's wrapping costs
where it shards nothing. Not yet run on a GPU, so its time there is not known.
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
    ap.add_argument("--hidden", type=int, default=None, help="the student's width (default 256; 1024 with --gpu)")
    ap.add_argument("--layers", type=int, default=None, help="the student's layers (default 4; 12 with --gpu)")
    ap.add_argument("--batch", type=int, default=8, help="rows per micro-batch (the global batch)")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--gpu", action="store_true", help="train on CUDA in bf16; compare FSDP2 on one GPU first")
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    args.hidden = args.hidden or (1024 if args.gpu else 256)  # the CPU's sizes would not keep a GPU busy
    args.layers = args.layers or (12 if args.gpu else 4)
    gpus = torch.cuda.device_count() if args.gpu else 0

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
    runs = [(1, "none")]
    if args.gpu:
        runs.append((1, "fsdp"))  # FSDP2 over the one GPU
        if args.nproc > 1 and gpus >= args.nproc:
            runs += [(args.nproc, "ddp"), (args.nproc, "fsdp")]
    else:
        runs += [(args.nproc, "ddp"), (args.nproc, "fsdp")]
    rows = []
    for nproc, mode in runs:
        spec = {"task": {"name": "arithmetic"}, "teachers": [{"model": str(base / "teacher")}],
                "students": [{"model": str(base / "student")}],
                "distill": {"parallel": "ddp" if mode == "none" else mode, "per_device_train_batch_size": args.batch,
                            "max_steps": args.steps, "save_steps": 10_000, "bf16": args.gpu, "learning_rate": 1e-3}}
        (base / "spec.yaml").write_text(yaml.safe_dump(spec))
        out = base / f"run-{nproc}-{mode}"
        env = {**os.environ, "STRATOS_CACHE": str(base / "cache"), "OMP_NUM_THREADS": str(max(1, threads // nproc))}
        distill = ["distill", str(base / "spec.yaml"), "--data", str(base / "data.jsonl"), "--out", str(out),
                   "--overwrite", "--device", "cuda" if args.gpu else "cpu"]
        if nproc == 1 and mode == "fsdp":  # torchrun itself: `stratos distill --nproc 1` is a plain process
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                   "-m", "stratos.cli", *distill]
        else:
            cmd = [sys.executable, "-m", "stratos.cli", *distill, "--nproc", str(nproc)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)  # builds the cache the first time
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        res = json.loads((out / "result.json").read_text())
        assert res["signal"].get("processes", {"parallel": "none"})["parallel"] == mode, res["signal"]
        rows.append((nproc, mode, max(1, threads // nproc), res["tokens_per_second"], res["final_metrics"].get("loss")))
    base_tps = rows[0][3]
    where = (f"{torch.cuda.get_device_name(0)} x {gpus}, bf16" if args.gpu else f"fp32, {threads} CPU threads")
    print(f"\nstudent {args.layers} layers x {args.hidden} wide, teacher {2 * args.hidden} wide, {args.steps} steps of "
          f"{args.batch} rows, {where}, torch {torch.__version__}\n")
    print("| processes | parallel | threads each | tokens/s | vs 1 process | final loss |")
    print("|---|---|---|---|---|---|")
    for nproc, mode, th, tps, loss in rows:
        print(f"| {nproc} | {mode} | {th} | {tps:,.0f} | {tps / base_tps:.2f}x | {loss:.4f} |")


if __name__ == "__main__":
    main()
