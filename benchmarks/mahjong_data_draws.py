"""How much the Mahjong student's accuracy hangs on the draw of its training data.

The demo's student learns from 8,000 oracle-answered questions of the task's train split drawn at
one seed (the synth stage's reverse synthesis: ``task.seed + 1``, so 1). This script trains the same
student with the same recipe (`benchmarks/mahjong_rationale.yaml`: 6 layers, the `split` rationale,
3 epochs, `distill.seed` 0) on the train split drawn at other seeds (`task.seed`), each with
`stratos distill`, and scores every model as `benchmarks/mahjong_near_ready.py` does: the 400
near-ready hands from play and the task's 200 eval questions (the same questions for every draw:
the eval split is fixed by a hash of each hand, not by the seed).

    python benchmarks/mahjong_data_draws.py --seeds 2 3 4 --out runs/mahjong-draws

A draw whose model is already there (with the same settings) is scored again, not retrained; delete
its folder to retrain.
About 7 minutes of training per draw on 2 cores with native bf16. Prints a table per draw, then the
mean and standard error over the draws.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from mahjong_near_ready import as_examples, near_ready_hands

from stratos.evaluate import evaluate
from stratos.io import read_jsonl
from stratos.tasks.mahjong import MahjongTask

HERE = Path(__file__).resolve().parent


def train(seed: int, out: Path, train_size: int, epochs: float) -> Path:
    """``stratos distill`` of the benchmark recipe on the train split drawn at ``seed``; the model folder."""
    spec = yaml.safe_load((HERE / "mahjong_rationale.yaml").read_text())
    spec["task"].update(seed=seed, train_size=train_size)
    spec["distill"]["num_train_epochs"] = epochs
    out.mkdir(parents=True, exist_ok=True)
    text, path = yaml.safe_dump(spec, sort_keys=False), out / "spec.yaml"
    if (out / "model" / "config.json").is_file() and path.is_file() and path.read_text() != text:
        raise SystemExit(f"{out}: holds a model trained with other settings ({path}); give another --out")
    path.write_text(text)
    if not (out / "model" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "stratos.cli", "distill", str(out / "spec.yaml"), "--out", str(out)],
                       check=True)
    return out / "model"


def score(model_dir: Path, out: Path) -> dict[str, float]:
    from stratos.models import load

    task = MahjongTask(types=("discard",), notation="spaced")
    model, tok = load(model_dir)
    play = as_examples(near_ready_hands(400, 0))
    row: dict[str, float] = {}
    for slug, examples in (("play", play), ("eval", task.examples("eval", 200, seed=0))):
        path = out / f"{slug}.jsonl"
        row[slug] = evaluate(model, tok, task, examples, max_new_tokens=64, predictions_path=path).accuracy
        if slug == "play":
            oks = [r["correct"] for ex, r in zip(examples, read_jsonl(path)) if ex.meta["form"] == "seven pairs"]
            row["play_seven_pairs"] = sum(oks) / len(oks)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4], help="task.seed of each draw")
    ap.add_argument("--train-size", type=int, default=8000, help="questions per draw (the demo: 8,000)")
    ap.add_argument("--epochs", type=float, default=3, help="num_train_epochs (the demo: 3)")
    ap.add_argument("--out", type=Path, default=Path("runs/mahjong-draws"))
    args = ap.parse_args()

    rows = {}
    for seed in args.seeds:
        where = args.out / f"seed-{seed}"
        rows[seed] = score(train(seed, where, args.train_size, args.epochs), where)
        (where / "scores.json").write_text(json.dumps(rows[seed], indent=2))
    print(f"\n{args.train_size} questions per draw, {args.epochs:g} epoch(s), distill.seed 0")
    print("| task.seed | 400 hands from play | of them read as seven pairs | 200 eval questions |\n|---|---|---|---|")
    for seed, r in rows.items():
        print(f"| {seed} | {r['play']:.1%} | {r['play_seven_pairs']:.1%} | {r['eval']:.1%} |")
    if len(rows) > 1:
        for key, name in (("play", "play"), ("eval", "eval")):
            xs = [r[key] for r in rows.values()]
            print(f"{name}: mean {statistics.mean(xs):.1%}, SE {statistics.stdev(xs) / len(xs) ** 0.5:.1%}")


if __name__ == "__main__":
    main()
