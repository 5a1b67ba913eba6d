"""Tables and the plot of a plan, and the table of the server catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stratos.plan.catalog import Server


def servers_table(servers: list[Server], *, sources: bool = False) -> Any:
    """The catalog as a table; ``sources`` adds provider, region, interconnect and each row's source."""
    from rich.table import Table

    from rich import box

    # A light box: the catalog should fit an 80-column terminal.
    t = Table(title="server catalog (datasheet figures, list prices: approximate)", box=box.SIMPLE_HEAD, pad_edge=False,
              padding=(0, 1))
    cols = ["name", "GPU", "n", "GB", "TF/s", "TB/s", "$/h", "spot", "date"]
    cols += ["provider", "region", "interconnect", "source"] if sources else []
    for col in cols:
        t.add_column(col, justify="left" if col in ("name", "GPU", "date", "provider", "region", "interconnect", "source")
                     else "right", no_wrap=col != "source", overflow="fold")
    for s in servers:
        row = [s.name, s.gpu, str(s.gpu_count), f"{s.gpu_memory_gb:g}", f"{s.bf16_tflops:g}", f"{s.mem_bw_tbs:g}",
               f"{s.on_demand_usd_hr:,.2f}", "-" if s.spot_usd_hr is None else f"{s.spot_usd_hr:,.2f}", s.date or "-"]
        t.add_row(*row, *([s.provider, s.region, s.interconnect, s.source] if sources else []))
    t.caption = ("GB, dense bf16 TF/s, TB/s per GPU; $/h per instance"
                 + ("" if sources else "; --sources for provenance"))
    return t


def pareto_table(plan: Any, limit: int = 15) -> Any:
    from rich.table import Table

    t = Table(title=f"Pareto front ({plan.counts['front']} of {plan.counts['feasible']} feasible, "
                    f"{plan.counts['total']} combinations); * = chosen")
    for col in ("", "teacher", "student", "train on", "serve on", "accuracy", "p50 ms (load)", "train min", "cost $", "score"):
        t.add_column(col, justify="right" if col in ("accuracy", "p50 ms (load)", "train min", "cost $", "score") else "left")
    for i, r in enumerate(plan.pareto[:limit]):
        t.add_row("*" if i == 0 else "", r["teacher"], r["student"], r["training_server"], r["serving_server"],
                  f"{r['accuracy']:.1%} ({r['accuracy_method']})", f"{r['latency_ms']:,.1f}",
                  f"{r['train_hours'] * 60:,.1f}", f"{r['cost_usd']:,.2f}",
                  "" if r["score"] is None else f"{r['score']:.3f}")
    from stratos.plan.costmodel import LoadTest

    load = plan.predicted.get("latency_load")
    notes = ([f"p50 ms (load): request latency predicted for the eval's load test ({LoadTest(**load).label()})"]
             if load else [])
    if len(plan.pareto) > limit:
        notes.append(f"{len(plan.pareto) - limit} more front points in plan.json")
    t.caption = "; ".join(notes) or None
    return t


def stages_table(plan: Any) -> Any:
    from rich.table import Table

    t = Table(title="predicted time and cost per stage (chosen plan)")
    for col in ("stage", "server", "time", "cost $", "note"):
        t.add_column(col, justify="right" if col in ("time", "cost $") else "left")
    for s in plan.stages:
        t.add_row(s.stage, s.server, _duration(s.seconds), f"{s.usd:,.4f}", s.note)
    return t


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def plot(candidates: list[Any], chosen: Any, path: str | Path) -> Path:
    """Cost vs predicted accuracy of every feasible candidate, coloured by serving latency; the
    front outlined, the chosen plan starred."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    feasible = [c for c in candidates if c.feasible]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lat = [max(c.latency_ms, 1e-3) for c in feasible]
    norm = LogNorm(vmin=min(lat), vmax=max(max(lat), min(lat) * 1.01))
    sc = ax.scatter([c.cost_usd for c in feasible], [c.accuracy for c in feasible], c=lat, cmap="viridis", norm=norm,
                    s=18, alpha=0.6, linewidths=0)
    front = sorted((c for c in feasible if c.on_front), key=lambda c: c.cost_usd)
    ax.scatter([c.cost_usd for c in front], [c.accuracy for c in front], facecolors="none", edgecolors="black",
               s=60, linewidths=1.0, label="Pareto front")
    ax.scatter([chosen.cost_usd], [chosen.accuracy], marker="*", s=260, c="red", edgecolors="black", label="chosen",
               zorder=5)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("total cost ($, probe + teacher work + training + serving trial)")
    ax.set_ylabel("predicted student accuracy")
    fig.colorbar(sc, ax=ax, label="serving latency (ms)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{chosen.teacher} -> {chosen.student}: train {chosen.training_server}, serve {chosen.serving_server}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
