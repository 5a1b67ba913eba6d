"""The compress stage: structured pruning, KD recovery, sparsity, quantization, export.

    res = run_compress(spec, "runs/x/distill/model", "runs/x/compress")
    res.model_dir    # the final model folder (loads with stratos.models.load and the server)
    res.report_path  # compress_report.json: one row per step

Steps, each written as its own model folder under ``out_dir`` and measured the same way
(params, size on disk, peak memory, tokens/s at batch 1 on this CPU, accuracy on the task's eval
split): ``original`` -> ``pruned`` (depth or width, ranked on calibration records) ->
``recovered`` (KD from the unpruned model with the distill engine) -> optional Wanda/2:4
``sparse`` -> ``quantized`` (torchao). Exports (GGUF, ONNX, GPTQ/AWQ) come last and each says
whether it worked and why not.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratos.compress.export import EXPORTERS, export_model
from stratos.compress.measure import measure_step, report_table
from stratos.compress.prune import PrunePlan, apply_plan, calibration_batches, count_params, importance, prune, wanda
from stratos.compress.quantize import QUANT_METHODS, quantize_folder, register_quant
from stratos.io import write_json
from stratos.spec import CompressSpec, DistillSpec

__all__ = [
    "EXPORTERS", "QUANT_METHODS", "CompressResult", "PrunePlan", "apply_plan", "calibration_batches", "count_params",
    "export_model", "importance", "prune", "quantize_folder", "recovery_config", "register_quant", "report_table",
    "run_compress", "wanda",
]

log = logging.getLogger("stratos.compress")


@dataclass
class CompressResult:
    model_dir: Path
    report_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)


def recovery_config(distill: DistillSpec, steps: int) -> DistillSpec:
    """The distill options of recovery: KD from the unpruned model (``stratos.distill.recipe.recovery_config``:
    the run's divergence when it has one), for ``steps`` steps, with full weights rather than LoRA."""
    from stratos.distill.recipe import recovery_config as kd_from_unpruned

    update: dict[str, Any] = {"max_steps": steps, "lora": None, "eval_steps": None, "load_best_model_at_end": False}
    if distill.teacher_signal not in ("online", "cached"):  # e.g. top-k log-probs of an API teacher: not this teacher
        update["teacher_signal"] = "cached"
    return kd_from_unpruned(distill).model_copy(update=update)


def _records_from_task(spec: Any) -> list[dict[str, Any]]:
    from stratos.tasks import task_from_spec, to_records

    task = task_from_spec(spec.task)
    return to_records(task, task.examples("train", spec.task.train_size, seed=spec.task.seed))


def _eval_set(spec: Any, n: int) -> tuple[Any, list[Any]]:
    """The task and its first ``n`` eval examples, or (None, []) when the task cannot be evaluated."""
    if n <= 0:
        return None, []
    from stratos.tasks import task_from_spec

    try:
        task = task_from_spec(spec.task)
        return task, task.examples("eval", n, seed=spec.task.seed)
    except Exception as e:  # a jsonl task without an eval split, an unknown option...
        log.warning("compress: no accuracy in the report (%s)", e)
        return None, []


def run_compress(
    spec: Any,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    records: list[dict[str, Any]] | None = None,
    teacher_dir: str | Path | None = None,
    progress: bool = True,
    device: Any = None,
) -> CompressResult:
    """Compress the model folder ``model_dir`` as ``spec.compress`` says (``spec`` is the whole pipeline
    Spec: the task gives calibration/eval data, ``spec.distill`` the recovery options).

    ``records``: training records for calibration and recovery (default: the task's train split).
    ``teacher_dir``: distil the pruned model from this model instead of the unpruned one (it must
    share the tokenizer). ``device``: where pruning, recovery and the measurements run (default:
    the spec's ``device`` setting, see ``stratos.runtime``)."""
    from stratos.models import load
    from stratos.runtime import resolve_device

    device = device if device is not None else resolve_device(spec.device)
    cs: CompressSpec = spec.compress
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if records is None:
        records = _records_from_task(spec)
    task, examples = _eval_set(spec, cs.eval_size)
    ev = {"task": task, "examples": examples, "batch_size": spec.eval.batch_size,
          "max_new_tokens": spec.eval.max_new_tokens, "decode_tokens": cs.speed_tokens, "progress": progress,
          "device": device}
    rows: list[dict[str, Any]] = []
    report_path = out_dir / "compress_report.json"

    def step(name: str, folder: Path, **extra: Any) -> None:
        row = {**measure_step(name, folder, predictions_path=out_dir / f"predictions-{name}.jsonl" if examples else None,
                              **ev), **extra}
        rows.append(row)
        log.info("compress: %-10s %s params, %.1f MB, %.1f tok/s, accuracy %s", name, f"{row['params']:,}",
                 row["size_mb"], row["tokens_per_s"], row["accuracy"])
        write_json(report_path, {"spec": cs.model_dump(mode="json"), "rows": rows})

    step("original", model_dir)
    current = model_dir
    pruning = cs.prune_ratio is not None or cs.target_params is not None
    if pruning or cs.sparsity != "none":
        model, tok = load(model_dir, device=device)
        batches = calibration_batches(tok, records, cs.calibration_samples, max_length=spec.distill.max_length,
                                      batch_size=spec.distill.per_device_train_batch_size)
    if pruning:
        small, plan = prune(model, batches, method=cs.prune, prune_ratio=cs.prune_ratio, target_params=cs.target_params,
                            axes=cs.width_axes, progress=progress)
        current = _save(small, tok, out_dir / "pruned")
        step("pruned", current, plan=plan.summary())
        if cs.recovery_steps:
            t_dir = Path(teacher_dir) if teacher_dir else model_dir
            teacher, t_tok = (model, tok) if teacher_dir is None else load(t_dir, device=device)
            from stratos.distill import distill

            rcfg = recovery_config(spec.distill, cs.recovery_steps)
            # Only what the steps consume: a cached teacher signal would otherwise cover every record.
            need = cs.recovery_steps * rcfg.per_device_train_batch_size * rcfg.gradient_accumulation_steps
            used = random.Random(rcfg.seed).sample(list(records), need) if need < len(records) else records
            res = distill(small, tok, used, rcfg, out_dir / "recovery",
                          teacher=teacher, teacher_tokenizer=t_tok, progress=progress)
            del teacher
            current = res.model_dir
            step("recovered", current, recovery={"steps": res.steps, "teacher": str(t_dir),
                                                 "final_metrics": res.final_metrics})
        model = small
    if cs.sparsity != "none":
        model, tok = load(current, device=device)
        info = wanda(model, batches, ratio=cs.sparsity_ratio, pattern="2:4" if cs.sparsity == "2:4" else "unstructured")
        current = _save(model, tok, out_dir / "sparse")
        step("sparse", current, sparsity=info)
    if pruning or cs.sparsity != "none":
        del model
    unquantized = current  # what the exporters take: GGUF/ONNX/llm-compressor quantize in their own formats
    chosen = None
    if cs.quantize != "none":
        current = quantize_folder(current, out_dir / "quantized", cs.quantize)
        step("quantized", current, quantize=cs.quantize)
        limit = getattr(getattr(spec, "constraints", None), "max_latency_ms", None)
        keep, why = choose_for_latency(rows[-2], rows[-1], limit, spec.eval.max_new_tokens)
        chosen = {"step": rows[keep]["step"], "why": why}
        log.info("compress: deploying %s: %s", chosen["step"], why)
        if keep == -2:
            current = unquantized  # the faster one, or the only one within max_latency_ms
    if current == model_dir:  # nothing changed it: the stage's model is a copy, so later stages own their folder
        current = _copy(model_dir, out_dir / "model")
    exports = [export_model(fmt, unquantized, out_dir / "export", records=records) for fmt in cs.export]
    write_json(report_path, {"spec": cs.model_dump(mode="json"), "rows": rows, "exports": exports,
                             "model_dir": str(current), **({"chosen": chosen} if chosen else {})})
    (out_dir / "compress_report.md").write_text(report_table(rows) + "\n")
    return CompressResult(model_dir=current, report_path=report_path, rows=rows, exports=exports)


def choose_for_latency(before: dict[str, Any], quantized: dict[str, Any], max_latency_ms: float | None,
                       answer_tokens: int) -> tuple[int, str]:
    """Which of the last two report rows to deploy, the unquantized (-2) or the quantized (-1) model, and
    why. Without a latency constraint, the quantized one (what the spec asked for: smaller). With one,
    the faster, by measured batch-1 decode speed: ``max_latency_ms`` is judged under the eval's
    concurrent load, where a request takes longer than ``answer_tokens`` at batch-1 speed, so a batch-1
    estimate within the limit is no promise (the demo estimated 472 ms for int8 and measured a p50 of
    1,015 ms at 4 clients), and the slower model would only spend the margin."""
    if max_latency_ms is None:
        return -1, f"quantized as compress.quantize asks ({quantized['size_mb']} MB against {before['size_mb']} MB)"
    rows = {-2: before, -1: quantized}
    est = {i: 1000 * answer_tokens / max(row["tokens_per_s"], 1e-9) for i, row in rows.items()}
    keep = min((-1, -2), key=lambda i: est[i])  # ties: the quantized, smaller one
    figures = (f"{answer_tokens} tokens at batch 1 take {est[-1]:,.0f} ms quantized ({quantized['tokens_per_s']} "
               f"tok/s, {quantized['size_mb']} MB) and {est[-2]:,.0f} ms unquantized ({before['tokens_per_s']} "
               f"tok/s, {before['size_mb']} MB), measured")
    within = sum(est[i] <= max_latency_ms for i in rows)
    verdict = (f"the faster, since max_latency_ms {max_latency_ms:g} is judged under concurrent load, where requests "
               "take longer than at batch 1" + ("" if within else "; neither is within it even at batch 1"))
    return keep, f"{rows[keep]['step']}: {figures}; {verdict}"


def _save(model: Any, tok: Any, path: Path) -> Path:
    from stratos.distill import save_student

    save_student(model, tok, path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
