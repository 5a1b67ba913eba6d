"""Injection, then alignment: what KD from a Mahjong-trained teacher adds over SFT alone, same data and steps.

The demo's teacher (SmolLM2-135M-Instruct) does not know Mahjong, so its student learns by knowledge
injection: SFT on the oracle's worked answers. Here a model that learned the domain that way (a
`stratos run` or `stratos distill` student, e.g. `RUN/distill/model`) teaches a smaller student on
the same vocabulary, and the student trains on the same oracle records and steps two ways:

- sft: cross-entropy on the records;
- kd:  kd_ratio x forward KL to the teacher's distribution at every answer token (the engine's
       hidden-state signal, cached once) + the rest cross-entropy.

Each is trained with several seeds and scored greedily on the task's 200 held-out discard questions;
the table gives each seed's accuracy, the means and the pooled standard error of the difference.

    python benchmarks/mahjong_kd_vs_sft.py runs/mahjong-demo-*/distill/model              # 3 seeds
    python benchmarks/mahjong_kd_vs_sft.py TEACHER --records 2000 --steps 250 --layers 2 --hidden 192
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ctkd_vs_sft import compare

from stratos.distill import distill
from stratos.evaluate import evaluate
from stratos.models import load
from stratos.models.tiny import tiny_llama
from stratos.spec import DistillSpec
from stratos.tasks import to_records
from stratos.tasks.mahjong import MahjongTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", help="a Mahjong model folder on the task tokenizer (the student of an injection run)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--records", type=int, default=2000, help="oracle-answered training questions")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--loss", default="fkl")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n", type=int, default=200, help="held-out questions")
    ap.add_argument("--out", type=Path, default=Path("runs/mahjong_kd_vs_sft"))
    args = ap.parse_args()

    task = MahjongTask(types=("discard",), notation="spaced")
    train = [{**r, "source": "oracle"} for r in to_records(task, task.examples("train", args.records, seed=1),
                                                            rationale=True)]
    held_out = task.examples("eval", args.n, seed=0)
    teacher, tok = load(args.teacher)
    t0 = time.perf_counter()
    res = evaluate(teacher, tok, task, held_out, max_new_tokens=96)
    teacher_acc = res.accuracy
    n_teacher = sum(p.numel() for p in teacher.parameters())
    print(f"teacher {args.teacher}: {teacher_acc:.1%} of {len(held_out)} held-out questions, {n_teacher / 1e6:.2f}M "
          f"parameters ({time.perf_counter() - t0:.0f} s)", flush=True)

    results: dict[str, list[float]] = {"sft": [], "kd": []}
    rows = []
    n_student = None
    for seed in range(args.seeds):
        for method in ("sft", "kd"):
            torch.manual_seed(seed)
            student = tiny_llama(tok, hidden_size=args.hidden, num_hidden_layers=args.layers, seed=seed,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * args.hidden)
            n_student = sum(p.numel() for p in student.parameters())
            cfg = DistillSpec(algorithm="sft" if method == "sft" else "kd", loss=args.loss,
                              kd_ratio=args.kd_ratio if method == "kd" else 0.0, max_steps=args.steps,
                              per_device_train_batch_size=16, learning_rate=args.lr, warmup_ratio=0.03,
                              max_length=256, seed=seed, report_to=[], logging_steps=50, bf16=False)
            t = time.perf_counter()
            out = distill(student, tok, train, cfg, args.out / f"{method}-seed{seed}",
                          teacher=teacher if method == "kd" else None, teacher_tokenizer=tok,
                          cache_root=args.out / "teacher-cache", resume=False, progress=False)
            acc = evaluate(student, tok, task, held_out, max_new_tokens=96).accuracy
            results[method].append(acc)
            rows.append({"seed": seed, "method": method, "accuracy": acc, "train_s": out.seconds})
            print(f"seed {seed} {method:3s}: {acc:.1%} ({time.perf_counter() - t:.0f} s)", flush=True)

    gain = compare({"SFT": results["sft"], f"KD ({args.loss}, kd_ratio {args.kd_ratio:g})": results["kd"]},
                   len(held_out))
    print(f"\n{gain}; teacher {teacher_acc:.1%} at "
          f"{n_teacher / 1e6:.2f}M parameters, student {n_student / 1e6:.2f}M; {args.records} records, {args.steps} "
          f"steps of 16; {len(held_out)} held-out questions")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"teacher_accuracy": teacher_acc, "rows": rows,
                                                       "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
