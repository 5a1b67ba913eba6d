"""``jsonl``: the user's own prompt/answer file, scored by a scorer named in the spec.

Each line is a JSON object with a prompt and an answer (keys configurable), optionally a
``type`` (for per-type breakdowns) and an ``id``. Scorers: ``exact``, ``normalized``,
``regex`` (the answer is a pattern the output must match), ``numeric`` (within a tolerance)
or ``module:function`` (your code: ``fn(prediction: str, answer) -> bool | float | Score``).
"""

from __future__ import annotations

import importlib
import logging
import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratos.io import DataError, iter_jsonl
from stratos.tasks.base import Example, Score, answer_span, check_split, register_task, split_of

log = logging.getLogger(__name__)

Scorer = Callable[[str, Any], Score]


def _normalize(text: str) -> str:
    # Case, punctuation, articles and spacing do not change an answer (SQuAD-style normalisation).
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _as_float(x: Any) -> float | None:
    if isinstance(x, (int, float)):
        return float(x)
    m = re.search(r"-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?", str(x))
    if not m:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:
        return None


def make_scorer(name: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> Scorer:
    """The scorer called ``name``: a built-in one, or ``module:function`` imported from your code."""
    if name == "exact":
        return lambda pred, ans: _bool_score(pred.strip() == str(ans).strip())
    if name == "normalized":
        return lambda pred, ans: _bool_score(_normalize(pred) == _normalize(str(ans)))
    if name == "regex":
        return lambda pred, ans: _bool_score(re.fullmatch(str(ans), pred.strip(), re.DOTALL) is not None)
    if name == "numeric":
        def numeric(pred: str, ans: Any) -> Score:
            p, a = _as_float(pred), _as_float(ans)
            return _bool_score(p is not None and a is not None and math.isclose(p, a, rel_tol=rel_tol, abs_tol=abs_tol))
        return numeric
    if ":" in name:
        module, _, fn_name = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"jsonl scorer {name!r}: cannot import it ({e})") from None
        return lambda pred, ans: _to_score(fn(pred, ans), name)
    raise ValueError(f"unknown jsonl scorer {name!r}; use exact, normalized, regex, numeric or module:function")


def _answer_problem(answer: Any) -> str | None:
    """Why an answer cannot be scored against (it would mark every output wrong, or right), or None."""
    if answer is None:
        return "is null; every example needs an answer"
    if isinstance(answer, str) and not answer.strip():
        return "is empty; every example needs an answer"
    if isinstance(answer, float) and not math.isfinite(answer):
        return f"is {answer}, not a finite number"
    return None


def _bool_score(ok: bool) -> Score:
    return Score(bool(ok), float(bool(ok)))


def _to_score(value: Any, name: str) -> Score:
    if isinstance(value, Score):
        return value
    if isinstance(value, bool):
        return _bool_score(value)
    if isinstance(value, (int, float)) and 0 <= value <= 1:
        return Score(value >= 1, float(value))
    raise TypeError(f"jsonl scorer {name!r} returned {value!r}; expected a bool, a float in [0, 1] or a Score")


@dataclass
class JsonlTask:
    """A task read from a JSONL file; the train/eval split is a fixed hash partition of the prompts."""

    path: Path
    scorer: str = "exact"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    eval_fraction: float = 0.2
    rules: str = ""  # the domain in words, for knowledge injection (optional)
    rel_tol: float = 1e-6
    abs_tol: float = 1e-9
    name: str = "jsonl"
    duplicates: int = 0  # lines dropped because their prompt appeared before (counted and logged)
    _rows: list[Example] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._score = make_scorer(self.scorer, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        self._rows = self._load()

    def _load(self) -> list[Example]:
        rows, seen = [], set()
        id_lines: dict[str, int] = {}  # each id given in the file -> the line it is on
        for lineno, rec in iter_jsonl(self.path):
            for key in (self.prompt_key, self.answer_key):
                if key not in rec:
                    raise DataError(f"{self.path}:{lineno}: missing key {key!r} (found: {', '.join(sorted(rec)) or 'none'})")
            prompt = rec[self.prompt_key]
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{self.path}:{lineno}: {self.prompt_key!r} must be a non-empty string")
            if problem := _answer_problem(rec[self.answer_key]):
                raise DataError(f"{self.path}:{lineno}: {self.answer_key!r} {problem}")
            if prompt in seen:
                self.duplicates += 1
                continue
            seen.add(prompt)
            ex_id = rec.get("id")
            if ex_id is not None:
                if isinstance(ex_id, bool) or not isinstance(ex_id, (str, int)):
                    raise DataError(f"{self.path}:{lineno}: 'id' must be a string or an integer, got {ex_id!r}")
                # Predictions and reports are keyed by id: two examples under one id would be mixed up.
                if (first := id_lines.setdefault(str(ex_id), lineno)) != lineno:
                    raise DataError(f"{self.path}:{lineno}: duplicate id {str(ex_id)!r}, already on line {first}")
            rows.append(Example(id=str(ex_id) if ex_id is not None else f"line{lineno}", question=prompt,
                                answer=rec[self.answer_key], type=str(rec.get("type", "default")), meta={"line": lineno}))
        if not rows:
            raise DataError(f"{self.path}: no examples")
        if self.duplicates:
            log.warning("%s: %d lines repeat an earlier prompt and were dropped", self.path, self.duplicates)
        return rows

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        check_split(split)
        pool = [ex for ex in self._rows if split_of(ex.question, self.eval_fraction) == split]
        random.Random(f"jsonl:{split}:{seed}").shuffle(pool)
        if n is not None and n > len(pool):
            log.warning("%s: %d %s examples asked, the file has %d; using %d", self.path, n, split, len(pool), len(pool))
        return pool if n is None else pool[:n]

    def prompt(self, ex: Example, *, rules: bool = False) -> str:
        return f"{self.rules}\n\n{ex.question}" if rules and self.rules else ex.question

    def target(self, ex: Example, *, rationale: bool = False) -> str:
        return str(ex.answer)

    def parse(self, text: str, ex: Example | None = None) -> str | None:
        span = answer_span(text).strip()
        return span or None

    def score(self, ex: Example, answer: str | None) -> Score:
        if answer is None:
            return Score(False, 0.0)
        return self._score(answer, ex.answer)

    def describe(self) -> str:
        return self.rules or f"Questions and answers from {self.path.name}."


@register_task("jsonl")
def make_jsonl(sub: str | None = None, *, path: str | Path | None = None, scorer: str = "exact", prompt_key: str = "prompt",
               answer_key: str = "answer", eval_fraction: float = 0.2, rules: str = "", rel_tol: float = 1e-6,
               abs_tol: float = 1e-9) -> JsonlTask:
    if path is None:
        raise ValueError("task 'jsonl' needs a path (spec task.path)")
    return JsonlTask(path=Path(path), scorer=scorer, prompt_key=prompt_key, answer_key=answer_key,
                     eval_fraction=eval_fraction, rules=rules, rel_tol=rel_tol, abs_tol=abs_tol)
