"""The distillation strategy: knowledge alignment or knowledge injection, and its concrete settings.

*Alignment* (the teacher already knows the task): teacher generations, rejection-sampled against
the task's verifier, plus logit KD where the pair allows it. *Injection* (it does not): oracle-checked
reverse-synthesised data, the rules in the prompts and a rules corpus, SFT first, then KD weighted
by how far the teacher can be trusted. The decision uses the teacher probe and the task's
complexity; every choice comes with a sentence saying why.

What the user wrote in the spec's ``synth`` and ``distill`` sections wins over these choices:
``apply_spec`` puts those values into the strategy and re-sizes the data the way the synth stage
will. The planner predicts with its result and the runner runs it, so the two agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from stratos.plan.matching import Match, capacity_retention
from stratos.plan.probe import TaskProfile, TeacherProbe

# Above these a task counts as complex: long answers or multi-step reasoning.
LONG_ANSWER_TOKENS = 32
MANY_STEPS = 3
# Prior accuracy a student can reach on oracle-checked data alone (no competent teacher).
ORACLE_CEILING = 0.9
RULES_HELP = 0.05  # probe gain with rules in the prompt that makes them worth their tokens
# Top-k log-probs asked of an API teacher for top-k KD: the most OpenAI's chat API returns per token.
TOPK_LOGPROBS = 20
# A final RL phase pays when at least this share of the student's sample groups would get differing rewards.
RL_MIN_MIXED_GROUPS = 0.5
# Prior share of the gap between the student's pass@1 and pass@G that an RL phase closes.
RL_GAIN = 0.5


@dataclass
class Strategy:
    kind: str  # 'alignment' | 'injection'
    loss: str  # divergence of the KD phase (registered in stratos.distill.losses)
    kd_ratio: float  # loss = kd_ratio * KD + (1 - kd_ratio) * CE
    on_policy: bool
    rules_in_prompt: bool
    knowledge_injection: bool  # SFT on the task's rules corpus first
    reverse_synthesis: int  # oracle-checked examples to synthesise
    samples_per_prompt: int  # teacher samples per prompt for rejection sampling
    teacher_generates: bool
    data_size: int  # training examples: one verified answer per teacher prompt + reverse-synthesised ones
    epochs: float
    reasons: list[str] = field(default_factory=list)
    prompts: int = 0  # train prompts sent to the teacher (0 when it does not generate)
    top_logprobs: int = 0  # top-k log-probs synth asks an API teacher for, per generated token (top-k KD)
    rl: str = ""  # why a final RL phase against the verifier pays (``plan_rl``); empty: no RL phase
    verify: bool = True  # synth keeps only the teacher samples the verifier accepts (the spec's synth.verify)
    few_shot: int = 0  # worked examples before every teacher prompt (synth.few_shot; the plan's where the probe
    # showed them help: plan.probe_few_shot)
    teacher_accuracy: float = 0.0  # alignment: the probe's accuracy of the teacher as synth asks it (0: injection)
    # The plan's own values of the fields the spec overrode (``apply_spec``), restored before it applies again.
    planned: dict[str, Any] = field(default_factory=dict)

    @property
    def teacher_prompts(self) -> int:
        if not self.teacher_generates:
            return 0
        return self.prompts or self.data_size - self.reverse_synthesis  # plans written before ``prompts`` existed

    @property
    def topk_data(self) -> bool:
        """Whether the training data will carry an API teacher's top-k log-probs."""
        return self.top_logprobs > 0 and self.teacher_generates

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_complex(task: TaskProfile) -> bool:
    return task.answer_tokens > LONG_ANSWER_TOKENS or task.reasoning_steps >= MANY_STEPS


def samples_for(accuracy: float, target: float = 0.95, cap: int = 8) -> int:
    """Samples per prompt so that a prompt gets at least one verified answer with probability ``target``."""
    if accuracy >= target:
        return 1
    if accuracy <= 0:
        return cap
    return max(1, min(cap, math.ceil(math.log(1 - target) / math.log(1 - accuracy))))


def epochs_for(data: int, kind: str) -> float:
    """3 epochs under 3,000 examples, else 2; one more for injection."""
    return (3.0 if data < 3000 else 2.0) + (1.0 if kind == "injection" else 0.0)


def unchecked_kd_ratio(teacher_accuracy: float) -> float:
    """kd_ratio where no verifier checks the teacher's answers (a task without one, or synth.verify false): the
    data are its answers as they come, so a reliable teacher's distribution gets most of the weight."""
    return 0.9 if teacher_accuracy >= 0.8 else 0.5


def choose_strategy(probe: TeacherProbe, task: TaskProfile, m: Match, *, competent_accuracy: float = 0.5) -> Strategy:
    """Alignment or injection for this teacher, student and task, with settings and reasons."""
    reasons: list[str] = []
    complex_ = is_complex(task)
    rules = probe.rules_help >= RULES_HELP - 1e-9
    shots = probe.shots if probe.shots_help >= RULES_HELP - 1e-9 else 0
    best = probe.best
    competent = best >= competent_accuracy
    asked = 0.0  # alignment's: the teacher as synth will ask it
    desc = (f"answers of ~{task.answer_tokens:.0f} tokens, ~{task.reasoning_steps:.0f} reasoning step(s), "
            f"{'a verifier' if task.verifier else 'no verifier'}, {'an oracle' if task.oracle else 'no oracle'}")
    reasons.append(f"task {task.name}: {desc}; {'complex' if complex_ else 'simple'}")
    reasons.append(f"teacher {probe.teacher} probe: {probe.words()}")

    base = 2000 if task.answer_tokens <= 8 else 5000 if task.answer_tokens <= 64 else 10000
    if competent:
        kind = "alignment"
        reasons.append(f"knowledge alignment: the teacher is competent ({best:.0%} >= {competent_accuracy:.0%}), so "
                       f"its {'verified ' if task.verifier else ''}answers are the training data and the student "
                       "matches its distribution on them "
                       "(distill.sft_baseline measures whether that beats SFT on the same answers)")
        data = base
        # The teacher as synth will ask it (with the worked examples or the rules that help): what its data will be.
        asked = probe.asked(rules=rules, few_shot=shots)
        samples = samples_for(asked) if task.verifier else 1
        if task.verifier:
            reasons.append(f"{samples} teacher sample(s) per prompt, kept only when the verifier accepts them "
                           f"(enough for 95% of prompts to get a correct answer at {asked:.0%} if its errors were "
                           "independent; the synth stage counts the prompts solved)")
        if task.verifier:
            # Measured (docs/benchmarks.md): on examples/alignment.yaml's verified answers, with its teacher at 81%,
            # the same student scored 98.5% by SFT, 92.3% at kd_ratio 0.5 and 90.0% at 0.9 (2 seeds each).
            kd_ratio = 0.5
            reasons.append(f"kd_ratio 0.5: the data are answers the verifier accepted, and the teacher is right "
                           f"{asked:.0%} of the time, so CE on the verified answers keeps half the weight (on "
                           "examples/alignment.yaml's data, with its teacher at 81%, more weight on KD scored lower: "
                           "kd_ratio 0.9 90.0%, 0.5 92.3%, SFT alone 98.5%, 2 seeds each)")
        else:
            kd_ratio = unchecked_kd_ratio(asked)
            reasons.append(f"kd_ratio {kd_ratio}: " + ("the teacher is reliable and no verifier checks its answers, so "
                                                       "KD dominates with a small CE anchor" if kd_ratio > 0.5 else
                                                       "the teacher errs often, so KD is balanced with CE on its "
                                                       "answers"))
        # The settings (stratos.distill.recipe) train gkd for it: the student's own samples, scored by the teacher.
        on_policy = m.mode in ("logit", "cross") and complex_
        rev = 0
        injection = False
        teacher_generates = True
    else:
        kind = "injection"
        reasons.append(f"knowledge injection: the teacher is not competent ({best:.0%} < {competent_accuracy:.0%}); "
                       "its answers would teach its mistakes, so the knowledge comes from the task itself")
        data = 2 * base
        injection = True
        if task.oracle:
            rev = data
            teacher_generates = False
            reasons.append(f"{rev} reverse-synthesised examples (answer first, question derived, checked by the oracle)")
        else:
            rev = 0
            teacher_generates = True
            reasons.append("no oracle for this task: teacher generations with the rules in the prompt, kept only when "
                           "the verifier accepts them" if task.verifier else
                           "no oracle and no verifier: the given data with the rules in the prompt is all there is")
        samples = samples_for(best) if teacher_generates else 1
        # The phases (SFT first, then KD at this ratio) are the settings' to decide: stratos.distill.recipe.
        kd_ratio = round(min(0.5, max(0.1, best)), 2) if m.mode != "text" else 0.0
        on_policy = False
        rules = True
        reasons.append("the task's rules go in every teacher prompt (the student's prompts stay as it will be "
                       "served; knowledge injection adds the rules corpus to its data)")

    if kind == "alignment" and rules:
        reasons.append(f"the rules go in the teacher's prompts: they raise its probe accuracy by {probe.rules_help:.0%}")
    elif kind == "alignment":
        reasons.append("no rules in the prompts: they did not help the teacher on the probe")
    if not teacher_generates:
        shots = 0
    elif shots:
        reasons.append(f"worked examples: {shots} before each teacher prompt (synth.few_shot), which raise its probe "
                       f"accuracy from {probe.accuracy:.0%} to {probe.accuracy_shots:.0%}; the student's prompts stay "
                       "the bare question")
    elif probe.accuracy_shots is not None:
        reasons.append(f"worked examples: none in the teacher's prompts; {probe.shots} of them changed its probe "
                       f"accuracy by {probe.shots_help * 100:+.0f} points, short of the {RULES_HELP * 100:.0f} that "
                       "would pay for their tokens")

    if m.mode == "text":
        loss, kd_ratio = "ce", 0.0
        reasons.append("loss ce: teacher and student share no vocabulary and too little maps across it for logit KD "
                       "(or it could not be measured); the student learns "
                       "the text of its data (" + ("the teacher's verified answers" if teacher_generates else
                                                   "oracle-checked answers") + ")")
    elif m.mode == "topk" and not teacher_generates:
        loss, kd_ratio = "ce", 0.0
        reasons.append("loss ce: an API teacher returns log-probs only for its own generations, and the training "
                       "data comes from the oracle")
    elif m.capacity_ratio >= 10 and m.student_pretrained:
        loss = "rkl"
        reasons.append(f"loss rkl (reverse KL): at a {m.capacity_ratio:,.0f}x gap the student can't cover every teacher "
                       "mode; mode-seeking KL keeps it on the teacher's main answer (MiniLLM)")
    elif m.capacity_ratio >= 10:
        loss = "fkl"
        reasons.append(f"loss fkl (forward KL), not the reverse KL a {m.capacity_ratio:,.0f}x gap would get: the student "
                       "starts from random weights, and reverse KL weighs each token by the student's own probability, "
                       "which from scratch is spread thin (on the alignment example's former from-scratch student it "
                       "learnt no answer, 0.5%, docs/benchmarks.md)")
    else:
        loss = "fkl"
        reasons.append(f"loss fkl (forward KL): at a {m.capacity_ratio:,.1f}x gap the student can match the teacher's "
                       "whole distribution")
    # An API teacher's generations always come with its top-k log-probs (what the spec writes wins):
    # the spec may make it generate (synth.prompts) and train KD (distill.loss) where the plan would not.
    top_logprobs = TOPK_LOGPROBS if m.mode == "topk" else 0
    if top_logprobs and teacher_generates and loss != "ce":
        reasons.append(f"top-k KD: synth asks the API for the top {top_logprobs} log-probs of every token it "
                       "generates (the most OpenAI's API returns), and the KD term matches them, renormalised over "
                       "those tokens plus the rest of the probability mass")

    # The synth stage sends the teacher task.train_size prompts unless synth.prompts says otherwise, and
    # keeps about one verified answer per prompt: that, not a size of our own, is the teacher's data.
    prompts = (task.train_size or data) if teacher_generates else 0
    if teacher_generates:
        data = prompts + rev
    epochs = epochs_for(data, kind)
    if teacher_generates:
        reasons.append(f"{data} examples x {epochs:g} epochs: about one verified answer for each of the task's "
                       f"{prompts} train prompts (synth.prompts defaults to task.train_size)"
                       + ("; one more epoch for injection" if kind == "injection" else ""))
    else:
        reasons.append(f"{data} examples x {epochs:g} epochs: sized by answer length"
                       + (", doubled and one more epoch for injection" if kind == "injection" else ""))
    return Strategy(kind, loss, kd_ratio, on_policy, rules, injection, rev, samples, teacher_generates, data, epochs,
                    reasons, prompts=prompts, top_logprobs=top_logprobs, few_shot=shots, teacher_accuracy=asked)


def mixed_group_share(accuracy: float, group: int) -> float:
    """The share of groups of ``group`` samples, each correct with probability ``accuracy``, whose
    rewards differ: only those give RL (grpo's group-normalised advantages) a gradient."""
    p = min(max(accuracy, 0.0), 1.0)
    return 1.0 - p**group - (1.0 - p) ** group


def oracle_answers(s: Strategy) -> bool:
    """Whether most of the training data are the oracle's answers (reverse synthesis), not the teacher's."""
    return s.reverse_synthesis > 0 and s.reverse_synthesis >= s.teacher_prompts


def plan_rl(s: Strategy, task: TaskProfile, accuracy: float, min_accuracy: float | None,
            num_generations: int) -> tuple[Strategy, float, str]:
    """A final RL phase against the task's verifier, where it pays: the task has a verifier, the student
    is predicted to answer sometimes (at least half its groups of ``num_generations`` samples would
    have differing rewards, so a gradient) and its predicted accuracy misses ``min_accuracy`` (RL costs
    a generation per sample; where the prediction already meets the target, it is not spent) and its
    data come mostly from the teacher: where most are the oracle's answers (``oracle_answers``),
    spending the RL phase's minutes on more SFT taught more on the one task measured (Mahjong), so the
    plan adds none and its reasons say why.

    Returns the strategy, the accuracy predicted with the RL phase, and why (empty without RL). The
    prediction is a prior: RL sharpens what the student already samples, so its pass@1 is bounded by its
    pass@k (Yue et al. 2025); we predict it closes RL_GAIN of the gap between pass@1 and pass@G
    (G = num_generations, samples taken as independent)."""
    if not task.verifier or min_accuracy is None or accuracy >= min_accuracy:
        return replace(s, rl=""), accuracy, ""
    share = mixed_group_share(accuracy, num_generations)
    if share < RL_MIN_MIXED_GROUPS:
        return replace(s, rl=""), accuracy, ""
    if oracle_answers(s):
        why = (f"no RL phase, though the student is predicted to answer {accuracy:.0%}, short of min_accuracy "
               f"{min_accuracy:.0%}: {s.reverse_synthesis} of its ~{s.data_size} training examples are the oracle's "
               "answers, and on the task measured, more SFT on such data taught more than a GRPO phase in the same "
               "minutes (Mahjong, of 1,000 validation questions: SFT alone 87.9% at 488 s, SFT then GRPO 39.2-61.5% "
               "at 561-634 s over three seeds; docs/engine.md)")
        return replace(s, rl="", reasons=[*s.reasons, why]), accuracy, ""
    pass_at_g = 1.0 - (1.0 - accuracy) ** num_generations
    after = accuracy + RL_GAIN * (pass_at_g - accuracy)
    why = (f"RL against the verifier: the student is predicted to answer {accuracy:.0%} correctly, short of "
           f"min_accuracy {min_accuracy:.0%}, and at that rate {share:.0%} of its groups of {num_generations} "
           "samples get differing rewards, so the verifier can teach it directly")
    gain = (f"; with RL: {accuracy:.0%} + {RL_GAIN:g} x (pass@{num_generations} {pass_at_g:.0%} - {accuracy:.0%}) "
            f"= {after:.0%} (prior: RL sharpens what the student already samples)")
    return replace(s, rl=why), after, gain


@dataclass(frozen=True)
class SpecValues:
    """The values the user wrote in the spec's ``synth`` and ``distill`` sections (None: not written,
    the plan decides). ``SpecValues.from_spec(spec)`` reads them from a ``stratos.spec.Spec``."""

    prompts: int | None = None  # synth.prompts
    samples_per_prompt: int | None = None
    reverse_synthesis: int | None = None
    knowledge_injection: bool | None = None
    rationales: bool | None = None  # synth.rationales: oracle answers with their worked rationale
    top_logprobs: int | None = None  # synth.top_logprobs
    verify: bool | None = None  # synth.verify
    few_shot: int | None = None  # synth.few_shot
    epochs: float | None = None  # distill.num_train_epochs
    max_steps: int | None = None  # distill.max_steps (wins over epochs)
    loss: str | None = None
    kd_ratio: float | None = None
    loss_needs_teacher: bool | None = None  # of the written loss (ce does not)
    train_batch: int = 8  # per_device_train_batch_size x gradient_accumulation_steps, to turn max_steps into epochs

    @classmethod
    def from_spec(cls, spec: Any) -> "SpecValues":
        s, d = spec.synth, spec.distill

        def given(section: Any, name: str) -> Any:
            return getattr(section, name) if name in section.model_fields_set else None

        prompts = given(s, "prompts")
        if prompts is None and "prompts" in s.model_fields_set:
            prompts = spec.task.train_size  # `prompts: null` written out: the synth stage's default, teacher or not
        loss = given(d, "loss")
        needs = None
        if loss is not None:
            from stratos.distill.losses import get_loss

            needs = get_loss(loss).needs_teacher
        return cls(prompts=prompts, samples_per_prompt=given(s, "samples_per_prompt"),
                   reverse_synthesis=given(s, "reverse_synthesis"), knowledge_injection=given(s, "knowledge_injection"),
                   rationales=given(s, "rationales"), top_logprobs=given(s, "top_logprobs"), verify=given(s, "verify"),
                   few_shot=given(s, "few_shot"),
                   epochs=given(d, "num_train_epochs"),
                   max_steps=given(d, "max_steps"), loss=loss, kd_ratio=given(d, "kd_ratio"), loss_needs_teacher=needs,
                   train_batch=d.per_device_train_batch_size * d.gradient_accumulation_steps)

    def written(self) -> list[tuple[str, str, Any]]:
        """(field, spec name, value) of each value the user wrote."""
        return [(f, name, getattr(self, f)) for f, name in _SPEC_NAMES.items() if getattr(self, f) is not None]


# SpecValues field -> its name in the spec, and the Strategy attribute holding the plan's own value.
_SPEC_NAMES = {"prompts": "synth.prompts", "samples_per_prompt": "synth.samples_per_prompt",
               "reverse_synthesis": "synth.reverse_synthesis", "knowledge_injection": "synth.knowledge_injection",
               "top_logprobs": "synth.top_logprobs", "verify": "synth.verify", "few_shot": "synth.few_shot",
               "epochs": "distill.num_train_epochs", "max_steps": "distill.max_steps", "loss": "distill.loss",
               "kd_ratio": "distill.kd_ratio"}
_PLAN_VALUE = {"prompts": "teacher_prompts", "samples_per_prompt": "samples_per_prompt",
               "reverse_synthesis": "reverse_synthesis", "knowledge_injection": "knowledge_injection",
               "top_logprobs": "top_logprobs", "verify": "verify", "few_shot": "few_shot", "epochs": "epochs",
               "loss": "loss",
               "kd_ratio": "kd_ratio"}


def _fmt(v: Any) -> str:
    """A spec value as the user wrote it in YAML."""
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


# Which of choose_strategy's reason lines states each value the spec can replace (by how the line starts or
# what it holds), so that a replaced one says so where it stands instead of reading as what runs.
_REASON_OF = {
    "loss": lambda r, s: r.startswith("loss "),
    "kd_ratio": lambda r, s: r.startswith("kd_ratio "),
    "samples_per_prompt": lambda r, s: "teacher sample(s) per prompt" in r,
    "verify": lambda r, s: "verified answers" in r or "kept only when the verifier accepts them" in r,
    "reverse_synthesis": lambda r, s: "reverse-synthesised examples (answer first" in r,
    "data_size": lambda r, s: r.startswith(f"{s.data_size} examples x "),
    "few_shot": lambda r, s: r.startswith("worked examples: "),
    "epochs": lambda r, s: r.startswith(f"{s.data_size} examples x "),
}


def _mark_replaced(strategy: Strategy, changed: dict[str, Any]) -> list[str]:
    """The plan's own reasons, each line whose value ``changed`` replaces marked as the plan's."""
    out = []
    for r in strategy.reasons:
        if any(_REASON_OF[k](r, strategy) for k in changed if k in _REASON_OF):
            r += " [the plan's own choice; the spec's value replaces it, below]"
        out.append(r)
    return out


def apply_spec(strategy: Strategy, values: SpecValues, task: TaskProfile) -> Strategy:
    """The strategy with the user's spec values in place of the plan's: the one rule "what the user
    wrote wins", used by the planner (for its predictions) and by the runner (for what it runs).

    The data is re-sized the way the synth stage sizes it: ``prompts`` train prompts to the teacher
    (``samples_per_prompt`` samples each, about one verified answer kept per prompt) plus
    ``reverse_synthesis`` oracle examples; without an oracle both are capped by the task's
    ``train_size``. Epochs not written follow the plan's rule for the new size; ``max_steps`` turns
    into the epochs it amounts to. Applying again (a rerun with another spec) starts from the
    plan's own values, so a value removed from the spec goes back to the plan's."""
    if strategy.planned:
        strategy = replace(strategy, **strategy.planned, planned={})
    written = values.written()
    if not written:
        return strategy
    new: dict[str, Any] = {}
    for name in ("loss", "kd_ratio", "samples_per_prompt", "knowledge_injection", "top_logprobs", "verify", "few_shot"):
        if getattr(values, name) is not None:
            new[name] = getattr(values, name)
    # Every teacher sample kept (verify false): nothing checks the answers KD is weighed against, so the rule for
    # unchecked answers sets kd_ratio, unless the spec writes it.
    unchecked = (values.verify is False and values.kd_ratio is None and strategy.kind == "alignment"
                 and strategy.loss != "ce")
    if unchecked:
        new["kd_ratio"] = unchecked_kd_ratio(strategy.teacher_accuracy)
    if values.top_logprobs is None and values.loss_needs_teacher is False:
        new["top_logprobs"] = 0  # the written loss (ce) has no use for the teacher's log-probs
    if values.knowledge_injection:
        new["rules_in_prompt"] = True  # the synth stage puts the rules in the teacher's prompts then
    rev = strategy.reverse_synthesis if values.reverse_synthesis is None else values.reverse_synthesis
    generates = strategy.teacher_generates or values.prompts is not None
    prompts = values.prompts if values.prompts is not None else strategy.teacher_prompts
    if not generates:
        prompts = 0
    elif prompts <= 0:
        prompts = task.train_size  # the synth stage's default
    capped = ""
    if not task.oracle and task.train_size:  # a fixed set of questions: neither draw can exceed it
        if max(prompts, rev) > task.train_size:
            capped = f" (capped at the task's {task.train_size} train examples: no oracle to make more)"
        prompts, rev = min(prompts, task.train_size), min(rev, task.train_size)
        # Both draw from the same questions and the synth stage keeps one source per question: the rows
        # are the questions in either draw, P + R - P*R/N expected for two independent draws.
        data = round(prompts + rev - prompts * rev / task.train_size)
    else:
        data = prompts + rev
    samples = new.get("samples_per_prompt", strategy.samples_per_prompt)
    if values.verify is False:  # every sample is kept, not about one verified answer per prompt (at most: distinct)
        data += prompts * (samples - 1)
    epochs = strategy.epochs if values.epochs is None else float(values.epochs)
    if values.epochs is None and data != strategy.data_size:
        epochs = epochs_for(data, strategy.kind)  # the plan's rule, for the size that will run
    if values.max_steps is not None:
        epochs = values.max_steps * values.train_batch / max(1, data)
    new.update(reverse_synthesis=rev, teacher_generates=generates, prompts=prompts, data_size=data, epochs=epochs)
    changed = {k: v for k, v in new.items() if getattr(strategy, k) != v}
    if not changed:
        return strategy

    parts = []
    for f, spec_name, value in written:
        plan_value = getattr(strategy, _PLAN_VALUE[f]) if f in _PLAN_VALUE else None
        note = f" (plan: {_fmt(plan_value)})" if plan_value is not None and plan_value != value else ""
        if f == "prompts" and plan_value == 0:
            note = " (plan: no teacher generations)"
        if f == "max_steps":
            note = f" (= {epochs:.3g} epochs)"
        parts.append(f"{spec_name} {_fmt(value)}{note}")
    if unchecked and "kd_ratio" in changed:
        parts.append(f"so kd_ratio {_fmt(changed['kd_ratio'])} (plan: {_fmt(strategy.kd_ratio)}), the rule for "
                     f"answers no verifier checks, for a teacher at {strategy.teacher_accuracy:.0%}")
    sizes = []
    if generates:
        sizes.append(f"{prompts} teacher prompt(s) x {samples} sample(s)"
                     + (", every distinct one kept" if values.verify is False else ""))
    if rev:
        sizes.append(f"{rev} reverse-synthesised")
    reasons = _mark_replaced(strategy, changed) + [
        "from the spec (what the user wrote wins over the plan): " + ", ".join(parts) + "; the data is "
        + (" + ".join(sizes) or "none") + f" = {'at most ' if values.verify is False else ''}{data} examples x "
        f"{epochs:g} epochs{capped}"
        + (" (synth keeps a prompt's identical samples once)" if values.verify is False else "")
        + ", and the predictions are for that"
        + ("" if data else "; with no teacher prompts and no reverse synthesis only the rules corpus is left to "
           "train on")
    ]
    planned = {k: getattr(strategy, k) for k in changed} | {"reasons": strategy.reasons}
    return replace(strategy, **changed, reasons=reasons, planned=planned)


def prior_student_accuracy(probe: TeacherProbe, task: TaskProfile, m: Match, s: Strategy,
                           student_baseline: float = 0.0) -> tuple[float, str]:
    """Prior on the student's accuracy after distillation, and the reasoning in words.

    The ceiling is what the training data teaches: the teacher's best probe accuracy for
    alignment, or, for injection with an oracle, the better of that and ORACLE_CEILING. The
    student keeps a share of it that falls with the capacity ratio; complex tasks cost 15% more."""
    teacher_best = max(probe.asked(rules=s.rules_in_prompt, few_shot=s.few_shot), probe.accuracy)
    ceiling = teacher_best
    if s.kind == "injection" and task.oracle:
        ceiling = max(teacher_best, ORACLE_CEILING)
    keep = capacity_retention(m.capacity_ratio) * (0.85 if is_complex(task) else 1.0)
    acc = max(student_baseline, ceiling * keep)
    why = (f"prior: ceiling {ceiling:.0%} ({'oracle-checked data' if ceiling > teacher_best else 'teacher probe'}) x "
           f"retention {keep:.2f} at a {m.capacity_ratio:,.0f}x capacity ratio"
           + (", complex task" if is_complex(task) else "") + f" = {acc:.0%}")
    return acc, why
