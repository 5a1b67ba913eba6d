"""The distillation strategy: knowledge alignment or knowledge injection, and its concrete settings.

*Alignment* (the teacher already knows the task): teacher generations, rejection-sampled against
the task's verifier, plus logit KD where the pair allows it. *Injection* (it does not): oracle-checked
reverse-synthesised data, the rules in the prompts and a rules corpus, SFT first, then KD weighted
by how far the teacher can be trusted. The decision uses the teacher probe and the task's
complexity; every choice comes with a sentence saying why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from stratos.plan.matching import Match, capacity_retention
from stratos.plan.probe import TaskProfile, TeacherProbe

# Above these a task counts as complex: long answers or multi-step reasoning.
LONG_ANSWER_TOKENS = 32
MANY_STEPS = 3
# Prior accuracy a student can reach on oracle-checked data alone (no competent teacher).
ORACLE_CEILING = 0.9
RULES_HELP = 0.05  # probe gain with rules in the prompt that makes them worth their tokens


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
    data_size: int
    epochs: float
    reasons: list[str] = field(default_factory=list)

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


def choose_strategy(probe: TeacherProbe, task: TaskProfile, m: Match, *, competent_accuracy: float = 0.5) -> Strategy:
    """Alignment or injection for this teacher, student and task, with settings and reasons."""
    reasons: list[str] = []
    best = probe.best
    competent = best >= competent_accuracy
    complex_ = is_complex(task)
    rules = probe.rules_help >= RULES_HELP - 1e-9
    desc = (f"answers of ~{task.answer_tokens:.0f} tokens, ~{task.reasoning_steps:.0f} reasoning step(s), "
            f"{'a verifier' if task.verifier else 'no verifier'}, {'an oracle' if task.oracle else 'no oracle'}")
    reasons.append(f"task {task.name}: {desc}; {'complex' if complex_ else 'simple'}")
    if probe.accuracy_rules is not None:
        reasons.append(f"teacher {probe.teacher} probe: {probe.accuracy:.0%} zero-shot, {probe.accuracy_rules:.0%} with "
                       f"the rules in the prompt (n={probe.n})")
    else:
        reasons.append(f"teacher {probe.teacher} probe: {probe.accuracy:.0%} zero-shot (n={probe.n})")

    base = 2000 if task.answer_tokens <= 8 else 5000 if task.answer_tokens <= 64 else 10000
    if competent:
        kind = "alignment"
        reasons.append(f"knowledge alignment: the teacher is competent ({best:.0%} >= {competent_accuracy:.0%}), so "
                       "its own answers are good training data and its distribution is worth matching")
        data = base
        samples = samples_for(best) if task.verifier else 1
        if task.verifier:
            reasons.append(f"{samples} teacher sample(s) per prompt, kept only when the verifier accepts them "
                           f"(enough for 95% of prompts to get a correct answer at {best:.0%})")
        kd_ratio = 0.9 if best >= 0.8 else 0.5
        reasons.append(f"kd_ratio {kd_ratio}: " + ("the teacher is reliable, so KD dominates with a small CE anchor"
                                                   if kd_ratio > 0.5 else
                                                   "the teacher errs often, so KD is balanced with CE on verified answers"))
        on_policy = m.mode == "logit" and complex_
        if on_policy:
            reasons.append("on-policy KD: long, multi-step answers let a student drift from teacher prefixes; "
                           "scoring the student's own samples with the teacher corrects that")
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
        kd_ratio = round(min(0.5, max(0.1, best)), 2) if m.mode != "text" else 0.0
        reasons.append("SFT on the rules corpus and the checked data first, then KD with kd_ratio "
                       f"{kd_ratio} (weighted by how often the teacher is right)")
        on_policy = False
        rules = True
        reasons.append("the task's rules go in every prompt (teacher and student data)")

    if kind == "alignment" and rules:
        reasons.append(f"the rules go in the teacher's prompts: they raise its probe accuracy by {probe.rules_help:.0%}")
    elif kind == "alignment":
        reasons.append("no rules in the prompts: they did not help the teacher on the probe")

    if m.mode == "text":
        loss, kd_ratio = "ce", 0.0
        reasons.append("loss ce: with text-only distillation the teacher's outputs are the targets")
    elif m.mode == "topk" and not teacher_generates:
        loss, kd_ratio = "ce", 0.0
        reasons.append("loss ce: an API teacher returns log-probs only for its own generations, and the training "
                       "data comes from the oracle")
    elif m.capacity_ratio >= 10:
        loss = "rkl"
        reasons.append(f"loss rkl (reverse KL): at a {m.capacity_ratio:,.0f}x gap the student can't cover every teacher "
                       "mode; mode-seeking KL keeps it on the teacher's main answer (MiniLLM)")
    else:
        loss = "fkl"
        reasons.append(f"loss fkl (forward KL): at a {m.capacity_ratio:,.1f}x gap the student can match the teacher's "
                       "whole distribution")
    if m.mode == "topk" and loss != "ce":
        reasons.append("the KD term uses the API's top-k log-probs, renormalised over those k tokens")

    if not task.oracle and task.train_size:
        data = min(data, task.train_size)
        reasons.append(f"data size capped at the task's {task.train_size} train examples (no oracle to make more)")
    epochs = 3.0 if data < 3000 else 2.0
    if kind == "injection":
        epochs += 1
    reasons.append(f"{data} examples x {epochs:g} epochs: sized by answer length"
                   + (", doubled and one more epoch for injection" if kind == "injection" else ""))
    return Strategy(kind, loss, kd_ratio, on_policy, rules, injection, rev, samples, teacher_generates, data, epochs,
                    reasons)


def prior_student_accuracy(probe: TeacherProbe, task: TaskProfile, m: Match, s: Strategy,
                           student_baseline: float = 0.0) -> tuple[float, str]:
    """Prior on the student's accuracy after distillation, and the reasoning in words.

    The ceiling is what the training data teaches: the teacher's best probe accuracy for
    alignment, or, for injection with an oracle, the better of that and ORACLE_CEILING. The
    student keeps a share of it that falls with the capacity ratio; complex tasks cost 15% more."""
    teacher_best = probe.accuracy_rules if s.rules_in_prompt and probe.accuracy_rules is not None else probe.accuracy
    teacher_best = max(teacher_best, probe.accuracy)
    ceiling = teacher_best
    if s.kind == "injection" and task.oracle:
        ceiling = max(teacher_best, ORACLE_CEILING)
    keep = capacity_retention(m.capacity_ratio) * (0.85 if is_complex(task) else 1.0)
    acc = max(student_baseline, ceiling * keep)
    why = (f"prior: ceiling {ceiling:.0%} ({'oracle-checked data' if ceiling > teacher_best else 'teacher probe'}) x "
           f"retention {keep:.2f} at a {m.capacity_ratio:,.0f}x capacity ratio"
           + (", complex task" if is_complex(task) else "") + f" = {acc:.0%}")
    return acc, why
