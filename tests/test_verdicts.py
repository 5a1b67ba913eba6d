"""The constraints as results (stratos.verdicts): a verdict per constraint from what the eval measured."""

from __future__ import annotations

from stratos.spec import Constraints
from stratos.verdicts import ConstraintsMissed, from_results, judge, missed, spent_usd


def _results(accuracy: float, p50: float, p95: float) -> dict:
    return {"rows": [{"role": "student", "accuracy": 0.99, "n": 200, "ci_low": 0.9, "ci_high": 1.0},
                     {"role": "deployed student", "accuracy": accuracy, "n": 200, "ci_low": accuracy - 0.07,
                      "ci_high": accuracy + 0.07, "latency_ms": {"p50": p50, "p95": p95}}],
            "bench": {"clients": 4}}


def test_each_constraint_is_judged_on_the_deployed_student():
    c = Constraints(min_accuracy=0.85, max_latency_ms=1000, budget_usd=2.0)
    vs = judge(c, _results(0.435, 1814.0, 2500.0), (1.5, "counted so"))
    by = {v.constraint: v for v in vs}
    assert [v.constraint for v in vs] == ["min_accuracy", "max_latency_ms", "budget_usd"]
    # Judged on the deployed row, not the better unserved student above it.
    assert by["min_accuracy"].measured == 0.435 and by["min_accuracy"].met is False
    assert by["min_accuracy"].line() == "min_accuracy 85.0%: missed, 41.5 points short (measured 43.5%)"
    assert by["max_latency_ms"].measured == 1814.0 and by["max_latency_ms"].met is False
    assert by["max_latency_ms"].shortfall == "814 ms over" and "p95 2,500 ms at 4 concurrent clients" in by["max_latency_ms"].how
    assert by["budget_usd"].met is True and by["budget_usd"].shortfall == "" and by["budget_usd"].how == "counted so"
    assert [v.constraint for v in missed(vs)] == ["min_accuracy", "max_latency_ms"]
    # What the eval writes to results.json reads back as the same verdicts.
    assert from_results({"verdicts": [v.to_dict() for v in vs]}) == vs


def test_limits_met_exactly_and_constraints_not_set_or_not_measured():
    c = Constraints(min_accuracy=0.5, max_latency_ms=200)
    vs = judge(c, _results(0.5, 200.0, 300.0))
    assert [v.met for v in vs] == [True, True]  # the limits themselves are allowed
    assert judge(Constraints(), _results(0.1, 9e9, 9e9)) == []  # no constraint set, nothing judged
    unmeasured = judge(Constraints(min_accuracy=0.5, budget_usd=1.0), {"rows": []})
    assert [(v.measured, v.met) for v in unmeasured] == [(None, None), (None, None)]
    assert unmeasured[0].line() == "min_accuracy 50.0%: not measured" and not missed(unmeasured)


def test_spending_counts_api_compute_at_each_servers_price_and_the_planned_trial():
    manifest = {"stages": {"plan": {"seconds": 600}, "synth": {"seconds": 1200}, "distill": {"seconds": 1800},
                           "compress": {"seconds": 0}, "deploy": {"seconds": 5}}}
    total, how = spent_usd(manifest, train_price=4.0, serve_price=1.0, api_usd=0.25, serve_trial_hours=2.0,
                           eval_seconds=1800)
    # API 0.25 + 3600 s of plan..compress at $4/h + 1800 s of eval at $1/h + a 2 h trial at $1/h.
    assert abs(total - (0.25 + 4.0 + 0.5 + 2.0)) < 1e-9
    assert "60.0 min of plan to compress at $4.00/h" in how and "2 h at $1.00/h, planned" in how
    assert ConstraintsMissed("x").exit_code == 3


def test_the_reports_constraints_table_says_what_load_the_plans_latency_is_for():
    from stratos.report import _constraints

    c = Constraints(min_accuracy=0.8, max_latency_ms=1000)
    results = _results(0.87, 366.0, 599.0) | {"verdicts": [v.to_dict() for v in judge(c, _results(0.87, 366.0, 599.0))]}
    html = _constraints(results, {"accuracy": 0.872, "latency_ms": 341.0,
                                  "latency_load": {"clients": 4, "new_tokens": 64}})
    # The measured p50 is under 4 concurrent clients, and so is the plan's prediction beside it.
    assert "366 ms" in html and "at 4 concurrent clients" in html
    assert "341 ms (p50 of 4 concurrent clients, 64 new tokens each)" in html and "87.2%<" in html
    # A plan written before plans predicted the eval's load predicted one request alone: the cell says so.
    old = _constraints(results, {"accuracy": 0.872, "latency_ms": 82.0})
    assert "82 ms (one request at a time)" in old
