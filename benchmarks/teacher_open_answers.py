"""Does the teacher know a task with many right answers? Greedy answers of a model to four kinds of
question whose answer is any of many numbers, each checked exactly.

Knowledge alignment shows what KD adds over SFT where the teacher's distribution holds right answers
that the one kept sample does not (docs/benchmarks.md, "What the teacher adds in a run"); "What is
N + 1?" has one right answer. This measures whether SmolLM2-135M-Instruct knows any such task well
enough (50% or more) to serve as the alignment example's:

    python benchmarks/teacher_open_answers.py                 # 64 questions per kind, about a minute
    python benchmarks/teacher_open_answers.py --n 200 --model PATH_OR_ID

Prints a markdown table: accuracy per kind and one greedy answer of each.
"""

from __future__ import annotations

import argparse
import random
import re

import torch

from stratos.models import load
from stratos.models.generate import generate

_INT = re.compile(r"\d+")


def questions(n: int, seed: int = 0) -> dict[str, list[tuple[str, object]]]:
    """Per kind, n (question, check) pairs; check(numbers after the last 'Answer:') -> bool."""
    rng = random.Random(seed)
    kinds: dict[str, list[tuple[str, object]]] = {"between": [], "greater": [], "even greater": [], "sum of two": []}
    for _ in range(n):
        a, k = rng.randint(100, 989), rng.randint(3, 10)
        kinds["between"].append((f"Name a number between {a} and {a + k}.",
                                 lambda xs, a=a, b=a + k: bool(xs) and a < xs[0] < b))
        a = rng.randint(100, 989)
        kinds["greater"].append((f"Name a number greater than {a}.", lambda xs, a=a: bool(xs) and xs[0] > a))
        a = rng.randint(10, 989)
        kinds["even greater"].append((f"Name an even number greater than {a}.",
                                      lambda xs, a=a: bool(xs) and xs[0] > a and xs[0] % 2 == 0))
        s = rng.randint(10, 99)
        kinds["sum of two"].append((f"Give two numbers that add up to {s}.",
                                    lambda xs, s=s: len(xs) >= 2 and xs[0] + xs[1] == s))
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=64, help="questions per kind")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load(args.model)
    print(f"{args.model}, greedy, {args.n} questions per kind\n")
    print("| kind | correct | one answer |")
    print("|---|---|---|")
    for kind, qs in questions(args.n).items():
        prompts = [q + "\nReply with 'Answer: <number>'." for q, _ in qs]
        outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens)
        ok = 0
        for (_, check), out in zip(qs, outs):
            text = out[0].text
            ok += check([int(x) for x in _INT.findall(text.split("Answer:")[-1])])
        first = outs[0][0].text
        print(f"| {kind} | {ok}/{len(qs)} ({ok / len(qs):.0%}) | {qs[0][0]} -> {first.strip()[:60]!r} |")


if __name__ == "__main__":
    main()
