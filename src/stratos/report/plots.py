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


def training_curves(rows: Sequence[dict[str, Any]], best_step: int | None = None) -> str | None:
    """Loss, its KD and CE parts, and the student's agreement with the teacher, per step; below them,
    when rows carry ``eval_accuracy`` (evaluation while training), the eval accuracy per step with
    ``best_step`` marked. A row may hold training values, eval values or both."""
    train = [r for r in rows if "step" in r and "loss" in r]
    evals = [r for r in rows if "step" in r and isinstance(r.get("eval_accuracy"), (int, float))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if train and evals:
        fig, (ax, ax_eval) = plt.subplots(2, 1, figsize=(6.4, 4.6), dpi=110, sharex=True,
                                          gridspec_kw={"height_ratios": [2, 1]})
    elif train:
        fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
        ax_eval = None
    else:
        fig, ax_eval = plt.subplots(figsize=(6.4, 2.4), dpi=110)
        ax = None
    if ax is not None:
        ax.grid(alpha=0.3)
        steps = [r["step"] for r in train]
        for key, label in (("loss", "loss"), ("kd", "KD term"), ("ce", "CE term")):
            if all(key in r for r in train) and (key == "loss" or any(r[key] != r["loss"] for r in train)):
                ax.plot(steps, [r[key] for r in train], label=label)
        ax.set_ylabel("nats / token")
        ax.set_yscale("log")
        if any(r.get("teacher_agreement") for r in train):
            ax2 = ax.twinx()
            ax2.plot(steps, [r.get("teacher_agreement", 0.0) for r in train], color="tab:gray", ls="--",
                     label="top-1 agreement with teacher")
            ax2.set_ylabel("agreement")
            ax2.set_ylim(0, 1)
            ax2.legend(loc="upper center", fontsize=8)
        ax.legend(fontsize=8)
        ax.set_title("Distillation")
    if ax_eval is not None:
        ax_eval.grid(alpha=0.3)
        n = evals[-1].get("eval_n")
        ax_eval.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], marker="o", ms=3,
                     color="tab:green", label=f"eval accuracy ({n} examples)" if n else "eval accuracy")
        best = [r for r in evals if r["step"] == best_step]
        if best:
            ax_eval.plot([best_step], [best[-1]["eval_accuracy"]], marker="*", ms=12, color="tab:orange",
                         ls="none", label=f"best checkpoint (step {best_step})")
        ax_eval.set_ylim(-0.02, 1.02)
        ax_eval.set_ylabel("accuracy")
        ax_eval.legend(fontsize=8, loc="lower right")
        if ax is None:
            ax_eval.set_title("Evaluation while training")
    (ax_eval if ax_eval is not None else ax).set_xlabel("optimizer step")
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
