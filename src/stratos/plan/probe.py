"""Measuring what the planner cannot know from a datasheet: how good each teacher is on the task,
how fast it answers, and how long the task's prompts and answers are.

``probe_teacher`` is the one function that runs models; everything downstream (strategy, accuracy
priors, Pareto selection) takes its ``TeacherProbe`` numbers, so it can be tested with given ones.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class TeacherProbe:
    teacher: str
    n: int
    accuracy: float  # zero-shot
    accuracy_rules: float | None  # with the task's rules in the prompt (None: not probed)
    latency_s: float  # per example, zero-shot (local: batched wall time / n; API: mean request latency)
    tokens_per_s: float = 0.0  # local: batched; API: per stream (tokens / request latencies)
    seconds: float = 0.0  # wall time of the whole probe
    source: str = "measured"  # 'measured' or 'given'
    cost_usd: float = 0.0  # an API teacher's requests at its price (cached answers included: what the probe cost)
    shots: int = 0  # worked examples before each question in the third run (0: not probed)
    accuracy_shots: float | None = None  # with ``shots`` worked examples, as synth.few_shot asks (None: not probed)

    @property
    def best(self) -> float:
        return max(self.accuracy, self.accuracy_rules or 0.0, self.accuracy_shots or 0.0)

    @property
    def rules_help(self) -> float:
        return (self.accuracy_rules or 0.0) - self.accuracy if self.accuracy_rules is not None else 0.0

    @property
    def shots_help(self) -> float:
        return (self.accuracy_shots or 0.0) - self.accuracy if self.accuracy_shots is not None else 0.0

    def asked(self, *, rules: bool, few_shot: int) -> float:
        """The probe's accuracy of the teacher asked as synth will ask it: with ``few_shot`` worked examples
        when the probe measured that many, else with the rules when they go in and were probed, else
        zero-shot (the zero-shot figure when the way it is asked was not probed)."""
        if few_shot and few_shot == self.shots and self.accuracy_shots is not None:
            return self.accuracy_shots
        if rules and self.accuracy_rules is not None:
            return self.accuracy_rules
        return self.accuracy

    def words(self) -> str:
        """The probe's figures in words, for plan reasons."""
        extra = ([f"{self.accuracy_rules:.0%} with the rules in the prompt"] if self.accuracy_rules is not None
                 else []) + ([f"{self.accuracy_shots:.0%} with {self.shots} worked example(s) before each question"]
                             if self.accuracy_shots is not None else [])
        return f"{self.accuracy:.0%} zero-shot" + "".join(f", {e}" for e in extra) + f" (n={self.n})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherProbe":
        return cls(**d)


@dataclass
class TaskProfile:
    """How big and how hard a task is, as the strategy and the cost model see it."""

    name: str
    prompt_tokens: float
    answer_tokens: float
    rationale_tokens: float
    reasoning_steps: float
    verifier: bool  # answers can be checked automatically
    oracle: bool  # new questions with known answers can be made (reverse synthesis)
    train_size: int
    # A teacher's prompt, plain and with the task's rules before it, in the teacher's tokens (0: not measured)
    teacher_prompt_tokens: float = 0.0
    rules_prompt_tokens: float = 0.0
    oracle_seconds: float = 0.0  # to make one question with its worked answer here (0: not measured)

    def teacher_prompt(self, *, rules: bool = False, few_shot: int = 0) -> float:
        """A teacher's prompt in tokens: the question (with the task's rules when they go in) after
        ``few_shot`` worked examples, each a question and its worked answer (``synth.few_shot``)."""
        one = (self.rules_prompt_tokens if rules else self.teacher_prompt_tokens) or self.prompt_tokens
        return one * (1 + few_shot) + few_shot * self.rationale_tokens

    def probe_prompts(self, probe: "TeacherProbe") -> list[float]:
        """The prompt length, in the teacher's tokens, of each run the probe made (zero-shot, with the
        rules, with worked examples)."""
        return [self.teacher_prompt()] + ([self.teacher_prompt(rules=True)] if probe.accuracy_rules is not None
                                          else []) + ([self.teacher_prompt(few_shot=probe.shots)]
                                                      if probe.accuracy_shots is not None else [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def has_oracle(task: Any) -> bool:
    """File-backed tasks (jsonl) hold a fixed set of questions; generated ones can make more."""
    own = getattr(task, "oracle", None)
    if isinstance(own, bool):
        return own
    return task.name.partition(":")[0] != "jsonl"


def _steps(rationale: str) -> int:
    """Reasoning steps in a worked answer: its non-empty lines or sentences, the answer line excluded."""
    parts = [p for p in re.split(r"\n+|(?<=[.;])\s+", rationale.strip()) if p.strip()]
    return max(0, len(parts) - 1)


def profile_task(task: Any, *, train_size: int, tokenizer: Any = None, n: int = 20, seed: int = 0,
                 teacher_tokenizer: Any = None) -> TaskProfile:
    """Measure prompt, answer and rationale lengths on ``n`` train examples (tokens with ``tokenizer``, the
    student's, else characters / 4, the usual English average; the prompt as the student trains on it and is
    served it, through its chat template where it has one), a teacher's prompt with and without the
    rules (in ``teacher_tokenizer``'s tokens, else as the student's), and the time this machine takes to
    make one question with its worked answer (what reverse synthesis does per question)."""
    t0 = time.perf_counter()
    examples = task.examples("train", n, seed=seed)
    rationales = [task.target(ex, rationale=True) for ex in examples]
    made = (time.perf_counter() - t0) / max(1, len(examples))

    def count(text: str, tok: Any = tokenizer) -> float:
        return len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else len(text) / 4

    t_tok = teacher_tokenizer if teacher_tokenizer is not None else tokenizer

    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from stratos.models.generate import encode_prompt
        from stratos.tasks.base import messages

        # The template's own tokens (a system prompt, role markers) are a third of a short question's and more.
        prompts = [float(len(encode_prompt(tokenizer, messages(task, ex)))) for ex in examples]
    else:
        prompts = [count(task.prompt(ex)) for ex in examples]
    answers = [count(task.target(ex)) for ex in examples]
    return TaskProfile(
        name=task.name,
        prompt_tokens=statistics.mean(prompts),
        answer_tokens=statistics.mean(answers),
        rationale_tokens=statistics.mean(count(r) for r in rationales),
        reasoning_steps=statistics.mean(_steps(r) for r in rationales),
        verifier=callable(getattr(task, "score", None)),
        oracle=has_oracle(task),
        train_size=train_size,
        teacher_prompt_tokens=statistics.mean(count(task.prompt(ex), t_tok) for ex in examples),
        rules_prompt_tokens=statistics.mean(count(task.prompt(ex, rules=True), t_tok) for ex in examples),
        oracle_seconds=made,
    )


def probe_teacher(teacher: Any, task: Any, examples: Sequence[Any], *, rules: bool = True, batch_size: int = 16,
                  max_new_tokens: int = 64, model_and_tokenizer: tuple[Any, Any] | None = None,
                  device: str | None = None, cache_dir: str | Path | None = None, price: Any = None,
                  progress: bool = False, context: Sequence[dict[str, str]] = ()) -> TeacherProbe:
    """Probe one teacher on ``examples``: zero-shot, then with the rules in the prompt, then (``context``:
    worked examples as chat turns, ``stratos.synth.spec_context``) with the worked examples before each
    question.

    ``teacher`` is a ``TeacherSpec`` or a ``stratos.teachers.Teacher``. A teacher object, and an API
    teacher's spec (backend ``openai``, built with ``make_teacher`` on the request cache ``cache_dir``
    at ``price``), is asked through ``stratos.teachers.generate_fn``: the one client synthesis and
    the eval stage use, with its cache and retries; its latency is the mean request latency. A local
    teacher's spec is loaded on ``device`` (or passed in as ``model_and_tokenizer``) and run in
    process through the evaluator, which measures its speed (no cache: the probe times it)."""
    from stratos.evaluate import evaluate
    from stratos.teachers import generate_fn, make_teacher

    t0 = time.perf_counter()
    client = teacher if callable(getattr(teacher, "generate", None)) else None
    own = client is None and teacher.backend == "openai"
    if own:
        client = make_teacher(teacher, cache_dir=cache_dir, price=price)
    if client is not None:
        fn, model, tok = generate_fn(client, progress=progress), None, None
    else:
        fn = None
        if model_and_tokenizer is None:
            from stratos.models import load

            where = {} if device is None else {"device": device}
            model_and_tokenizer = load(teacher.model, dtype=teacher.dtype, trust_remote_code=teacher.trust_remote_code,
                                       **where)
        model, tok = model_and_tokenizer
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, generate_fn=fn, progress=progress)
    spent_before = client.usage.cost_usd if client is not None else 0.0
    try:
        zero = evaluate(model, tok, task, examples, rules=False, **kw)
        with_rules = evaluate(model, tok, task, examples, rules=True, **kw) if rules else None
        shown = evaluate(model, tok, task, examples, context=context, **kw) if context else None
        cost = client.usage.cost_usd - spent_before if client is not None else 0.0
    finally:
        if own:
            client.close()
    return TeacherProbe(
        teacher=teacher.label, n=zero.n, accuracy=zero.accuracy,
        accuracy_rules=with_rules.accuracy if with_rules else None,
        latency_s=zero.mean_latency_s, tokens_per_s=zero.tokens_per_s, seconds=time.perf_counter() - t0,
        cost_usd=cost, shots=len(context) // 2 if shown else 0,
        accuracy_shots=shown.accuracy if shown else None,
    )
