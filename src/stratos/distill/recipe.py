"""The effective training settings of a run, decided once.

``resolve`` turns the spec's distill section, the plan's strategy (when there is a plan) and the
teacher-student match into :class:`Settings`: the phases to run (each an algorithm and the full
options it trains with), what the teacher must provide (its hidden states, top-k log-probs in the
data, or nothing), and a sentence per decision. The plan writes them into plan.json; the runner,
``stratos distill``, compress recovery, the pilots and the planner's cost model read them. No other
module decides "does this run need the teacher" or "which loss": they ask the settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from stratos.distill.algorithms import get_algorithm
from stratos.spec import DistillSpec

# Share of an injection run's epochs given to its SFT phase (the rest is the KD phase).
INJECTION_SFT_SHARE = 0.75
# The share of the training a final RL phase takes when the plan adds one (Strategy.rl).
RL_SHARE = 0.2


@dataclass(frozen=True)
class Phase:
    """One phase: an algorithm and the complete options it trains with."""

    algorithm: str
    config: dict[str, Any]  # DistillSpec as JSON, after the algorithm's own settings (sft: loss ce)
    needs_teacher: bool
    reason: str

    @property
    def spec(self) -> DistillSpec:
        return DistillSpec.model_validate(self.config)

    @property
    def label(self) -> str:
        c = self.config
        steps = f"{c['max_steps']} steps" if c.get("max_steps") else f"{c['num_train_epochs']:g} epoch(s)"
        what = []
        if get_algorithm(self.algorithm).rewarded:  # e.g. grpo: its loss is the reward's, not `loss`
            what.append("reward " + " + ".join(c.get("reward_funcs") or ["verifier"]))
        if self.needs_teacher or not what:
            what.append(f"loss {c['loss']}" + (f", kd_ratio {c['kd_ratio']:g}" if self.needs_teacher else ""))
            if self.needs_teacher and c.get("temperature", 1.0) != 1.0:
                what.append(f"temperature {c['temperature']:g}")
            if c.get("label_smoothing_factor"):  # resolve refuses it where a phase has no CE term to smooth
                what.append(f"label smoothing {c['label_smoothing_factor']:g}")
        return f"{self.algorithm} ({', '.join(what)}, {steps})"


@dataclass
class Settings:
    """What a run trains: its phases in order, and what the teacher provides."""

    phases: list[Phase]
    match: str  # 'logit' (shared vocabulary), 'cross' (logits across tokenizers), 'topk' (API log-probs), 'text'
    signal: str  # the teacher's part in training: 'hidden' (its model, hidden states), 'topk' (in the data), 'none'
    reasons: list[str] = field(default_factory=list)
    on_policy: bool = False  # a phase trains on the student's own samples (gkd)

    @property
    def needs_teacher_model(self) -> bool:
        """Whether the distill stage must load the teacher's weights (for its hidden states)."""
        return self.signal == "hidden"

    @property
    def training(self) -> str:
        """The phases in words, e.g. "sft (loss ce, 3 epoch(s)) -> kd (loss fkl, kd_ratio 0.2, 1 epoch(s))"."""
        return " -> ".join(p.label for p in self.phases)

    def summary(self) -> str:
        return f"{self.training}; teacher signal: {self.signal}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Settings":
        return cls(**{**d, "phases": [Phase(**p) for p in d["phases"]]})


def _base(distill: DistillSpec, strategy: Any) -> DistillSpec:
    """The distill section with the strategy's loss, kd_ratio and epochs where the spec left them open
    (the strategy already holds what the user wrote: ``stratos.plan.strategy.apply_spec``)."""
    if strategy is None:
        return distill
    update: dict[str, Any] = {"loss": strategy.loss, "kd_ratio": strategy.kd_ratio}
    if distill.max_steps is None:  # with max_steps the steps are given; the strategy's epochs only describe them
        update["num_train_epochs"] = strategy.epochs
    return distill.model_copy(update=update)


def names_algorithm(distill: DistillSpec) -> bool:
    """Whether the spec's distill section names what trains (``algorithm`` or ``phases``): then that runs,
    and the plan adds no phase of its own (an RL phase)."""
    return bool(distill.phases) or "algorithm" in distill.model_fields_set


def _split(cfg: DistillSpec, share: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Length updates for two phases taking ``share`` and ``1 - share`` of ``cfg``'s training."""
    if cfg.max_steps is not None:
        first = max(1, round(cfg.max_steps * share))
        return {"max_steps": first}, {"max_steps": max(1, cfg.max_steps - first)}
    return {"num_train_epochs": cfg.num_train_epochs * share}, {"num_train_epochs": cfg.num_train_epochs * (1 - share)}


def _context_clause(strategy: Any) -> str:
    """What the teacher reads that the student does not (context distillation), as a clause of the teacher-signal
    reason; empty when the teacher answers the student's own prompts. Only where it generates the data."""
    from stratos.spec import teacher_context_words

    if strategy is None or not strategy.teacher_generates:
        return ""
    seen = teacher_context_words(strategy.few_shot, strategy.rules_in_prompt)
    if seen is None:
        return ""
    return (f"; the teacher reads {seen} before each question, as it did when it answered, the student "
            "the question alone (context distillation)")


def resolve(distill: DistillSpec, *, match: str = "logit", strategy: Any = None, topk_data: bool = False) -> Settings:
    """The settings a run trains with.

    ``distill`` is the spec's section (what the user wrote wins), ``strategy`` the plan's (None for
    ``stratos distill`` without a plan), ``match`` the pair's signal ('logit', 'cross', 'topk', 'text'; see
    ``stratos.plan.matching``) and ``topk_data`` whether the training data will carry an API teacher's
    top-k log-probs (``synth.top_logprobs`` with teacher generations)."""
    base = _base(distill, strategy)
    written = distill.model_fields_set
    reasons: list[str] = []
    if distill.phases:
        raw = [(c, "phase from the spec (distill.phases)") for c in distill.phase_configs()]
    elif "algorithm" in written:
        raw = [(base, "the algorithm the spec names (distill.algorithm)")]
    elif strategy is not None and strategy.kind == "injection" and get_algorithm("kd").needs_teacher(base):
        sft, kd = _split(base, INJECTION_SFT_SHARE)
        raw = [(base.model_copy(update={"algorithm": "sft", **sft}),
                "knowledge injection: SFT first, on the checked data and the rules corpus, so the student learns "
                "the domain from the task itself"),
               (base.model_copy(update={"algorithm": "kd", **kd}),
                f"then KD with kd_ratio {base.kd_ratio:g} (weighted by how often the teacher is right)")]
    else:
        algo = "kd" if get_algorithm("kd").needs_teacher(base) else "sft"
        why = ("KD: the loss needs the teacher" if algo == "kd" else
               "SFT: loss ce (or kd_ratio 0) needs no teacher; the student learns the data's answers")
        if algo == "kd" and strategy is not None and getattr(strategy, "on_policy", False) and match in ("logit", "cross"):
            algo = "gkd"
            why = (f"on-policy KD (gkd, lmbda {base.lmbda:g}): the answers are long or take many steps, so the student "
                   "also learns from its own samples, scored by the teacher, where off-policy KD would only show it "
                   "the data's answers (GKD, Agarwal et al. 2024)")
        raw = [(base.model_copy(update={"algorithm": algo}), why)]
    if not names_algorithm(distill) and getattr(strategy, "rl", ""):
        # The plan's RL phase comes last and takes RL_SHARE of the training: the student first learns to
        # answer (SFT or KD), then the verifier's reward sharpens what it answers. opd where the teacher
        # is worth matching (alignment, white-box), so teacher and verifier teach in one phase.
        rl = "opd" if strategy.kind == "alignment" and match in ("logit", "cross") else "grpo"
        raw = [(c.model_copy(update=_split(c, 1 - RL_SHARE)[0]), why) for c, why in raw]
        raw.append((base.model_copy(update={"algorithm": rl, **_split(base, RL_SHARE)[0]}),
                    f"{strategy.rl}; {rl}" + (" (the teacher's reverse KL on the same samples too)" if rl == "opd" else "")
                    + f" for {RL_SHARE:.0%} of the training"))

    phases = []
    for cfg, why in raw:
        algo = get_algorithm(cfg.algorithm)
        cfg = algo.configure(cfg)
        needs = algo.needs_teacher(cfg)
        # Without a usable teacher signal an algorithm trains as its fallback (SFT, or grpo for opd).
        fallback = get_algorithm(algo.fallback)
        instead = "SFT" if algo.fallback == "sft" else algo.fallback
        if needs and match == "text":
            cfg = fallback.configure(cfg.model_copy(update={"algorithm": algo.fallback}))
            why += (f"; {instead} instead: teacher and student share no vocabulary, and too little of the teacher's "
                    "probability maps across it for logit KD (or it could not be measured)" + (", so the student learns from its text (loss ce)"
                                            if algo.fallback == "sft" else ""))
            needs = False
        elif needs and match == "topk" and algo.on_policy:
            # An API's log-probs come with its own generations only; it cannot score the student's samples.
            cfg = fallback.configure(cfg.model_copy(update={"algorithm": algo.fallback}))
            why += (f"; {instead} instead: {algo.name} needs the teacher to score the student's own samples, which an "
                    "API teacher (top-k log-probs of its own generations only) cannot")
            needs = False
        elif needs and match == "topk":
            if topk_data:
                cfg = cfg.model_copy(update={"teacher_signal": "topk"})
            else:
                cfg = get_algorithm("sft").configure(cfg.model_copy(update={"algorithm": "sft"}))
                why += ("; SFT instead: an API teacher's only KD signal is the top-k log-probs of its own "
                        "generations, and the data will carry none (synth.top_logprobs 0, or no teacher generations)")
                needs = False
        if cfg.label_smoothing_factor and (algo.rewarded or (needs and cfg.kd_ratio == 1 and match != "cross")):
            raise ValueError(f"distill.label_smoothing_factor {cfg.label_smoothing_factor:g}: {cfg.algorithm} "
                             + ("trains on rewards" if algo.rewarded else "has kd_ratio 1") + " and has no CE term "
                             "to smooth; set it to 0, or lower kd_ratio")
        phases.append(Phase(cfg.algorithm, cfg.model_dump(mode="json"), needs, why))
    signal = "none" if not any(p.needs_teacher for p in phases) else "topk" if match == "topk" else "hidden"
    for i, p in enumerate(phases):
        prefix = f"phase {i + 1} of {len(phases)}: " if len(phases) > 1 else "training: "
        reasons.append(f"{prefix}{p.label}: {p.reason}")
    if signal == "hidden":
        first = next(p.config for p in phases if p.needs_teacher)
        reasons.append(f"teacher signal: its last hidden states ({first['teacher_signal']}), exact logits recomputed "
                       "on the student side" + _context_clause(strategy) + ("" if match != "cross" else
                                                f", then mapped into the student's vocabulary (cross-tokenizer KD, "
                                                f"ctkd.method {first['ctkd']['method']}: responses aligned by bytes)"))
    elif signal == "topk":
        reasons.append("teacher signal: the API's top-k log-probs stored with its generations")
    on_policy = any(get_algorithm(p.algorithm).on_policy and p.needs_teacher for p in phases)
    settings = Settings(phases, match, signal, reasons, on_policy=on_policy)
    if distill.sft_baseline:
        reasons.append("SFT baseline (distill.sft_baseline): " + (
            f"the same student is also trained with {sft_baseline(settings).training} on the same data, seed and "
            "batch order, to measure what the teacher adds"
            if signal != "none" else "none trained: no phase learns from the teacher, so the student is its own "
            "SFT baseline"))
    return settings


def sft_baseline(settings: Settings) -> Settings:
    """The baseline of ``distill.sft_baseline``: the same phases with every phase that learns from the
    teacher trained as its algorithm without the teacher instead (its ``fallback``: SFT, loss ce, for kd
    and gkd; grpo, the verifier's reward alone, for opd), at the same length and seed, so the two
    students differ only in the teacher's signal."""
    out = []
    for p in settings.phases:
        if p.needs_teacher:
            algo = get_algorithm(get_algorithm(p.algorithm).fallback)
            cfg = algo.configure(p.spec.model_copy(update={"algorithm": algo.name}))
            p = Phase(algo.name, cfg.model_dump(mode="json"), False, f"{algo.name} in place of {p.algorithm}: the "
                      "baseline without the teacher")
        out.append(p)
    return Settings(out, settings.match, "none", [f"{p.label}: {p.reason}" for p in out])


def recovery_config(distill: DistillSpec) -> DistillSpec:
    """The options of compression recovery: KD from the unpruned model (same tokenizer, so logit KD
    always works), with the spec's divergence when it has one, else forward KL at kd_ratio 1."""
    cfg = distill.model_copy(update={"algorithm": "kd", "phases": None})
    if not get_algorithm("kd").needs_teacher(cfg):
        cfg = cfg.model_copy(update={"loss": "fkl", "kd_ratio": 1.0})
    return cfg
