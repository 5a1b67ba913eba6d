"""The synth stage: training data from a teacher, checked by the task's verifier, plus oracle data.

    res = run_synth(spec, "runs/x/synth", plan=plan)   # res.data_path, res.stats_path, res.rows

1. **Rejection sampling.** ``synth.prompts`` train questions (default: all of ``task.train_size``) go
   to the teacher, ``samples_per_prompt`` samples each; every sample is graded by the task's
   verifier and only correct ones are kept, each distinct response once (best-of-n when n > 1).
   With ``verify: false`` every distinct sample is kept, right or wrong (the grade is still
   recorded, in each record's ``score`` and in the statistics).
   With ``knowledge_injection`` (or the plan's ``rules_in_prompt``) the teacher sees the task's
   rules in its prompt, and with ``few_shot: k`` k worked examples before it (train questions
   the prompts do not ask, answered by the task's oracle with its rationale: ``worked_examples``); the student's record
   keeps the plain prompt it will be served with, and ``teacher_messages`` what the teacher was
   asked, so KD reads the teacher as it answered (context distillation, ``stratos.distill.data``).
2. **Reverse synthesis.** ``reverse_synthesis: N`` adds N oracle-answered train questions.
3. **Knowledge injection.** ``knowledge_injection: true`` adds the task's rules corpus as text records.

Every teacher request is cached on disk under ``requests_dir`` (default ``out_dir/requests``; a run
uses its run-level ``RUN/requests``, shared with the plan's probes and the eval stage): a rerun, or
a run resumed after a crash, sends only what is missing. API spend never passes the budget
(``synth.budget_usd``, else ``constraints.budget_usd``): the stage stops before the request that
could cross it, keeps what it has and says so in the statistics. With ``top_logprobs: k`` each kept
record carries the teacher's top-k log-probs per response token, the targets of top-k KD
(``distill.teacher_signal: topk``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratos.errors import UserError
from stratos.io import write_json, write_jsonl
from stratos.spec import Spec
from stratos.teachers import Budget, GenParams, Price, Sample, Teacher, make_teacher

log = logging.getLogger("stratos.synth")

__all__ = ["SynthError", "SynthResult", "budget_of", "price_of", "prompt_count", "run_synth", "spec_context",
           "teacher_of", "worked_context", "worked_examples"]


class SynthError(UserError):
    """The stage cannot make data as configured; the message says what to change."""


@dataclass
class SynthResult:
    data_path: Path
    stats_path: Path
    rows: int
    stats: dict[str, Any] = field(default_factory=dict)


def teacher_of(spec: Spec, plan: Any = None) -> Any:
    """The plan's teacher, else the spec's first."""
    if plan is not None:
        return spec.teachers[plan.teacher["index"]]
    return spec.teachers[0]


def price_of(spec: Spec, teacher: Any) -> Price:
    """Token prices of a teacher from ``plan.api_prices`` (by name, then model); local teachers cost nothing here."""
    p = spec.plan.api_prices.get(teacher.label) or spec.plan.api_prices.get(teacher.model)
    return Price(p.input_usd_per_mtok, p.output_usd_per_mtok) if p else Price()


def budget_of(spec: Spec) -> float | None:
    limits = [b for b in (spec.synth.budget_usd, spec.constraints.budget_usd) if b is not None]
    return min(limits) if limits else None


def _topk_field(s: Sample) -> dict[str, Any] | None:
    if s.top is None:
        return None
    from stratos.distill.topk import FLOOR

    # A -inf log-prob (a token the server masked) is stored as FLOOR: JSON has no Infinity, and data
    # files with one are refused as non-finite.
    return {"tokens": s.tokens, "top": [[[t, round(max(lp, FLOOR), 5)] for t, lp in pos] for pos in s.top]}


def prompt_count(spec: Spec) -> int:
    """The train prompts the spec sends its teacher (``synth.prompts``, default ``task.train_size``), before a
    plan that uses no teacher generations sends none."""
    return spec.synth.prompts if spec.synth.prompts is not None else spec.task.train_size


def worked_examples(task: Any, k: int, seed: int, prompts: list[Any]) -> list[Any]:
    """``k`` train questions for the teacher's worked examples (``synth.few_shot``), none of them among the
    ``prompts``: a draw of their own (seed + 2; reverse synthesis draws with seed + 1)."""
    if not k:
        return []
    asked = {ex.question for ex in prompts}
    drawn = [ex for ex in task.examples("train", 4 * k + 8, seed=seed + 2) if ex.question not in asked]
    if len(drawn) < k:
        raise SynthError(f"synth.few_shot {k}: only {len(drawn)} train questions found that the prompts do not ask; "
                         "lower few_shot or synth.prompts")
    return drawn[:k]


def worked_context(task: Any, shots: list[Any], *, rules: bool = False) -> list[dict[str, str]]:
    """The worked examples as earlier chat turns: each question as the teacher is asked it, then the task's
    oracle answer with its rationale."""
    return [m for ex in shots for m in ({"role": "user", "content": task.prompt(ex, rules=rules)},
                                        {"role": "assistant", "content": task.target(ex, rationale=True)})]


def spec_context(spec: Spec, task: Any, k: int, *, rules: bool = False) -> list[dict[str, str]]:
    """The ``k`` worked examples synth shows ``spec``'s teacher, as chat turns before a question: none of the
    train prompts the spec sends (``prompt_count``). The plan's probe, the eval stage's teacher row and
    ``stratos eval --few-shot`` ask the teacher with these, so each measures the teacher that answered."""
    asked = prompt_count(spec)
    prompts = task.examples("train", asked, seed=spec.task.seed) if asked else []
    return worked_context(task, worked_examples(task, k, spec.task.seed, prompts), rules=rules)


def run_synth(spec: Spec, out_dir: str | Path, *, plan: Any = None, progress: bool = True,
              teacher: Teacher | None = None, requests_dir: str | Path | None = None) -> SynthResult:
    """Build the stage's dataset in ``out_dir`` (``data.jsonl``, ``stats.json``, and the request cache
    in ``requests_dir``, default ``out_dir/requests``).

    ``teacher`` replaces the spec's teacher (e.g. another model sampling in its place); it keeps its own cache."""
    from stratos.tasks import corpus, grade, task_from_spec, to_records

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = spec.synth
    task = task_from_spec(spec.task)
    t_spec = teacher_of(spec, plan)
    strategy = getattr(plan, "strategy", None)
    rules = cfg.knowledge_injection or bool(getattr(strategy, "rules_in_prompt", False))
    n_prompts = prompt_count(spec)
    if strategy is not None and not strategy.teacher_generates and "prompts" not in cfg.model_fields_set:
        n_prompts = 0  # the planner found the teacher's own answers not worth asking for
        log.info("synth: the plan does not use teacher generations (knowledge injection)")
    price, limit = price_of(spec, t_spec), budget_of(spec)
    if limit is not None and t_spec.backend == "openai" and teacher is None and price == Price():
        raise SynthError(f"a budget of ${limit:g} is set but teacher {t_spec.label!r} has no price: set "
                         f"plan.api_prices.{t_spec.label} (input_usd_per_mtok, output_usd_per_mtok)")

    examples = task.examples("train", n_prompts, seed=spec.task.seed) if n_prompts else []
    shots = worked_examples(task, cfg.few_shot, spec.task.seed, examples) if examples else []
    context = worked_context(task, shots, rules=rules)
    params = GenParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                       max_tokens=cfg.max_new_tokens, stop=tuple(cfg.stop), seed=spec.seed, top_logprobs=cfg.top_logprobs)
    usage: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    by_type: dict[str, Counter] = {}
    seen: set[tuple[str, str]] = set()
    solved_prompts: set[str] = set()  # the student's prompts of the questions a teacher sample answered right
    duplicates = 0
    if examples:
        own = teacher is None
        if own:
            cache = Path(requests_dir) if requests_dir is not None else out_dir / "requests"
            from stratos.runtime import resolve_device

            teacher = make_teacher(t_spec, cache_dir=cache, price=price, budget=Budget(limit),
                                   device=resolve_device(spec.device))
        try:
            asked = [[*context, {"role": "user", "content": task.prompt(ex, rules=rules)}] for ex in examples]
            # Without worked examples a prompt stays one string, as before: the request cache keeps answering it.
            samples = teacher.generate(asked if context else [m[-1]["content"] for m in asked], params,
                                       progress=progress)
        finally:
            if own:
                teacher.close()
        for ex, got, msgs in zip(examples, samples, asked):
            c = by_type.setdefault(ex.type, Counter())
            c["prompts"] += 1
            c["samples"] += len(got)
            solved = False
            prompt = task.prompt(ex)  # what the student is served with: no rules, no worked examples
            seen_by_teacher = {"teacher_messages": msgs} if context or rules else {}
            for j, s in enumerate(got):
                _, score = grade(task, ex, s.text)
                c["correct"] += score.correct
                solved = solved or score.correct
                if cfg.verify and not score.correct:
                    continue
                key = (prompt, s.text.strip())
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                c["kept"] += 1
                rec = {"prompt": prompt, "response": s.text, "answer": ex.answer, "type": ex.type, "id": ex.id,
                       "source": "teacher", "teacher": teacher.label, "sample": j, "score": score.credit,
                       **seen_by_teacher, **({"meta": ex.meta} if ex.meta else {})}
                if (topk := _topk_field(s)) is not None:
                    rec["topk"] = topk
                records.append(rec)
            c["solved"] += solved
            if solved:
                solved_prompts.add(prompt)
        usage = teacher.usage.to_dict()
        if teacher.usage.budget_stopped:
            answered = sum(1 for g in samples if g)
            log.warning("synth: stopped by the budget ($%.4f of $%g spent) after %d of %d prompts; the data so far "
                        "is kept", teacher.usage.cost_usd, limit, answered, len(examples))

    n_teacher = len(records)
    if cfg.reverse_synthesis:
        # Another draw than the teacher's prompts (seed + 1). A question the teacher already solved keeps
        # only the teacher's answers; one it failed gets the oracle's (beside its wrong answers when they are
        # kept, verify false), so nothing it could not do is lost.
        oracle = [ex for ex in task.examples("train", cfg.reverse_synthesis, seed=spec.task.seed + 1)
                  if task.prompt(ex) not in solved_prompts]
        for rec in to_records(task, oracle, rationale=cfg.rationales):
            key = (rec["prompt"], rec["response"].strip())
            if key not in seen:
                seen.add(key)
                records.append({**rec, "source": "oracle"})
    n_oracle = len(records) - n_teacher
    if cfg.knowledge_injection:
        records += [{**r, "source": "corpus"} for r in corpus(task, 0, seed=spec.task.seed)]

    data_path, stats_path = out_dir / "data.jsonl", out_dir / "stats.json"
    write_jsonl(data_path, records)
    samples_total = sum(c["samples"] for c in by_type.values())
    correct_total = sum(c["correct"] for c in by_type.values())
    stats = {
        "teacher": t_spec.label if teacher is None else teacher.label,
        "backend": t_spec.backend,
        "prompts": len(examples),
        "samples_per_prompt": cfg.samples_per_prompt,
        "rules_in_teacher_prompt": rules,
        "few_shot": len(shots),
        "worked_examples": context,  # the chat turns before each teacher question (what eval asks it with again)
        "verified": cfg.verify,
        "acceptance": correct_total / samples_total if samples_total else None,
        "by_type": {
            t: {**dict(c), "acceptance": c["correct"] / c["samples"] if c["samples"] else None}
            for t, c in sorted(by_type.items())
        },
        "rows": {"teacher": n_teacher, "oracle": n_oracle, "corpus": len(records) - n_teacher - n_oracle,
                 "total": len(records)},
        "duplicates_dropped": duplicates,
        "budget_usd": limit,
        "usage": usage,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(stats_path, stats)
    if progress:
        print_stats(stats)
    if not records:
        raise SynthError("synth produced no training rows: no teacher sample passed the verifier"
                         + (" (the budget stopped it)" if usage.get("budget_stopped") else "")
                         + "; raise synth.samples_per_prompt, or add synth.reverse_synthesis / knowledge_injection")
    return SynthResult(data_path, stats_path, len(records), stats)


def print_stats(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from stratos.report.card import teacher_context

    table = Table(title=f"synth: teacher {stats['teacher']}", title_justify="left")
    for col in ("type", "prompts", "samples", "correct", "kept", "solved", "acceptance"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for t, c in stats["by_type"].items():
        acc = c.get("acceptance")
        table.add_row(t, *(str(c.get(k, 0)) for k in ("prompts", "samples", "correct", "kept", "solved")),
                      "-" if acc is None else f"{acc:.1%}")
    console = Console(stderr=True)
    console.print(table)
    u, rows = stats["usage"], stats["rows"]
    line = (f"rows: {rows['teacher']} teacher + {rows['oracle']} oracle + {rows['corpus']} corpus = {rows['total']}; "
            f"{stats['duplicates_dropped']} duplicates dropped; {stats['seconds']:.1f}s")
    if u:
        line += (f"\ntokens: {u['prompt_tokens']} prompt + {u['completion_tokens']} completion; requests sent "
                 f"{u['requests']} ({u['retries']} retries), {u['cached']} prompts from the cache; cost "
                 f"${u['cost_usd']:.4f} (${u['cost_usd_now']:.4f} this run)")
        if u.get("budget_stopped"):
            line += f"\n[yellow]stopped by the budget (${stats['budget_usd']:g}); the data so far is kept[/yellow]"
    if (context := teacher_context(stats)) is not None:
        line += f"\nthe teacher saw {context}"
    console.print(line, highlight=False)
