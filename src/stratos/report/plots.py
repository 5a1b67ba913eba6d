"""The report's figures, drawn with matplotlib and returned as base64 PNG data URIs (the
report is one self-contained file)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any


def _figure(width: float = 6.4, height: float = 3.2) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.grid(alpha=0.3)
    return fig, ax


def _data_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def training_curves(rows: Sequence[dict[str, Any]]) -> str | None:
    """Loss, its KD and CE parts, and the student's agreement with the teacher, per step."""
    rows = [r for r in rows if "step" in r and "loss" in r]
    if not rows:
        return None
    fig, ax = _figure()
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "loss"), ("kd", "KD term"), ("ce", "CE term")):
        if all(key in r for r in rows) and (key == "loss" or any(r[key] != r["loss"] for r in rows)):
            ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.set_yscale("log")
    if any("teacher_agreement" in r for r in rows) and any(r.get("teacher_agreement") for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("teacher_agreement", 0.0) for r in rows], color="tab:gray", ls="--",
                 label="top-1 agreement with teacher")
        ax2.set_ylabel("agreement")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("Distillation")
    return _data_uri(fig)


def accuracy_bars(rows: Sequence[dict[str, Any]]) -> str | None:
    """Accuracy with its 95% interval for every evaluated model."""
    if not rows:
        return None
    fig, ax = _figure(6.4, 0.5 + 0.45 * len(rows))
    labels = [r["role"] for r in rows][::-1]
    acc = [r["accuracy"] for r in rows][::-1]
    err = [[a - r["ci_low"] for a, r in zip(acc, rows[::-1])], [r["ci_high"] - a for a, r in zip(acc, rows[::-1])]]
    colors = ["tab:gray" if lab.startswith("teacher") else "tab:blue" for lab in labels]
    ax.barh(labels, acc, xerr=err, color=colors, capsize=3)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy on held-out questions (95% Wilson interval)")
    return _data_uri(fig)


def stage_costs(stages: Sequence[tuple[str, float | None, float | None]]) -> str | None:
    """Predicted vs measured seconds per stage (only stages with both)."""
    both = [(n, p, m) for n, p, m in stages if p and m]
    if not both:
        return None
    fig, ax = _figure(6.4, 2.8)
    xs = range(len(both))
    ax.bar([x - 0.2 for x in xs], [p for _, p, _ in both], width=0.4, label="predicted")
    ax.bar([x + 0.2 for x in xs], [m for _, _, m in both], width=0.4, label="measured")
    ax.set_xticks(list(xs), [n for n, _, _ in both])
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _data_uri(fig)
