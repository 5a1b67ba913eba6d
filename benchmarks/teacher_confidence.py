"""How sure the teacher is of a run's training data: its probability on each response token it is distilled on.

KD adds to SFT what the teacher's distribution holds beyond the data's token. On verified answers to
questions with one right answer, the mass it puts elsewhere at the answer's digits is mass on wrong
digits: this script measures how much there is. For a `stratos run` directory whose plan and synth
stages are done, it runs the run's teacher over the run's `synth/data.jsonl` (each record as the
engine encodes it for the teacher: with its ``teacher_messages`` where the teacher saw worked examples or
rules) and prints, over all response tokens and over the digit tokens alone: the mean
probability of the data's token, the share of tokens where it is below 0.5, the share where the
teacher ranks another token first, and a few such tokens in context.

    python benchmarks/teacher_confidence.py runs/alignment-*/        # about a minute on 2 cores

README and docs/benchmarks.md quote it for examples/alignment.yaml.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from stratos.distill import load_records
from stratos.distill.data import IGNORE, encode_record, teacher_record
from stratos.models import load
from stratos.plan.planner import Plan
from stratos.spec import load_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a `stratos run` directory whose plan and synth stages are done")
    ap.add_argument("--examples", type=int, default=5, help="tokens the teacher ranks otherwise, shown in context")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    spec = load_spec(args.run_dir / "spec.yaml")
    plan = Plan.from_json(args.run_dir / "plan" / "plan.json")
    t_spec = spec.teachers[plan.teacher["index"]]
    records = load_records(args.run_dir / "synth" / "data.jsonl")
    teacher, tok = load(t_spec.model, dtype=t_spec.dtype, trust_remote_code=t_spec.trust_remote_code)
    teacher.eval()

    stats = {"all": [], "digits": []}  # (p of the data's token, teacher's top is another token)
    shown = []
    for rec in records:
        enc, _ = encode_record(teacher_record(rec), tok, spec.distill.max_length)  # as KD reads the teacher
        with torch.no_grad():
            logp = torch.log_softmax(teacher(torch.tensor([enc.input_ids])).logits[0].float(), dim=-1)
        for t in range(1, len(enc.labels)):
            y = enc.labels[t]
            if y == IGNORE:
                continue
            p, top = float(logp[t - 1, y].exp()), int(logp[t - 1].argmax())
            digit = tok.decode([y]).strip().isdigit()
            for group in ("all", "digits") if digit else ("all",):
                stats[group].append((p, top != y))
            if digit and top != y and len(shown) < args.examples:
                context = tok.decode([i for i, lab in zip(enc.input_ids[:t], enc.labels[:t]) if lab != IGNORE])
                shown.append(f"  {context!r} + {tok.decode([y])!r}: p {p:.2f}; the teacher's first is "
                             f"{tok.decode([top])!r} at {float(logp[t - 1, top].exp()):.2f}")

    print(f"{args.run_dir}: teacher {t_spec.model}, {len(records)} training records")
    print("| response tokens | count | mean p(data's token) | share with p < 0.5 | share the teacher ranks another first |")
    print("|---|---|---|---|---|")
    out = {}
    for group, rows in stats.items():
        if not rows:
            continue
        mean = statistics.mean(p for p, _ in rows)
        low = sum(p < 0.5 for p, _ in rows) / len(rows)
        other = sum(o for _, o in rows) / len(rows)
        out[group] = {"tokens": len(rows), "mean_p": mean, "share_below_half": low, "share_other_first": other}
        print(f"| {group} | {len(rows)} | {mean:.3f} | {low:.1%} | {other:.1%} |")
    if shown:
        print("digit tokens the teacher ranks otherwise:")
        print("\n".join(shown))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
