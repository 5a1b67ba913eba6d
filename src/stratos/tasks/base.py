"""The Task protocol: what every task (built-in or the user's) provides, and the registry.

A task turns seeded randomness into questions with reference answers, renders them as prompts,
reads answers back out of model text and scores them. Everything else in Stratos (synthesis,
training data, the evaluator) goes through these few methods, so a user's own task plugs in by
implementing them and registering a factory with ``@register_task``.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from stratos.errors import UserError

Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")


@dataclass
class Example:
    """One question with its reference answer."""

    id: str
    question: str  # the task input in words, without instructions on the answer format
    answer: Any  # canonical answer, JSON-able (a compact tile string, an int, a string ...)
    type: str = "default"  # question type / sub-task, for per-type breakdowns
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Score:
    correct: bool  # exact match
    credit: float  # partial credit in [0, 1]; equals float(correct) where partial credit makes no sense


@runtime_checkable
class Task(Protocol):
    name: str

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """Seeded examples; the train and eval splits never share a question."""

    def prompt(self, ex: Example, *, rules: bool = False) -> str:
        """The user message: question plus answer-format instructions (and the rules if asked)."""

    def target(self, ex: Example, *, rationale: bool = False) -> str:
        """The reference response text a student is trained on (optionally with a rationale)."""

    def parse(self, text: str, ex: Example | None = None) -> Any | None:
        """The answer in a model's text, or None when there is none.

        ``ex`` is given by callers that have it; tasks mixing question types use its ``type``
        to know which kind of answer to look for."""

    def score(self, ex: Example, answer: Any | None) -> Score: ...

    def describe(self) -> str:
        """The domain and its rules in plain words (knowledge injection)."""


def grade(task: Task, ex: Example, text: str) -> tuple[Any | None, Score]:
    """Parse a model's text and score it: the one call the evaluator and rejection sampling need."""
    answer = task.parse(text, ex)
    return answer, task.score(ex, answer)


def messages(task: Task, ex: Example, *, rules: bool = False, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages for an example; render them with the tokenizer's chat template."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": task.prompt(ex, rules=rules)})
    return msgs


def to_records(task: Task, examples: Iterable[Example], *, rules: bool = False, rationale: bool = False) -> list[dict[str, Any]]:
    """Training records in the KD engine's JSONL format.

    ``{"prompt", "response", "answer", "type", "id"}``, and ``meta`` when the example has any (what the
    verifier may need besides the answer, e.g. Mahjong's shanten after each discard, for partial credit
    on a student's own samples in RL): the engine renders ``prompt`` as a user message through the chat
    template and trains on ``response`` + EOS.
    """
    return [
        {
            "prompt": task.prompt(ex, rules=rules),
            "response": task.target(ex, rationale=rationale),
            "answer": ex.answer,
            "type": ex.type,
            "id": ex.id,
            **({"meta": ex.meta} if ex.meta else {}),
        }
        for ex in examples
    ]


def corpus(task: Task, n_examples: int = 0, seed: int = 0) -> list[dict[str, str]]:
    """Knowledge-injection text records ``{"text": ...}``: the task's rules, plus worked examples.

    Tasks with a richer corpus (mahjong) provide ``task.corpus(n_examples, seed)``; for the others
    the rules text plus train-split question/answer pairs with rationales is used.
    """
    own = getattr(task, "corpus", None)
    if callable(own):
        return own(n_examples, seed=seed)
    out = [{"text": task.describe()}]
    for ex in task.examples("train", n_examples, seed=seed) if n_examples else []:
        out.append({"text": f"{ex.question}\n{task.target(ex, rationale=True)}"})
    return out


# --------------------------------------------------------------------------- helpers for tasks


def split_of(key: str, eval_fraction: float = 0.125, salt: str = "stratos-split") -> Split:
    """The split a canonical question key belongs to: a fixed hash partition of the question space.

    The partition does not depend on the seed, so no seed's train split ever contains a question
    of any seed's eval split; seeds only choose which questions of each part are drawn.
    """
    h = int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")




def answer_span(text: str) -> str:
    """The part of a model's text after its last 'Answer:' marker (the whole text when there is none).

    Models often restate the question or reason first; the final marked answer is what counts.
    """
    matches = list(re.finditer(r"answer\s*(?:is\s*)?[:=]", text, re.IGNORECASE))
    if matches:
        return text[matches[-1].end():]
    return text


# --------------------------------------------------------------------------- the registry


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Register a task factory: ``@register_task("mine") def make(sub=None, **options) -> Task``."""

    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        TASKS[name] = factory
        return factory

    return deco


class TaskError(UserError, ValueError):
    """A task that cannot be built as asked: unknown name, unknown option or a bad option value."""


def get_task(name: str, **options: Any) -> Task:
    """Build a task from 'name' or 'name:subtask' (e.g. 'mahjong:waits'); options are the factory's kwargs.

    Raises TaskError for an unknown task or a bad option (and DataError, naming file and line,
    for a bad data file of a file-backed task)."""
    base, _, sub = name.partition(":")
    if base not in TASKS:
        raise TaskError(f"unknown task {base!r}; registered: {', '.join(sorted(TASKS))}")
    factory = TASKS[base]
    try:
        inspect.signature(factory).bind(sub or None, **options)
    except TypeError as e:
        # A misspelt option (spec task.options) arrives as an unexpected keyword: name the task.
        raise TaskError(f"task {name!r}: bad options: {e}") from None
    try:
        return factory(sub or None, **options)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # a factory's own check of an option's value
        raise TaskError(f"task {name!r}: {str(e).strip(chr(39))}") from None


def task_from_spec(task_spec: Any, **overrides: Any) -> Task:
    """The task a spec's ``task:`` section describes (``TaskSpec``): its name and options, plus
    ``path`` and ``scorer`` for the file-backed ``jsonl`` task."""
    options = {**task_spec.options, **overrides}
    if task_spec.name.partition(":")[0] == "jsonl":
        options.setdefault("path", task_spec.path)
        options.setdefault("scorer", task_spec.scorer)
    return get_task(task_spec.name, **options)

