"""Pure planning: from measured and given numbers to a chosen plan.

``build_plan`` takes model shapes, teacher probes, the task profile, the servers and the spec's
constraints and objective. It enumerates (teacher, student, training server, serving server),
drops what breaks a hard constraint (and says which constraint binds when nothing is left),
computes the Pareto front over cost, serving latency and predicted accuracy, and picks one point
by the deployment score. Nothing here runs a model, so every decision is testable with given numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stratos.distill.algorithms import get_algorithm
from stratos.distill.recipe import Settings, names_algorithm, resolve, sft_baseline
from stratos.errors import UserError
from stratos.plan.catalog import Server
from stratos.plan.costmodel import (
    ApiPricing,
    Efficiency,
    LoadTest,
    ModelShape,
    StageCost,
    Workload,
    check_memory,
    serve_latency_ms,
    stage_costs,
)
from stratos.plan.calibration import accuracy_corrections, recipe_key
from stratos.plan.matching import Match, against_pilot, match
from stratos.plan.pareto import deployment_scores, pareto_front
from stratos.plan.probe import TaskProfile, TeacherProbe
from stratos.plan.strategy import (
    SpecValues,
    Strategy,
    apply_spec,
    choose_strategy,
    plan_rl,
    prior_student_accuracy,
)

PLAN_VERSION = 2  # 2: the resolved training settings (stratos.distill.recipe.Settings)
CONSTRAINTS = ("memory", "min_accuracy", "max_latency_ms", "budget_usd")


@dataclass
class Candidate:
    teacher_index: int
    teacher: str
    student_index: int
    student: str
    training_server: str
    serving_server: str
    accuracy: float
    accuracy_method: str  # 'prior' or 'pilot'
    latency_ms: float
    cost_usd: float
    train_hours: float  # probe, generation, signal, training, recovery: time until the student exists
    stages: list[StageCost] = field(default_factory=list)
    violations: dict[str, str] = field(default_factory=dict)  # constraint -> why
    waived: dict[str, str] = field(default_factory=dict)  # predicted misses that plan.candidate plans anyway
    on_front: bool = False
    score: float | None = None

    @property
    def feasible(self) -> bool:
        return not self.violations

    def row(self) -> dict[str, Any]:
        """The summary kept in plan.json's Pareto table (stages omitted)."""
        d = asdict(self)
        d.pop("stages")
        return d


@dataclass
class PairDecision:
    """What depends on the teacher-student pair only, not on servers."""

    teacher_index: int
    student_index: int
    match: Match
    strategy: Strategy
    settings: Settings
    workload: Workload
    accuracy: float
    accuracy_method: str
    accuracy_reason: str
    # What earlier runs' errors added to the method's own prediction (``accuracy`` includes it): a run's
    # accuracy record stores the prediction without it, so corrections keep learning the method's error.
    accuracy_correction: float = 0.0


@dataclass
class Plan:
    """Everything later stages need; written to ``plan.json`` and read back by the runner."""

    spec_name: str
    objective: str
    weights: dict[str, float]
    teacher: dict[str, Any]  # {index, name, model}
    student: dict[str, Any]
    training_server: Server
    serving_server: Server
    strategy: Strategy
    settings: Settings  # what the run trains: phases, algorithms, losses, teacher signal (decided once)
    match: Match
    task: TaskProfile
    workload: Workload
    predicted: dict[str, Any]  # accuracy, accuracy_method, accuracy_reason, latency_ms, cost_usd, train_hours
    stages: list[StageCost]
    probes: list[TeacherProbe]
    pareto: list[dict[str, Any]]  # the front, chosen first
    counts: dict[str, int]  # candidates: total, feasible, front
    reasons: list[str]
    efficiency: dict[str, dict[str, Any]] = field(default_factory=dict)  # server -> factors used
    created_at: str = ""
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        if path is not None:
            from stratos.io import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        d = dict(d)
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not {PLAN_VERSION}; re-run `stratos plan`")
        d["training_server"] = Server(**d["training_server"])
        d["serving_server"] = Server(**d["serving_server"])
        d["strategy"] = Strategy(**d["strategy"])
        d["settings"] = Settings.from_dict(d["settings"])
        d["match"] = Match(**d["match"])
        d["task"] = TaskProfile(**d["task"])
        d["workload"] = Workload(**d["workload"])
        d["stages"] = [StageCost(**s) for s in d["stages"]]
        d["probes"] = [TeacherProbe(**p) for p in d["probes"]]
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Plan":
        """Read a plan from JSON text or a ``plan.json`` path."""
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{p or 'plan'}: invalid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{p or 'plan'}: not a Stratos plan ({e})") from None


class NoFeasiblePlan(UserError):
    """No combination meets every hard constraint. ``binding`` names the constraint(s) to relax.
    Not bad input but an answer: the CLI prints it and exits with code 1."""

    exit_code = 1

    def __init__(self, message: str, binding: list[str], candidates: list[Candidate]):
        super().__init__(message)
        self.binding = binding
        self.candidates = candidates


# --------------------------------------------------------------------------- inputs


@dataclass
class PlanInputs:
    teachers: list[ModelShape]
    students: list[ModelShape]
    probes: dict[str, TeacherProbe]  # by teacher name
    task: TaskProfile
    servers: list[Server]
    efficiency: dict[str, Efficiency]  # by server name; missing -> default for its kind
    min_accuracy: float | None = None
    max_latency_ms: float | None = None
    budget_usd: float | None = None
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "latency": 1.0, "train_time": 0.5, "cost": 1.0})
    objective: str = "balanced"
    competent_accuracy: float = 0.5
    spot: bool = False
    serve_hours: float = 1.0
    load: LoadTest = LoadTest()  # the eval's load test, under which max_latency_ms is judged
    api_pricing: dict[str, ApiPricing] = field(default_factory=dict)  # by teacher name
    student_accuracy: dict[tuple[int, int], tuple[float, str, str]] = field(default_factory=dict)  # pilots
    student_baseline: dict[int, float] = field(default_factory=dict)
    # (teacher index, student index) -> what crosstok.measure_mapping measured for a pair of different tokenizers
    mappings: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    corrections: dict[str, dict[str, float]] = field(default_factory=dict)  # server -> stage -> factor
    # student index -> the accuracy records of earlier runs of the task with that student (calibration.
    # accuracy_records: shipped, then this machine's); each pair's plan is corrected by those of its recipe
    accuracy_records: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    recovery_tokens: float = 0.0
    max_length: int = 512
    batch: int = 8
    teacher_models: list[str] = field(default_factory=list)
    student_models: list[str] = field(default_factory=list)
    spec_name: str = "stratos-run"
    spec_values: SpecValues = field(default_factory=SpecValues)  # what the user wrote in synth / distill: it wins
    distill: Any = None  # the spec's distill section (DistillSpec), for the resolved settings
    # plan.candidate: plan only with this (teacher name, student name, serving server name or None)
    pin: tuple[str, str, str | None] | None = None


def _pinned(inputs: PlanInputs, teacher: str, student: str) -> bool:
    return inputs.pin is None or (inputs.pin[0], inputs.pin[1]) == (teacher, student)


def _check_pin(inputs: PlanInputs) -> None:
    if inputs.pin is None:
        return
    t, s, serve = inputs.pin
    for what, name, known in (("teacher", t, [x.name for x in inputs.teachers]),
                              ("student", s, [x.name for x in inputs.students]),
                              ("serving_server", serve, [x.name for x in inputs.servers])):
        if name is not None and name not in known:
            raise ValueError(f"plan.candidate.{what} {name!r}: not one of the plan's {what.replace('_', ' ')}s "
                             f"({', '.join(known)})")


def _eff(inputs: PlanInputs, server: Server) -> Efficiency:
    from stratos.plan.costmodel import CPU_DEFAULT, GPU_DEFAULT

    return inputs.efficiency.get(server.name) or (CPU_DEFAULT if server.gpu.lower() == "cpu" else GPU_DEFAULT)


# The teacher signal of the settings -> the cost model's name for it.
_SIGNAL_COST = {"hidden": "logit", "topk": "topk", "none": "text"}


def settings_for(strategy: Strategy, m: Match, inputs: PlanInputs) -> Settings:
    """The pair's training settings: ``stratos.distill.recipe.resolve``, the one rule the run follows too."""
    from stratos.spec import DistillSpec

    return resolve(inputs.distill or DistillSpec(), match=m.mode, strategy=strategy,
                   topk_data=strategy.topk_data)


def workload_for(strategy: Strategy, m: Match, task: TaskProfile, inputs: PlanInputs,
                 settings: Settings | None = None) -> Workload:
    """The work ``strategy`` (with the spec's values already applied) implies, sized as the runner runs it."""
    v = inputs.spec_values
    settings = settings or settings_for(strategy, m, inputs)
    rationales = bool(v.rationales)  # the synth stage writes rationales only when synth.rationales says so
    answer = task.rationale_tokens if rationales and task.reasoning_steps else task.answer_tokens
    corpus = 2000.0 * 20 if strategy.knowledge_injection else 0.0  # the rules corpus, ~2k tokens, seen 20 times
    # Each phase's share of the training (its steps or epochs; one unit across phases), for what the
    # teacher and the student do in it: online teacher passes, student rollouts (on-policy phases).
    length = [p.config.get("max_steps") or p.config["num_train_epochs"] for p in settings.phases]
    shares = [x / max(1e-9, sum(length)) for x in length]
    signal_passes, rollouts, rollout_len = 1.0, 0.0, 0.0
    if any(p.needs_teacher and p.config["teacher_signal"] == "online" for p in settings.phases):
        signal_passes = sum(sh * strategy.epochs for sh, p in zip(shares, settings.phases)
                            if p.needs_teacher and p.config["teacher_signal"] == "online")
    trained = 0.0  # sequences trained per example and epoch, over the phases (grpo trains a group per prompt)
    recomputed = 0.0  # of those, the ones whose forward pass is recomputed in the backward (gradient checkpointing)
    students = [settings.phases]
    if inputs.distill is not None and inputs.distill.sft_baseline and settings.signal != "none":
        students.append(sft_baseline(settings).phases)  # a second student, the same length, no teacher
    for phases in students:
        for sh, p in zip(shares, phases):
            algo = get_algorithm(p.algorithm)
            sampled, seqs = algo.rollouts(p.spec) if algo.rollouts else (0.0, 1.0)
            trained += sh * seqs
            recomputed += sh * seqs * bool(p.config.get("gradient_checkpointing"))
            if sampled:
                rollouts += sh * strategy.epochs * strategy.data_size * sampled
                rollout_len = max(rollout_len, p.config["max_completion_length"])
    return Workload(
        prompt_tokens=task.prompt_tokens,
        answer_tokens=max(1.0, answer),
        train_examples=strategy.data_size,
        epochs=strategy.epochs,
        teacher_sequences=strategy.teacher_prompts * strategy.samples_per_prompt,
        signal=_SIGNAL_COST[settings.signal],
        extra_sft_tokens=corpus,
        signal_passes=signal_passes,
        train_sequences=trained,
        recomputed_share=recomputed / trained if trained else 0.0,
        teacher_workers=max((p.config.get("teacher_workers") or 0 for p in settings.phases if p.needs_teacher),
                            default=0),
        rollout_sequences=rollouts,
        rollout_tokens=rollout_len,
        recovery_tokens=inputs.recovery_tokens,
        serve_hours=inputs.serve_hours,
        batch=inputs.batch,
        seq=inputs.max_length,
        # The synth stage puts the rules before each teacher prompt when the strategy says so, and the worked
        # examples (synth.few_shot) before that: each one a question and its worked answer.
        teacher_prompt_tokens=task.teacher_prompt(rules=strategy.rules_in_prompt, few_shot=strategy.few_shot),
        oracle_examples=strategy.reverse_synthesis if task.oracle else 0,
        oracle_seconds=task.oracle_seconds,
    )


def decide_pairs(inputs: PlanInputs) -> list[PairDecision]:
    from stratos.spec import DistillSpec

    distill = inputs.distill or DistillSpec()
    out = []
    _check_pin(inputs)
    for ti, t in enumerate(inputs.teachers):
        probe = inputs.probes[t.name]
        for si, s in enumerate(inputs.students):
            if not _pinned(inputs, t.name, s.name):
                continue
            m = match(t, s, mapping=inputs.mappings.get((ti, si)), min_mapped_mass=distill.ctkd.min_mapped_mass,
                      ctkd_method=distill.ctkd.method)
            m = against_pilot(m, probe.best, inputs.student_accuracy.get((ti, si)))
            strat = apply_spec(choose_strategy(probe, inputs.task, m, competent_accuracy=inputs.competent_accuracy),
                               inputs.spec_values, inputs.task)
            if (ti, si) in inputs.student_accuracy:
                acc, method, why = inputs.student_accuracy[(ti, si)]
            else:
                acc, why = prior_student_accuracy(probe, inputs.task, m, strat, inputs.student_baseline.get(si, 0.0))
                method = "prior"
            recipe = recipe_key(strat, inputs.teacher_models[ti] if ti < len(inputs.teacher_models) else t.name)
            learnt = accuracy_corrections(inputs.accuracy_records.get(si, []), recipe)
            correction = 0.0
            if method in learnt:  # learnt from what earlier runs of this task, student and recipe measured
                err, measured, runs, shipped = learnt[method]
                source = (f"in {runs} earlier run(s) (deployed student measured"
                          + (f"; {shipped} of them measured by Stratos' authors, shipped in "
                             "stratos/data/accuracy_records.jsonl" if shipped else "") + ")")
                if method == "prior":
                    # The prior is a formula of the probe and the capacity ratio; the same task, student and
                    # recipe train the same student, so what those runs measured is the prediction. An error
                    # added to the prior would carry over wrong once the prior's inputs change (a probe asked
                    # with worked examples since: 65% -> 81% on the alignment example, and a +17-point error
                    # learnt against the zero-shot prior then predicted 100%).
                    correction = min(1.0, max(0.0, measured)) - acc
                    why += (f"; corrected by {100 * correction:+.1f} points to {measured:.1%}, the median accuracy "
                            f"of this student trained the same way ({recipe}) on this task {source}")
                else:  # a pilot measures this plan's own student: its bias is what carries over
                    correction = min(1.0, max(0.0, acc + err)) - acc
                    why += (f"; corrected by {100 * err:+.1f} points, the median error of this task's {method} "
                            f"predictions for this student trained the same way ({recipe}) {source}")
                acc += correction
            if not names_algorithm(distill):  # what the spec names is what runs: no RL phase of the plan's own
                strat, acc, gain = plan_rl(strat, inputs.task, acc, inputs.min_accuracy, distill.num_generations)
                why += gain
            settings = settings_for(strat, m, inputs)
            out.append(PairDecision(ti, si, m, strat, settings, workload_for(strat, m, inputs.task, inputs, settings),
                                    acc, method, why, correction))
    return out


def _probe_stage(probe: TeacherProbe, teacher: ModelShape, local: Server | None, pricing: ApiPricing | None,
                 task: TaskProfile) -> StageCost:
    usd = probe.seconds * (local.on_demand_usd_hr if local else 0.0) / 3600
    if teacher.api and pricing:
        usd += sum(probe.n * (prompt * pricing.input_usd_per_mtok + task.answer_tokens * pricing.output_usd_per_mtok)
                   for prompt in task.probe_prompts(probe)) / 1e6
    return StageCost("probe", "local", probe.seconds, usd, "measured" if probe.source == "measured" else f"{probe.source} (not measured here)")


def enumerate_candidates(inputs: PlanInputs, pairs: list[PairDecision]) -> list[Candidate]:
    local = next((s for s in inputs.servers if s.is_local), None)
    out = []
    for pd in pairs:
        t, s = inputs.teachers[pd.teacher_index], inputs.students[pd.student_index]
        probe = inputs.probes[t.name]
        pricing = inputs.api_pricing.get(t.name)
        if pricing is not None:
            pricing = ApiPricing(pricing.input_usd_per_mtok, pricing.output_usd_per_mtok, probe.latency_s)
        probe_cost = _probe_stage(probe, t, local, pricing, inputs.task)
        needs_teacher = pd.workload.teacher_sequences > 0 or pd.workload.signal == "logit"
        for train in inputs.servers:
            for serve in inputs.servers:
                if inputs.pin is not None and inputs.pin[2] is not None and serve.name != inputs.pin[2]:
                    continue
                work = pd.workload
                violations: dict[str, str] = {}
                mem = check_memory(t, s, work, train, serve, needs_teacher)
                if not mem.ok:
                    violations["memory"] = mem.reason
                corr = inputs.corrections.get(train.name, {})
                stages = [probe_cost] + stage_costs(t, s, work, train, serve, _eff(inputs, train), _eff(inputs, serve),
                                                    spot=inputs.spot, api=pricing, correction=corr)
                latency = serve_latency_ms(s, work, serve, _eff(inputs, serve),
                                           inputs.corrections.get(serve.name, {}).get("latency", 1.0), inputs.load)
                cost = sum(st.usd for st in stages)
                hours = sum(st.seconds for st in stages if st.stage != "serving") / 3600
                if inputs.min_accuracy is not None and pd.accuracy < inputs.min_accuracy:
                    violations["min_accuracy"] = f"predicted accuracy {pd.accuracy:.1%} < {inputs.min_accuracy:.1%}"
                if inputs.max_latency_ms is not None and latency > inputs.max_latency_ms:
                    violations["max_latency_ms"] = f"latency {latency:,.0f} ms > {inputs.max_latency_ms:,.0f} ms"
                if inputs.budget_usd is not None and cost > inputs.budget_usd:
                    violations["budget_usd"] = f"cost ${cost:,.2f} > ${inputs.budget_usd:,.2f}"
                waived = {}
                if inputs.pin is not None:  # a pinned pair is planned even where it is predicted to miss; memory is a fact
                    waived = {k: v for k, v in violations.items() if k != "memory"}
                    violations = {k: v for k, v in violations.items() if k == "memory"}
                out.append(Candidate(pd.teacher_index, t.name, pd.student_index, s.name, train.name, serve.name,
                                     pd.accuracy, pd.accuracy_method, latency, cost, hours, stages, violations, waived))
    return out


def binding_constraints(cands: list[Candidate], inputs: PlanInputs) -> tuple[list[str], str]:
    """Which constraints, relaxed alone, would let some candidate through; and a message saying so,
    with the best value each constraint could get."""
    active = [c for c in CONSTRAINTS if any(c in x.violations for x in cands)]
    binding = [c for c in active if any(set(x.violations) == {c} for x in cands)]
    fits = [x for x in cands if "memory" not in x.violations]
    lines = []
    if not fits:
        reasons = sorted({x.violations["memory"] for x in cands})
        lines.append("nothing fits in memory: " + "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else ""))
    else:
        def best(pool: list[Candidate], key, fmt: str, rev: bool = False) -> str:
            x = sorted(pool, key=key, reverse=rev)[0]
            return fmt.format(x) + f" ({x.teacher} -> {x.student}, train on {x.training_server}, serve on {x.serving_server})"

        def others_ok(c: str) -> list[Candidate]:
            return [x for x in fits if not (set(x.violations) - {c})] or fits

        if "min_accuracy" in active:
            lines.append(f"min_accuracy {inputs.min_accuracy:.1%}: best predicted "
                         + best(others_ok("min_accuracy"), lambda x: x.accuracy, "{0.accuracy:.1%}", rev=True))
        if "max_latency_ms" in active:
            lines.append(f"max_latency_ms {inputs.max_latency_ms:,.0f}: fastest "
                         + best(others_ok("max_latency_ms"), lambda x: x.latency_ms, "{0.latency_ms:,.0f} ms"))
        if "budget_usd" in active:
            lines.append(f"budget_usd ${inputs.budget_usd:,.2f}: cheapest "
                         + best(others_ok("budget_usd"), lambda x: x.cost_usd, "${0.cost_usd:,.2f}"))
    head = ("no plan meets every constraint; binding: " + ", ".join(binding) + " (relaxing it alone leaves a plan)"
            if binding else "no plan meets every constraint, and no single constraint relaxed alone would leave one")
    return binding, "\n".join([head] + [f"  {line}" for line in lines])


def select(cands: list[Candidate], weights: dict[str, float]) -> Candidate:
    """Mark the Pareto front of the feasible candidates and pick the best deployment score on it."""
    feasible = [c for c in cands if c.feasible]
    front = pareto_front([(c.cost_usd, c.latency_ms, -c.accuracy) for c in feasible])
    for i in front:
        feasible[i].on_front = True
    scores = deployment_scores([c.accuracy for c in feasible], [c.latency_ms for c in feasible],
                               [c.train_hours for c in feasible], [c.cost_usd for c in feasible], weights)
    for c, sc in zip(feasible, scores):
        c.score = sc
    # Ties (identical numbers on two servers) go to the cheaper, then faster, then earlier-listed one.
    return max((feasible[i] for i in front), key=lambda c: (c.score, -c.cost_usd, -c.latency_ms))


def build_plan(inputs: PlanInputs) -> tuple[Plan, list[Candidate]]:
    """Choose a plan. Raises ``NoFeasiblePlan`` naming the binding constraint when none is left."""
    pairs = decide_pairs(inputs)
    cands = enumerate_candidates(inputs, pairs)
    if not any(c.feasible for c in cands):
        binding, msg = binding_constraints(cands, inputs)
        raise NoFeasiblePlan(msg, binding, cands)
    best = select(cands, inputs.weights)
    pd = next(p for p in pairs if (p.teacher_index, p.student_index) == (best.teacher_index, best.student_index))
    servers = {s.name: s for s in inputs.servers}
    train, serve = servers[best.training_server], servers[best.serving_server]
    front = sorted((c for c in cands if c.on_front), key=lambda c: -(c.score or 0))
    feasible = sum(c.feasible for c in cands)
    lat_corr = inputs.corrections.get(serve.name, {}).get("latency", 1.0)  # learnt from earlier evals' latency
    reasons = [
        f"{len(cands)} combination{'s' * (len(cands) != 1)} of {len(inputs.teachers)} teacher(s), "
        f"{len(inputs.students)} student(s) and {len(inputs.servers)} server(s); {feasible} meet"
        f"{'s' * (feasible == 1)} every constraint; {len(front)} on the Pareto front "
        "(cost, serving latency, predicted accuracy)",
        f"picked by the '{inputs.objective}' deployment score (weights: "
        + ", ".join(f"{k} {v:g}" for k, v in inputs.weights.items()) + ")",
        f"teacher {best.teacher}, student {best.student}: predicted accuracy {best.accuracy:.1%} ({pd.accuracy_reason})",
        f"train on {train.name} ({train.gpu_count}x {train.gpu}, ${train.price(inputs.spot):,.2f}/h): "
        f"{best.train_hours * 60:,.1f} min until the student exists",
        f"serve on {serve.name} ({serve.gpu_count}x {serve.gpu}): {best.latency_ms:,.1f} ms per request, the p50 "
        f"of the eval's load test that max_latency_ms is judged on ("
        + inputs.load.words(inputs.task.prompt_tokens, pd.workload.answer_tokens)
        + (f"; x{lat_corr:.2f}: the median of measured over predicted p50 in earlier evals on {serve.name})"
           if lat_corr != 1.0 else ")"),
        f"total cost ${best.cost_usd:,.2f} (probe, teacher work, training and {inputs.serve_hours:g} h of serving)",
    ] + pd.match.reasons + pd.strategy.reasons + pd.settings.reasons
    if inputs.pin is not None:
        reasons.insert(0, f"plan.candidate pins teacher {inputs.pin[0]} and student {inputs.pin[1]}"
                       + (f", served on {inputs.pin[2]}" if inputs.pin[2] else "")
                       + ": the other pairs were not considered"
                       + "".join(f"; planned although predicted to miss {k} ({v})" for k, v in best.waived.items()))
    eff = {name: _eff(inputs, s).to_dict() for name, s in servers.items() if name in (train.name, serve.name)}
    plan = Plan(
        spec_name=inputs.spec_name,
        objective=inputs.objective,
        weights=dict(inputs.weights),
        teacher={"index": best.teacher_index, "name": best.teacher,
                 "model": inputs.teacher_models[best.teacher_index] if inputs.teacher_models else best.teacher},
        student={"index": best.student_index, "name": best.student,
                 "model": inputs.student_models[best.student_index] if inputs.student_models else best.student},
        training_server=train,
        serving_server=serve,
        strategy=pd.strategy,
        settings=pd.settings,
        match=pd.match,
        task=inputs.task,
        workload=pd.workload,
        predicted={"accuracy": best.accuracy, "accuracy_method": best.accuracy_method,
                   "accuracy_reason": pd.accuracy_reason, "accuracy_correction": pd.accuracy_correction,
                   "latency_ms": best.latency_ms, "latency_load": asdict(inputs.load), "cost_usd": best.cost_usd,
                   "train_hours": best.train_hours},
        stages=best.stages,
        probes=list(inputs.probes.values()),
        pareto=[best.row()] + [c.row() for c in front if c is not best],
        counts={"total": len(cands), "feasible": feasible, "front": len(front)},
        reasons=reasons,
        efficiency=eff,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return plan, cands
