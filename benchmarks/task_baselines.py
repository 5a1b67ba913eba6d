"""Teacher baselines on the Mahjong question types: a model zero-shot, the same model with the
rules in its prompt (knowledge injection by context), and random guessing, on the same held-out
questions (eval split, seed 0).

    python benchmarks/task_baselines.py                       # SmolLM2-135M-Instruct, 100 per type
    python benchmarks/task_baselines.py --n 50 --n-rules 16     # the run docs/tasks.md records

The rules prompt is ~840 tokens, so its runs cost ~15x more prefill on a CPU: --n-rules sets
them apart. Prints a markdown table (docs/tasks.md records a run) and writes JSON metrics and
the predictions of every run under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from stratos.evaluate import evaluate
from stratos.models.generate import Generation
from stratos.tasks import get_task
from stratos.tasks.mahjong import parse_tiles, tile_name, to_compact


def guesser(task, examples, seed=0):
    """A generate_fn that answers at random, with answers of the right form: the chance baseline."""
    rng = random.Random(seed)
    by_prompt = {task.prompt(ex): ex for ex in examples}

    def guess(ex):
        hand = parse_tiles(ex.question.split(":", 1)[1].splitlines()[0])
        if ex.type == "waits":  # a plausible number of plausible tiles: kinds near the hand's tiles
            near = sorted({t + d for t in hand for d in (-1, 0, 1) if 0 <= t + d < 34 and (t + d) // 9 == t // 9})
            return to_compact(rng.sample(near, min(len(near), rng.choice([1, 2, 3]))))
        if ex.type == "shanten":
            return str(rng.choice([0, 1, 2, 3]))
        if ex.type == "complete":
            return rng.choice(["yes", "no"])
        if ex.type == "discard":
            return tile_name(rng.choice(hand))
        return f"{rng.choice([1, 2, 3, 4])} han {rng.choice([30, 40, 50])} fu"

    def fn(prompts, *, max_new_tokens, batch_size):
        return [Generation(f"Answer: {guess(by_prompt[p[-1]['content']])}", 4, "stop") for p in prompts]

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--types", default="waits,shanten,complete,discard")
    ap.add_argument("--n", type=int, default=100, help="questions per type, zero-shot")
    ap.add_argument("--n-rules", type=int, default=32, help="questions per type with the rules in the prompt (0: skip)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/task_baselines"))
    args = ap.parse_args()

    from stratos.models import load

    model, tok = load(args.model)
    rows = []
    for typ in args.types.split(","):
        task = get_task(f"mahjong:{typ}")
        exs = task.examples("eval", max(args.n, args.n_rules), seed=0)
        runs = [("random guess", exs[: args.n], False), ("zero-shot", exs[: args.n], False)]
        if args.n_rules:
            runs.append(("rules in prompt", exs[: args.n_rules], True))
        for label, subset, rules in runs:
            t0 = time.perf_counter()
            fn = guesser(task, subset) if label == "random guess" else None
            res = evaluate(model, tok, task, subset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           rules=rules, generate_fn=fn, progress=fn is None,
                           predictions_path=args.out / f"{typ}-{label.replace(' ', '_')}.jsonl")
            rows.append({"type": typ, "setting": label, **res.to_dict(), "wall_s": time.perf_counter() - t0})
            print(f"{typ:9s} {label:16s} n={res.n:4d} acc={res.accuracy:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}] "
                  f"credit={res.mean_credit:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baselines.json").write_text(json.dumps({"model": args.model, **vars(args), "out": str(args.out),
                                                         "rows": rows}, indent=2, default=str))
    print("\n| type | setting | n | accuracy | 95% CI | mean credit | unparsed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['setting']} | {r['n']} | {r['accuracy']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
              f"| {r['mean_credit']:.3f} | {r['unparsed']} |")


if __name__ == "__main__":
    main()
