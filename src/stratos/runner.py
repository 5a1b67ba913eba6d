"""``stratos run``: the stages in order inside a run directory, recorded in a manifest, resumable.

    plan -> synth -> distill -> compress -> deploy -> eval -> report

Each stage is a plain function ``(ctx) -> artifacts`` that reads what earlier stages wrote
(through ``ctx.artifact(stage, key)``) and writes into its own folder ``RUN/<stage>/``.
``manifest.json`` records, per stage, its status, the hash of its inputs (the spec sections
it reads plus the input hashes of the stages before it), its artifacts, its start and end
time, and its predicted and measured duration. On a rerun a stage whose inputs hash is
unchanged and whose status is ``done`` is skipped; a stage interrupted while running is
resumed (distill from its last checkpoint, synth from its request cache); a stage whose
inputs changed reruns from scratch, and so does every stage after it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stratos.errors import UserError
from stratos.io import read_jsonl, sha256_text, write_json
from stratos.report.card import BASELINE_ROLE, shots_role
from stratos.spec import Spec

log = logging.getLogger("stratos.run")

STAGE_NAMES = ["plan", "synth", "distill", "compress", "deploy", "eval", "report"]


class RunError(UserError):
    """A stage failed in a way the user can act on; the message says how."""


class TrainElsewhere(RunError):
    """The plan chose another server to train on: the run stops after the plan and writes the recipe
    that runs it there, instead of training on this machine with predictions made for another.
    Exit code 4: not a failure, and not 3 (a finished run whose student misses a constraint)."""

    exit_code = 4


# The stages that run on the plan's training server (deploy and eval serve on the serving server).
TRAINING_STAGES = ("synth", "distill", "compress")


# --------------------------------------------------------------------------- manifest


class Manifest:
    """``manifest.json``: the record of a run, rewritten atomically after every change."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "manifest.json"
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RunError(f"{self.path}: not a Stratos manifest ({e}); pass another --run-dir or --new") from None
            if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
                raise RunError(f"{self.path}: not a Stratos manifest (no stages); pass another --run-dir or --new")

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def save(self) -> None:
        write_json(self.path, self.data)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    spec: Spec
    run_dir: Path
    manifest: Manifest
    stage: str
    resume: bool  # the stage ran before with the same inputs and did not finish
    progress: bool = True
    runtime: Any = None  # stratos.runtime.Runtime: the device every model of the stage goes to
    nproc: int = 1  # processes that train the student together (distill under torchrun)

    @property
    def device(self) -> Any:
        return self.runtime.device

    @property
    def dir(self) -> Path:
        d = self.run_dir / self.stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def requests_dir(self) -> Path:
        """The run's one teacher request cache (plan probes, synth, eval): a run-level folder, so a
        stage rerun from scratch keeps it. Keyed by the request, so sharing it is safe."""
        return self.run_dir / "requests"

    def artifact(self, stage: str, key: str) -> Any:
        """An artifact an earlier stage recorded (paths are returned absolute)."""
        arts = self.manifest.data["stages"].get(stage, {}).get("artifacts", {})
        if key not in arts:
            raise RunError(f"stage {self.stage!r} needs {stage}.{key}, which stage {stage!r} did not produce")
        value = arts[key]
        if isinstance(value, str) and key.endswith(("_path", "_dir", "model")):
            return self.run_dir / value
        return value

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.run_dir.resolve()))

    def plan(self) -> Any:
        from stratos.plan.planner import Plan

        return Plan.from_json(self.artifact("plan", "plan_path"))


# --------------------------------------------------------------------------- stages


def _strategy(spec: Spec, plan: Any) -> Any:
    """The plan's strategy with the spec's synth / distill values applied (``stratos.plan.strategy.apply_spec``,
    the rule the planner predicted with). Applied again here because the plan stage does not rerun when
    only those sections change."""
    from stratos.plan.strategy import SpecValues, apply_spec

    return apply_spec(plan.strategy, SpecValues.from_spec(spec), plan.task)


def settings_of(spec: Spec, plan: Any) -> Any:
    """The run's training settings (``stratos.distill.recipe.Settings``): what plan.json holds, by the
    same function from the same inputs; computed again because the plan stage does not rerun when
    only the distill section changes. ``stratos distill --plan`` calls this too."""
    from stratos.distill.recipe import resolve

    st = _strategy(spec, plan)
    return resolve(spec.distill, match=plan.match.mode, strategy=st, topk_data=st.topk_data)


def _effective(spec: Spec, plan: Any) -> Spec:
    """The spec with the strategy's data settings filled in: reverse synthesis, samples per prompt,
    knowledge injection, worked examples. What the user wrote always wins: ``_strategy`` already holds their values,
    so the strategy is written out as it stands. (The training settings are ``settings_of``'s.)"""
    st = _strategy(spec, plan)
    spec = spec.model_copy(deep=True)
    s = spec.synth
    for field, value in (
        ("samples_per_prompt", st.samples_per_prompt),
        ("top_logprobs", st.top_logprobs),
        ("reverse_synthesis", st.reverse_synthesis),
        ("knowledge_injection", st.knowledge_injection),
        ("few_shot", st.few_shot),
    ):
        if getattr(s, field) != value:
            setattr(s, field, value)
    return spec


def stage_plan(ctx: Context) -> dict[str, Any]:
    from stratos.plan.run import make_plan

    plan, _ = make_plan(ctx.spec, ctx.dir, progress=ctx.progress, requests_dir=ctx.requests_dir, device=ctx.device,
                        cache_dir=ctx.run_dir / "cache", processes=ctx.nproc)
    log.info("plan: teacher %s, student %s, strategy %s", plan.teacher["name"], plan.student["name"], plan.strategy.kind)
    return {
        "plan_path": ctx.rel(ctx.dir / "plan.json"),
        "teacher": plan.teacher,
        "student": plan.student,
        "strategy": plan.strategy.kind,
        "predicted": _predicted_by_stage(plan),
        "device": ctx.runtime.name,  # the device the plan priced as this machine (its `local` server)
    }


# The cost model prices work items; the runner's stages group them.
_COST_ITEMS = {"synth": ("generation",), "distill": ("signal", "rollouts", "training"), "compress": ("recovery",)}


def _predicted_by_stage(plan: Any) -> dict[str, float]:
    secs: dict[str, float] = {}
    for item in plan.stages:
        for stage, items in _COST_ITEMS.items():
            if item.stage in items and item.server == plan.training_server.name:
                secs[stage] = secs.get(stage, 0.0) + item.seconds
    return {k: round(v, 2) for k, v in secs.items()}


def stage_synth(ctx: Context) -> dict[str, Any]:
    from stratos.synth import run_synth

    plan = ctx.plan()
    plan = replace(plan, strategy=_strategy(ctx.spec, plan))  # whether the teacher generates, with the spec's values
    spec = _effective(ctx.spec, plan)
    res = run_synth(spec, ctx.dir, plan=plan, progress=ctx.progress, requests_dir=ctx.requests_dir)
    return {"data_path": ctx.rel(res.data_path), "stats_path": ctx.rel(res.stats_path), "rows": res.rows}


def stage_distill(ctx: Context) -> dict[str, Any]:
    from stratos.distill import load_records, run_phases, train_sft_baseline
    from stratos.distill.evaluation import evaluator_for
    from stratos.models import load, load_student
    from stratos.tasks import task_from_spec

    plan = ctx.plan()
    spec = ctx.spec
    settings = settings_of(spec, plan)
    if ctx.nproc > 1:
        return _distill_processes(ctx, settings)
    s_spec = spec.students[plan.student["index"]]
    t_spec = spec.teachers[plan.teacher["index"]]
    records = load_records(ctx.artifact("synth", "data_path"))
    student, tok = load_student(s_spec, spec.task, device=ctx.device, seed=spec.distill.seed,
                                calibration=records)
    teacher = t_tok = None
    if settings.needs_teacher_model:
        teacher, t_tok = load(t_spec.model, dtype=t_spec.dtype, trust_remote_code=t_spec.trust_remote_code,
                              device=ctx.device)
    for line in settings.reasons:
        log.info("distill: %s", line)
    task = task_from_spec(spec.task)
    evaluator = evaluator_for(spec.task, tok, settings, max_new_tokens=spec.eval.max_new_tokens,
                              held_out=spec.eval_questions, batch_size=spec.eval.batch_size, task=task)
    res = run_phases(student, tok, records, settings, ctx.dir, teacher=teacher, teacher_tokenizer=t_tok,
                     resume=ctx.resume, progress=ctx.progress, evaluator=evaluator, task=task)
    from stratos.report.card import data_source, write_baseline_card, write_distill_card

    # What training knows of the student, in `stratos distill`'s form; the eval stage replaces it with the measured one.
    card_facts = dict(max_new_tokens=spec.eval.max_new_tokens,
                      source=data_source(ctx.artifact("synth", "data_path"), spec.task.name),
                      spec=spec, plan=plan.to_dict(), teacher=t_spec, student=s_spec, device=ctx.runtime.describe(),
                      made_by="run")
    write_distill_card(res, settings=settings, metrics_path=ctx.dir / "metrics.jsonl", **card_facts)
    out = {"model": ctx.rel(res.model_dir), "metrics_path": ctx.rel(ctx.dir / "metrics.jsonl"),
           "steps": res.steps, "tokens_per_second": res.tokens_per_second,
           "phases": [p.algorithm for p in settings.phases], "loss": settings.phases[-1].config["loss"],
           "signal": res.signal.get("mode", "none"), "settings": settings.to_dict(),
           "best_step": res.final_metrics.get("best_step")}
    if spec.distill.sft_baseline:
        # The same student, data, seed and batch order without the teacher: what eval compares the student with.
        del student, teacher
        b_res = train_sft_baseline(lambda: load_student(s_spec, spec.task, device=ctx.device, seed=spec.distill.seed,
                                                        calibration=records)[0],
                                   tok, records, settings, ctx.dir, resume=ctx.resume, progress=ctx.progress,
                                   evaluator=evaluator, task=task)
        if b_res is not None:
            write_baseline_card(b_res, settings=settings, out_dir=ctx.dir, **card_facts)
    return out | _baseline_artifacts(ctx, settings)


def _baseline_artifacts(ctx: Context, settings: Any) -> dict[str, Any]:
    """What the distill stage records about the SFT baseline (``distill.sft_baseline``) it trained."""
    from stratos.distill import BASELINE_DIR
    from stratos.distill.recipe import sft_baseline

    if not ctx.spec.distill.sft_baseline or settings.signal == "none":
        return {}
    where = ctx.dir / BASELINE_DIR
    res = json.loads((where / "result.json").read_text())
    return {"sft_baseline": {"model": ctx.rel(where / "model"), "steps": res["steps"],
                             "training": sft_baseline(settings).training, "settings": res["settings"]}}


def _distill_processes(ctx: Context, settings: Any) -> dict[str, Any]:
    """The distill stage as ``ctx.nproc`` processes (``stratos distill --nproc``, torchrun): the same settings
    from the same spec and plan, written for them to read; what they trained is read back from result.json."""
    import subprocess
    import sys

    import yaml

    spec_path = ctx.dir / "spec.yaml"  # the spec this attempt runs with, paths absolute
    spec_path.write_text(yaml.safe_dump(ctx.spec.model_dump(mode="json", exclude_unset=True), sort_keys=False))
    cmd = [sys.executable, "-m", "stratos.cli", "distill", str(spec_path), "--plan",
           str(ctx.artifact("plan", "plan_path")), "--data", str(ctx.artifact("synth", "data_path")),
           "--out", str(ctx.dir), "--resume", "--device", ctx.runtime.name, "--nproc", str(ctx.nproc)]
    log.info("distill: %d processes (torchrun): %s", ctx.nproc, " ".join(cmd[2:]))
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise RunError(f"the distill processes failed (exit {done.returncode}); their output is above")
    res = json.loads((ctx.dir / "result.json").read_text())
    return {"model": ctx.rel(Path(res["model_dir"])), "metrics_path": ctx.rel(ctx.dir / "metrics.jsonl"),
            "steps": res["steps"], "tokens_per_second": res["tokens_per_second"],
            "phases": [p.algorithm for p in settings.phases], "loss": settings.phases[-1].config["loss"],
            "signal": res.get("signal", {}).get("mode", "none"), "settings": settings.to_dict(),
            "best_step": res["final_metrics"].get("best_step"), "processes": ctx.nproc,
            **_baseline_artifacts(ctx, settings)}


def stage_compress(ctx: Context) -> dict[str, Any]:
    model = ctx.artifact("distill", "model")
    if not ctx.spec.compress.enabled:
        return {"model": ctx.rel(model), "skipped": True}
    from stratos.compress import run_compress
    from stratos.distill import load_records

    records = load_records(ctx.artifact("synth", "data_path"))
    res = run_compress(ctx.spec, model, ctx.dir, records=records, progress=ctx.progress, device=ctx.device)
    return {"model": ctx.rel(res.model_dir), "report_path": ctx.rel(res.report_path)}


def stage_deploy(ctx: Context) -> dict[str, Any]:
    """The launch recipe (SkyPilot task + shell script) for the server the plan chose; what the
    user set under ``serve.deploy`` wins over the plan."""
    from stratos.serve import ServeError, deploy_recipe, read_plan_target
    from stratos.spec import DeployTarget

    model = ctx.artifact("compress", "model")
    user = ctx.spec.serve.deploy
    try:
        planned = read_plan_target(ctx.artifact("plan", "plan_path"))
    except ServeError:  # the plan chose a CPU machine (no accelerator): nothing to take from it
        planned = {}
    target = DeployTarget(**{**{k: v for k, v in planned.items() if k not in user.model_fields_set},
                             **user.model_dump(include=user.model_fields_set)})
    recipe = deploy_recipe(str(model), target, port=ctx.spec.serve.port, api_key_env=ctx.spec.serve.api_key_env,
                           served_model_name=ctx.spec.serve.model_name)
    task_path, sh_path = recipe.write(ctx.dir)
    for note in recipe.notes:
        log.info("deploy: %s", note)
    return {"model": ctx.rel(model), "skypilot_path": ctx.rel(task_path), "script_path": ctx.rel(sh_path),
            "accelerator": target.accelerator, "cloud": target.cloud, "notes": recipe.notes}


def _model_facts(model: Any, folder: Path | None) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder and folder.is_dir() else None
    return {"params": sum(p.numel() for p in model.parameters()), "size_mb": round(size / 2**20, 1) if size else None}


def stage_eval(ctx: Context) -> dict[str, Any]:
    """Teacher (zero-shot, with the rules, and with the worked examples synth showed it), student,
    compressed and deployed student on the same held-out questions; the deployed one through its HTTP
    endpoint, with a load test."""
    from stratos.evaluate import evaluate
    from stratos.models import load, load_tokenizer, resolve
    from stratos.models.generate import encode_prompt
    from stratos.serve import bench_serve, running_server
    from stratos.synth import price_of
    from stratos.tasks import messages, task_from_spec
    from stratos.teachers import endpoint, generate_fn, make_teacher

    t_start = time.perf_counter()
    spec, plan = ctx.spec, ctx.plan()
    task = task_from_spec(spec.task)
    n = spec.eval_questions
    examples = task.examples("eval", n, seed=spec.task.seed)
    kw = {"batch_size": spec.eval.batch_size, "max_new_tokens": spec.eval.max_new_tokens, "progress": ctx.progress}
    rows: list[dict[str, Any]] = []

    def record(role: str, name: str, res: Any, facts: dict[str, Any], **extra: Any) -> None:
        rows.append({"role": role, "model": name, **res.to_dict(), **facts, **extra})
        log.info("eval: %-24s accuracy %.3f [%.3f, %.3f]", role, res.accuracy, res.ci_low, res.ci_high)

    t_spec = spec.teachers[plan.teacher["index"]]
    teacher = t_tok = gen = client = None
    if t_spec.backend == "openai":  # a black box: asked through the run's teacher client and request cache
        client = make_teacher(t_spec, cache_dir=ctx.requests_dir, price=price_of(spec, t_spec))
        gen = generate_fn(client, progress=ctx.progress)
        price = spec.plan.api_prices.get(t_spec.label) or spec.plan.api_prices.get(t_spec.model)
        facts = {"params": int(price.params_b * 1e9) if price and price.params_b else None, "size_mb": None}
    else:
        teacher, t_tok = load(t_spec.model, dtype=t_spec.dtype, trust_remote_code=t_spec.trust_remote_code,
                              device=ctx.device)
        facts = _model_facts(teacher, resolve(t_spec.model)[1])
    for rules in (False, True) if spec.eval.rules_n != 0 else (False,):
        role = "teacher (rules in prompt)" if rules else "teacher (zero-shot)"
        subset = examples[: spec.eval.rules_n] if rules and spec.eval.rules_n else examples
        res = evaluate(teacher, t_tok, task, subset, rules=rules, generate_fn=gen,
                       predictions_path=ctx.dir / f"predictions-teacher{'-rules' if rules else ''}.jsonl", **kw)
        record(role, t_spec.label, res, facts)
    synth_stats = json.loads(Path(ctx.artifact("synth", "stats_path")).read_text())
    shots, rules = synth_stats.get("few_shot") or 0, bool(synth_stats.get("rules_in_teacher_prompt"))
    context = synth_stats.get("worked_examples")  # what synth showed the teacher before each question
    if shots and context and spec.eval.few_shot_n != 0:  # the teacher as synth asked it, the one KD reads
        subset = examples[: spec.eval.few_shot_n] if spec.eval.few_shot_n else examples
        res = evaluate(teacher, t_tok, task, subset, rules=rules, generate_fn=gen, context=context,
                       predictions_path=ctx.dir / "predictions-teacher-shots.jsonl", **kw)
        record(shots_role(shots, rules), t_spec.label, res, facts, few_shot=shots, rules=rules)
    api_usd = 0.0
    if client is not None:
        api_usd = client.usage.cost_usd
        client.close()
    del teacher
    models = [("student", ctx.artifact("distill", "model"))]
    baseline = ctx.manifest.data["stages"]["distill"].get("artifacts", {}).get("sft_baseline")
    if baseline:  # distill.sft_baseline: the same student trained without the teacher
        models.append((BASELINE_ROLE, ctx.run_dir / baseline["model"]))
    if not ctx.manifest.data["stages"].get("compress", {}).get("artifacts", {}).get("skipped"):
        models.append(("compressed student", ctx.artifact("compress", "model")))
    correct: dict[str, list[bool]] = {}
    for role, folder in models:
        model, tok = load(folder, device=ctx.device)
        path = ctx.dir / f"predictions-{role.replace(' ', '-')}.jsonl"
        res = evaluate(model, tok, task, examples, predictions_path=path, **kw)
        correct[role] = [bool(r["correct"]) for r in read_jsonl(path)]
        measured = _model_facts(model, folder)
        if role != BASELINE_ROLE:
            facts = measured  # the deployed model is the last one listed, the baseline aside
        record(role, ctx.rel(folder), res, measured)
        del model

    final = ctx.artifact("deploy", "model")
    bench = None
    with running_server(final, args=["--device", ctx.runtime.name]) as srv:
        deployed = endpoint(srv.base_url, srv.model, api_key=srv.api_key,  # no cache: this measures the server
                            role="deployed student")
        res = evaluate(None, None, task, examples, generate_fn=generate_fn(deployed, progress=ctx.progress),
                       predictions_path=ctx.dir / "predictions-deployed.jsonl", **kw)
        # The load test's prompts are the first eval questions as a chat request carries them: the token ids the
        # server makes of /v1/chat/completions (encode_prompt, the deployed model's chat template), not bare text.
        d_tok = load_tokenizer(final)
        prompts = [encode_prompt(d_tok, messages(task, ex)) for ex in examples[:16]]
        bench = bench_serve(srv.url, clients=spec.eval.bench_clients, requests=spec.eval.bench_requests,
                            prompts=prompts, max_tokens=spec.eval.max_new_tokens, api_key=srv.api_key)
    price = plan.serving_server.price(False)
    record("deployed student", ctx.rel(final), res, facts, latency_ms=bench.latency_ms,
           requests_per_s=bench.requests_per_s, output_tokens_per_s=bench.output_tokens_per_s)
    results = {"task": spec.task.name, "n": n, "rows": rows, "bench": bench.to_dict(),
               "serving_server": plan.serving_server.name, "serving_usd_per_hour": price,
               "serving_local": plan.serving_server.is_local}
    if baseline:  # what the teacher adds: the student against its SFT baseline, question by question
        from stratos.distill.recipe import Settings
        from stratos.evaluate import paired_difference

        trained = Settings.from_dict(ctx.manifest.data["stages"]["distill"]["artifacts"]["settings"]).training
        results["teacher_gain"] = {**paired_difference(correct["student"], correct[BASELINE_ROLE]),
                                   "student": trained, "baseline": baseline["training"]}
    # No eval question in the training data: reverse synthesis or a teacher's prompts could have brought one in.
    from stratos.distill import load_records
    from stratos.evaluate import leakage

    results["leakage"] = leakage(task, examples, load_records(ctx.artifact("synth", "data_path"), need_response=False))
    if results["leakage"]["found"]:
        log.warning("eval: %d of the %d eval questions appear in the training data (e.g. %s): the accuracy "
                    "overstates what the student does on unseen questions", results["leakage"]["found"], n,
                    ", ".join(results["leakage"]["found_ids"]))
    # The constraints as results: judged here, shown first in the report, and `stratos run` exits 3 on a miss.
    from stratos.verdicts import judge, spent_usd

    api_usd += sum(getattr(p, "cost_usd", 0.0) for p in plan.probes)  # the plan's probes of API teachers
    api_usd += float((synth_stats.get("usage") or {}).get("cost_usd") or 0.0)
    earlier = sum(float(a.get("compute_usd") or 0.0) for a in ctx.manifest.data.get("attempts", [])[:-1])
    spent = spent_usd(ctx.manifest.data, plan.training_server.price(bool(spec.plan.spot)), price, api_usd,
                      spec.plan.serve_trial_hours, eval_seconds=time.perf_counter() - t_start, earlier_usd=earlier)
    results["spent"] = {"usd": spent[0], "how": spent[1]}
    results["verdicts"] = [v.to_dict() for v in judge(spec.constraints, results, spent)]
    write_json(ctx.dir / "results.json", results)
    # A model card in each model folder the run exports, from what was just measured.
    from stratos.report.card import write_cards

    stages = ctx.manifest.data["stages"]
    card_facts = dict(spec=spec, plan=json.loads(Path(ctx.artifact("plan", "plan_path")).read_text()), results=results,
                      stats=synth_stats, device=ctx.runtime.describe())
    write_cards({"student": ctx.artifact("distill", "model"), "deployed student": final},
                distill=stages["distill"].get("artifacts", {}), compress=stages.get("compress", {}).get("artifacts"),
                **card_facts)
    if baseline:  # its own training (the distill stage's artifact), its own row
        write_cards({BASELINE_ROLE: ctx.run_dir / baseline["model"]}, baseline=True,
                    distill={"steps": baseline["steps"], "signal": "none", "settings": baseline.get("settings")},
                    **card_facts)
    return {"results_path": ctx.rel(ctx.dir / "results.json"),
            "accuracy": {r["role"]: r["accuracy"] for r in rows},
            "verdicts": [v["line"] for v in results["verdicts"]]}


def stage_report(ctx: Context) -> dict[str, Any]:
    from stratos.report import build_report

    path = build_report(ctx.run_dir)
    return {"report_path": ctx.rel(path)}


STAGES: dict[str, tuple[Callable[[Context], dict[str, Any]], tuple[str, ...]]] = {
    # stage: (function, the spec sections (or single fields) it reads)
    # The plan's probes generate with eval.max_new_tokens; eval's other settings (how many questions,
    # the load test) change only the eval stage, so editing them never reruns training.
    "plan": (stage_plan, ("task", "constraints.min_accuracy", "constraints.max_latency_ms", "constraints.budget_usd",
                          "teachers", "students", "plan", "eval.max_new_tokens")),
    "synth": (stage_synth, ("synth",)),
    "distill": (stage_distill, ("distill",)),
    "compress": (stage_compress, ("compress",)),
    "deploy": (stage_deploy, ("serve",)),
    "eval": (stage_eval, ("eval",)),
    "report": (stage_report, ()),
}


# --------------------------------------------------------------------------- the run


def input_files(spec: Spec) -> dict[str, str]:
    """The content fingerprints of the files a spec names: the task's data file and scorer module,
    the server catalog, local teacher and student models. The plan reads them all, so an edited
    data file or a retrained local model reruns the run from the plan on, as an edited spec does."""
    import importlib.util

    from stratos.io import fingerprint

    paths: dict[str, Path] = {}
    if spec.task.path is not None:
        paths["task.path"] = spec.task.path
    module = spec.task.scorer.partition(":")[0] if ":" in spec.task.scorer else None
    if module:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and Path(found.origin).is_file():
            paths["task.scorer"] = Path(found.origin)
    if spec.plan.catalog is not None:
        paths["plan.catalog"] = spec.plan.catalog
    for group in ("teachers", "students"):
        for i, m in enumerate(getattr(spec, group)):
            if Path(m.model).is_absolute():  # load_spec made every local model path absolute
                paths[f"{group}[{i}].model"] = Path(m.model)
    return {k: fingerprint(p) if p.exists() else "missing" for k, p in paths.items()}


def _section(dumped: dict[str, Any], key: str) -> Any:
    section, _, field = key.partition(".")
    return dumped[section][field] if field else dumped[section]


def inputs_hashes(spec: Spec) -> dict[str, str]:
    """Each stage's inputs hash chains the hash of the stage before it, so a change to one
    section reruns that stage and everything after it, and nothing before it. The first stage's
    hash also covers the contents of the files the spec names (``input_files``)."""
    out, prev = {}, ""
    dumped = spec.model_dump(mode="json")
    files = input_files(spec)
    for name in STAGE_NAMES:
        _, sections = STAGES[name]
        prev = sha256_text(name, prev, {k: _section(dumped, k) for k in sections}, files if name == "plan" else {})[:16]
        out[name] = prev
    return out


def select_stages(from_: str | None, only: str | None, until: str | None) -> list[str]:
    for flag, value in (("--from", from_), ("--only", only), ("--until", until)):
        if value is not None and value not in STAGE_NAMES:
            raise RunError(f"{flag} {value!r}: not a stage; stages are {', '.join(STAGE_NAMES)}")
    if only:
        return [only]
    start = STAGE_NAMES.index(from_) if from_ else 0
    stop = STAGE_NAMES.index(until) + 1 if until else len(STAGE_NAMES)
    return STAGE_NAMES[start:stop]


def default_run_dir(spec: Spec, new: bool = False) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS``: the latest directory of exactly this name, so that rerunning the
    same command resumes it (and a changed spec reruns only what changed), or a new one when ``new``
    or there is none. Only ``NAME-`` followed by a timestamp matches: the run of ``mahjong`` never
    continues the run of ``mahjong-demo``."""
    pattern = re.compile(rf"^{re.escape(spec.name)}-\d{{8}}-\d{{6}}$")
    root = Path("runs")
    runs = sorted(p for p in root.iterdir() if pattern.match(p.name) and (p / "manifest.json").is_file()) \
        if root.is_dir() else []
    if runs and not new:
        return runs[-1]
    return root / f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(
    spec: Spec,
    run_dir: str | Path,
    *,
    from_: str | None = None,
    only: str | None = None,
    until: str | None = None,
    progress: bool = True,
    spec_text: str | None = None,
    nproc: int = 1,
) -> Manifest:
    """Run the pipeline (or the selected stages) in ``run_dir``; see the module doc. When the eval finds
    the deployed student missing ``min_accuracy`` or ``max_latency_ms``, and the run covered the stages
    through the eval, it retries as ``stratos.attempts`` says (``constraints.max_attempts``)."""
    from stratos.attempts import apply_overrides, user_spec_hash
    from stratos.runtime import runtime

    run_dir = Path(run_dir)
    selected = select_stages(from_, only, until)
    rt = runtime(spec.device)  # before any work: a CUDA device this machine lacks fails here
    manifest = Manifest(run_dir)
    owner = manifest.data.get("name")
    if owner is not None and owner != spec.name:
        raise RunError(f"{run_dir} holds the run of spec {owner!r}, not {spec.name!r}: pass another --run-dir "
                       "(or leave it out for runs/NAME-TIMESTAMP)")
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_to(run_dir / "run.log")
    log.info("device: %s (device: %s)", rt.describe(), spec.device)
    manifest.data.update(name=spec.name, spec=spec.model_dump(mode="json"), updated=_now())
    if spec_text is not None:
        (run_dir / "spec.yaml").write_text(spec_text)
    # The attempts belong to the spec they were made for: a changed spec starts again from the first.
    key = user_spec_hash(spec)
    attempts = manifest.data.get("attempts") or []
    if attempts and manifest.data.get("attempts_for") != key:
        shutil.rmtree(run_dir / "attempts", ignore_errors=True)
        attempts = []
    if not attempts:
        attempts = [{"number": 1, "action": "first", "why": "the plan's choice", "overrides": {}}]
    manifest.data.update(attempts=attempts, attempts_for=key)
    forced = {from_} if from_ else set()  # --from X reruns X even if it looks done
    if only:
        forced = {only}
    retry_allowed = only is None and until is None  # a retry reruns stages through the eval, then the report
    while True:
        current = apply_overrides(spec, attempts[-1]["overrides"])
        if len(attempts) > 1:
            log.info("attempt %d of %d: %s", len(attempts), spec.constraints.max_attempts, attempts[-1]["why"])
        _run_stages(current, run_dir, manifest, selected, forced, rt, progress, nproc)
        forced = set()
        first = _retry(current, spec, run_dir, manifest, rt) if retry_allowed and "eval" in selected else None
        if first is None:
            break
        selected = STAGE_NAMES[STAGE_NAMES.index(first):]  # the retry reruns from the stage its action changes
    manifest.data["updated"] = _now()
    manifest.save()
    if "report" in selected and (len(attempts) > 1 or attempts[-1].get("next")):
        from stratos.report import build_report

        build_report(run_dir)  # again: the report stage ran before the last attempt's result was recorded
    _check_constraints(run_dir, selected, attempts)
    return manifest


def _run_stages(spec: Spec, run_dir: Path, manifest: Manifest, selected: list[str], forced: set[str], rt: Any,
                progress: bool, nproc: int = 1) -> None:
    """Each selected stage whose inputs changed, or which has not finished, in order."""
    hashes = inputs_hashes(spec)
    for name in STAGE_NAMES:
        if name not in selected:
            continue
        rec = manifest.stage(name)
        fn, _ = STAGES[name]
        same_inputs = rec.get("inputs_hash") == hashes[name]
        if same_inputs and rec.get("status") == "done" and name not in forced:
            log.info("%-8s done earlier, inputs unchanged: skipped", name)
            continue
        if name in TRAINING_STAGES:
            _train_here_or_stop(spec, run_dir, manifest)
        resume = same_inputs and rec.get("status") in ("running", "failed") and name not in forced
        if not resume and (run_dir / name).exists():
            shutil.rmtree(run_dir / name)  # inputs changed (or forced): start the stage clean
        rec.clear()
        rec.update(status="running", inputs_hash=hashes[name], started=_now(), device=rt.name)
        manifest.save()
        predicted = _predicted(manifest, rt)
        eta = f" (predicted {predicted[name]:.0f} s)" if predicted.get(name) else ""
        log.info("stage %d/%d %s: %s%s", STAGE_NAMES.index(name) + 1, len(STAGE_NAMES), name,
                 "resuming from its checkpoint" if resume else "running", eta)
        t0 = time.perf_counter()
        ctx = Context(spec=spec, run_dir=run_dir, manifest=manifest, stage=name, resume=resume, progress=progress,
                      runtime=rt, nproc=nproc)
        try:
            artifacts = fn(ctx)
        except BaseException as e:
            rec.update(status="failed" if not isinstance(e, KeyboardInterrupt) else "running", ended=_now(),
                       error=f"{type(e).__name__}: {e}"[:2000])
            manifest.save()
            raise
        seconds = time.perf_counter() - t0
        predicted = _predicted(manifest, rt)  # the plan may be new
        rec.update(status="done", ended=_now(), seconds=round(seconds, 2), artifacts=artifacts,
                   predicted_seconds=predicted.get(name))
        manifest.save()
        _learn(ctx, seconds, predicted.get(name), resumed=resume)
        log.info("%-8s done in %.1fs", name, seconds)
        # A changed stage invalidates what came after it: their hashes chain, so they rerun.


def _retry(spec: Spec, user_spec: Spec, run_dir: Path, manifest: Manifest, rt: Any) -> str | None:
    """After the eval: record the attempt's result; when it missed a constraint and ``stratos.attempts``
    proposes an action the budget allows, move the stages it reruns to ``RUN/attempts/N/``, add the next
    attempt to the manifest and return the first stage to run again (None: no retry)."""
    from stratos.attempts import RERUN, SERVING_STAGES, apply_overrides, propose
    from stratos.plan.planner import Plan
    from stratos.runtime import bf16_supported
    from stratos.verdicts import from_results, missed

    results_path = run_dir / "eval" / "results.json"
    if not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    attempts = manifest.data["attempts"]
    this = attempts[-1]
    stages = manifest.data["stages"]
    plan = Plan.from_json(run_dir / stages["plan"]["artifacts"]["plan_path"])
    this["candidate"] = [plan.teacher["name"], plan.student["name"], plan.serving_server.name]
    final = next((r for r in results["rows"] if r["role"] == "deployed student"), {})
    this["result"] = {"accuracy": final.get("accuracy"), "n": final.get("n"),
                      "latency_ms": final.get("latency_ms"), "verdicts": [v["line"] for v in results.get("verdicts", [])],
                      "missed": [v.constraint for v in missed(from_results(results))]}
    manifest.save()
    if not this["result"]["missed"] or this.get("next"):
        return None
    distill = stages.get("distill", {}).get("artifacts", {})
    layers = None
    model_dir = run_dir / distill["model"] if distill.get("model") else None
    if model_dir is not None and (model_dir / "config.json").is_file():
        layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers")
    seconds = {name: float(stages.get(name, {}).get("seconds") or 0.0) for name in STAGE_NAMES}
    action, why_not = propose(spec, plan, results, attempts, seconds,
                              distill_steps=int(distill.get("steps") or 0), student_layers=layers,
                              native_bf16=bf16_supported(rt.device))
    if action is None:
        this["next"] = f"no retry: {why_not}"
        manifest.save()
        log.info("no retry: %s", why_not)
        return None
    n = len(attempts)
    folder = run_dir / "attempts" / str(n)
    train_price, serve_price = plan.training_server.price(bool(spec.plan.spot)), plan.serving_server.price(False)
    rerun = RERUN[action.first_stage]
    moved_usd = sum(seconds[name] / 3600 * (serve_price if name in SERVING_STAGES else train_price) for name in rerun)
    overrides = {**this["overrides"], **action.overrides}
    apply_overrides(user_spec, overrides)  # fails here, not mid-stage, if the overrides do not validate
    archived = {name: stages.pop(name) for name in (*rerun, "report") if name in stages}
    this.update(dir=str(folder.relative_to(run_dir)), compute_usd=round(moved_usd, 6),
                next=f"attempt {n + 1}: {action.kind}")
    attempts.append({"number": n + 1, "action": action.kind, "why": action.why, "overrides": overrides,
                     "predicted_usd": round(action.predicted_usd, 6)})
    manifest.save()  # first: killed before the move, the rerun starts these stages clean (their records are gone)
    folder.mkdir(parents=True, exist_ok=True)
    for name in rerun:
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(folder / name))
    write_json(folder / "stages.json", archived)  # the manifest's records of the moved stages
    log.info("attempt %d missed %s: attempt %d tries %s", n, ", ".join(this["result"]["missed"]), n + 1, action.why)
    return action.first_stage


def _learn(ctx: Context, seconds: float, predicted_s: float | None, *, resumed: bool) -> None:
    """What the planner learns from a finished stage (``stratos.plan.calibration``; later plans correct
    their predictions by it): the stage's time against the plan's prediction, when it ran whole on the
    machine the plan priced; after the eval, the deployed student's accuracy and latency against the
    plan's predictions (latency only when served on the plan's serving server)."""
    from stratos.plan.calibration import latency_basis, recipe_key, record_accuracy, record_stage, student_key, task_key

    if predicted_s and not resumed:
        record_stage(ctx.stage, "local", predicted_s, seconds, run_dir=ctx.dir, note=f"run {ctx.run_dir.name}")
    if ctx.stage != "eval":
        return
    attempt = (ctx.manifest.data.get("attempts") or [{"number": 1, "action": "first"}])[-1]
    if attempt["action"] not in ("first", "next candidate"):
        return  # more training or another compression than the plan predicted for: not its prediction's error
    results = json.loads(Path(ctx.artifact("eval", "results_path")).read_text())
    plan, final = ctx.plan(), results["rows"][-1]
    pred = plan.predicted
    # One record per run and attempt: a rerun of the same eval replaces its record.
    run = str(ctx.run_dir.resolve()) + (f"#attempt-{attempt['number']}" if attempt["number"] > 1 else "")
    # The method's own prediction: an error measured against a corrected one would shrink the next correction
    # towards 0 however far off the method is (a plan.json written before 2026-12-05's fix holds no correction).
    uncorrected = pred["accuracy"] - pred.get("accuracy_correction", 0.0)
    record_accuracy(task_key(ctx.spec.task), pred["accuracy_method"], uncorrected, final["accuracy"],
                    run=run, run_dir=ctx.dir, student=student_key(ctx.spec.students[plan.student["index"]]),
                    recipe=recipe_key(_strategy(ctx.spec, plan), plan.teacher["model"]),
                    note=f"{plan.student['name']} from {plan.teacher['name']}, {final['n']} questions")
    p50 = (final.get("latency_ms") or {}).get("p50")
    if plan.serving_server.is_local and p50 and pred.get("latency_ms"):
        record_stage("latency", plan.serving_server.name, pred["latency_ms"], p50, run_dir=ctx.dir, run=run,
                     basis=latency_basis(pred, ctx.spec.eval.bench_clients, ctx.spec.eval.max_new_tokens),
                     note=f"p50 at {ctx.spec.eval.bench_clients} clients over the plan's prediction (ms)")


def _check_constraints(run_dir: Path, selected: list[str], attempts: list[dict[str, Any]]) -> None:
    """Raise ConstraintsMissed (exit 3) when the eval judged the deployed student to miss a constraint."""
    from stratos.verdicts import ConstraintsMissed, from_results, missed

    results = run_dir / "eval" / "results.json"
    if "eval" not in selected or not results.is_file():
        return
    misses = missed(from_results(json.loads(results.read_text())))
    if misses:
        tries = (f" after {len(attempts)} attempts" if len(attempts) > 1 else "")
        why = attempts[-1].get("next", "")
        raise ConstraintsMissed(f"the deployed student misses the spec's constraints{tries}: "
                                + "; ".join(v.line() for v in misses)
                                + (f"; {why}" if why else "") + f" (see {run_dir / 'report.html'})")


def _predicted(manifest: Manifest, rt: Any) -> dict[str, float]:
    """The plan's predicted seconds per stage, when this run computes on the device the plan priced
    (its ``local`` server): a prediction for a GPU is no yardstick for a run on the CPU."""
    plan = manifest.data["stages"].get("plan", {}).get("artifacts", {})
    return plan.get("predicted", {}) if plan.get("device", rt.name) == rt.name else {}


def _train_here_or_stop(spec: Spec, run_dir: Path, manifest: Manifest) -> None:
    """Go on when the plan trains on this machine; otherwise write the launch recipe for the server it
    chose (``RUN/launch/``) and stop with TrainElsewhere."""
    from dataclasses import asdict

    from stratos.plan.planner import Plan
    from stratos.serve.deploy import server_target, train_recipe
    from stratos.spec import DeployTarget

    rel = manifest.data["stages"].get("plan", {}).get("artifacts", {}).get("plan_path")
    if not rel:
        return  # no plan (a stage run alone): nothing chose a server
    plan = Plan.from_json(run_dir / rel)
    srv = plan.training_server
    if srv.is_local:
        return
    folder = run_dir / "launch"
    spot = bool(spec.plan.spot)
    target = DeployTarget(**server_target(asdict(srv), spot), name=f"stratos-{spec.name}".lower()[:60])
    recipe = train_recipe(spec, target, server=srv.name, price_per_hour=srv.price(spot), folder=folder)
    task_path, sh_path = recipe.write(folder)
    what = f"{srv.gpu_count}x {srv.gpu}" if srv.gpu != "cpu" else "a CPU machine"
    raise TrainElsewhere(
        f"the plan trains on {srv.name} ({what}, {srv.provider}), not on this machine, so nothing after the plan "
        f"ran here. Run it there: sky launch {task_path} (or {sh_path} on that server). To train on this machine "
        "instead, set plan.servers: [local] in the spec: the plan then prices this machine."
        + "".join(f" Note: {n}." for n in recipe.notes))


def _log_to(path: Path) -> None:
    """Everything the run logs goes to the console and to ``run.log`` in the run directory."""
    root = logging.getLogger("stratos")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_stratos_run", False):
            root.removeHandler(h)
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    fh._stratos_run = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        from rich.logging import RichHandler

        sh = RichHandler(show_path=False, show_time=False)
        root.addHandler(sh)
