"""A retry on a miss: when the deployed student misses ``min_accuracy`` or ``max_latency_ms``, the run
tries again with what the plan allows, within ``budget_usd``, up to ``constraints.max_attempts``.

    action, why_not = propose(spec, plan, results, attempts, stage_seconds, device=...)
    spec = apply_overrides(user_spec, action.overrides)   # the next attempt's spec

An attempt is the user's spec with overrides (dotted spec fields). Each action names the first stage
it changes; the runner moves that stage's folder and every later one's (through the eval) to
``RUN/attempts/N/`` and runs them again under the new spec, so the stage hashes decide the rest, a
killed retry resumes like any run, and the earlier attempt's models stay on disk.

What is tried, in order (the first the budget allows):

- ``min_accuracy`` missed:
  1. **next candidate**: the next pair on the plan's Pareto front that trains on the same server and
     was predicted a higher accuracy than the pair that missed (``plan.candidate`` pins it; the plan
     reruns, with its probes cached, and plans the pair even where its prediction, now corrected by
     what the first attempt measured, misses a constraint);
  2. **more training**: twice the optimizer steps the distill stage ran (``distill.max_steps``).
- ``max_latency_ms`` missed (and ``min_accuracy`` met):
  1. **bf16**: where the device computes bf16 natively and the spec does not quantize to bf16 already;
     the compress stage measures both and deploys the faster (``choose_for_latency``);
  2. **pruning**: keep 60% of the student's parameters (of what it kept, when it was pruned already),
     by depth for four layers or more, else by width, with KD recovery from the unpruned student;
  3. **next candidate** whose predicted latency is lower.

Accuracy comes first when both are missed: a faster student that answers wrongly helps nobody.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stratos.io import sha256_text

# The stages an attempt reruns, from the first one its action changes, through the eval.
RERUN = {"plan": ("plan", "synth", "distill", "compress", "deploy", "eval"),
         "distill": ("distill", "compress", "deploy", "eval"),
         "compress": ("compress", "deploy", "eval")}
SERVING_STAGES = ("deploy", "eval")  # priced at the serving server's rate, the rest at the training server's


@dataclass(frozen=True)
class Action:
    kind: str  # "next candidate", "more training", "bf16" or "pruning"
    why: str  # one sentence for the log and the report
    overrides: dict[str, Any]  # dotted spec fields -> values, on top of the attempt that missed
    first_stage: str  # the first stage the overrides change (a key of RERUN)
    predicted_usd: float  # the compute the attempt is expected to cost, from the stages' measured times


def user_spec_hash(spec: Any) -> str:
    """What the attempts of a run were made for: the spec without ``max_attempts`` (raising it continues)."""
    dumped = spec.model_dump(mode="json")
    dumped["constraints"].pop("max_attempts", None)
    return sha256_text("attempts-v1", dumped)[:16]


def apply_overrides(spec: Any, overrides: dict[str, Any]) -> Any:
    """``spec`` with each dotted field (``distill.max_steps``) set, validated like the spec itself. Only
    what the user set is carried over, besides the overrides: the strategy fills in what the user left
    unset (``stratos.plan.strategy.SpecValues``), and it must still see it as unset."""
    from stratos.spec import Spec

    if not overrides:
        return spec
    data = spec.model_dump(exclude_unset=True)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return Spec.model_validate(data)


def attempt_cost(first_stage: str, stage_seconds: dict[str, float], train_price: float, serve_price: float,
                 scale: dict[str, float] | None = None) -> float:
    """The compute, in $, of rerunning ``first_stage`` through the eval, from the seconds the stages took
    (``scale``: a stage expected to take that many times as long)."""
    scale = scale or {}
    usd = 0.0
    for stage in RERUN[first_stage]:
        seconds = stage_seconds.get(stage, 0.0) * scale.get(stage, 1.0)
        usd += seconds / 3600 * (serve_price if stage in SERVING_STAGES else train_price)
    return usd


def _pct(x: float) -> str:
    return f"{x:.1%}"


def propose(spec: Any, plan: Any, results: dict[str, Any], attempts: list[dict[str, Any]],
            stage_seconds: dict[str, float], *, distill_steps: int, student_layers: int | None,
            native_bf16: bool) -> tuple[Action | None, str]:
    """The next attempt's action after a miss, or None and why nothing is tried.

    ``results``: the eval's results.json (its verdicts); ``attempts``: the run's attempts so far, the
    last one the attempt that missed (each with its ``candidate`` [teacher, student, serving server]);
    ``stage_seconds``: what each stage of that attempt took. What the run spent so far is the eval's
    figure (``results['spent']``), the one the ``budget_usd`` verdict judges."""
    from stratos.verdicts import from_results, missed

    misses = {v.constraint: v for v in missed(from_results(results))}
    if not misses:
        return None, "every constraint is met"
    if not ({"min_accuracy", "max_latency_ms"} & set(misses)):
        return None, "only budget_usd is missed: another attempt would spend more"
    if len(attempts) >= spec.constraints.max_attempts:
        return None, f"constraints.max_attempts ({spec.constraints.max_attempts}) reached"
    train_price, serve_price = plan.training_server.price(bool(spec.plan.spot)), plan.serving_server.price(False)
    tried = {tuple(a["candidate"]) for a in attempts if a.get("candidate")}
    tried_pairs = {c[:2] for c in tried}
    front = [r for r in plan.pareto[1:] if r["training_server"] == plan.training_server.name]
    pred = plan.predicted
    options: list[Action] = []

    def next_candidate(row: dict[str, Any], because: str) -> Action:
        pin = {"teacher": row["teacher"], "student": row["student"], "serving_server": row["serving_server"]}
        return Action("next candidate", f"the plan's next candidate on its Pareto front, teacher {row['teacher']} and "
                      f"student {row['student']} served on {row['serving_server']}: {because}",
                      {"plan.candidate": pin}, "plan", attempt_cost("plan", stage_seconds, train_price, serve_price))

    if "min_accuracy" in misses:
        measured = misses["min_accuracy"].measured
        row = next((r for r in front if (r["teacher"], r["student"]) not in tried_pairs
                    and r["accuracy"] > pred["accuracy"]), None)
        if row is not None:
            options.append(next_candidate(row, f"the plan predicted {_pct(row['accuracy'])} for it, against "
                                               f"{_pct(pred['accuracy'])} for the pair that missed, which measured "
                                               f"{_pct(measured)}"))
        if distill_steps > 0:
            steps = 2 * distill_steps
            options.append(Action(
                "more training", f"twice the training: {steps:,} optimizer steps instead of {distill_steps:,} "
                f"(distill.max_steps), since the student measured {_pct(measured)} against min_accuracy "
                f"{_pct(misses['min_accuracy'].limit)}", {"distill.max_steps": steps}, "distill",
                attempt_cost("distill", stage_seconds, train_price, serve_price, {"distill": 2.0})))
    else:
        lat = misses["max_latency_ms"]
        cs = spec.compress
        if native_bf16 and not (cs.enabled and cs.quantize == "bf16"):
            options.append(Action(
                "bf16", f"the student cast to bf16, which this device computes natively; the compress stage "
                f"measures it against the unquantized student and deploys the faster (p50 measured "
                f"{lat.measured:,.0f} ms against max_latency_ms {lat.limit:,.0f})",
                {"compress.enabled": True, "compress.quantize": "bf16"}, "compress",
                attempt_cost("compress", stage_seconds, train_price, serve_price)))
        kept = 1.0 - (cs.prune_ratio or 0.0) if cs.enabled and cs.target_params is None else 1.0
        if kept * 0.6 >= 0.2 and cs.target_params is None:
            ratio = round(1.0 - kept * 0.6, 3)
            method = "depth" if (student_layers or 0) >= 4 else "width"
            recovery = max(cs.recovery_steps, min(200, max(distill_steps // 2, 20)))
            options.append(Action(
                "pruning", f"the student pruned to {kept * 0.6:.0%} of its original parameters ({method}), "
                f"recovered by {recovery} KD steps from the unpruned student, since its p50 latency "
                f"{lat.measured:,.0f} ms is over max_latency_ms {lat.limit:,.0f}",
                {"compress.enabled": True, "compress.prune_ratio": ratio, "compress.prune": method,
                 "compress.target_params": None, "compress.recovery_steps": recovery}, "compress",
                attempt_cost("compress", stage_seconds, train_price, serve_price)
                + stage_seconds.get("distill", 0.0) * recovery / max(distill_steps, 1) / 3600 * train_price))
        row = next((r for r in front if (r["teacher"], r["student"], r["serving_server"]) not in tried
                    and r["latency_ms"] < pred["latency_ms"]), None)
        if row is not None:
            options.append(next_candidate(row, f"the plan predicted {row['latency_ms']:,.0f} ms per request for it, "
                                               f"against {pred['latency_ms']:,.0f} ms for the pair that missed"))
    spent_usd = float((results.get("spent") or {}).get("usd") or 0.0)
    budget = spec.constraints.budget_usd
    over = []
    for opt in options:
        if budget is not None and spent_usd + opt.predicted_usd > budget:
            over.append(f"{opt.kind} would cost about ${opt.predicted_usd:,.2f} on top of ${spent_usd:,.2f} spent, "
                        f"over budget_usd ${budget:,.2f}")
            continue
        return opt, ""
    if over:
        return None, "; ".join(over)
    return None, "the plan allows nothing more to try (no stronger or faster candidate, nothing left to train or cut)"
