"""Evaluation while training: held-out questions of the task scored every ``eval_steps`` optimizer steps.

    evaluator = evaluator_for(spec.task, tokenizer, spec.distill, max_new_tokens=spec.eval.max_new_tokens)
    distill(student, tokenizer, records, spec.distill, out, evaluator=evaluator)

An evaluator is any callable ``(model, step) -> dict[str, float]`` whose dict holds ``eval_accuracy``
(the metric ``load_best_model_at_end`` keeps the best checkpoint by); the trainer calls it after the
optimizer step at every multiple of ``eval_steps`` and at the last step and logs what it returns in
metrics.jsonl. :class:`TaskEvaluator` is the one the pipeline uses: greedy generation on a fixed
sample of the task's eval split, graded by the task's verifier, through ``stratos.evaluate.evaluate``
(the same scoring as the eval stage, on other questions).

The questions are *validation* questions: from the eval split (so never trained on), but not among the
questions the eval stage scores (:func:`validation_examples`). A checkpoint chosen by them
(``load_best_model_at_end``) is then measured by the eval stage on questions that played no part in
choosing it, so the reported accuracy is not inflated by the choice.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from stratos.evaluate import canonical_text, evaluate
from stratos.tasks.base import Example, Task

__all__ = ["TaskEvaluator", "evaluator_for", "validation_examples"]


class TaskEvaluator:
    """Score a model on fixed ``examples`` of ``task``: ``TaskEvaluator(...)(model, step)`` returns
    ``eval_accuracy`` (share of exactly right answers), ``eval_credit`` (mean partial credit),
    ``eval_n`` (examples scored), ``eval_unparsed`` (outputs with no answer), ``eval_truncated``
    (outputs cut by ``max_new_tokens``) and ``eval_s`` (seconds the generation took).

    The model is scored in eval mode (no dropout) and put back in the mode it was in; the torch RNG
    is forked around it, so a run with evaluation trains exactly the steps a run without it does."""

    def __init__(
        self,
        task: Task,
        examples: Sequence[Example],
        tokenizer: Any,
        *,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        rules: bool = False,
    ):
        if not examples:
            raise ValueError("TaskEvaluator: no eval examples")
        self.task, self.examples, self.tokenizer = task, list(examples), tokenizer
        self.max_new_tokens, self.batch_size, self.rules = max_new_tokens, batch_size, rules

    def __call__(self, model: Any, step: int) -> dict[str, float]:
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                res = evaluate(model, self.tokenizer, self.task, self.examples, batch_size=self.batch_size,
                               max_new_tokens=self.max_new_tokens, rules=self.rules)
        finally:
            model.train(was_training)
        return {
            "eval_accuracy": res.accuracy,
            "eval_credit": res.mean_credit,
            "eval_n": res.n,
            "eval_unparsed": res.unparsed,
            "eval_truncated": res.truncated,
            "eval_s": res.total_s,
        }

    def __repr__(self) -> str:
        return f"TaskEvaluator({getattr(self.task, 'name', self.task)!r}, n={len(self.examples)})"


def _configs(cfg: Any) -> list[Any]:
    """The training options a run trains with: a DistillSpec (its phases, if any), a recipe
    ``Settings`` (its phases' specs), or a sequence of DistillSpecs."""
    if hasattr(cfg, "phase_configs"):
        return list(cfg.phase_configs())
    if hasattr(cfg, "phases") and all(hasattr(p, "spec") for p in cfg.phases):
        return [p.spec for p in cfg.phases]
    if isinstance(cfg, Sequence):
        return list(cfg)
    return [cfg]


def validation_examples(task: Task, n: int, *, seed: int, held_out: int) -> list[Example]:
    """``n`` questions of ``task``'s eval split (drawn at ``seed``) that are not among its first ``held_out``,
    the questions the eval stage scores (``task.examples("eval", held_out, seed=seed)``), compared by their
    canonical text. Fewer when the split holds fewer beyond them (a warning says so); a ValueError when it
    holds none, or when the task cannot give ``held_out + n`` eval questions at all."""
    try:
        scored = {canonical_text(ex.question) for ex in task.examples("eval", held_out, seed=seed)}
        drawn = task.examples("eval", held_out + n, seed=seed)
    except ValueError as e:
        raise ValueError(f"the eval stage's {held_out} questions and {n} validation questions, {held_out + n} in all, "
                         f"are more than the task's eval split gives ({e})") from None
    out: list[Example] = []
    for ex in drawn:
        key = canonical_text(ex.question)
        if key not in scored:
            scored.add(key)
            out.append(ex)
    if not out:
        raise ValueError(f"the task's eval split holds no question beyond the {held_out} the eval stage scores; "
                         "lower eval.n or give the task a larger eval split")
    if len(out) < n:
        warnings.warn(f"distill.eval_samples ({n}): the task's eval split holds only {len(out)} questions beyond the "
                      f"{held_out} the eval stage scores; evaluating while training on those {len(out)}", stacklevel=2)
    return out[:n]


def evaluator_for(
    task_spec: Any,
    tokenizer: Any,
    cfg: Any,
    *,
    max_new_tokens: int,
    held_out: int | None = None,
    batch_size: int = 16,
    task: Any = None,
) -> TaskEvaluator | None:
    """The evaluator a run's training options ask for, or None when no phase sets ``eval_steps``.

    ``task_spec`` is the spec's ``task`` section (``TaskSpec``); ``cfg`` its ``distill`` section (or
    the recipe's ``Settings``, or a list of per-phase DistillSpecs). The examples are ``eval_samples``
    validation questions (:func:`validation_examples`): the task's eval split for ``task_spec.seed``
    without the ``held_out`` questions the eval stage scores (the spec's ``eval.n``; default
    ``task_spec.eval_size``); with phases of different ``eval_samples`` the largest is used (one
    evaluator serves all). Without a task (``task_spec`` None) there is nothing to score: None, with a
    warning if evaluation was asked. ``task``: the task ``task_spec`` describes, when the caller has
    built it already."""
    asking = [c for c in _configs(cfg) if getattr(c, "eval_steps", None) is not None]
    if not asking:
        return None
    if task_spec is None:
        warnings.warn("eval_steps is set but there is no task to evaluate on (a spec's task section): "
                      "no evaluation while training", stacklevel=2)
        return None
    if task is None:
        from stratos.tasks import task_from_spec

        task = task_from_spec(task_spec)
    n = max(c.eval_samples for c in asking)
    try:
        examples = validation_examples(task, n, seed=task_spec.seed,
                                       held_out=task_spec.eval_size if held_out is None else held_out)
    except ValueError as e:  # e.g. a question space whose eval split holds fewer examples
        raise ValueError(f"distill.eval_samples ({n}): {e}") from None
    return TaskEvaluator(task, examples, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size)
