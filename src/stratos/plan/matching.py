"""Teacher-student matching: which kind of distillation a pair allows, and how far apart they are."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from stratos.plan.costmodel import ModelShape

# An API teacher of unknown size is assumed this large (a frontier-class model) for the capacity ratio.
ASSUMED_API_PARAMS = 1e11


@dataclass
class Match:
    teacher: str
    student: str
    mode: str  # 'logit' (white-box, shared vocabulary), 'cross' (white-box, logits mapped across tokenizers),
    # 'topk' (API log-probs), 'text' (outputs only)
    capacity_ratio: float
    reasons: list[str] = field(default_factory=list)
    # Across tokenizers: what stratos.distill.crosstok.measure_mapping measured (mapped_mass, vocab_overlap, ...)
    mapping: dict[str, Any] | None = None
    student_pretrained: bool = True  # False: the student trains from random weights (init: random)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# How each ctkd.method distils the aligned positions (stratos.distill.crosstok.CrossHead).
CTKD_METHODS = {
    "hybrid": "the mapped part matched token for token, the rest by sorted probabilities (ULD)",
    "uld": "by sorted probabilities alone (ULD, ctkd.method uld)",
    "shared": "the mapped part alone, token for token (ctkd.method shared)",
}


def match(teacher: ModelShape, student: ModelShape, *, mapping: dict[str, Any] | None = None,
          min_mapped_mass: float = 0.5, ctkd_method: str = "hybrid") -> Match:
    """Decide the signal a teacher can give a student, and explain it. ``mapping`` is what
    ``stratos.distill.crosstok.measure_mapping`` measured for a pair of different tokenizers (None when
    it could not be measured); logit KD across tokenizers needs its ``mapped_mass`` >= ``min_mapped_mass``."""
    reasons = []
    t_params = teacher.params or ASSUMED_API_PARAMS
    if teacher.api:
        mode = "topk"
        reasons.append(f"{teacher.name} is an API teacher: only its text and top-k log-probs are available, "
                       "so the student learns from its outputs and their top-k distributions")
        if not teacher.params:
            reasons.append(f"its size is unknown; assumed {ASSUMED_API_PARAMS / 1e9:.0f}B parameters "
                           "(set plan.api_prices.<teacher>.params_b)")
    elif teacher.tokenizer and teacher.tokenizer == student.tokenizer:
        mode = "logit"
        reasons.append(f"{teacher.name} and {student.name} share a tokenizer: white-box logit KD over the "
                       "full vocabulary is possible (teacher hidden states, exact logits recomputed)")
    elif mapping is not None:
        share, overlap = mapping["mapped_mass"], mapping["vocab_overlap"]
        onto = ("tokens that do" if mapping.get("map", "exact") == "exact" else
                "tokens that map, byte for byte or onto the first token of the student's cut (ctkd.map first_token)")
        measured = (f"{teacher.name} and {student.name} use different tokenizers: {overlap:.0%} of the teacher's "
                    f"vocabulary maps byte for byte to a student token, and on the task's answers "
                    f"({mapping['positions']} aligned positions) {share:.0%} of the teacher's probability falls on "
                    + onto)
        if share >= min_mapped_mass:
            mode = "cross"
            reasons.append(f"{measured} (>= ctkd.min_mapped_mass {min_mapped_mass:g}): logit KD across tokenizers is "
                           f"possible (responses aligned by bytes, {CTKD_METHODS[ctkd_method]})")
        else:
            mode = "text"
            reasons.append(f"{measured} (< ctkd.min_mapped_mass {min_mapped_mass:g}): too little maps for logit KD, so "
                           "the teacher can teach through its text only (sequence-level KD)")
    else:
        mode = "text"
        # What the pair allows, not what the run does: the strategy decides whether the teacher's text is used.
        reasons.append(f"{teacher.name} and {student.name} use different tokenizers and the mapping between them "
                       "could not be measured (a tokenizer could not be loaded), so the teacher can teach through "
                       "its text only (sequence-level KD), not its logits")
    ratio = t_params / max(1.0, student.params)
    reasons.append(f"capacity ratio {ratio:,.1f}x ({_human(t_params)} / {_human(student.params)} parameters)"
                   + ("; a gap this large favours mode-seeking losses"
                      + ("" if student.pretrained else " for a student that starts from trained weights, which this "
                         "one does not") if ratio >= 10 else ""))
    return Match(teacher.name, student.name, mode, ratio, reasons, mapping, student.pretrained)


def against_pilot(m: Match, teacher_accuracy: float, pilot: tuple[float, str, str] | None) -> Match:
    """Logit KD across tokenizers also needs the teacher to beat what the student reaches: its pilot
    (``pilot``: the predicted accuracy, the method, the reason; only a measured pilot counts). A teacher the
    student matches would pull it towards the teacher's own errors through the mapped logits (measured in
    benchmarks/ctkd_vs_sft.py: a 60% teacher lowered a student that SFT brought to 90%), so such a pair falls
    back to the teacher's text. Other modes are returned as they are; a pair without a pilot keeps its mode, and
    its reasons say that this was not checked."""
    if m.mode != "cross":
        return m
    if pilot is None or pilot[1] != "pilot":
        why = "whether the teacher beats the student is not checked: that needs a pilot (plan.pilot)"
        return replace(m, reasons=[*m.reasons[:1], why, *m.reasons[1:]])
    acc = pilot[0]
    if teacher_accuracy > acc:
        why = (f"the teacher ({teacher_accuracy:.0%} on the probe) beats the student's pilot ({acc:.0%} predicted), "
               "so its logits have something to teach")
        return replace(m, reasons=[*m.reasons[:1], why, *m.reasons[1:]])
    why = (f"but the teacher ({teacher_accuracy:.0%} on the probe) does not beat the student's pilot ({acc:.0%} "
           "predicted after cross-tokenizer KD): its logits would pull the student towards its errors, so it "
           "teaches through its text only (sequence-level KD); the plan keeps the pilot's prediction")
    return replace(m, mode="text", reasons=[*m.reasons[:1], why, *m.reasons[1:]])


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def capacity_retention(ratio: float) -> float:
    """Prior share of a teacher's task accuracy a student keeps, falling with log of the size gap:
    1x -> 1.0, 10x -> 0.9, 100x -> 0.8, 1000x -> 0.7 (floored at 0.4). A prior, not a law: pilots
    replace it when ``plan.pilot`` is on."""
    return max(0.4, min(1.0, 1.0 - 0.1 * math.log10(max(1.0, ratio))))
