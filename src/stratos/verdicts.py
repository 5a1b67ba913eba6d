"""The user's constraints as results: did the deployed student meet each one, measured?

    vs = judge(spec.constraints, results, spent)     # one Verdict per constraint the spec sets
    missed(vs)                                       # the ones it missed

The eval stage judges and writes the verdicts into ``eval/results.json``; the report shows them first;
``stratos run`` exits 3 with one line when one is missed (``ConstraintsMissed``).

- ``min_accuracy``: the deployed student's accuracy on the eval questions, through its HTTP endpoint
  (its 95% interval is shown, the verdict is on the measured accuracy itself).
- ``max_latency_ms``: end-to-end request latency of the deployed student under the eval's load test
  (``eval.bench_clients`` concurrent clients), judged on the median (p50); p95 is shown beside it.
- ``budget_usd``: what the run spent: API requests (the teacher's, as the plan's probes, synth and
  eval recorded them, cached answers at their price: what the run's data cost),
  the compute time of the stages so far at the hourly price of the server each ran on (the plan's
  training server for plan to compress, its serving server for the eval), and the plan's serving
  trial (``plan.serve_trial_hours`` at the serving server's price), which is planned, not measured,
  as in the plan's own prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from stratos.errors import UserError


# How each constraint's figures are written, in the verdict's line and in the report.
FORMATS = {"min_accuracy": "{:.1%}", "max_latency_ms": "{:,.0f} ms", "budget_usd": "${:,.2f}"}


@dataclass(frozen=True)
class Verdict:
    constraint: str  # min_accuracy, max_latency_ms or budget_usd
    limit: float
    measured: float | None  # None: not measured (the stage that measures it did not run)
    met: bool | None
    how: str  # what was measured, and how, for the report

    @property
    def shortfall(self) -> str:
        """By how much it missed, in the constraint's unit ("" when met or not measured)."""
        if self.met is not False or self.measured is None:
            return ""
        if self.constraint == "min_accuracy":
            return f"{100 * (self.limit - self.measured):.1f} points short"
        if self.constraint == "max_latency_ms":
            return f"{self.measured - self.limit:,.0f} ms over"
        return f"${self.measured - self.limit:,.2f} over"

    def line(self) -> str:
        fmt = FORMATS[self.constraint]
        limit = fmt.format(self.limit)
        if self.measured is None:
            return f"{self.constraint} {limit}: not measured"
        state = "met" if self.met else f"missed, {self.shortfall}"
        return f"{self.constraint} {limit}: {state} (measured {fmt.format(self.measured)})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"line": self.line(), "shortfall": self.shortfall}


class ConstraintsMissed(UserError):
    """The run finished, and its deployed student misses a constraint of the spec."""

    exit_code = 3


def spent_usd(manifest: dict[str, Any], train_price: float, serve_price: float, api_usd: float,
              serve_trial_hours: float, eval_seconds: float = 0.0, earlier_usd: float = 0.0) -> tuple[float, str]:
    """What a run spent, and how that was counted (see the module's docstring); prices in $/h.
    ``earlier_usd``: the compute of the run's earlier attempts (``stratos.attempts``), whose stages
    are no longer in the manifest."""
    stages = manifest.get("stages", {})
    train_s = sum(float(stages.get(s, {}).get("seconds") or 0.0) for s in ("plan", "synth", "distill", "compress"))
    compute = train_s / 3600 * train_price + eval_seconds / 3600 * serve_price
    trial = serve_trial_hours * serve_price
    how = (f"API requests of the plan's probes, synth and eval ${api_usd:,.2f} + compute ${compute:,.2f} "
           f"({train_s / 60:,.1f} min of plan to compress at ${train_price:,.2f}/h, {eval_seconds / 60:,.1f} min of "
           f"eval at ${serve_price:,.2f}/h) + serving trial ${trial:,.2f} ({serve_trial_hours:g} h at "
           f"${serve_price:,.2f}/h, planned)")
    if earlier_usd:
        how += f" + earlier attempts' compute ${earlier_usd:,.2f}"
    return api_usd + compute + trial + earlier_usd, how


def judge(constraints: Any, results: dict[str, Any], spent: tuple[float, str] | None = None) -> list[Verdict]:
    """A verdict for each constraint ``constraints`` sets, from the eval's ``results`` (results.json's
    rows: the deployed student's accuracy and latency) and ``spent`` (``spent_usd``'s total and text)."""
    rows = {r["role"]: r for r in results.get("rows", [])}
    final = rows.get("deployed student")
    out = []
    if constraints.min_accuracy is not None:
        acc = final["accuracy"] if final else None
        how = (f"the deployed student, {final['n']} held-out questions through its endpoint "
               f"(95% CI {final['ci_low']:.1%} to {final['ci_high']:.1%})" if final else "no deployed student measured")
        out.append(Verdict("min_accuracy", constraints.min_accuracy, acc,
                           None if acc is None else acc >= constraints.min_accuracy, how))
    if constraints.max_latency_ms is not None:
        lat = (final or {}).get("latency_ms") or {}
        p50, p95 = lat.get("p50"), lat.get("p95")
        clients = (results.get("bench") or {}).get("clients", "?")
        how = (f"end-to-end request latency, p50 {p50:,.0f} ms and p95 {p95:,.0f} ms at {clients} concurrent "
               "clients; judged on p50" if p50 is not None else "no load test of the deployed student")
        if p50 is not None and not results.get("serving_local", True):
            how += f"; measured on this machine, not on the plan's serving server {results.get('serving_server')}"
        out.append(Verdict("max_latency_ms", constraints.max_latency_ms, p50,
                           None if p50 is None else p50 <= constraints.max_latency_ms, how))
    if constraints.budget_usd is not None:
        total, how = spent if spent is not None else (None, "not counted")
        out.append(Verdict("budget_usd", constraints.budget_usd, total,
                           None if total is None else total <= constraints.budget_usd, how))
    return out


def missed(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.met is False]


def from_results(results: dict[str, Any]) -> list[Verdict]:
    """The verdicts an eval stage wrote into results.json."""
    return [Verdict(**{k: v for k, v in d.items() if k not in ("line", "shortfall")})
            for d in results.get("verdicts", [])]
