"""Accuracy and speed of a model on a task: the one evaluator every stage uses.

``evaluate`` runs batched greedy generation over a task's examples, parses and scores each
output, and reports accuracy with a Wilson 95% interval, a per-type breakdown, mean latency per
example and generated tokens per second; it can write every prediction to JSONL.

Generation goes through a ``generate_fn`` seam: by default the local model and
``stratos.models.generate``; a teacher or an OpenAI-compatible endpoint goes through
``stratos.teachers.generate_fn(teacher)`` (with ``stratos.teachers.endpoint(...)`` for an arbitrary
server), passed as ``generate_fn`` with ``model=None``; anything else that turns prompts into
``Generation`` objects works too. When every generation carries its request's ``latency_s``, the
speed figures are per request (per stream), not batched wall time.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stratos.io import DataError, write_jsonl
from stratos.models.generate import Generation, Prompt, encode_prompt, generate
from stratos.tasks.base import Example, Task, grade, messages

# (prompts, max_new_tokens=, batch_size=) -> one Generation per prompt
GenerateFn = Callable[..., Sequence[Generation]]


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); sane at 0 and n, unlike Wald."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = 1.959964) -> dict[str, Any]:
    """Accuracy of ``a`` minus that of ``b``, two models' correctness on the same questions in the same
    order, with its 95% interval from the paired differences (Wald on the discordant pairs): only the
    questions one gets right and the other wrong move it, so it is far tighter than two separate
    intervals would suggest."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} answers; need the same questions, at least one")
    n = len(a)
    only_a = sum(bool(x) and not y for x, y in zip(a, b))
    only_b = sum(bool(y) and not x for x, y in zip(a, b))
    diff = (only_a - only_b) / n
    half = z * math.sqrt(max(0.0, only_a + only_b - (only_a - only_b) ** 2 / n)) / n
    return {"n": n, "a": sum(map(bool, a)) / n, "b": sum(map(bool, b)) / n, "difference": diff,
            "ci_low": diff - half, "ci_high": diff + half, "only_a": only_a, "only_b": only_b}


@dataclass
class EvalResult:
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_credit: float
    per_type: dict[str, dict[str, float]] = field(default_factory=dict)  # type -> {n, accuracy, ci_low, ci_high}
    # The task's own finer grouping (``task.group(ex)``, e.g. Mahjong discards by how close the best
    # discard leaves the hand), the same fields; empty for a task without one.
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per example. When every generation carries its request's latency_s (a teacher or endpoint through
    # stratos.teachers.generate_fn, answers replayed from its cache included): the mean request latency;
    # otherwise wall time per example (batched: total time / n).
    mean_latency_s: float = 0.0
    per_request: bool = False  # mean_latency_s and tokens_per_s are per request (else per example of a batch)
    # With request latencies: generated tokens / the sum of request latencies (the speed of one stream);
    # otherwise generated tokens per second of wall time.
    tokens_per_s: float = 0.0
    total_s: float = 0.0  # wall time of the generation
    generated_tokens: int = 0
    unparsed: int = 0  # outputs with no answer in them at all
    truncated: int = 0  # outputs cut by max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def local_generate_fn(model: Any, tokenizer: Any, *, progress: bool = False) -> GenerateFn:
    """The default seam: greedy batched generation with a local transformers model."""

    def fn(prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int) -> list[Generation]:
        outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        temperature=0.0, progress=progress)
        return [o[0] for o in outs]

    return fn


def example_location(task: Task, ex: Example) -> str:
    """Where an example came from: ``path:line`` for a file-backed task, else its id."""
    line, path = ex.meta.get("line"), getattr(task, "path", None)
    return f"{path}:{line}" if line is not None and path is not None else f"example {ex.id!r}"


def model_context(model: Any) -> int | None:
    """The longest sequence ``model`` takes (``config.max_position_embeddings``); None where it states none."""
    cfg = getattr(model, "config", None)
    context = getattr(cfg, "max_position_embeddings", None) or getattr(getattr(cfg, "text_config", None),
                                                                       "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def check_context(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], prompts: Sequence[Prompt],
                  max_new_tokens: int) -> None:
    """Raise DataError when a rendered prompt plus ``max_new_tokens`` does not fit the model's context
    (``config.max_position_embeddings``): past it a model with learned positions fails outright and a
    rotary one degrades, after the whole batch was allocated. Measured as ``generate`` renders them."""
    context = model_context(model)
    if context is None:
        return  # the model states no limit
    over = []
    for ex, prompt in zip(examples, prompts):
        n = len(encode_prompt(tokenizer, prompt))
        if n + max_new_tokens > context:
            over.append((ex, n))
    if not over:
        return
    # The longest prompt sets the limit, so the max_new_tokens suggested fits every example.
    ex, n = max(over, key=lambda o: o[1])
    more = f" ({len(over) - 1} more example{'s' * (len(over) > 2)} too long)" if len(over) > 1 else ""
    if n >= context:
        what = f"the prompt is {n} tokens, leaving no room in the model's context of {context} tokens; shorten it"
    else:  # it fits, but not with the answer's room: say both ways out
        what = (f"the prompt is {n} tokens and max_new_tokens {max_new_tokens}: {n + max_new_tokens}, past the "
                f"model's context of {context} tokens; lower max_new_tokens to {context - n} or shorten the prompt")
    raise DataError(f"{example_location(task, ex)}: {what}{more}")


def _breakdown(groups: dict[str, list[bool]]) -> dict[str, dict[str, float]]:
    """Accuracy with its Wilson interval for each group of answers."""
    out = {}
    for name, oks in sorted(groups.items()):
        lo, hi = wilson_interval(sum(oks), len(oks))
        out[name] = {"n": len(oks), "accuracy": sum(oks) / len(oks), "ci_low": lo, "ci_high": hi}
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    rules: bool = False,
    predictions_path: str | Path | None = None,
    generate_fn: GenerateFn | None = None,
    progress: bool = False,
    context: Sequence[dict[str, str]] = (),
) -> EvalResult:
    """Score ``model`` on ``examples`` of ``task``; see the module doc. ``rules`` puts the task's rules in the prompt;
    ``context`` is chat turns before every question (worked examples: ``stratos.synth.worked_context``)."""
    if not examples:
        raise ValueError("evaluate: no examples")
    if generate_fn is None:
        if model is None or tokenizer is None:
            raise ValueError("evaluate: pass a model and tokenizer, or a generate_fn")
        generate_fn = local_generate_fn(model, tokenizer, progress=progress)
    prompts = [[*context, *messages(task, ex, rules=rules)] for ex in examples]
    if model is not None and tokenizer is not None:
        check_context(model, tokenizer, task, examples, prompts, max_new_tokens)
    t0 = time.perf_counter()
    gens = list(generate_fn(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size))
    total = time.perf_counter() - t0
    if len(gens) != len(examples):
        raise RuntimeError(f"evaluate: generate_fn returned {len(gens)} outputs for {len(examples)} prompts")

    rows, by_type, by_group = [], defaultdict(list), defaultdict(list)
    group_of = getattr(task, "group", None)
    credit = 0.0
    unparsed = truncated = 0
    for ex, prompt, gen in zip(examples, prompts, gens):
        answer, score = grade(task, ex, gen.text)
        by_type[ex.type].append(score.correct)
        if group_of is not None:
            by_group[group_of(ex)].append(score.correct)
        credit += score.credit
        unparsed += answer is None
        truncated += gen.finish_reason == "length"
        rows.append({
            "id": ex.id, "type": ex.type, "prompt": prompt[-1]["content"], "output": gen.text,
            "parsed": answer, "answer": ex.answer, "correct": score.correct, "credit": score.credit,
            "num_tokens": gen.num_tokens, "finish_reason": gen.finish_reason,
        })
    n = len(examples)
    k = sum(r["correct"] for r in rows)
    low, high = wilson_interval(k, n)
    tokens = sum(g.num_tokens for g in gens)
    if predictions_path is not None:
        write_jsonl(predictions_path, rows)
    latencies = [getattr(g, "latency_s", None) for g in gens]
    if all(lat is not None for lat in latencies):  # per request: what one caller of the endpoint sees
        spent = sum(latencies)
        mean_latency, tokens_per_s = spent / n, tokens / spent if spent > 0 else 0.0
    else:
        mean_latency, tokens_per_s = total / n, tokens / total if total > 0 else 0.0
    return EvalResult(
        n=n, accuracy=k / n, ci_low=low, ci_high=high, mean_credit=credit / n, per_type=_breakdown(by_type),
        per_group=_breakdown(by_group),
        mean_latency_s=mean_latency, per_request=all(lat is not None for lat in latencies), tokens_per_s=tokens_per_s,
        total_s=total, generated_tokens=tokens, unparsed=unparsed, truncated=truncated,
    )


def evaluate_model(
    name_or_path: str,
    task_name: str,
    n: int = 200,
    *,
    task_options: dict[str, Any] | None = None,
    split: str = "eval",
    seed: int = 0,
    rules: bool = False,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    predictions_path: str | Path | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Load any model ``stratos.models.load`` takes and evaluate it on ``n`` examples of a registered task."""
    from stratos.models import load
    from stratos.tasks import get_task

    task = get_task(task_name, **(task_options or {}))
    examples = task.examples(split, n, seed=seed)
    model, tok = load(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return evaluate(model, tok, task, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, rules=rules,
                    predictions_path=predictions_path, progress=progress)


def result_table(result: EvalResult, title: str = "evaluation") -> Any:
    """A rich table of a result: overall row then one row per question type."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("type", "n", "accuracy", "95% CI"):
        table.add_column(col, justify="right" if col != "type" else "left")
    for typ, r in result.per_type.items():
        table.add_row(typ, str(r["n"]), f"{r['accuracy']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    table.add_row("[bold]all[/bold]", str(result.n), f"[bold]{result.accuracy:.3f}[/bold]",
                  f"[{result.ci_low:.3f}, {result.ci_high:.3f}]")
    table.caption = (
        f"mean credit {result.mean_credit:.3f} | {result.mean_latency_s * 1000:.1f} ms/example | "
        f"{result.tokens_per_s:.1f} tok/s | {result.unparsed} unparsed, {result.truncated} truncated"
    )
    return table


def canonical_text(text: str) -> str:
    """A question as the leakage check compares it: case folded, every run of whitespace one space."""
    return " ".join(text.split()).casefold()


def leakage(task: Task, examples: Sequence[Example], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Which eval questions appear in the training data: an eval example's question, as stored or as the
    model reads it (``task.prompt(ex)``, which may render it in another notation; both ``canonical_text``),
    found inside any training record's prompt or text, or the ``teacher_messages`` its teacher answered (a
    teacher's prompt may wrap it in the rules or show it as a worked example, a reverse-synthesised record
    may have regenerated it). Returns the counts, the first few ids found,
    and how it was checked, for results.json and the report."""
    texts = [canonical_text(str(r.get("prompt") or r.get("text") or "")) for r in records]
    for key in ("messages", "teacher_messages"):  # a conversation, and what the teacher saw (worked examples)
        if any(key in r for r in records):
            texts += [canonical_text(" ".join(str(m.get("content", "")) for m in r.get(key) or [])) for r in records]
    haystack = "\x00".join(texts)  # one search per question; \x00 never occurs in a canonical question
    found = [ex.id for ex in examples
             if canonical_text(ex.question) in haystack or canonical_text(task.prompt(ex)) in haystack]
    return {"eval_questions": len(examples), "training_records": len(records), "found": len(found),
            "found_ids": found[:5],
            "how": "each eval question, as stored and as the model reads it, case folded and its whitespace "
                   "collapsed, searched for inside every training record's prompt (or text, or messages) and the "
                   "messages its teacher saw, the same way canonicalised"}
