"""What each compression step is worth: parameters, size on disk, peak memory, tokens/s, accuracy.

Every step is measured the same way, from its saved folder: load it with ``stratos.models.load``
(what the evaluator and the server do), time greedy decoding at batch size 1 on this CPU, and
score it on the same eval examples.

Peak memory is the growth of the process's peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) while loading and running that model; None where that is unavailable.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def size_on_disk(folder: str | os.PathLike) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The process's resident memory now, in MiB (NaN where not on Linux)."""
    kb = _status_kb("VmRSS")
    return float("nan") if kb is None else kb / 1024


def reset_peak_memory() -> int | None:
    """Reset the peak-RSS counter; returns the current RSS in KiB (None where not on Linux)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def peak_memory_mb(base_kb: int | None) -> float | None:
    peak = _status_kb("VmHWM")
    if base_kb is None or peak is None:
        return None
    return round((peak - base_kb) / 1024, 1)


def params_of(model: Any) -> int:
    """Parameters counted as numbers, whatever their storage (torchao tensors keep the logical shape)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def decode_speed(model: Any, tokenizer: Any, prompt: str, *, new_tokens: int = 32, repeats: int = 2) -> tuple[float, float]:
    """Greedy tokens/s at batch size 1 with the KV cache, best of ``repeats`` after a warm-up:
    per wall-clock second, and per CPU second of this process (all its threads). On a shared
    machine the second is the steadier measure of the work a model needs."""
    from stratos.models.generate import decode_layout, render

    ids = tokenizer(render(tokenizer, [{"role": "user", "content": prompt}], chat=True), return_tensors="pt",
                    add_special_tokens=False)
    ids = {k: v.to(next(model.parameters()).device) for k, v in ids.items()}
    pad = tokenizer.pad_token_id
    kw = dict(do_sample=False, pad_token_id=pad, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    from stratos.runtime import synchronize

    device = next(model.parameters()).device
    wall = cpu = 0.0
    with decode_layout(model, rows=1):  # as the server decodes
        model.generate(**ids, **{**kw, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model.generate(**ids, **kw)
            synchronize(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            n = out.shape[1] - ids["input_ids"].shape[1]
            wall, cpu = max(wall, n / dt), max(cpu, n / max(dc, 1e-9))
    return wall, cpu


def measure_step(step: str, folder: str | os.PathLike, *, task: Any = None, examples: Sequence[Any] = (),
                 batch_size: int = 16, max_new_tokens: int = 64, decode_tokens: int = 32,
                 speed_prompt: str = "Count from one to twenty.", progress: bool = False,
                 predictions_path: str | os.PathLike | None = None, device: Any = "cpu") -> dict[str, Any]:
    """One report row for the model folder of ``step``, measured on ``device``."""
    from stratos.models import load

    base = reset_peak_memory()
    gpu = torch.device(device).type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    model, tok = load(folder, device=device)
    model.eval()
    row: dict[str, Any] = {"step": step, "model_dir": str(folder), "device": str(device), "params": params_of(model),
                           "size_mb": round(size_on_disk(folder) / 2**20, 2)}
    if examples:
        speed_prompt = task.prompt(examples[0])
    wall, cpu = decode_speed(model, tok, speed_prompt, new_tokens=decode_tokens)
    row["tokens_per_s"], row["tokens_per_cpu_s"] = round(wall, 2), round(cpu, 2)
    row["accuracy"] = row["ci_low"] = row["ci_high"] = None
    if task is not None and examples:
        from stratos.evaluate import evaluate

        res = evaluate(model, tok, task, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       predictions_path=predictions_path, progress=progress)
        row.update(accuracy=res.accuracy, ci_low=round(res.ci_low, 4), ci_high=round(res.ci_high, 4), eval_n=res.n,
                   eval_tokens_per_s=round(res.tokens_per_s, 2))
    row["peak_mem_mb"] = peak_memory_mb(base)  # this process's resident memory (host RAM)
    if gpu:
        row["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del model
    gc.collect()
    return row


def report_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of report rows, with each step's ratio to the first (original) row."""
    head = ("| step | params | % of original | size MB | peak mem MB | tokens/s (bs 1) | tokens/CPU-s | speed-up (CPU) "
            "| accuracy [95% CI] |")
    lines = [head, "|" + "---|" * 9]
    p0 = rows[0]["params"]
    c0 = rows[0].get("tokens_per_cpu_s") or 1.0
    for r in rows:
        acc = "n/a" if r.get("accuracy") is None else f"{r['accuracy']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] (n={r['eval_n']})"
        mem = "n/a" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"
        cpu = r.get("tokens_per_cpu_s")
        lines.append(f"| {r['step']} | {r['params'] / 1e6:.2f}M | {100 * r['params'] / p0:.0f}% | {r['size_mb']:.1f} | "
                     f"{mem} | {r['tokens_per_s']:.1f} | {'n/a' if cpu is None else f'{cpu:.1f}'} | "
                     f"{'n/a' if cpu is None else f'{cpu / c0:.2f}x'} | {acc} |")
    return "\n".join(lines)
