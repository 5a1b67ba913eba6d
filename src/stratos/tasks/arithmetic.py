"""``arithmetic``: multi-digit integer arithmetic, small and fast, for tests and quick demos.

Answers are short ("Answer: 579") so that a model of a million parameters can learn 3-digit
addition in minutes on a CPU.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from stratos.tasks.base import Example, Score, answer_span, check_split, register_task, split_of

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INT_RE = re.compile(r"-?\d[\d,]*")


@dataclass
class ArithmeticTask:
    """Questions ``a <op> b`` with operands of up to ``digits`` digits.

    Options (spec ``task.options``): ``digits`` (default 3), ``ops`` ("+" by default; any of
    "+-*", as a string or a list), ``b`` (the second operand fixed at this value: ``b: 1`` asks
    "What is N + 1?"), ``eval_fraction`` of the question space held out for eval.
    """

    digits: int = 3
    ops: str = "+"
    eval_fraction: float = 0.125
    b: int | None = None
    name: str = "arithmetic"

    def __post_init__(self) -> None:
        if isinstance(self.ops, (list, tuple)):
            self.ops = "".join(self.ops)
        bad = [o for o in self.ops if o not in _OPS]
        if not self.ops or bad:
            raise ValueError(f"arithmetic: ops must be made of '+', '-', '*' (got {self.ops!r})")
        if not 1 <= self.digits <= 18:
            raise ValueError(f"arithmetic: digits must be between 1 and 18 (got {self.digits})")
        if self.b is not None and (isinstance(self.b, bool) or not isinstance(self.b, int) or self.b < 0):
            raise ValueError(f"arithmetic: b must be a non-negative integer (got {self.b!r})")

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        check_split(split)
        rng = random.Random(f"arithmetic:{split}:{seed}")
        hi = 10**self.digits - 1
        space = (hi + 1) * (hi + 1 if self.b is None else 1) * len(self.ops)
        # The held-out part of a small question space can be smaller than n: say so, don't loop forever.
        limit = space * (self.eval_fraction if split == "eval" else 1 - self.eval_fraction)
        if n > 0.5 * limit:
            raise ValueError(
                f"arithmetic: {n} {split} examples asked, but {self.digits}-digit {self.ops!r} questions give "
                f"only about {int(limit)} in that split; raise digits{' or eval_fraction' if split == 'eval' else ''}, "
                "or lower n"
            )
        out, seen = [], set()
        while len(out) < n:
            a, op = rng.randint(0, hi), rng.choice(self.ops)
            b = rng.randint(0, hi) if self.b is None else self.b
            key = f"{a}{op}{b}"
            if key in seen or split_of(key, self.eval_fraction) != split:
                continue
            seen.add(key)
            out.append(Example(id=f"{split}-{seed}-{len(out)}", question=f"What is {a} {op} {b}?",
                               answer=_OPS[op](a, b), type=op, meta={"a": a, "b": b, "op": op}))
        return out

    def prompt(self, ex: Example, *, rules: bool = False) -> str:
        head = self.describe() + "\n\n" if rules else ""
        return f"{head}{ex.question}\nReply with 'Answer: <number>'."

    def target(self, ex: Example, *, rationale: bool = False) -> str:
        if rationale:
            return f"{ex.meta['a']} {ex.meta['op']} {ex.meta['b']} = {ex.answer}\nAnswer: {ex.answer}"
        return f"Answer: {ex.answer}"

    def parse(self, text: str, ex: Example | None = None) -> int | None:
        # The first integer after the last 'Answer:' marker; else the last integer in the text.
        span = answer_span(text)
        nums = _INT_RE.findall(span)
        if not nums:
            return None
        pick = nums[0] if span is not text else nums[-1]
        try:
            return int(pick.replace(",", ""))
        except ValueError:
            return None

    def score(self, ex: Example, answer: int | None) -> Score:
        ok = answer is not None and int(answer) == int(ex.answer)
        return Score(ok, float(ok))

    def describe(self) -> str:
        names = {"+": "addition", "-": "subtraction", "*": "multiplication"}
        return (
            f"Integer arithmetic ({', '.join(names[o] for o in self.ops)}) on numbers of up to {self.digits} digits. "
            "Work column by column from the rightmost digit, carrying or borrowing as needed, "
            "and give the exact integer result."
        )


@register_task("arithmetic")
def make_arithmetic(sub: str | None = None, *, digits: int = 3, ops: str | list[str] | None = None,
                    eval_fraction: float = 0.125, b: int | None = None) -> ArithmeticTask:
    # 'arithmetic:+-' picks the operators, like options {ops: "+-"}
    return ArithmeticTask(digits=digits, ops=ops or sub or "+", eval_fraction=eval_fraction, b=b)
