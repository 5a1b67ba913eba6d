"""Injection, then alignment: what KD from a Mahjong-trained teacher adds over SFT alone, same data and steps.

The demo's teacher (SmolLM2-135M-Instruct) does not know Mahjong, so its student learns by knowledge
injection: SFT on the oracle's worked answers. Here a model that learned the domain that way (a
`stratos run` or `stratos distill` student, e.g. `RUN/distill/model`) teaches a smaller student on
the same vocabulary, and the student trains on the same oracle records and steps two ways:

- sft: cross-entropy on the records;
- kd:  kd_ratio x forward KL to the teacher's distribution at every answer token (the engine's
       hidden-state signal, cached once) + the rest cross-entropy;
- gkd (with --methods sft kd gkd): on-policy KD: with probability lmbda a micro-batch holds the
       student's own answers to its questions (sampled at temperature 1), which train on the divergence
       to the teacher alone, token by token; the other micro-batches train as in kd.

Each is trained with several seeds and scored greedily on the task's 200 held-out discard questions;
the table gives each seed's accuracy, the means and the pooled standard error of the difference.

    python benchmarks/mahjong_kd_vs_sft.py runs/mahjong-demo-*/distill/model              # 3 seeds
    python benchmarks/mahjong_kd_vs_sft.py TEACHER --records 2000 --steps 250 --layers 2 --hidden 192
    python benchmarks/mahjong_kd_vs_sft.py TEACHER --methods sft gkd --lmbda 0.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ctkd_vs_sft import compare, gain_words

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
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--records", type=int, default=2000, help="oracle-answered training questions")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--methods", nargs="+", choices=("sft", "kd", "gkd"), default=["sft", "kd"])
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--gkd-kd-ratio", type=float, default=None, help="gkd's kd_ratio (default: --kd-ratio)")
    ap.add_argument("--lmbda", type=float, default=0.5, help="gkd: the share of micro-batches on the student's samples")
    ap.add_argument("--max-completion-length", type=int, default=64, help="gkd: tokens a sampled answer may hold")
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

    kd_ratio = {"sft": 0.0, "kd": args.kd_ratio,
                "gkd": args.kd_ratio if args.gkd_kd_ratio is None else args.gkd_kd_ratio}
    labels = {"sft": "SFT", "kd": f"KD ({args.loss}, kd_ratio {args.kd_ratio:g})",
              "gkd": f"on-policy KD (gkd, {args.loss}, kd_ratio {kd_ratio['gkd']:g}, lmbda {args.lmbda:g})"}
    results: dict[str, list[float]] = {m: [] for m in args.methods}
    rows = []
    n_student = None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method in args.methods:
            torch.manual_seed(seed)
            student = tiny_llama(tok, hidden_size=args.hidden, num_hidden_layers=args.layers, seed=seed,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * args.hidden)
            n_student = sum(p.numel() for p in student.parameters())
            cfg = DistillSpec(algorithm=method, loss=args.loss, kd_ratio=kd_ratio[method], max_steps=args.steps,
                              lmbda=args.lmbda, max_completion_length=args.max_completion_length,
                              per_device_train_batch_size=16, learning_rate=args.lr, warmup_ratio=0.03,
                              max_length=256, seed=seed, report_to=[], logging_steps=50, bf16=False)
            t = time.perf_counter()
            out = distill(student, tok, train, cfg, args.out / f"{method}-seed{seed}",
                          teacher=teacher if method != "sft" else None, teacher_tokenizer=tok,
                          cache_root=args.out / "teacher-cache", resume=False, progress=False)
            acc = evaluate(student, tok, task, held_out, max_new_tokens=96).accuracy
            results[method].append(acc)
            rows.append({"seed": seed, "method": method, "accuracy": acc, "train_s": out.seconds})
            print(f"seed {seed} {method:3s}: {acc:.1%} ({time.perf_counter() - t:.0f} s)", flush=True)

    compare({labels[m]: results[m] for m in args.methods}, len(held_out), args.first_seed)
    base = args.methods[0]
    gains = [f"{labels[m]} over {labels[base]}: {gain_words(results[base], results[m], len(held_out))}"
             for m in args.methods[1:]]
    print("\n" + "\n".join(gains) + f"\nteacher {teacher_acc:.1%} at "
          f"{n_teacher / 1e6:.2f}M parameters, student {n_student / 1e6:.2f}M; {args.records} records, {args.steps} "
          f"steps of 16; {len(held_out)} held-out questions")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"teacher_accuracy": teacher_acc, "rows": rows,
                                                       "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
