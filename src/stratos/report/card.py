"""Model cards: the README.md a run writes into each model folder it exports (the distilled student,
and the compressed one it deploys), and `stratos distill` into the student's, as users of the Hugging
Face ecosystem expect: base models, data, method, measured accuracy and speed, and limits. Every figure
comes from the run's own files; a card of `stratos distill` alone, which measures nothing, says so."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

# The role (an eval row, a card's title) of distill.sft_baseline's student: the same student, data and steps
# without the teacher.
BASELINE_ROLE = "SFT baseline"


def shots_words(shots: int, rules: bool) -> str:
    """What the teacher was shown before each question for the training data: ``shots`` worked examples, and
    the task's rules where synth put them in."""
    return f"{shots} worked examples{' and the rules' if rules else ''}"


def shots_role(shots: int, rules: bool) -> str:
    """The eval row (role) of the teacher asked as synth asked it (``shots_words``)."""
    return f"teacher ({shots_words(shots, rules)})"


def shots_row(results: dict[str, Any]) -> dict[str, Any] | None:
    """The eval row of the teacher with its worked examples (None: the run has none)."""
    return next((r for r in results.get("rows", []) if r.get("few_shot")), None)


def asked_teacher_sentence(results: dict[str, Any], accuracy: Callable[[dict[str, Any]], str]) -> str:
    """The teacher's accuracy asked as synth asked it (``shots_row``), in a sentence for the report's headline and
    the model card, ``accuracy`` formatting the row's; empty where the run has no such row."""
    shown = shots_row(results)
    if not shown:
        return ""
    asked = shots_words(shown["few_shot"], shown.get("rules", False))
    return (f"Asked as synth asked it for the training data ({asked} before each question), the teacher answers "
            f"{accuracy(shown)} of {shown['n']}.")


def teacher_context(stats: dict[str, Any]) -> str | None:
    """From the synth stage's statistics: what the teacher saw in its prompts that the student's do not hold,
    in words (None: nothing)."""
    from stratos.spec import teacher_context_words

    seen = teacher_context_words(stats.get("few_shot") or 0, bool(stats.get("rules_in_teacher_prompt")))
    if seen is None or not stats.get("prompts"):  # no teacher prompt sent (oracle data only): it saw nothing
        return None
    if not (stats.get("rows") or {}).get("teacher"):  # asked, but none of its answers is in the data
        return seen + " before each question; none of its answers was kept, so the training data holds none"
    return (seen + " before each question; the student's prompts hold the question alone (a KD term reads the "
            "teacher with them in view: context distillation)")


def _pct(row: dict[str, Any]) -> str:
    return f"{row['accuracy']:.1%} [{row['ci_low']:.1%}, {row['ci_high']:.1%}]"


def teacher_gain_sentence(results: dict[str, Any]) -> str:
    """What the teacher's signal added (``distill.sft_baseline``), in words: the student against the same
    student trained by SFT alone on the same data and steps, on the same questions. Empty without a baseline."""
    g = results.get("teacher_gain")
    if not g:
        return ""
    verdict = ("the teacher's signal helped" if g["ci_low"] > 0 else "the teacher's signal hurt" if g["ci_high"] < 0
               else "no difference either way at 95% confidence")
    return (f"The student, trained with {g['student']}, answers {g['a']:.1%} of the {g['n']} eval "
            f"questions; the same student trained with {g['baseline']} on the same data, seed and steps answers "
            f"{g['b']:.1%}: {100 * g['difference']:+.1f} points [{100 * g['ci_low']:+.1f}, "
            f"{100 * g['ci_high']:+.1f}] (95% interval of the paired difference; {g['only_a']} questions right only "
            f"with the teacher, {g['only_b']} only without): {verdict}.")


def _count(n: Any) -> str:
    """A count as a card writes it; '?' where it was not recorded."""
    return f"{n:,}" if isinstance(n, int) else "?"


def _local(model: str) -> bool:
    """Whether a model name is a path on this machine rather than a hub id or an alias."""
    return model.startswith((".", "~", "/")) or Path(model).expanduser().exists()


def _ref(model: str) -> str:
    """A model name as a card writes it: a local path by its last part only (a card travels with the model;
    the full path is this machine's), anything else as given."""
    return Path(model).expanduser().name if _local(model) else model


def _pruning(p: Any) -> str:
    """How ``init: pruned`` shrank the student, in words."""
    what = ("whole layers dropped" if p.method == "depth" else
            "every layer narrowed: " + ", ".join({"mlp": "MLP channels", "heads": "attention heads",
                                                  "hidden": "hidden size"}[a] for a in p.width_axes))
    return f"{what}, ranked on {p.calibration_samples} training records"


def _label(spec: Any) -> str:
    """A teacher's or student's name as a card shows it, as ``_ref`` writes it (a local model's name
    defaults to the path the spec gave)."""
    return _ref(spec.name or spec.model)


def data_source(data: Any, task: str | None, *, rationales: bool = False) -> str:
    """Where `stratos distill`'s training records came from, as its card says it: a file by its name (the
    card travels with the model; the path is this machine's), else the task's reference answers."""
    if data is not None:
        return f"from `{Path(data).name}`"
    return f"the reference answers of the task `{task}`'s train split" + (", worked (synth.rationales)" if rationales else "")


def _source(model: str) -> str:
    """Where a model name points, in words: an alias (a GGUF in a PyPI wheel) says what it is and where from,
    a local path is a local folder (by its last part), anything else a hub id."""
    from stratos.models.hub import ALIASES  # lazily: stratos.models imports torch, which the runner defers

    if _local(model):
        return f"a local model, `{_ref(model)}`"
    alias = ALIASES.get(model)
    return f"`{model}`" + (f": {alias.description}, from {alias.source}"
                           if alias else "")


def model_card(*, role: str, spec: Any = None, plan: dict[str, Any] | None = None,
               results: dict[str, Any] | None = None, stats: dict[str, Any] | None = None,
               distill: dict[str, Any], compress: dict[str, Any] | None = None, device: str,
               teacher: Any = None, student: Any = None, data: dict[str, Any] | None = None,
               training_eval: dict[str, Any] | None = None, params: int | None = None,
               made_by: str = "distill", baseline: bool = False) -> str:
    """The card of the ``role`` model ("student" or "deployed student"), from what is known of it.

    A run passes the eval stage's ``results`` and synth's ``stats``: the card holds what was measured.
    ``stratos distill`` alone passes neither: the card says accuracy and speed were not measured, and how
    to measure them; ``training_eval`` (the metrics.jsonl row of the evaluation while training that
    describes these weights, if there was one) is stated as exactly what it is. ``teacher`` / ``student``:
    the specs (default: the plan's choice from ``spec``); ``teacher`` None: no teacher. ``data``: what
    distill trained on ({"source": words, and its ``DistillResult.data``}). ``params``: the model's
    parameters when ``results`` has no row for it. ``made_by``: the command that wrote an unmeasured card,
    ``distill`` (``stratos distill``) or ``run`` (the distill stage of ``stratos run``). ``baseline``: the
    ``role`` model is the run's SFT baseline (``distill``: its own training, teacher signal none)."""
    results = results or {}
    measured = bool(results.get("rows"))
    rows = {r["role"]: r for r in results.get("rows", [])}
    me = rows.get(role) or {}
    t_spec = teacher if teacher is not None or plan is None else spec.teachers[plan["teacher"]["index"]]
    s_spec = student if student is not None else spec.students[plan["student"]["index"]]
    # A teacher took part: through synth's data (a run) or its signal in training.
    t_used = t_spec is not None and (stats is not None or distill.get("signal", "none") != "none")
    task = results.get("task") or (spec.task.name if spec is not None else None)
    from stratos.models.hub import ALIASES

    # A hub id only: not a folder or file here, nor an alias (which names a de-quantised GGUF, no hub repository).
    hub_id = not (_local(s_spec.model) or s_spec.model in ALIASES)
    base = s_spec.model if s_spec.init != "random" and hub_id else None
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["stratos", "distillation"],
             **({"base_model": base} if base else {})}
    init = ("its weights" if s_spec.init == "pretrained" else
            f"its weights pruned to {s_spec.prune.keep:.0%} of its parameters before training ({_pruning(s_spec.prune)})"
            if s_spec.init == "pruned" else "its architecture only (weights initialised at random)")
    phases = " -> ".join(f"{p['algorithm']} (loss {p['config']['loss']}, kd_ratio {p['config'].get('kd_ratio', 0):g})"
                         for p in (distill.get("settings") or {}).get("phases", []))
    alone = not t_used and not measured  # `stratos distill` without a teacher: SFT on the data
    title = f"{spec.name}: {role}" if spec is not None else f"{_label(s_spec)}, {'trained' if alone else 'distilled'}"
    what = (f"A {me.get('params') or params or 0:,}-parameter model {'trained' if alone else 'distilled'} by Stratos"
            + (f" for the task\n`{task}`" if task else "")
            + (f", from the teacher {_label(t_spec)} (`{_ref(t_spec.model)}`)." if t_used else
               ", on its data alone (no teacher signal)." if alone else "."))
    if baseline:  # distill.sft_baseline's student: it exists to be compared with, and says so first
        what += (" It is the **SFT baseline** (`distill.sft_baseline`): the same student, data, seed and steps "
                 "as the distilled student it was trained beside, but without the teacher's signal, to measure "
                 "what that signal adds (below). It is not the deployed model.")
    if t_used and baseline:
        teacher_line = (f"- Teacher: {_label(t_spec)} ({_source(t_spec.model)}; backend {t_spec.backend}): in the data "
                        "only (what synth kept of its answers); its signal was not used in training.")
    elif t_used:
        teacher_line = f"- Teacher: {_label(t_spec)} ({_source(t_spec.model)}; backend {t_spec.backend})."
    else:
        teacher_line = ("- Teacher: none in this training (teacher signal none: the student learnt the responses "
                        "of its data alone).")
    if stats is not None:
        leak = results.get("leakage") or {}
        data_rows = ", ".join(f"{k} {v:,}" for k, v in (stats.get("rows") or {}).items() if k != "total")
        kept = ("teacher answers kept by the task's verifier" if stats.get("verified", True) else
                "teacher answers the task's verifier accepts (every answer kept, right or wrong: synth.verify false)")
        data_text = f"""- Training records: {stats.get('rows', {}).get('total', '?'):,} ({data_rows}); {kept}: \
{stats.get('acceptance', 0):.1%} of {stats.get('prompts', 0)} prompts x {stats.get('samples_per_prompt', 0)} samples.\
{(' The teacher saw ' + context + '.') if (context := teacher_context(stats)) else ''}
- Evaluation: {results.get('n')} held-out questions of the task's eval split.
  {('No eval question appears in the training data (' + leak['how'] + ').') if leak and not leak.get('found') else
   (str(leak.get('found')) + ' eval questions appear in the training data: the accuracy below overstates unseen questions.') if leak else ''}"""
    else:
        d = data or {}
        data_text = (f"- Training records: {_count(d.get('records'))} ({d.get('source', 'source not recorded')}); "
                     f"{_count(d.get('kept'))} kept for training, {_count(d.get('truncated'))} of them cut at "
                     f"max_length, {_count(d.get('dropped_empty'))} dropped with no response tokens left.")
        if training_eval:
            data_text += (f"\n- Evaluation while training: {training_eval['n']} validation questions of the task's "
                          "eval split, none among the questions its eval stage scores; not checked against the "
                          "training data by this command (`stratos run`'s eval stage checks).")
    if plan is not None:
        strategy = f"- Strategy: {plan['strategy']['kind']} (match {plan['match']['mode']}).\n"
    else:
        match = (distill.get("settings") or {}).get("match")
        strategy = f"- Teacher-student match: {match}.\n" if t_used and match else ""
    trained_on = "" if measured else f" Trained on {device}."
    bench = results.get("bench") or {}
    comp = ""
    if role == "deployed student" and compress and not compress.get("skipped"):
        cs = spec.compress
        parts = [f"pruned {cs.prune} to remove {cs.prune_ratio:.0%} of the parameters" if cs.prune_ratio else "",
                 f"{cs.recovery_steps} KD recovery steps" if cs.prune_ratio and cs.recovery_steps else "",
                 (f"quantized {cs.quantize} (with max_latency_ms set, the faster of it and the unquantized model "
                  "by measured batch-1 speed is the one deployed, see the report)"
                  if spec.constraints.max_latency_ms is not None else f"quantized {cs.quantize}")
                 if cs.quantize != "none" else ""]
        comp = "- Compression: " + ", ".join(p for p in parts if p) + ".\n" if any(parts) else ""
    gain = teacher_gain_sentence(results)  # about the distilled student, which a deployed one was made from
    gain = f"- What the teacher adds: {gain}\n" if gain else ""
    if measured:
        table = ["| model | accuracy [95% CI] | parameters | tokens/s | latency p50 / p95 |",
                 "|---|---|---|---|---|"]
        for r in results.get("rows", []):
            lat = r.get("latency_ms") or {}
            table.append(f"| {r['role']} | {_pct(r)} | {r['params']:,} | {r.get('tokens_per_s', 0):,.0f} | "
                         + (f"{lat['p50']:,.0f} / {lat['p95']:,.0f} ms |" if lat.get("p50") is not None else "– |")
                         if r.get("params") else
                         f"| {r['role']} | {_pct(r)} | – | {r.get('tokens_per_s', 0):,.0f} | – |")
        shown_line = " " + asked_teacher_sentence(results, _pct) if shots_row(results) else ""
        groups = [f"- {g}: {_pct(v)} of {v['n']}" for g, v in (me.get("per_group") or {}).items()]
        by_group = ("\nThis model by question group:\n\n" + "\n".join(groups) + "\n") if len(groups) > 1 else ""
        measured_text = f"""On {results.get('n')} held-out questions, on {device}. tokens/s: batched greedy generation in the eval
process, except the deployed student's, which answered through its HTTP endpoint; its latency comes
from a load test of {bench.get('clients', '?')} concurrent clients.

{chr(10).join(table)}
{by_group}"""
        limits = f"""- Measured on this task's questions only; nothing else was evaluated.
- Speed figures are this machine's ({device}); another device gives other figures.
- {('The teacher answers ' + _pct(rows['teacher (zero-shot)']) + ' zero-shot on the same questions.') if 'teacher (zero-shot)' in rows else ''}{shown_line}
"""
    else:
        how = ("`stratos eval SPEC --model FOLDER` (with the spec this model was trained from)" if spec is not None
               else "`stratos eval --model FOLDER --task TASK`")
        maker = ("`stratos distill`, the command that made this model" if made_by == "distill" else
                 "the distill stage of `stratos run` that made this model (the run's eval stage measures them and "
                 "replaces this card)")
        measured_text = (f"Accuracy and speed were not measured by {maker}: measure them with {how}, which gives accuracy with a 95% interval on the task's held-out eval "
                         "split, latency and tokens/s, or with `stratos run`, which evaluates the teacher and the "
                         "student on the same questions and load-tests the served model.\n")
        if training_eval:
            e = training_eval
            at = (f"at step {e['step']} of {e['steps']}, the step whose weights this folder holds"
                  if e["step"] == e.get("model_step", e["steps"]) else
                  f"at step {e['step']} of {e['steps']}; this folder holds the weights of step "
                  f"{e.get('model_step', e['steps'])}, which that figure does not describe")
            measured_text += (f"\nEvaluation while training (`distill.eval_steps`): {e['accuracy']:.1%} of {e['n']} "
                              "validation questions (the task's eval split without the eval stage's questions) "
                              f"answered exactly right, greedy generation of at most {e['max_new_tokens']} new "
                              f"tokens, {at}. A check during training on few questions, with no confidence "
                              "interval: not a measurement of the model.\n")
        limits = ("- Not evaluated by the command that made it (see Measured); no figure here describes its accuracy "
                  "on unseen questions or its speed.\n")
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {title}

{what}

## Base models

{teacher_line}
- Student: {_label(s_spec)} ({_source(s_spec.model)}): {init}.

## Data

{data_text}

## Method

{strategy}- Training: {phases}; {distill.get('steps', '?')} optimizer steps, teacher signal {distill.get('signal', 'none')}.{trained_on}
{comp}{gain}
## Measured

{measured_text}
## Limits

{limits}"""
    return text


def write_distill_card(result: Any, *, settings: Any, metrics_path: Path, max_new_tokens: int, source: str,
                       role: str = "student", **facts: Any) -> list[Path]:
    """The card of a distilled student as training leaves it (``stratos distill``, and the run's distill
    stage until its eval stage writes the measured one): ``result`` is the ``DistillResult``; ``source``
    says where the records came from; ``role``: the model's role ("SFT baseline" with ``baseline=True``);
    ``facts`` go to ``model_card`` (spec, plan, teacher, student, device, made_by, baseline)."""
    m = result.final_metrics
    return write_cards({role: result.model_dir}, data={"source": source, **result.data},
                       distill={"steps": result.steps, "signal": result.signal.get("mode", "none"),
                                "settings": settings.to_dict()},
                       training_eval=training_eval_of(metrics_path, steps=result.steps, model_step=m.get("model_step"),
                                                      max_new_tokens=max_new_tokens), **facts)


def write_baseline_card(result: Any, *, settings: Any, out_dir: Path, **facts: Any) -> list[Path]:
    """The card of the SFT baseline (``distill.sft_baseline``) as training leaves it: ``result`` is its
    ``DistillResult``, ``settings`` the distilled student's (the baseline's are ``recipe.sft_baseline`` of
    them), ``out_dir`` the distilled student's output folder; ``facts`` as for ``write_distill_card``."""
    from stratos.distill import BASELINE_DIR
    from stratos.distill.recipe import sft_baseline

    return write_distill_card(result, settings=sft_baseline(settings), role=BASELINE_ROLE, baseline=True,
                              metrics_path=Path(out_dir) / BASELINE_DIR / "metrics.jsonl", **facts)


def training_eval_of(metrics_path: Path, *, steps: int, model_step: int | None, max_new_tokens: int) -> dict | None:
    """The evaluation while training that describes the saved weights, from ``metrics.jsonl``: the row of
    ``model_step`` (``load_best_model_at_end``) if evaluated, else the last evaluated one; None without any."""
    from stratos.io import read_jsonl

    rows = [r for r in read_jsonl(metrics_path) if r.get("eval_accuracy") is not None] if metrics_path.is_file() else []
    if not rows:
        return None
    row = next((r for r in rows if r["step"] == model_step), rows[-1])
    return {"accuracy": row["eval_accuracy"], "n": row.get("eval_n"), "step": row["step"], "steps": steps,
            "model_step": model_step if model_step is not None else steps, "max_new_tokens": max_new_tokens}


def folder_params(folder: Path) -> int | None:
    """The parameters a model folder's safetensors hold (read from their headers), None without any."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def write_cards(folders: dict[str, Path], **facts: Any) -> list[Path]:
    """``README.md`` into each folder (role -> folder); returns the paths written. A folder listed for two
    roles (the deployed student is the student itself when nothing was compressed) gets the last one's card."""
    from stratos.io import atomic_write_text

    out = []
    last = {Path(folder).resolve(): role for role, folder in folders.items()}
    for role, folder in folders.items():
        if Path(folder).is_dir() and last[Path(folder).resolve()] == role:
            path = Path(folder) / "README.md"
            params = {} if facts.get("results") else {"params": folder_params(folder)}  # nothing measured of it
            atomic_write_text(path, model_card(role=role, **params, **facts))
            out.append(path)
    return out
