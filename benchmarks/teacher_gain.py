"""What the teacher adds in a run, over several seeds: the run's student retrained with the run's own
settings (what plan.json decided) and as its SFT baseline (``distill.sft_baseline``: every phase that
learns from the teacher trained as SFT instead), on the run's training data, for each seed, and both
scored greedily on the run's eval questions.

One run's report compares the two students at one seed. A small student trained from scratch can
land far apart at two seeds of the same recipe (init and batch order), so that one comparison says
little; this script gives each seed's pair, the paired difference per seed, and the means with the
pooled standard error of the difference (``ctkd_vs_sft.compare``).

    python benchmarks/teacher_gain.py runs/alignment-*/ --seeds 3      # docs/benchmarks.md records a run
    # a variant of either side, against the other side of an earlier run of the script (not retrained):
    python benchmarks/teacher_gain.py runs/alignment-*/ --seeds 3 --set temperature=1 \
        --out runs/alignment-*/teacher-gain-t1 --baseline-from runs/alignment-*/teacher-gain
    python benchmarks/teacher_gain.py runs/alignment-*/ --seeds 3 --baseline-set label_smoothing_factor=0.1 \
        --out runs/alignment-*/teacher-gain-ls --teacher-from runs/alignment-*/teacher-gain

It needs the run's plan and synth stages (the data) and the teacher; the hidden-state cache is built
once and reused by every seed. Give it the machine: other work changes nothing measured here but time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from ctkd_vs_sft import compare

from stratos.distill import load_records, run_phases
from stratos.distill.recipe import Phase, Settings, sft_baseline
from stratos.evaluate import evaluate, paired_difference
from stratos.models import load, load_student
from stratos.plan.planner import Plan
from stratos.runner import settings_of
from stratos.spec import DistillSpec, load_spec
from stratos.tasks import task_from_spec


def with_seed(settings: Settings, seed: int) -> Settings:
    """The same settings trained from ``seed`` (the student's init, the batch order, any sampling)."""
    return Settings([Phase(p.algorithm, {**p.config, "seed": seed}, p.needs_teacher, p.reason) for p in settings.phases],
                    settings.match, settings.signal, settings.reasons, on_policy=settings.on_policy)


def with_options(settings: Settings, options: list[str], *, teacher_phases: bool = True) -> Settings:
    """The phases that learn from the teacher (or, with ``teacher_phases=False``, every phase: an SFT
    baseline's) with ``KEY=VALUE`` distill options changed (YAML values)."""
    update = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected KEY=VALUE, e.g. temperature=2")
        update[key] = yaml.safe_load(value)
    phases = []
    for p in settings.phases:
        if update and (p.needs_teacher or not teacher_phases):
            cfg = DistillSpec.model_validate({**p.config, **update})  # names the bad field, if any
            p = Phase(p.algorithm, cfg.model_dump(mode="json"), p.needs_teacher, p.reason)
        phases.append(p)
    return Settings(phases, settings.match, settings.signal, settings.reasons, on_policy=settings.on_policy)


# What Phase.label shows of a phase's settings; an option among these is named there already.
LABELLED = {"loss", "kd_ratio", "temperature", "label_smoothing_factor", "num_train_epochs", "max_steps"}


def unlabelled(options: list[str]) -> str:
    """`` with KEY=VALUE, ...`` for the ``--set`` options a phase's label does not show, else ``""``."""
    extra = [o for o in options if o.partition("=")[0] not in LABELLED]
    return " with " + ", ".join(extra) if extra else ""


def earlier_label(out_dir: Path, key: str, default: str) -> str:
    """What an earlier run of this script called one side (its results.json), else ``default``."""
    try:
        return json.loads((out_dir / "results.json").read_text())[key].split(" (from ")[0]
    except (OSError, ValueError, KeyError):
        return default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a `stratos run` directory whose plan and synth stages are done")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="where the students go (default RUN/teacher-gain)")
    ap.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="a distill option of the phases that learn from the teacher, e.g. temperature=2")
    ap.add_argument("--baseline-set", dest="baseline_options", action="append", default=[], metavar="KEY=VALUE",
                    help="a distill option of the SFT baseline, e.g. label_smoothing_factor=0.1")
    ap.add_argument("--baseline-from", type=Path, default=None, metavar="DIR",
                    help="score the SFT baseline from DIR's predictions-sft-seedN.jsonl (an earlier --out of this "
                    "script on the same run) instead of training it again; seeds DIR lacks are trained")
    ap.add_argument("--teacher-from", type=Path, default=None, metavar="DIR",
                    help="likewise the student trained with the teacher, from DIR's predictions-kd-seedN.jsonl")
    ap.add_argument("--no-teacher-context", action="store_true",
                    help="drop the records' teacher_messages: KD reads the teacher on the student's own prompt, not "
                    "with the worked examples or rules it answered with (what context distillation adds)")
    args = ap.parse_args()

    run_dir = args.run_dir
    spec = load_spec(run_dir / "spec.yaml")
    plan = Plan.from_json(run_dir / "plan" / "plan.json")
    settings = with_options(settings_of(spec, plan), args.options)
    if settings.signal == "none":
        raise SystemExit(f"{run_dir}: its student learns nothing from the teacher ({settings.summary()}): "
                         "it is its own SFT baseline")
    s_spec, t_spec = spec.students[plan.student["index"]], spec.teachers[plan.teacher["index"]]
    records = load_records(run_dir / "synth" / "data.jsonl")
    if args.no_teacher_context:
        records = [{k: v for k, v in r.items() if k != "teacher_messages"} for r in records]
    task = task_from_spec(spec.task)
    examples = task.examples("eval", spec.eval_questions, seed=spec.task.seed)
    teacher, t_tok = load(t_spec.model, dtype=t_spec.dtype, trust_remote_code=t_spec.trust_remote_code)
    out = args.out or run_dir / "teacher-gain"
    kd_name, sft_name = settings.training, sft_baseline(settings).training
    kd_name += unlabelled(args.options) + (" (the teacher on the student's prompts: --no-teacher-context)"
                                           if args.no_teacher_context else "")
    sft_name += unlabelled(args.baseline_options)
    # A side scored from an earlier run of the script is named as that run named it (its own --set).
    if args.teacher_from:
        kd_name = f"{earlier_label(args.teacher_from, 'with_teacher', kd_name)} (from {args.teacher_from})"
    if args.baseline_from:
        sft_name = f"{earlier_label(args.baseline_from, 'baseline', sft_name)} (from {args.baseline_from})"
    print(f"{run_dir}: {len(records)} training records, {len(examples)} eval questions\n"
          f"  with the teacher: {kd_name}\n  SFT baseline:     {sft_name}", flush=True)

    acc: dict[str, list[float]] = {"SFT baseline": [], "with the teacher": []}
    rows = []
    for seed in range(args.seeds):
        seeded = with_seed(settings, seed)
        right = {}
        baseline = with_options(sft_baseline(seeded), args.baseline_options, teacher_phases=False)
        for name, these, uses_teacher in (("with the teacher", seeded, True), ("SFT baseline", baseline, False)):
            earlier = args.teacher_from if uses_teacher else args.baseline_from
            pred = out / f"predictions-{'kd' if uses_teacher else 'sft'}-seed{seed}.jsonl"
            kept = earlier / pred.name if earlier is not None else None
            if kept is not None and kept.exists():  # seeds DIR lacks are trained below
                lines = kept.read_text().splitlines()
                right[name] = [json.loads(x)["correct"] for x in lines]
                if len(right[name]) != len(examples):
                    raise SystemExit(f"{kept}: {len(right[name])} predictions, not the {len(examples)} eval questions")
                if kept.resolve() != pred.resolve():  # OUT holds every seed's predictions, for a later --*-from
                    pred.parent.mkdir(parents=True, exist_ok=True)
                    pred.write_text("\n".join(lines) + "\n")
                acc[name].append(sum(right[name]) / len(right[name]))
                rows.append({"seed": seed, "method": name, "accuracy": acc[name][-1], "from": str(kept)})
                print(f"seed {seed} {name:16s}: {acc[name][-1]:.1%} ({kept})", flush=True)
                continue
            t0 = time.perf_counter()
            student, tok = load_student(s_spec, spec.task, seed=seed, calibration=records)
            res = run_phases(student, tok, records, these, out / f"{'kd' if uses_teacher else 'sft'}-seed{seed}",
                             teacher=teacher if uses_teacher else None, teacher_tokenizer=t_tok if uses_teacher else None,
                             resume=False, progress=False)
            ev = evaluate(student, tok, task, examples, max_new_tokens=spec.eval.max_new_tokens,
                          batch_size=spec.eval.batch_size, predictions_path=pred)
            right[name] = [json.loads(x)["correct"] for x in pred.open()]
            acc[name].append(ev.accuracy)
            rows.append({"seed": seed, "method": name, "accuracy": ev.accuracy, "steps": res.steps,
                         "train_s": res.seconds})
            print(f"seed {seed} {name:16s}: {ev.accuracy:.1%} after {res.steps} steps "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        d = paired_difference(right["with the teacher"], right["SFT baseline"])
        print(f"seed {seed} paired difference: {100 * d['difference']:+.1f} points [{100 * d['ci_low']:+.1f}, "
              f"{100 * d['ci_high']:+.1f}]", flush=True)

    gain = compare(acc, len(examples))
    print(f"\nwith the teacher ({kd_name}) against the SFT baseline ({sft_name}), same data and steps, "
          f"{args.seeds} seeds, {len(examples)} eval questions: {gain}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "gain": gain, "with_teacher": kd_name,
                                                  "baseline": sft_name}, indent=2))


if __name__ == "__main__":
    main()
