"""The process's memory over a short training of a run's student, with the run's settings and data.

Loads a `stratos run` directory's teacher and student as the run does (a pruned student pruned again,
from the run's records), trains the student for ``--steps`` optimizer steps with the settings plan.json
decided (the teacher's signal included), and samples the process's RSS once a second. It prints the RSS
when training starts, at each quarter of it and its maximum, and the training time:

    python benchmarks/train_memory.py runs/alignment-*/ --steps 60

Compare two commits by running it at each, back to back, on a quiet machine (docs/engine.md does, for
the padding of wide output heads on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from teacher_gain import with_options

from stratos.distill import load_records, run_phases
from stratos.models import load, load_student
from stratos.plan.planner import Plan
from stratos.runner import settings_of
from stratos.spec import load_spec


def rss_mb() -> float:
    """Resident memory now, in MiB. Read here, not through ``stratos.compress.measure.rss_mb``, so the script
    runs against the commits before that helper too (``PYTHONPATH=OLD/src``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a `stratos run` directory whose plan and synth stages are done")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="a distill option of the phases that learn from the teacher, e.g. temperature=2")
    args = ap.parse_args()

    samples: list[tuple[float, float]] = []

    def sample() -> None:
        while True:
            samples.append((time.perf_counter(), rss_mb()))
            time.sleep(1.0)

    threading.Thread(target=sample, daemon=True).start()
    spec = load_spec(args.run_dir / "spec.yaml")
    plan = Plan.from_json(args.run_dir / "plan" / "plan.json")
    settings = with_options(with_options(settings_of(spec, plan), args.options), [f"max_steps={args.steps}"],
                            teacher_phases=False)  # every phase: the steps; the teacher's phases: --set
    s_spec, t_spec = spec.students[plan.student["index"]], spec.teachers[plan.teacher["index"]]
    records = load_records(args.run_dir / "synth" / "data.jsonl")
    teacher, t_tok = load(t_spec.model, dtype=t_spec.dtype, trust_remote_code=t_spec.trust_remote_code)
    student, tok = load_student(s_spec, spec.task, seed=0, calibration=records)
    loaded = rss_mb()
    with tempfile.TemporaryDirectory(prefix="train-memory-") as out:
        t0 = time.perf_counter()
        res = run_phases(student, tok, records, settings, Path(out), teacher=teacher, teacher_tokenizer=t_tok,
                         resume=False, progress=False)
        t1 = time.perf_counter()
    during = [r for t, r in samples if t0 <= t <= t1] or [rss_mb()]
    quarters = [during[min(len(during) - 1, int(len(during) * f))] for f in (0, 0.25, 0.5, 0.75, 1)]
    print(f"{args.run_dir}: {settings.training}, {res.steps} steps in {t1 - t0:.0f} s; RSS MB with the models "
          f"loaded {loaded:,.0f}; during training at 0/25/50/75/100%: "
          f"{', '.join(f'{q:,.0f}' for q in quarters)}; max {max(during):,.0f}")


if __name__ == "__main__":
    main()
