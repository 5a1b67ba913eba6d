"""Compression of a fine-tuned SmolLM2-135M-Instruct: prune to <= 60% of its parameters, recover by
KD from the unpruned model, quantize (int8 weight-only, and bf16); accuracy, params, size, memory, tokens/s.

    # the run docs/compress.md records (~1 h on 2 CPU cores), then speed/memory re-measured in fresh processes
    python benchmarks/compress.py --ft-steps 200 --batch-size 16 --recovery-steps 400 --eval-n 200 --methods depth,width --out runs/bc3
    python benchmarks/compress.py --methods depth,width --remeasure --out runs/bc3
    # speed only (~3 min): the original and its depth-pruned cut, each in fp32 and in bf16, timed in fresh processes
    python benchmarks/compress.py --speed-only --out runs/bc-speed

1. fine-tune SmolLM2-135M-Instruct on the task (SFT, ``--ft-steps``; skipped when ``--out``
   already holds the fine-tuned model);
2. for each pruning method: ``run_compress`` (prune to ``--keep`` of the parameters, recovery KD
   from the fine-tuned model for ``--recovery-steps``, torchao int8 weight-only), which measures every
   step on the same ``--eval-n`` eval questions and times greedy decoding at batch 1;
3. prints one markdown table per method and writes the reports under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from stratos.compress import report_table, run_compress
from stratos.distill import distill
from stratos.models import load
from stratos.spec import CompressSpec, DistillSpec, EvalSpec, Spec, StudentSpec, TaskSpec, TeacherSpec
from stratos.tasks import task_from_spec, to_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--ft-steps", type=int, default=150, help="SFT steps of the fine-tune before compression")
    ap.add_argument("--train-max", type=int, default=4000, help="at most this many distinct training questions (reused across epochs)")
    ap.add_argument("--methods", default="depth,width", help="pruning methods to compare")
    ap.add_argument("--width-axes", default="mlp,heads")
    ap.add_argument("--keep", type=float, default=0.58, help="fraction of parameters kept")
    ap.add_argument("--recovery-steps", type=int, default=150)
    ap.add_argument("--quantize", default="int8")
    ap.add_argument("--extra-quantize", default="bf16",
                    help="also quantize the recovered model with these (comma-separated) and measure them")
    ap.add_argument("--eval-n", type=int, default=100, help="eval questions per step (kept small for the CPU)")
    ap.add_argument("--calibration", type=int, default=32, help="calibration records for the importance scores")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate of the fine-tune")
    ap.add_argument("--recovery-lr", type=float, default=3e-4, help="learning rate of the recovery KD")
    ap.add_argument("--speed-tokens", type=int, default=32, help="tokens generated at batch 1 to time each step")
    ap.add_argument("--remeasure", action="store_true",
                    help="only re-time the step folders of an earlier run (keeps its accuracies)")
    ap.add_argument("--speed-only", action="store_true",
                    help="no training: prune the untuned model by --methods' first method to --keep, and time the "
                         "original and the pruned model each in fp32 and bf16 (speed depends on the shape, not the weights)")
    ap.add_argument("--measure-one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-compress"))
    args = ap.parse_args()
    if args.measure_one:
        return measure_one(args.measure_one, args.speed_tokens)
    if args.remeasure:
        return remeasure(args)
    if args.speed_only:
        return speed_only(args)
    torch.manual_seed(0)

    task_spec = TaskSpec(name=args.task, options={"digits": args.digits}, train_size=min(max(args.ft_steps, args.recovery_steps) * args.batch_size, args.train_max),
                         eval_size=args.eval_n)
    task = task_from_spec(task_spec)
    records = to_records(task, task.examples("train", task_spec.train_size, seed=0))
    dcfg = DistillSpec(loss="ce", kd_ratio=0.0, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
                       max_length=128, teacher_signal="online", report_to=[], save_steps=10_000, logging_steps=25)

    ft_dir = args.out / "finetune" / "model"
    t0 = time.perf_counter()
    if not (ft_dir / "config.json").exists():
        model, tok = load(args.model)
        distill(model, tok, records, dcfg.model_copy(update={"max_steps": args.ft_steps}), args.out / "finetune", resume=False)
        del model
    ft_s = time.perf_counter() - t0

    results = {}
    for method in args.methods.split(","):
        spec = Spec(
            task=task_spec,
            teachers=[TeacherSpec(model=str(ft_dir))],
            students=[StudentSpec(model=str(ft_dir))],
            distill=dcfg.model_copy(update={"loss": "fkl", "kd_ratio": 1.0, "learning_rate": args.recovery_lr}),
            eval=EvalSpec(batch_size=16, max_new_tokens=16),
            compress=CompressSpec(enabled=True, prune_ratio=1 - args.keep, prune=method,
                                  width_axes=args.width_axes.split(","), recovery_steps=args.recovery_steps,
                                  calibration_samples=args.calibration, speed_tokens=args.speed_tokens, quantize=args.quantize, eval_size=args.eval_n),
        )
        t0 = time.perf_counter()
        report = args.out / method / "compress_report.json"
        if report.exists() and "model_dir" in json.loads(report.read_text()):  # a finished earlier run: reuse it
            rows = json.loads(report.read_text())["rows"]
        else:
            rows = run_compress(spec, ft_dir, args.out / method, records=records, progress=False).rows
        rows = rows + extra_quantized(args, spec, rows, args.out / method)
        results[method] = {"rows": rows, "seconds": time.perf_counter() - t0}

    print(f"\nmachine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; task {args.task} digits={args.digits}, eval n={args.eval_n}; "
          f"fine-tune {args.ft_steps} SFT steps ({ft_s:.0f} s)")
    for method, r in results.items():
        plan = next((row.get("plan") for row in r["rows"] if row["step"] == "pruned"), {})
        shape = {k: v for k, v in (plan or {}).items() if k in ("layers", "intermediate_size", "num_attention_heads",
                                                                "num_key_value_heads", "hidden_size") and v is not None}
        print(f"\n### {method} pruning to {args.keep:.0%} of the parameters, {args.recovery_steps} recovery KD steps, "
              f"{args.quantize} ({r['seconds']:.0f} s)  shape: {shape}\n")
        print(report_table(r["rows"]))
    (args.out / "summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=2, default=str))


def extra_quantized(args: argparse.Namespace, spec: Spec, rows: list[dict], out: Path) -> list[dict]:
    """The recovered model quantized with each of ``--extra-quantize`` as well, measured like the
    stage's own steps (same eval questions); kept in ``extra_rows.json`` next to the report."""
    from stratos.compress import _eval_set, quantize_folder
    from stratos.compress.measure import measure_step

    path = out / "extra_rows.json"
    done = {r["step"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    source = next(r["model_dir"] for r in reversed(rows) if r["step"] in ("recovered", "pruned", "original"))
    task, examples = _eval_set(spec, spec.compress.eval_size)  # the questions run_compress scored its steps on
    extra = []
    for method in filter(None, args.extra_quantize.split(",")):
        name = f"quantized ({method})"
        if name not in done:
            folder = quantize_folder(source, out / f"quantized-{method}", method)
            done[name] = {**measure_step(name, folder, task=task, examples=examples, batch_size=spec.eval.batch_size,
                                         max_new_tokens=spec.eval.max_new_tokens, decode_tokens=args.speed_tokens),
                          "quantize": method}
            path.write_text(json.dumps(list(done.values()), indent=2))
        extra.append(done[name])
    return extra


def speed_only(args: argparse.Namespace) -> None:
    """Like for like: the original and its pruned cut in the same dtype, fp32 and bf16, so the speed-up
    of pruning is not mixed with the speed-up of bf16. Decode speed at batch size 1 depends on the
    model's shape and dtype, not its weights, so the untuned model stands in for the fine-tuned one."""
    from stratos.compress import _save, quantize_folder
    from stratos.compress.prune import calibration_batches, prune

    method = args.methods.split(",")[0]
    out = args.out / "speed"
    folders = {"original": out / "original", "pruned": out / "pruned"}
    if not (folders["pruned"] / "config.json").exists():
        task_spec = TaskSpec(name=args.task, options={"digits": args.digits}, train_size=args.calibration, eval_size=1)
        task = task_from_spec(task_spec)
        records = to_records(task, task.examples("train", args.calibration, seed=0))
        model, tok = load(args.model)
        _save(model, tok, folders["original"])
        batches = calibration_batches(tok, records, args.calibration, max_length=128, batch_size=args.batch_size)
        small, plan = prune(model, batches, method=method, prune_ratio=1 - args.keep, axes=args.width_axes.split(","))
        _save(small, tok, folders["pruned"])
        del model, small
    for name in ("original", "pruned"):
        folders[f"{name} (bf16)"] = quantize_folder(folders[name], out / f"{name}-bf16", "bf16")
    rows = {}
    for name in ("original", "original (bf16)", "pruned", "pruned (bf16)"):  # back to back, a fresh process each
        rows[name] = _measure_fresh(folders[name], args.speed_tokens)
    flags = _cpu_flags()
    print(f"\n### {method} pruning to {args.keep:.0%} of the parameters: decode speed, {args.speed_tokens} tokens "
          f"at batch 1, each model in a fresh process (torch threads {torch.get_num_threads()}, CPU flags: {flags})\n")
    print("| model | params | dtype | tokens/s | tokens/CPU-s | vs original, same dtype (CPU-s) | vs fp32 original (CPU-s) |")
    print("|---|---|---|---|---|---|---|")
    base = rows["original"]["tokens_per_cpu_s"]
    for name, r in rows.items():
        same = rows["original (bf16)" if "bf16" in name else "original"]["tokens_per_cpu_s"]
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {'bf16' if 'bf16' in name else 'fp32'} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_cpu_s']:.1f} | {r['tokens_per_cpu_s'] / same:.2f}x | {r['tokens_per_cpu_s'] / base:.2f}x |")
    (out / "speed.json").write_text(json.dumps({"cpu_flags": flags, "rows": rows}, indent=2))


def _cpu_flags() -> str:
    """The CPU features that decide bf16 speed (native bf16 matmuls or not)."""
    try:
        have = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have) or "none of avx2/avx512"


def _measure_fresh(folder: str | Path, speed_tokens: int) -> dict:
    """``measure_one`` in a fresh process, so that no model inherits another's memory or caches."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, __file__, "--measure-one", str(folder), "--speed-tokens", str(speed_tokens)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def remeasure(args: argparse.Namespace) -> None:
    """Time every step folder again (wall and CPU tokens/s) and take its peak memory, each step in a
    fresh process so that no step inherits another's memory; accuracies come from the run's report."""
    for method in args.methods.split(","):
        report = json.loads((args.out / method / "compress_report.json").read_text())
        extra_path = args.out / method / "extra_rows.json"
        extra = json.loads(extra_path.read_text()) if extra_path.exists() else []
        rows = []
        for old in report["rows"] + extra:
            row = _measure_fresh(old["model_dir"], args.speed_tokens)
            row.update(step=old["step"], **{k: old.get(k) for k in ("accuracy", "ci_low", "ci_high", "eval_n")})
            rows.append(row)
        print(f"\n### {method}: each step re-timed in a fresh process ({args.speed_tokens} tokens at batch 1, "
              f"torch threads {torch.get_num_threads()})\n")
        print(report_table(rows))


def measure_one(folder: str, speed_tokens: int) -> None:
    # Import what loading pulls in first, so the peak-memory growth is the model's, not the libraries'.
    import torchao.quantization  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from stratos.compress.measure import measure_step

    print(json.dumps(measure_step("step", folder, decode_tokens=speed_tokens)))


if __name__ == "__main__":
    main()
