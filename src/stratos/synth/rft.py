"""Rejection fine-tuning (RFT), a recipe over ``run_synth`` and ``distill``.

    rounds = rft(spec, "runs/rft", rounds=3)

Round 0 samples the spec's teacher on the train prompts and keeps what the verifier accepts; the
student is fine-tuned (SFT, loss ce) on it. Each later round samples the *improved student* on
the same prompts, adds its verified, new answers to the data, and fine-tunes the student further.
The student's acceptance rate per round (``round.acceptance``) is its train accuracy as a sampler:
the number to watch. Every round lives in ``out_dir/round-N`` with its own request cache and
checkpoints, so a killed recipe resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratos.spec import Spec


@dataclass
class RftRound:
    round: int
    sampler: str  # the teacher's label in round 0, then the student's
    acceptance: float | None  # verified share of the sampler's samples
    new_rows: int  # rows this round added to the data
    rows: int  # rows the student was trained on this round
    data_path: Path
    model_dir: Path


def rft(spec: Spec, out_dir: str | Path, *, rounds: int = 2, student: int = 0, progress: bool = True) -> list[RftRound]:
    """Run ``rounds`` of rejection fine-tuning of ``spec.students[student]``; returns one entry per round."""
    from stratos.distill import distill
    from stratos.io import read_jsonl, write_jsonl
    from stratos.models import load
    from stratos.spec import TeacherSpec
    from stratos.synth import run_synth
    from stratos.teachers import HFTeacher

    if rounds < 1:
        raise ValueError("rft: rounds must be at least 1")
    out_dir = Path(out_dir)
    s_spec = spec.students[student]
    model, tok = load(s_spec.model, dtype=s_spec.dtype, trust_remote_code=s_spec.trust_remote_code,
                      config_overrides=s_spec.config_overrides, init=s_spec.init)
    # SFT on verified samples: the teacher's distribution is not needed (and the sampler changes each round).
    cfg = spec.distill.model_copy(update={"loss": "ce", "kd_ratio": 0.0})
    data: dict[tuple[str, str], dict[str, Any]] = {}
    out: list[RftRound] = []
    for r in range(rounds):
        rd = out_dir / f"round-{r}"
        sampler = None
        if r > 0:
            sampler = HFTeacher(TeacherSpec(model=str(out[-1].model_dir), name=f"student-round-{r - 1}"),
                                cache_dir=rd / "synth" / "requests", model_and_tokenizer=(model, tok))
        res = run_synth(spec, rd / "synth", progress=progress, teacher=sampler)
        before = len(data)
        for rec in read_jsonl(res.data_path):
            data.setdefault((rec.get("prompt", ""), rec.get("response", rec.get("text", "")).strip()), {**rec, "round": r})
        data_path = rd / "train.jsonl"
        write_jsonl(data_path, data.values())
        result = distill(model, tok, list(data.values()), cfg, rd / "distill", progress=progress)
        out.append(RftRound(r, res.stats["teacher"], res.stats["acceptance"], len(data) - before, len(data), data_path,
                            result.model_dir))
    return out
