"""The Task protocol: what every task (built-in or the user's) provides, and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Split = Literal["train", "eval"]


@dataclass
class Example:
    """One question with its reference answer."""

    id: str
    question: str  # the task input in words, without instructions on the answer format
    answer: Any  # canonical answer object (a set of tiles, an int, a string ...)
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
        """Seeded examples; the train and eval splits of one seed never share a question."""

    def prompt(self, ex: Example, *, rules: bool = False) -> str:
        """The user message: question plus answer-format instructions (and the rules if asked)."""

    def target(self, ex: Example, *, rationale: bool = False) -> str:
        """The reference response text a student is trained on (optionally with a rationale)."""

    def parse(self, text: str) -> Any | None:
        """The answer in a model's text, or None when there is none."""

    def score(self, ex: Example, answer: Any | None) -> Score: ...

    def describe(self) -> str:
        """The domain and its rules in plain words (knowledge injection)."""


def messages(task: Task, ex: Example, *, rules: bool = False, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages for an example; render them with the tokenizer's chat template."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": task.prompt(ex, rules=rules)})
    return msgs


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Register a task factory: ``@register_task("mine") def make(sub=None, **options) -> Task``."""

    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        TASKS[name] = factory
        return factory

    return deco


def get_task(name: str, **options: Any) -> Task:
    """Build a task from 'name' or 'name:subtask' (e.g. 'mahjong:waits')."""
    base, _, sub = name.partition(":")
    if base not in TASKS:
        raise KeyError(f"unknown task {base!r}; registered: {', '.join(sorted(TASKS))}")
    return TASKS[base](sub or None, **options)
