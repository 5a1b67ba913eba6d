"""Model cards: the README.md a run writes into each model folder it exports (the distilled student,
and the compressed one it deploys), as users of the Hugging Face ecosystem expect: base models, data,
method, measured accuracy and speed, and limits. Every figure comes from the run's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


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


def model_card(*, role: str, spec: Any, plan: dict[str, Any], results: dict[str, Any], stats: dict[str, Any],
               distill: dict[str, Any], compress: dict[str, Any] | None, device: str) -> str:
    """The card of the run's ``role`` model ("student" or "deployed student")."""
    rows = {r["role"]: r for r in results.get("rows", [])}
    me = rows.get(role) or {}
    t_spec = spec.teachers[plan["teacher"]["index"]]
    s_spec = spec.students[plan["student"]["index"]]
    base = s_spec.model if s_spec.init == "pretrained" and not Path(s_spec.model).is_absolute() else None
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["stratos", "distillation"],
             **({"base_model": base} if base else {})}
    init = ("its weights" if s_spec.init == "pretrained" else "its architecture only (weights initialised at random)")
    data_rows = ", ".join(f"{k} {v:,}" for k, v in (stats.get("rows") or {}).items() if k != "total")
    phases = " -> ".join(f"{p['algorithm']} (loss {p['config']['loss']}, kd_ratio {p['config'].get('kd_ratio', 0):g})"
                         for p in (distill.get("settings") or {}).get("phases", []))
    leak = results.get("leakage") or {}
    measured = ["| model | accuracy [95% CI] | parameters | tokens/s | latency p50 / p95 |",
                "|---|---|---|---|---|"]
    for r in results.get("rows", []):
        lat = r.get("latency_ms") or {}
        measured.append(f"| {r['role']} | {_pct(r)} | {r['params']:,} | {r.get('tokens_per_s', 0):,.0f} | "
                        + (f"{lat['p50']:,.0f} / {lat['p95']:,.0f} ms |" if lat.get("p50") is not None else "– |")
                        if r.get("params") else
                        f"| {r['role']} | {_pct(r)} | – | {r.get('tokens_per_s', 0):,.0f} | – |")
    groups = [f"- {g}: {_pct(v)} of {v['n']}" for g, v in (me.get("per_group") or {}).items()]
    by_group = ("\nThis model by question group:\n\n" + "\n".join(groups) + "\n") if len(groups) > 1 else ""
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
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {spec.name}: {role}

A {me.get('params', 0):,}-parameter model distilled by Stratos for the task
`{results.get('task')}`, from the teacher {t_spec.label} (`{t_spec.model}`).

## Base models

- Teacher: {t_spec.label} (`{t_spec.model}`, backend {t_spec.backend}).
- Student: {s_spec.label} (`{s_spec.model}`): {init}.

## Data

- Training records: {stats.get('rows', {}).get('total', '?'):,} ({data_rows}); teacher answers kept by the
  task's verifier: {stats.get('acceptance', 0):.1%} of {stats.get('prompts', 0)} prompts x {stats.get('samples_per_prompt', 0)} samples.
- Evaluation: {results.get('n')} held-out questions of the task's eval split.
  {('No eval question appears in the training data (' + leak['how'] + ').') if leak and not leak.get('found') else
   (str(leak.get('found')) + ' eval questions appear in the training data: the accuracy below overstates unseen questions.') if leak else ''}

## Method

- Strategy: {plan['strategy']['kind']} (match {plan['match']['mode']}).
- Training: {phases}; {distill.get('steps', '?')} optimizer steps, teacher signal {distill.get('signal', 'none')}.
{comp}{gain}
## Measured

On {results.get('n')} held-out questions, on {device}. tokens/s: batched greedy generation in the eval
process, except the deployed student's, which answered through its HTTP endpoint; its latency comes
from a load test of {bench.get('clients', '?')} concurrent clients.

{chr(10).join(measured)}
{by_group}
## Limits

- Measured on this task's questions only; nothing else was evaluated.
- Speed figures are this machine's ({device}); another device gives other figures.
- {('The teacher answers ' + _pct(rows['teacher (zero-shot)']) + ' zero-shot on the same questions.') if 'teacher (zero-shot)' in rows else ''}
"""
    return text


def write_cards(folders: dict[str, Path], **facts: Any) -> list[Path]:
    """``README.md`` into each folder (role -> folder); returns the paths written. A folder listed for two
    roles (the deployed student is the student itself when nothing was compressed) gets the last one's card."""
    from stratos.io import atomic_write_text

    out = []
    last = {Path(folder).resolve(): role for role, folder in folders.items()}
    for role, folder in folders.items():
        if Path(folder).is_dir() and last[Path(folder).resolve()] == role:
            path = Path(folder) / "README.md"
            atomic_write_text(path, model_card(role=role, **facts))
            out.append(path)
    return out
