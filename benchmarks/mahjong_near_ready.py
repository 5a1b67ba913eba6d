"""The Mahjong student on hands from play: near-ready discard questions made apart from the training sampler.

The task's questions (`mahjong:discard`) come from complete hands with tiles swapped out. This script
makes its own the way hands arise at a table: a shuffled wall of 136 tiles, 13 dealt, then draw a
tile and discard, repeatedly (the discard is a random optimal one: a player who plays for speed),
until the 14 tiles in hand are *near-ready*: the best discard leaves the hand ready or one tile
from ready, with at most 3 optimal discards (so a guess scores low), and the hand is not already
complete. Each such hand becomes one question in the task's own wording. The optimal discards are
computed here with the `mahjong` package's `Shanten` directly, not through `stratos.tasks.mahjong`.

    python benchmarks/mahjong_near_ready.py RUN/distill/model --run RUN --eval-split
    python benchmarks/mahjong_near_ready.py MODEL_DIR --n 400 --seed 0 --out runs/near-ready

Prints accuracy with a 95% Wilson interval, per group (ready or one from ready after the best
discard; regular hand, seven pairs or thirteen orphans as the best reading), and, with --run, how
many of the hands appear in that run's training data (the leakage check of the eval stage; such
hands are still scored). --eval-split scores the task's 200 eval questions the same way, and
--validation N the first N validation questions (the task's eval split past those 200: what
``distill.eval_samples`` scores while training), a larger sample for comparing two students.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from mahjong.shanten import Shanten

from stratos.evaluate import evaluate, leakage, wilson_interval
from stratos.io import read_jsonl
from stratos.tasks.base import Example
from stratos.tasks.mahjong import MahjongTask, to_compact


def _shanten(c: list[int]) -> int:
    return Shanten().calculate_shanten(c)


def _forms(c: list[int]) -> dict[str, int]:
    s = Shanten()
    return {"regular": s.calculate_shanten_for_regular_hand(c), "seven pairs": s.calculate_shanten_for_chiitoitsu_hand(c),
            "thirteen orphans": s.calculate_shanten_for_kokushi_hand(c)}


def near_ready_hands(n: int, seed: int = 0, max_best: int = 3, max_draws: int = 24) -> list[dict]:
    """``n`` distinct 14-tile hands from simulated play (see the module doc), with their optimal discards."""
    rng = random.Random(f"near-ready:{seed}")
    wall = [t for t in range(34) for _ in range(4)]
    out, seen = [], set()
    while len(out) < n:
        rng.shuffle(wall)
        hand = [0] * 34
        for t in wall[:13]:
            hand[t] += 1
        for pos in range(13, 13 + max_draws):
            hand[wall[pos]] += 1
            if _shanten(hand) < 0:  # complete: a win, not a discard question
                break
            after = {}
            for t in range(34):
                if hand[t]:
                    hand[t] -= 1
                    after[t] = _shanten(hand)
                    hand[t] += 1
            low = min(after.values())
            best = [t for t, s in after.items() if s == low]
            if low <= 1 and len(best) <= max_best:
                key = to_compact(hand, counts=True)
                if key not in seen:
                    seen.add(key)
                    forms = _forms(hand)
                    out.append({"hand": key, "best": best, "low": low,
                                "form": min(forms, key=lambda f: (forms[f], f != "regular"))})
                break
            hand[rng.choice(best)] -= 1
    return out


def as_examples(hands: list[dict]) -> list[Example]:
    return [Example(f"near-ready-{i}", f"Hand (14 tiles): {h['hand']}\nWhich tile should be discarded to leave the "
                    "lowest shanten?", to_compact(h["best"]), "discard",
                    {"class": h["low"], "hand": h["hand"], "form": h["form"]})
            for i, h in enumerate(hands)]


def report(name: str, task: MahjongTask, examples: list[Example], res, rows: list[dict]) -> None:
    """Accuracy with its 95% interval, then per group: how close the best discard leaves the hand, and
    (hands from play) which reading is best."""
    print(f"\n{name}: accuracy {res.accuracy:.1%} [{res.ci_low:.1%}, {res.ci_high:.1%}] of {res.n}, "
          f"{res.unparsed} unparsed, {res.truncated} cut by max_new_tokens")
    groups = defaultdict(list)
    for ex, row in zip(examples, rows):
        groups[task.group(ex)].append(row["correct"])
        if "form" in ex.meta:
            groups[f"best read as {ex.meta['form']}"].append(row["correct"])
    print("| group | n | accuracy (95% CI) |\n|---|---|---|")
    for group, oks in sorted(groups.items()):
        a, b = wilson_interval(sum(oks), len(oks))
        print(f"| {group} | {len(oks)} | {sum(oks) / len(oks):.1%} [{a:.1%}, {b:.1%}] |")
    wrong = error_kinds(task, examples, rows)
    if wrong:
        print(f"\n| where the {sum(wrong.values())} wrong answers went wrong (first line against the oracle's) | n |"
              "\n|---|---|")
        for kind, count in wrong.most_common():
            print(f"| {kind} | {count} |")


TILE = re.compile(r"[1-9][mpsz]")


def error_kinds(task: MahjongTask, examples: list[Example], rows: list[dict]) -> Counter:
    """Where the wrong answers went wrong, read off the first line of each answer against the oracle's
    worked answer (``task.target(ex, rationale=True)``): the kind of reading (``Split`` for a regular
    hand, ``Seven pairs``, ``Thirteen orphans``) differs; or the reading's tiles are not the hand's (a
    tile lost or changed on the way); or it holds the hand's tiles, grouped otherwise."""
    kinds: Counter = Counter()
    for ex, row in zip(examples, rows):
        if row["correct"]:
            continue
        ref, got = task.target(ex, rationale=True).split("\n")[0], (row.get("output") or "").split("\n")[0]
        hand = Counter(TILE.findall(row["prompt"].split("\n")[0]))
        if got.partition(":")[0] != ref.partition(":")[0]:
            kinds["another kind of reading (regular, seven pairs, thirteen orphans)"] += 1
        elif Counter(TILE.findall(got.partition(":")[2])) != hand:
            kinds["a reading that loses or changes a tile of the hand"] += 1
        else:
            kinds["the hand's tiles, grouped otherwise"] += 1
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model folder (the student, e.g. RUN/distill/model)")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-split", action="store_true", help="also score the task's 200 eval questions")
    ap.add_argument("--validation", type=int, default=0, metavar="N",
                    help="also score N validation questions: the eval split past the eval stage's 200, the ones "
                    "distill.eval_samples scores while training (a larger sample than the 200)")
    ap.add_argument("--run", help="a run directory: count hands found in its training data (RUN/synth/data.jsonl)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/near-ready"), help="predictions go here (jsonl)")
    args = ap.parse_args()

    from stratos.models import load

    task = MahjongTask(types=("discard",), notation="spaced")
    model, tok = load(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = [(f"{args.n} near-ready hands from play (seed {args.seed})", "near-ready",
             as_examples(near_ready_hands(args.n, args.seed)))]
    if args.eval_split:
        sets.append(("the task's 200 eval questions", "eval-split", task.examples("eval", 200, seed=0)))
    if args.validation:
        from stratos.distill.evaluation import validation_examples

        sets.append((f"{args.validation} validation questions", "validation",
                     validation_examples(task, args.validation, seed=0, held_out=200)))
    for name, slug, examples in sets:
        path = args.out / f"{slug}.jsonl"
        res = evaluate(model, tok, task, examples, max_new_tokens=args.max_new_tokens, predictions_path=path)
        report(name, task, examples, res, list(read_jsonl(path)))
        if args.run:
            records = list(read_jsonl(Path(args.run) / "synth" / "data.jsonl"))
            found = leakage(task, examples, records)
            print(f"in the run's training data: {found['found']} of {found['eval_questions']} questions")


if __name__ == "__main__":
    main()
