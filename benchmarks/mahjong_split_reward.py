"""A reward for GRPO on Mahjong discards that checks the student's worked reading, not only its answer.

The `split` rationale reads the 14 tiles once into blocks, spare tiles in brackets, then answers with
the first spare (`Split: 3m4m5m [5m] 4p5p6p 6p7p8p 7p9p 3z3z` then `Answer: 5m`; docs/tasks.md). 25
of the demo student's 63 errors on the 400 hands from play were readings that lose or change a tile
(docs/tasks.md; `benchmarks/mahjong_near_ready.py` prints the error kinds). `split_faithful` is 1 when a completion's reading
holds exactly the hand's 14 tiles, every block is a meld, a pair or a partial meld (a bracket may also
hold one tile), and the answer is the first bracketed tile; else 0, also for the few hands whose worked
answer is a table of discards (no reading exists for them: 5 of 2,000 train questions). Used beside the
task's verifier by benchmarks/mahjong_grpo_split.yaml:

    reward_funcs: [verifier, benchmarks/mahjong_split_reward.py:split_faithful]

`right_and_faithful` pays only a right answer reached by a faithful reading. Run as a script, it
measures a model's greedy readings (docs/engine.md, "On Mahjong"):

    python benchmarks/mahjong_split_reward.py runs/mahjong-rationale/model
"""

from __future__ import annotations

import re
from collections import Counter

_TILES = re.compile(r"([1-9]+)([mpsz])")  # "3m", or compact "23446m" in a hand
_READING = re.compile(r"^(Split|Seven pairs|Thirteen orphans):(.*)$", re.MULTILINE)
_HAND = re.compile(r"Hand \(14 tiles\):([^\n]*)")
_ANSWER = re.compile(r"Answer:\s*([1-9][mpsz])")


def _tiles(text: str) -> list[str]:
    return [d + suit for digits, suit in _TILES.findall(text) for d in digits]


def _block_ok(tiles: list[str], reading: str) -> bool:
    """A meld (run or triplet), a pair or a partial meld (two of a suit one or two apart); under seven
    pairs or thirteen orphans, a pair or a single tile."""
    if reading != "Split":
        return len(tiles) in (1, 2) and len(set(tiles)) == 1
    suits = {t[1] for t in tiles}
    nums = sorted(int(t[0]) for t in tiles)
    if len(suits) != 1 or len(tiles) not in (2, 3):
        return False
    if len(set(nums)) == 1:  # a pair or a triplet
        return True
    if suits == {"z"}:  # honours make no runs
        return False
    if len(tiles) == 3:
        return nums == [nums[0], nums[0] + 1, nums[0] + 2]
    return nums[1] - nums[0] in (1, 2)


def faithful(prompt: str, completion: str) -> bool:
    hand, reading, answer = _HAND.search(prompt), _READING.search(completion), _ANSWER.search(completion)
    if not (hand and reading and answer):
        return False
    spares, blocks_ok = [], True
    for part in reading.group(2).split():
        if part.startswith("[") and part.endswith("]"):  # a spare tile, or a spare pair or partial meld
            spare = _tiles(part)
            spares += spare
            blocks_ok &= len(spare) == 1 or _block_ok(spare, reading.group(1))
        else:
            blocks_ok &= _block_ok(_tiles(part), reading.group(1))
    used = _tiles(reading.group(2))
    return (blocks_ok and bool(spares) and Counter(used) == Counter(_tiles(hand.group(1)))
            and answer.group(1) == spares[0])


def split_faithful(prompts, completions, **_columns) -> list[float]:
    """TRL's reward-function signature: one value per completion (see the module's docstring)."""
    return [float(faithful(p if isinstance(p, str) else str(p), c if isinstance(c, str) else str(c)))
            for p, c in zip(prompts, completions)]


def right_and_faithful(prompts, completions, answer, **_columns) -> list[float]:
    """1 for an optimal discard (one of the record's ``answer`` tiles) reached by a faithful reading,
    else 0: a right answer from a reading that lost or changed a tile earns nothing."""
    out = []
    for p, c, best in zip(prompts, completions, answer):
        said = _ANSWER.search(str(c))
        out.append(float(faithful(str(p), str(c)) and said is not None and said.group(1) in _tiles(str(best))))
    return out


def main() -> None:
    """How often a model's greedy readings are faithful, and how that goes with a right answer, on the
    200 validation questions a GRPO spec's evaluation while training scores (docs/engine.md)."""
    import argparse
    import sys
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stratos.distill.evaluation import evaluator_for
    from stratos.evaluate import evaluate
    from stratos.io import read_jsonl
    from stratos.spec import load_spec

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model", help="a model folder (e.g. runs/mahjong-rationale/model)")
    ap.add_argument("--spec", default="benchmarks/mahjong_grpo_split.yaml", help="whose validation questions")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ev = evaluator_for(spec.task, tok, spec.distill, max_new_tokens=128)
    if ev is None:
        sys.exit(f"{args.spec}: no distill.eval_steps, so no validation questions")
    with tempfile.TemporaryDirectory() as tmp:  # greedy, decoded as evaluation while training decodes
        predictions = Path(tmp) / "predictions.jsonl"
        evaluate(model, tok, ev.task, ev.examples, max_new_tokens=128, predictions_path=predictions)
        rows = read_jsonl(predictions)
    right = [r["correct"] for r in rows]
    true = [faithful(r["prompt"], r["output"]) for r in rows]
    n, nf = len(rows), sum(true)
    rf = sum(r and f for r, f in zip(right, true))
    print(f"{args.model}: {n} validation questions, greedy")
    print(f"  right {sum(right) / n:.1%}; faithful readings {nf / n:.1%}")
    print(f"  right with a faithful reading {rf / n:.1%}, with an unfaithful one {(sum(right) - rf) / n:.1%}")
    print(f"  right among faithful readings {rf / max(1, nf):.1%}, among unfaithful ones "
          f"{(sum(right) - rf) / max(1, n - nf):.1%}")


if __name__ == "__main__":
    main()
