"""A retry on a miss (stratos.attempts): which action follows which miss, within the budget and
max_attempts, and the spec an attempt runs with. The end-to-end retry is in test_run.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from stratos.attempts import apply_overrides, propose, user_spec_hash
from stratos.plan.catalog import Server
from stratos.spec import Spec
from stratos.verdicts import judge


def _server(name: str, usd: float) -> Server:
    return Server(name, "local" if name == "local" else "aws", "-", "cpu", 1, 16, 1, 0.1, "-", usd, None, "test", "-")


def _plan(front: list[dict], train_usd: float = 0.0) -> SimpleNamespace:
    """What propose reads of a plan: servers, the Pareto rows (chosen first) and the chosen prediction."""
    chosen = front[0]
    return SimpleNamespace(training_server=_server("local", train_usd), serving_server=_server("local", train_usd),
                           pareto=front, predicted={"accuracy": chosen["accuracy"], "latency_ms": chosen["latency_ms"]})


def _row(teacher: str, student: str, accuracy: float, latency_ms: float, serve: str = "local") -> dict:
    return {"teacher": teacher, "student": student, "training_server": "local", "serving_server": serve,
            "accuracy": accuracy, "latency_ms": latency_ms}


def _spec(**constraints) -> Spec:
    return Spec.model_validate({"task": {"name": "arithmetic"}, "teachers": [{"model": "t"}],
                                "students": [{"model": "s"}], "constraints": constraints})


def _results(spec: Spec, accuracy: float, p50: float, spent: float = 0.0) -> dict:
    res = {"rows": [{"role": "deployed student", "accuracy": accuracy, "n": 100, "ci_low": 0.0, "ci_high": 1.0,
                     "latency_ms": {"p50": p50, "p95": p50}}], "bench": {"clients": 4}}
    res["spent"] = {"usd": spent, "how": "counted"}
    res["verdicts"] = [v.to_dict() for v in judge(spec.constraints, res, (spent, "counted"))]
    return res


FIRST = [{"number": 1, "action": "first", "overrides": {}, "candidate": ["t", "small", "local"]}]
SECONDS = {"plan": 60.0, "synth": 60.0, "distill": 600.0, "compress": 30.0, "deploy": 1.0, "eval": 120.0}


def _propose(spec, plan, results, attempts=FIRST, **kw):
    kw = {"distill_steps": 100, "student_layers": 4, "native_bf16": False, **kw}
    return propose(spec, plan, results, attempts, SECONDS, **kw)


def test_an_accuracy_miss_tries_the_stronger_next_candidate_then_more_training():
    spec = _spec(min_accuracy=0.8, max_attempts=3)
    plan = _plan([_row("t", "small", 0.85, 100), _row("t", "tiny", 0.6, 50), _row("t", "big", 0.9, 300)])
    action, _ = _propose(spec, plan, _results(spec, 0.5, 100))
    # Not "tiny": it predicts less than the pair that missed. "big" is pinned and the plan reruns.
    assert action.kind == "next candidate" and action.first_stage == "plan"
    assert action.overrides == {"plan.candidate": {"teacher": "t", "student": "big", "serving_server": "local"}}
    assert "the plan predicted 90.0% for it, against 85.0% for the pair that missed, which measured 50.0%" in action.why
    # With "big" tried as well, the next is twice the steps of the attempt that missed.
    tried = FIRST + [{"number": 2, "action": "next candidate", "overrides": action.overrides,
                      "candidate": ["t", "big", "local"]}]
    action, _ = _propose(spec, _plan([_row("t", "big", 0.9, 300), _row("t", "small", 0.85, 100)]),
                         _results(spec, 0.7, 300), attempts=tried, distill_steps=150)
    assert action.kind == "more training" and action.overrides == {"distill.max_steps": 300}
    assert action.first_stage == "distill"


def test_a_latency_miss_tries_bf16_where_native_then_pruning_then_a_faster_candidate():
    spec = _spec(min_accuracy=0.5, max_latency_ms=200, max_attempts=5)
    plan = _plan([_row("t", "small", 0.85, 150), _row("t", "tiny", 0.7, 60)])
    results = _results(spec, 0.9, 450)  # accuracy met, latency missed
    action, _ = _propose(spec, plan, results, native_bf16=True)
    assert action.kind == "bf16" and action.first_stage == "compress"
    assert action.overrides == {"compress.enabled": True, "compress.quantize": "bf16"}
    # Without native bf16 (emulated bf16 is slower than fp32), or once bf16 was tried: pruning, by depth
    # for a student of four layers or more, keeping 60% of its parameters.
    action, _ = _propose(spec, plan, results, native_bf16=False)
    assert action.kind == "pruning" and action.overrides["compress.prune"] == "depth"
    assert action.overrides["compress.prune_ratio"] == pytest.approx(0.4)
    assert _propose(spec, plan, results, student_layers=2)[0].overrides["compress.prune"] == "width"
    # A student already pruned to 30% of its parameters is not cut again: the faster candidate instead.
    pruned = _spec(min_accuracy=0.5, max_latency_ms=200, max_attempts=5)
    pruned.compress.enabled, pruned.compress.prune_ratio = True, 0.7
    action, _ = _propose(pruned, plan, _results(pruned, 0.9, 450))
    assert action.kind == "next candidate" and action.overrides["plan.candidate"]["student"] == "tiny"


def test_no_retry_past_max_attempts_the_budget_or_when_nothing_is_missed():
    spec = _spec(min_accuracy=0.8)  # max_attempts defaults to 2: the first and one retry
    plan = _plan([_row("t", "small", 0.85, 100)])
    assert _propose(spec, plan, _results(spec, 0.9, 100)) == (None, "every constraint is met")
    action, why = _propose(spec, plan, _results(spec, 0.5, 100),
                           attempts=FIRST + [{"number": 2, "action": "more training", "overrides": {}}])
    assert action is None and why == "constraints.max_attempts (2) reached"
    # More training would rerun distill (600 s, twice), compress, deploy and eval at $10/h: about $3.75.
    costly = _spec(min_accuracy=0.8, budget_usd=4.0)
    action, why = _propose(costly, _plan([_row("t", "small", 0.85, 100)], train_usd=10.0),
                           _results(costly, 0.5, 100, spent=1.0))
    assert action is None and "more training would cost about $3.75 on top of $1.00 spent" in why
    assert _propose(costly, _plan([_row("t", "small", 0.85, 100)], train_usd=10.0),
                    _results(costly, 0.5, 100, spent=0.2))[0].kind == "more training"
    only_budget = _spec(budget_usd=1.0)
    assert _propose(only_budget, plan, _results(only_budget, 0.5, 100, spent=2.0)) == (
        None, "only budget_usd is missed: another attempt would spend more")


def test_an_attempt_is_the_users_spec_with_its_overrides():
    spec = _spec(min_accuracy=0.8)
    changed = apply_overrides(spec, {"distill.max_steps": 300, "plan.candidate": {"teacher": "t", "student": "s"}})
    assert changed.distill.max_steps == 300 and changed.plan.candidate.student == "s"
    assert spec.distill.max_steps is None  # the user's spec is left as it was
    with pytest.raises(ValueError, match="max_steps"):
        apply_overrides(spec, {"distill.max_steps": -1})
    # Raising max_attempts continues a run's attempts; any other edit starts them again.
    assert user_spec_hash(spec) == user_spec_hash(_spec(min_accuracy=0.8, max_attempts=5))
    assert user_spec_hash(spec) != user_spec_hash(_spec(min_accuracy=0.7))


def test_overrides_keep_what_the_user_left_unset_unset():
    spec = _spec(min_accuracy=0.8)
    changed = apply_overrides(spec, {"distill.max_steps": 300})
    # The strategy fills in what the user did not write (SpecValues): an override must not make it "written".
    assert "learning_rate" not in changed.distill.model_fields_set and "synth" not in changed.model_fields_set
    assert changed.distill.model_fields_set == {"max_steps"}
