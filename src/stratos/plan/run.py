"""``make_plan``: the plan stage end to end. Reads the spec, measures what must be measured (teacher
probes, optionally pilots), builds the plan with the pure planner, writes ``plan.json``,
``plan.png``, ``probes.json`` and ``candidates.csv`` into the output folder."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from stratos.plan.calibration import (
    accuracy_records,
    corrections,
    load_calibration,
    local_efficiency,
    read_measurements,
    record_stage,
    shipped_measurements,
    student_key,
    task_key,
)
from stratos.plan.catalog import LOCAL, filter_servers, load_catalog
from stratos.plan.costmodel import ApiPricing, LoadTest, generate_seconds
from stratos.plan.planner import Plan, PlanInputs, build_plan
from stratos.plan.probe import TeacherProbe, probe_teacher, profile_task
from stratos.plan.shapes import model_shape
from stratos.plan.strategy import SpecValues
from stratos.synth import price_of, spec_context
from stratos.tasks import task_from_spec

log = logging.getLogger(__name__)


def _probe_key(spec: Any, t: Any, max_new_tokens: int, device: Any) -> str:
    from stratos.io import fingerprint, sha256_text
    from stratos.models import model_identity

    weights = model_identity(t.model) if t.backend != "openai" else None
    data = fingerprint(spec.task.path) if spec.task.path is not None and spec.task.path.is_file() else None
    where = str(device) if t.backend != "openai" else None  # a local probe's speed is the device's
    shots = [spec.probe_shots, spec.synth.prompts] if spec.probe_shots else []  # which worked examples it is shown
    return sha256_text(t.model_dump(), weights, spec.task.model_dump(mode="json"), data, spec.plan.probe_size,
                       spec.plan.probe_rules, max_new_tokens, where, *shots)[:16]


def _api_params(spec: Any, label: str, model: str) -> Any:
    return spec.plan.api_prices.get(label) or spec.plan.api_prices.get(model)


def weights_of(plan_spec: Any) -> dict[str, float]:
    from stratos.spec import OBJECTIVE_PRESETS

    chosen = plan_spec.weights if plan_spec.weights is not None else OBJECTIVE_PRESETS[plan_spec.objective]
    return chosen.model_dump()


def make_plan(
    spec: Any,
    out_dir: str | Path,
    *,
    probes: dict[str, TeacherProbe] | None = None,
    loaded: dict[str, tuple[Any, Any]] | None = None,
    progress: bool = True,
    calibration: dict[str, Any] | None = None,
    requests_dir: str | Path | None = None,
    device: Any = None,
    cache_dir: str | Path | None = None,
    processes: int = 1,
) -> tuple[Plan, list[Any]]:
    """Plan a run for ``spec`` (a ``stratos.spec.Spec``) into ``out_dir``.

    ``probes`` gives teacher probe results by teacher name instead of measuring them; ``loaded``
    gives already loaded (model, tokenizer) pairs by model name. Probes measured here are cached in
    ``out_dir/probes.json`` and reused when the teacher, task and probe settings are unchanged.
    ``calibration`` overrides the stored machine calibration; when none is stored (and none is
    given), a quick ``stratos profile`` runs first and stores one. API teachers are probed through
    their request cache in ``requests_dir`` (default ``out_dir/requests``; the runner passes the run's
    ``RUN/requests``, which synth and eval share, so a request asked here is never asked again).
    ``device`` (default: the spec's ``device`` setting) is this machine's ``local`` server: local
    teachers are probed and pilots trained there, and its calibration is the one priced.
    ``cache_dir`` (default ``out_dir``) holds ``probes.json`` and ``mappings.json``: the runner keeps
    them outside the plan's folder, so a plan rerun from scratch (a retry's pinned candidate) reuses them.
    ``processes``: how many train the student on this machine (``stratos run --nproc``): on CUDA the
    ``local`` server is that many of its GPUs (one each), on a CPU the same machine whatever the count.
    """
    from stratos.io import write_json
    from stratos.runtime import resolve_device

    if device is None or isinstance(device, str):
        device = resolve_device(spec.device if device is None else device)
    gpu = device.type == "cuda"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ps = spec.plan
    loaded = loaded or {}
    task = task_from_spec(spec.task)
    teachers = [model_shape(t, api_params_b=getattr(_api_params(spec, t.label, t.model), "params_b", None))
                for t in spec.teachers]
    students = [model_shape(s) for s in spec.students]
    if len({t.name for t in teachers}) < len(teachers) or len({s.name for s in students}) < len(students):
        raise ValueError("teachers (and students) need distinct names: set name: on the duplicates")

    # Token counts in the student's own vocabulary: it trains (and its data is sized) on those.
    first = spec.students[0]
    tokenizer = None if first.tokenizer == "task" else loaded.get(first.model, (None, None))[1]
    if tokenizer is None and first.model:
        try:
            from stratos.models import load_tokenizer, task_tokenizer

            tokenizer = (task_tokenizer(spec.task, first.tokenizer_vocab_size) if first.tokenizer == "task"
                         else load_tokenizer(first.model, trust_remote_code=first.trust_remote_code))
        except (OSError, ValueError):
            tokenizer = None
    # The teacher's prompts in its own tokens (the first local teacher's; synth sends those): a task tokenizer
    # trained on questions splits the English rules into three times as many tokens.
    t_first = next((t for t in spec.teachers if t.backend != "openai"), None)
    t_tok = loaded.get(t_first.model, (None, None))[1] if t_first is not None else None
    if t_first is not None and t_tok is None:
        from stratos.errors import ModelError
        from stratos.models import load_tokenizer

        try:
            t_tok = load_tokenizer(t_first.model, trust_remote_code=t_first.trust_remote_code)
        except (OSError, ValueError, ModelError):
            t_tok = None
    profile = profile_task(task, train_size=spec.task.train_size, tokenizer=tokenizer, seed=spec.task.seed,
                           teacher_tokenizer=t_tok)

    cal = load_calibration(device=device) if calibration is None else calibration
    if calibration is None and not cal:
        # Measure instead of assuming: the default CPU factors are a guess that can be several times
        # off for a small student; a quick profile takes seconds and is stored for every later plan.
        from stratos.plan.calibration import calibration_path, run_profile

        log.info("plan: this machine has no calibration yet; measuring it (stratos profile --quick)")
        cal = run_profile(quick=True, progress=progress, device=device, store_busy=False)
        if not cal["busy"]:
            log.info("plan: calibration stored in %s", calibration_path(device))
    servers = load_catalog(ps.catalog, mode=ps.catalog_mode, local_price=ps.local_price_per_hour, calibration=cal,
                           device=device, processes=processes)
    if ps.servers:
        servers = filter_servers(servers, only=ps.servers)
        if not servers:
            raise ValueError(f"plan.servers {ps.servers}: no offering matches (see `stratos servers`)")
    local = next((s for s in servers if s.is_local), None)

    # ----------------------------------------------------------------- teacher probes (measured)
    max_new = ps.probe_max_new_tokens or spec.eval.max_new_tokens
    cache = Path(cache_dir) if cache_dir is not None else out
    cache.mkdir(parents=True, exist_ok=True)
    cache_file = cache / "probes.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    probes = dict(probes or {})
    examples = None
    for t_spec, t_shape in zip(spec.teachers, teachers):
        if t_shape.name in probes:
            continue
        key = _probe_key(spec, t_spec, max_new, device)
        if key in cached:
            probes[t_shape.name] = TeacherProbe.from_dict(cached[key])
            continue
        if examples is None:
            examples = task.examples("eval", ps.probe_size, seed=spec.task.seed + 1)
            # The worked examples synth would show the teacher (plan.probe_few_shot, synth.few_shot).
            context = spec_context(spec, task, spec.probe_shots) if spec.probe_shots else []
        probe = probe_teacher(t_spec, task, examples, rules=ps.probe_rules, batch_size=spec.eval.batch_size,
                              max_new_tokens=max_new, model_and_tokenizer=loaded.get(t_spec.model), device=device,
                              cache_dir=requests_dir if requests_dir is not None else out / "requests",
                              price=price_of(spec, t_spec), progress=progress, context=context)
        probes[t_shape.name] = probe
        cached[key] = probe.to_dict()
        write_json(cache_file, cached)
        if not t_shape.api and local is not None:
            # The probe is a real generation run: record the model's prediction of it, so its error shows.
            # Predict what the probe actually did: its prompts and the tokens the teacher really generated.
            generated = max(1.0, probe.tokens_per_s * probe.latency_s)
            predicted = sum(generate_seconds(t_shape, probe.n, prompt, generated, local, local_efficiency(cal, gpu),
                                             batch=spec.eval.batch_size) for prompt in profile.probe_prompts(probe))
            record_stage("generation", LOCAL, predicted, probe.seconds, run_dir=out, note=f"probe of {t_shape.name}")

    # ----------------------------------------------------------------- pilots (optional, measured)
    pilots: dict[tuple[int, int], tuple[float, str, str]] = {}
    inputs = _inputs(spec, teachers, students, probes, profile, servers, cal, gpu)
    inputs.mappings = _measure_mappings(spec, task, teachers, students, loaded, cache, device)
    if ps.pilot:
        pilots = _run_pilots(spec, task, inputs, loaded, out, local, cal, device)
        inputs.student_accuracy = pilots

    plan, cands = build_plan(inputs)
    plan.to_json(out / "plan.json")
    from stratos.plan.render import plot

    chosen = next(c for c in cands if c.on_front and (c.teacher, c.student, c.training_server, c.serving_server)
                  == (plan.teacher["name"], plan.student["name"], plan.training_server.name, plan.serving_server.name))
    plot(cands, chosen, out / "plan.png")
    _write_candidates(out / "candidates.csv", cands)
    return plan, cands


def _inputs(spec, teachers, students, probes, profile, servers, cal, gpu: bool) -> PlanInputs:
    ps, c = spec.plan, spec.constraints
    eff = {s.name: local_efficiency(cal, gpu) for s in servers if s.is_local}
    api = {}
    for t_spec, t in zip(spec.teachers, teachers):
        price = _api_params(spec, t_spec.label, t_spec.model)
        if t.api:
            api[t.name] = ApiPricing(price.input_usd_per_mtok, price.output_usd_per_mtok) if price else ApiPricing()
    recovery = 0.0
    if spec.compress.enabled and spec.compress.recovery_steps:
        recovery = spec.compress.recovery_steps * spec.distill.per_device_train_batch_size * spec.distill.max_length
    measured = read_measurements()  # what earlier runs measured: read once for every server and student
    records = shipped_measurements() + measured  # and, for accuracy, the runs measured by Stratos' authors
    return PlanInputs(
        teachers=teachers, students=students, probes=probes, task=profile, servers=servers, efficiency=eff,
        min_accuracy=c.min_accuracy, max_latency_ms=c.max_latency_ms, budget_usd=c.budget_usd,
        weights=weights_of(ps), objective=ps.objective if ps.weights is None else "custom",
        competent_accuracy=ps.competent_accuracy, spot=ps.spot, serve_hours=ps.serve_trial_hours, api_pricing=api,
        load=LoadTest(clients=spec.eval.bench_clients, new_tokens=spec.eval.max_new_tokens),
        corrections={s.name: corrections(s.name, measured) for s in servers}, recovery_tokens=recovery,
        accuracy_records={si: accuracy_records(task_key(spec.task), student_key(s), records)
                          for si, s in enumerate(spec.students)},
        max_length=spec.distill.max_length, batch=spec.distill.per_device_train_batch_size,
        teacher_models=[t.model for t in spec.teachers], student_models=[s.model for s in spec.students],
        spec_name=spec.name, spec_values=SpecValues.from_spec(spec), distill=spec.distill,
        pin=(ps.candidate.teacher, ps.candidate.student, ps.candidate.serving_server) if ps.candidate else None,
    )


def _measure_mappings(spec, task, teachers, students, loaded, out: Path, device) -> dict[tuple[int, int], dict]:
    """For each white-box teacher and student with different tokenizers, how much of the teacher's probability
    maps exactly into the student's vocabulary on the task's answers (``crosstok.measure_mapping``): what the
    match needs to choose logit KD across tokenizers. Cached in ``out/mappings.json`` (``out``: the cache folder) by teacher weights,
    student tokenizer and task; a tokenizer that cannot be loaded leaves the pair unmeasured (text only)."""
    from stratos.distill.crosstok import measure_mapping
    from stratos.io import sha256_text, write_json
    from stratos.models import load, load_tokenizer, model_identity, task_tokenizer
    from stratos.plan.shapes import tokenizer_identity
    from stratos.tasks.base import to_records

    cache_file = out / "mappings.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    result: dict[tuple[int, int], dict] = {}
    records = None
    for ti, (t_spec, t) in enumerate(zip(spec.teachers, teachers)):
        if t.api or not t.tokenizer:
            continue
        for si, (s_spec, s) in enumerate(zip(spec.students, students)):
            if s.tokenizer == t.tokenizer:
                continue
            try:
                s_tok = (task_tokenizer(spec.task, s_spec.tokenizer_vocab_size) if s_spec.tokenizer == "task"
                         else load_tokenizer(s_spec.model, trust_remote_code=s_spec.trust_remote_code))
            except (OSError, ValueError):
                continue
            # v4: the teacher side read whole (context distillation) and byte-fallback duplicates resolved;
            # v5: no EOS pairing with a teacher that ends its turn in text (crosstok.pairs_eos), nor first-span
            # pairing where one side has a dummy prefix (crosstok.adds_dummy_prefix)
            key = sha256_text("mapping-v5", model_identity(t_spec.model), tokenizer_identity(s_tok),
                              spec.task.model_dump(mode="json"), spec.synth.rationales, spec.distill.ctkd.map,
                              spec.distill.ctkd.max_chain)[:16]
            if key not in cached:
                if records is None:
                    records = to_records(task, task.examples("train", 32, seed=spec.task.seed + 3),
                                         rationale=bool(spec.synth.rationales))
                model, t_tok = loaded.get(t_spec.model) or load(t_spec.model, dtype=t_spec.dtype, device=device,
                                                                trust_remote_code=t_spec.trust_remote_code)
                cached[key] = measure_mapping(model, s_tok, t_tok, records, max_length=spec.distill.max_length,
                                              mapping=spec.distill.ctkd.map, max_chain=spec.distill.ctkd.max_chain)
                write_json(cache_file, cached)
            result[(ti, si)] = cached[key]
    return result


def _run_pilots(spec, task, inputs: PlanInputs, loaded, out: Path, local, cal, device) -> dict:
    """One pilot per (teacher, student) pair on the local machine's device; teachers only load for logit KD."""
    from stratos.models import load
    from stratos.plan.costmodel import train_seconds
    from stratos.plan.pilot import run_pilot
    from stratos.plan.planner import decide_pairs

    ps = spec.plan
    eval_ex = task.examples("eval", min(ps.probe_size, 100), seed=spec.task.seed + 2)
    results = {}
    for pd in decide_pairs(inputs):
        t_spec, s_spec = spec.teachers[pd.teacher_index], spec.students[pd.student_index]
        teacher = None
        if pd.settings.needs_teacher_model:
            teacher = loaded.get(t_spec.model) or load(t_spec.model, dtype=t_spec.dtype,
                                                       trust_remote_code=t_spec.trust_remote_code, device=device)
        student = None
        if s_spec.model in loaded and not s_spec.config_overrides and s_spec.init == "pretrained":
            import copy

            m, tok = loaded[s_spec.model]
            student = (copy.deepcopy(m), tok)  # the pilot trains in place; keep the caller's model intact
        r = run_pilot(s_spec, task, pd.strategy, pd.settings, steps=ps.pilot_steps, eval_examples=eval_ex,
                      teacher=teacher, rationale=spec.synth.rationales, max_new_tokens=spec.eval.max_new_tokens,
                      seed=spec.task.seed, work_dir=out, student=student, task_spec=spec.task, device=device)
        results[(pd.teacher_index, pd.student_index)] = (r.predicted, "pilot", r.reason())
        if local is not None:
            predicted = train_seconds(inputs.students[pd.student_index], r.train_tokens, local,
                                      local_efficiency(cal, device.type == "cuda"))
            record_stage("training", LOCAL, predicted, r.seconds, run_dir=out,
                         note=f"pilot {pd.student_index}:{inputs.students[pd.student_index].name}")
    return results


def _write_candidates(path: Path, cands: list[Any]) -> None:
    from stratos.io import atomic_write_text

    buf = io.StringIO()
    cols = ["teacher", "student", "training_server", "serving_server", "accuracy", "accuracy_method", "latency_ms",
            "cost_usd", "train_hours", "on_front", "score", "violations"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for c in cands:
        row = {k: getattr(c, k) for k in cols if k != "violations"}
        row["violations"] = "; ".join(f"{k}: {v}" for k, v in c.violations.items())
        w.writerow(row)
    atomic_write_text(path, buf.getvalue())
