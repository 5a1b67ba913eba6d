"""Short pilot distillations: measure a student's learning curve for a few hundred steps and
extrapolate it to the planned length of training."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PILOT_POINTS = 3  # evaluations along the pilot (a curve needs more than one)


@dataclass
class PilotResult:
    steps: list[int]
    accuracy: list[float]
    planned_steps: int
    predicted: float
    seconds: float
    tokens_per_s: float
    train_tokens: int
    loss: str
    kd_ratio: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reason(self) -> str:
        pts = ", ".join(f"{a:.0%}@{s}" for s, a in zip(self.steps, self.accuracy))
        return (f"pilot: {self.loss} (kd_ratio {self.kd_ratio:g}) measured {pts} steps; log-linear extrapolation to "
                f"{self.planned_steps} steps = {self.predicted:.0%}" + "".join(f"; {n}" for n in self.notes))


def extrapolate(steps: list[int], accuracy: list[float], target_steps: int) -> float:
    """Fit accuracy = a + b ln(step) by least squares and read it at ``target_steps``.

    Learning curves of this length are close to linear in log-steps; the result is clamped to
    [last measured, 1] so a noisy dip never predicts forgetting and no fit predicts over 100%."""
    xs = [math.log(max(1, s)) for s in steps]
    mx, my = sum(xs) / len(xs), sum(accuracy) / len(accuracy)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, accuracy)) / var if var > 0 else 0.0
    a = my - b * mx
    pred = a + b * math.log(max(1, target_steps))
    return min(1.0, max(accuracy[-1], pred))


def run_pilot(
    student_spec: Any,
    task: Any,
    strategy: Any,
    settings: Any,
    *,
    steps: int,
    eval_examples: list[Any],
    teacher: tuple[Any, Any] | None = None,
    rationale: bool = False,
    max_new_tokens: int = 64,
    seed: int = 0,
    work_dir: str | Path | None = None,
    task_spec: Any = None,
    student: tuple[Any, Any] | None = None,
    device: Any = "cpu",
) -> PilotResult:
    """Train ``student_spec`` for ``steps`` steps with the run's own settings (``settings``, from
    ``stratos.distill.recipe.resolve``: the main phase's algorithm, loss, kd_ratio, learning rate and
    batch size) on the task's checked data, formatted as the run formats the student's records (the plain
    prompt, rationales), evaluating ``PILOT_POINTS`` times, and extrapolate to the run's planned steps.
    ``teacher`` = (model, tokenizer) when the settings need the teacher's hidden states. A student built
    here goes to ``device``; a given one trains where it is."""
    from stratos.distill import distill
    from stratos.evaluate import evaluate
    from stratos.tasks import to_records

    # The phase that trains longest is the one whose curve predicts the result.
    main = max(settings.phases, key=lambda p: p.config.get("max_steps") or p.config["num_train_epochs"])
    real = main.spec
    batch = real.per_device_train_batch_size * real.gradient_accumulation_steps
    n_train = min(strategy.data_size, steps * batch)
    # The student trains and is served on the plain prompt; rules_in_prompt is the teacher's (synth's) prompt.
    records = to_records(task, task.examples("train", n_train, seed=seed), rationale=rationale)
    if student is None:
        from stratos.models import load_student

        student = load_student(student_spec, task_spec, device=device, calibration=records)
    model, tok = student
    use_teacher = main.needs_teacher and main.config.get("teacher_signal") != "topk" and teacher is not None
    seg = max(1, steps // PILOT_POINTS)
    cfg = real.model_copy(update={
        "max_steps": seg * PILOT_POINTS, "save_steps": seg, "logging_steps": seg, "report_to": [], "seed": seed,
        "teacher_signal": "online", "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "eval_steps": None,
        "load_best_model_at_end": False,
    } | ({} if use_teacher else {"algorithm": "sft", "loss": "ce", "kd_ratio": 0.0}))
    notes = []
    if not use_teacher and main.needs_teacher:
        notes.append(f"SFT instead of the run's {main.algorithm} (no white-box teacher signal here)")
    elif not use_teacher and main.algorithm != "sft":
        notes.append(f"SFT instead of the run's {main.algorithm}: the pilot trains on the fixed data only")
    if len(settings.phases) > 1:
        notes.append(f"the run has {len(settings.phases)} phases; the pilot trains the longest, {main.algorithm}")
    notes.append("constant learning rate, no warmup")
    done, accs, seconds = [], [], 0.0
    with tempfile.TemporaryDirectory(prefix="stratos-pilot-", dir=work_dir) as tmp:
        for k in range(PILOT_POINTS):
            t0 = time.perf_counter()
            res = distill(model, tok, records, cfg, tmp, teacher=teacher[0] if use_teacher else None,
                          teacher_tokenizer=teacher[1] if use_teacher else None, resume=True, progress=False,
                          stop_after=seg)
            seconds += time.perf_counter() - t0
            r = evaluate(model, tok, task, eval_examples, batch_size=16, max_new_tokens=max_new_tokens)
            done.append(res.steps)
            accs.append(r.accuracy)
    # Tokens through the model (prompt and response), what the cost model's 6N-per-token counts.
    sample = records[:50]
    mean_len = sum(len(tok(r["prompt"] + r["response"])["input_ids"]) + 8 for r in sample) / len(sample)
    tokens = int(done[-1] * batch * mean_len)
    planned = max(1, math.ceil(strategy.data_size * strategy.epochs / batch))
    pred = extrapolate(done, accs, planned)
    return PilotResult(done, accs, planned, pred, seconds, tokens / seconds if seconds else 0.0, tokens,
                       cfg.loss if use_teacher else "ce", cfg.kd_ratio if use_teacher else 0.0, notes)
