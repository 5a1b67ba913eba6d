"""The Pareto front and the deployment score: pure functions over plain numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b`` when it is no worse in every objective and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, every objective minimised (negate what you maximise).

    After a lexicographic sort a point can only be dominated by one sorted before it (a dominating
    point is no larger anywhere and smaller somewhere), so each point is checked against the front
    built so far, and nothing on that front is ever removed.
    """
    order = sorted(range(len(points)), key=lambda i: tuple(points[i]))
    front: list[int] = []
    for i in order:
        if not any(dominates(points[j], points[i]) for j in front):
            front.append(i)
    return sorted(front)


def normalise(values: Sequence[float], *, log_floor: float | None = None) -> list[float]:
    """Min-max to [0, 1]; all equal -> all 0, so a metric that doesn't vary doesn't decide.

    With ``log_floor`` the values are compared on a log scale (below the floor counts as the floor):
    costs, latencies and times span orders of magnitude, and halving one should count the same
    whether it is $2 -> $1 or $200 -> $100."""
    if log_floor is not None:
        values = [math.log10(max(v, log_floor)) for v in values]
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return [0.0 for _ in values]
    return [(v - lo) / (hi - lo) for v in values]


# What counts as "nothing" for each metric on the log scale: one cent, a tenth of a millisecond, a minute.
COST_FLOOR_USD, LATENCY_FLOOR_MS, TIME_FLOOR_H = 0.01, 0.1, 1 / 60


def deployment_scores(
    accuracy: Sequence[float],
    latency: Sequence[float],
    train_time: Sequence[float],
    cost: Sequence[float],
    weights: dict[str, float],
) -> list[float]:
    """Weighted score over candidates: accuracy counts for, latency, training time and cost against.

    Accuracy is min-max normalised over the candidates compared, the other three the same on a log
    scale, so the weights trade fractions of the observed range, not raw units."""
    acc = normalise(accuracy)
    lat = normalise(latency, log_floor=LATENCY_FLOOR_MS)
    tt = normalise(train_time, log_floor=TIME_FLOOR_H)
    usd = normalise(cost, log_floor=COST_FLOOR_USD)
    return [
        weights["accuracy"] * a - weights["latency"] * l - weights["train_time"] * t - weights["cost"] * c
        for a, l, t, c in zip(acc, lat, tt, usd)
    ]
