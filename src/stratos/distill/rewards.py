"""Rewards for RL (grpo, opd): the task's verifier, or the user's own functions, as TRL calls them.

``distill.reward_funcs`` names them; their values are summed, weighted by ``reward_weights``:

- ``verifier``: the task's verifier (``stratos.tasks.grade``), its credit for the completion: 1 or 0,
  or partial credit where the task gives it;
- ``verifier_exact``: the same verifier, 1 for a correct answer and 0 otherwise, no partial credit
  (a policy can learn to collect partial credit with a cheap answer: on Mahjong, discarding the
  hand's first tile, docs/engine.md);
- ``module:function`` or ``path/to/file.py:function``: a function called as TRL's GRPOTrainer calls
  a reward function, ``fn(prompts=[...], completions=[...], **columns)``, one value per completion,
  where ``columns`` are the records' other fields (``answer``, ``type``, ...), one list each::

      def short_answer(prompts, completions, **kwargs):
          return [1.0 if len(c) < 40 else 0.0 for c in completions]

A file path is relative to the directory stratos runs in. The functions are the user's own code,
imported like any plug-in of theirs.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratos.errors import TrainingError
from stratos.spec import VERIFIER_REWARDS

RewardFn = Callable[..., Sequence[float]]


def load_reward_function(name: str) -> RewardFn:
    """The function ``module:function`` or ``file.py:function`` names; TrainingError naming it if not."""
    where, _, attr = name.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path.resolve()}")
            spec = importlib.util.spec_from_file_location(f"stratos_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        fn = getattr(module, attr)
    except Exception as e:  # the user's module may raise anything on import
        raise TrainingError(f"distill.reward_funcs: cannot load {name!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise TrainingError(f"distill.reward_funcs: {name!r} is not a function")
    return fn


@dataclass
class Rewards:
    """The summed, weighted rewards of a batch of completions, and each function's mean for the metrics."""

    names: list[str]
    functions: list[RewardFn | None]  # None: the task's verifier
    weights: list[float]
    task: Any

    @classmethod
    def from_config(cls, cfg: Any, task: Any) -> "Rewards":
        names = list(cfg.reward_funcs)
        if set(VERIFIER_REWARDS) & set(names) and task is None:
            raise TrainingError(f"algorithm {cfg.algorithm} rewards with the task's verifier: run it from a spec "
                                "(stratos run, or stratos distill SPEC), or name reward_funcs of your own")
        fns = [None if n in VERIFIER_REWARDS else load_reward_function(n) for n in names]
        return cls(names, fns, list(cfg.reward_weights or [1.0] * len(names)), task)

    def __call__(self, records: Sequence[dict[str, Any]], completions: Sequence[str]) -> tuple[list[float], dict[str, float]]:
        from stratos.distill.sources import record_example
        from stratos.tasks import grade

        total = [0.0] * len(completions)
        means: dict[str, float] = {}
        graded = None  # the verifier's results, once for both of its rewards
        for name, fn, w in zip(self.names, self.functions, self.weights):
            if fn is None:
                graded = graded or [grade(self.task, record_example(r), c)[1] for r, c in zip(records, completions)]
                values = [float(g.correct if name == "verifier_exact" else g.credit) for g in graded]
            else:
                columns = {k: [r.get(k) for r in records] for k in {k for r in records for k in r} - {"prompt"}}
                values = self._checked(name, fn(prompts=[r["prompt"] for r in records], completions=list(completions),
                                                **columns), len(completions))
            total = [t + w * v for t, v in zip(total, values)]
            if len(self.names) > 1:
                means[f"reward/{name}"] = sum(values) / max(1, len(values))
        return total, means

    @staticmethod
    def _checked(name: str, values: Any, n: int) -> list[float]:
        try:
            out = [float(v) for v in values]
        except (TypeError, ValueError):
            raise TrainingError(f"reward function {name!r} must return a list of numbers, got {values!r:.200}") from None
        if len(out) != n:
            raise TrainingError(f"reward function {name!r} returned {len(out)} values for {n} completions")
        if not all(math.isfinite(v) for v in out):
            raise TrainingError(f"reward function {name!r} returned a value that is not finite: {out!r:.200}")
        return out
