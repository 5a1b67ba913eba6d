"""KD throughput and memory: the Stratos engine against TRL doing the same off-policy work.

The same teacher (SmolLM2-135M-Instruct), the same student (its 8 evenly spaced layers, ~half
the parameters), the same data, batch size and sequence length, forward KL over the full
vocabulary on the response tokens, bf16 autocast for both where the CPU computes bf16 natively
(``--bf16 auto``, the default; what was used is printed first). TRL runs its GKD trainer with
``lmbda=0`` (always the dataset's responses: off-policy) and ``beta=0`` (forward KL) -- the same
objective our engine computes.

Each engine runs in its own subprocess, back to back, so peak memory (max RSS) is its own.
Our engine is measured in both teacher-signal modes:
  online  the teacher runs its forward pass inside the loop, as TRL's does;
  cached  the teacher's hidden states were written to disk beforehand, by another process (its
          time and peak memory are reported apart), and the training process never loads the
          teacher: what every epoch after the first, and every later run or student, pays.

    python benchmarks/kd_throughput.py                 # defaults: 24 steps of batch 8
    python benchmarks/kd_throughput.py --steps 40 --batch-size 8 --seq-len 128

``--mode workers`` measures the teacher as a service instead (stratos.teachers.pool): the online
teacher in worker processes, overlapped with training, against the same online teacher in the
training process, the same total threads on each side (``--threads``, default 2: the in-process
run uses all of them; the decoupled run gives ``--teacher-threads`` to each of ``--teacher-workers``
workers and the rest to training). Two more children measure the parts alone at the decoupled
run's split (the teacher's forward passes over the same batches; the student's training on
precomputed teacher states), which gives the ideal bound: the in-process time over the slower part.

    python benchmarks/kd_throughput.py --mode workers --steps 12

Prints one table; docs/benchmarks.md records a run of it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any
from pathlib import Path

TEACHER = "smollm2-135m-instruct"
STUDENT_LAYERS = 8


def make_records(n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs long enough to fill ``seq_len`` tokens after the chat template."""
    import random

    rng = random.Random(seed)
    words = "the tile hand wait pair meld discard ready winning suit honor dragon wind number sequence".split()
    out = []
    for _ in range(n):
        prompt = "Explain: " + " ".join(rng.choice(words) for _ in range(seq_len // 4))
        response = " ".join(rng.choice(words) for _ in range(seq_len // 2))
        out.append({"prompt": prompt, "response": response})
    return out


def load_pair(student_layers: int = STUDENT_LAYERS):
    from stratos.models import load

    teacher, tok = load(TEACHER)
    student, _ = load(TEACHER, config_overrides={"num_hidden_layers": student_layers})
    return teacher, student, tok


def build_cache(args: argparse.Namespace, workdir: Path) -> dict:
    """Cached mode, step one (its own process): run the teacher once over the data into the cache,
    and save the student's initial weights, so that training (step two) never loads the teacher."""
    from stratos.distill import save_student
    from stratos.teachers.signal import hidden_state_signal
    from stratos.distill.data import encode

    teacher, student, tok = load_pair(args.student_layers)
    records = make_records(args.batch_size * (args.steps + args.warmup), args.seq_len)
    cfg = _cfg(args, "cached")
    t0 = time.perf_counter()
    examples, _ = encode(records, tok, cfg.max_length)
    signal, _ = hidden_state_signal(teacher, examples, cfg, tok.pad_token_id, workdir / "cache", progress=False)
    seconds = time.perf_counter() - t0
    save_student(student, tok, workdir / "student-init")
    (workdir / "cache-path").write_text(str(signal.path))
    return {"cache_seconds": seconds}


def _cfg(args: argparse.Namespace, mode: str):
    from stratos.spec import DistillSpec

    return DistillSpec(
        loss="fkl", teacher_signal=mode, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        max_length=args.seq_len, learning_rate=1e-5, warmup_ratio=0.0, lr_scheduler_type="constant",
        save_steps=10_000, logging_steps=1, report_to=[], chunk_size=args.chunk_size, bf16=bool(args.bf16),
    )


def run_stratos(args: argparse.Namespace, mode: str, workdir: Path) -> dict:
    import torch

    from stratos.distill import distill
    from stratos.teachers.signal import HiddenStateCache

    records = make_records(args.batch_size * (args.steps + args.warmup), args.seq_len)
    cfg = _cfg(args, mode)
    if mode == "cached":  # the cache was built by build_cache in another process: no teacher here
        from stratos.models import load

        student, tok = load(workdir / "student-init")
        teacher, signal = None, HiddenStateCache(Path((workdir / "cache-path").read_text()))
    else:
        teacher, student, tok = load_pair(args.student_layers)
        signal = None
    # Warm-up steps (allocator, first-call overheads) are run and excluded from the timing.
    distill(student, tok, records, cfg, workdir / "run", teacher=teacher, signal=signal, cache_root=workdir / "cache",
            progress=False, stop_after=args.warmup)
    res = distill(student, tok, records, cfg, workdir / "run", teacher=teacher, signal=signal,
                  cache_root=workdir / "cache", progress=False)
    # The training steps alone, as for TRL (whose clock runs from step end to step end): not the
    # resume from the warm-up checkpoint nor the final checkpoint and model save.
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = rows[-1]["elapsed_s"]
    tokens = _tokens(records[args.batch_size * args.warmup :], tok, args.seq_len)
    return {"seconds": seconds, "tokens": tokens, "cache_seconds": 0.0, "steps": res.steps - args.warmup,
            "threads": torch.get_num_threads()}


def run_workers(args: argparse.Namespace, workdir: Path) -> dict:
    """The decoupled teacher: ``teacher_workers`` processes, batches in flight, the rest of the threads train."""
    import torch

    from stratos.distill import distill

    records = make_records(args.batch_size * (args.steps + args.warmup), args.seq_len)
    cfg = _cfg(args, "online").model_copy(update={
        "teacher_workers": args.teacher_workers, "teacher_threads": args.teacher_threads,
        "teacher_in_flight": args.in_flight})
    teacher, student, tok = load_pair(args.student_layers)
    distill(student, tok, records, cfg, workdir / "run", teacher=teacher, progress=False, stop_after=args.warmup)
    res = distill(student, tok, records, cfg, workdir / "run", teacher=teacher, progress=False)
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": rows[-1]["elapsed_s"], "tokens": _tokens(records[args.batch_size * args.warmup:], tok,
            args.seq_len), "steps": res.steps - args.warmup, "threads": torch.get_num_threads(),
            "signal": res.signal, "cache_seconds": 0.0}


def _timed_batches(args: argparse.Namespace, tok) -> tuple[list, list]:
    """The run's examples and its micro-batches, in the order the trainer takes them."""
    from stratos.distill.data import encode
    from stratos.distill.sources import FixedSource

    records = make_records(args.batch_size * (args.steps + args.warmup), args.seq_len)
    examples, _ = encode(records, tok, args.seq_len)
    source = FixedSource(examples, _cfg(args, "online"), tok.pad_token_id)
    return examples, [b for step in range(args.warmup + args.steps) for b in source.micro_batches(step)]


def run_part(args: argparse.Namespace, part: str) -> dict:
    """One side of the decoupled run alone, at its thread count: the teacher's forward passes over the
    timed batches (``teacher``), or the student's training on precomputed teacher states (``student``)."""
    import torch

    from stratos.teachers.signal import OnlineTeacher

    teacher, student, tok = load_pair(args.student_layers)
    examples, batches = _timed_batches(args, tok)
    online = OnlineTeacher(teacher)
    threads = args.teacher_threads * args.teacher_workers if part == "teacher" else \
        max(1, args.threads - args.teacher_threads * args.teacher_workers)
    if part == "teacher":
        torch.set_num_threads(threads)
        for b in batches[: args.warmup]:
            online.hidden(b)
        t0 = time.perf_counter()
        for b in batches[args.warmup:]:
            online.hidden(b)
        return {"seconds": time.perf_counter() - t0, "threads": threads}

    # The student alone: the teacher states computed first (untimed), then the training loop reads them.
    from stratos.distill.trainer import train

    states = {tuple(b.indices): online.hidden(b) for b in batches}

    class Precomputed:
        head = online.head

        def hidden(self, batch):
            return states[tuple(batch.indices)]

    torch.set_num_threads(threads)
    cfg = _cfg(args, "online")
    train(student, examples, cfg, Path(args.workdir) / "student", pad_id=tok.pad_token_id, signal=Precomputed(),
          progress=False, stop_after=args.warmup)
    train(student, examples, cfg, Path(args.workdir) / "student", pad_id=tok.pad_token_id, signal=Precomputed(),
          progress=False)
    rows = [json.loads(x) for x in (Path(args.workdir) / "student" / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": rows[-1]["elapsed_s"], "threads": threads}


def trl_inputs(records: list[dict]) -> tuple[Any, list[float], Any]:
    """TRL's view of the records (conversations), and a callback appending to the returned list the time
    each optimizer step ends (TRL's clock: step end to step end)."""
    from datasets import Dataset
    from transformers import TrainerCallback

    ds = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["response"]}]} for r in records])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    return ds, times, Clock()


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    import torch
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, tok = load_pair(args.student_layers)
    records = make_records(args.batch_size * (args.steps + args.warmup), args.seq_len)
    ds, times, clock = trl_inputs(records)

    cfg = GKDConfig(
        output_dir=str(workdir / "trl"), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
        per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps, max_length=args.seq_len,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to=[], bf16=bool(args.bf16), gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0,
        seed=0, disable_tqdm=True,
    )
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[clock])
    t_start = time.perf_counter()
    trainer.train()
    start = times[args.warmup - 1] if args.warmup else t_start
    seconds = times[-1] - start
    tokens = _tokens(records[args.batch_size * args.warmup :], tok, args.seq_len)
    return {"seconds": seconds, "tokens": tokens, "cache_seconds": 0.0, "steps": len(times) - args.warmup,
            "threads": torch.get_num_threads()}


def _tokens(records: list[dict], tok, seq_len: int) -> int:
    """Non-padding tokens the student processes (prompt + response, truncated like both engines do)."""
    from stratos.distill.data import encode

    examples, _ = encode(records, tok, seq_len)
    return sum(len(e.input_ids) for e in examples)


def child(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    import torch

    if args.mode == "workers":  # each side its --threads in all (the peers mode keeps torch's default)
        torch.set_num_threads(args.threads)
    if args.engine == "trl":
        out = run_trl(args, workdir)
    elif args.engine == "stratos-workers":
        out = run_workers(args, workdir)
    elif args.engine in ("teacher-alone", "student-alone"):
        out = run_part(args, args.engine.split("-")[0])
    elif args.engine == "cache-build":
        out = build_cache(args, workdir)
    else:
        out = run_stratos(args, args.engine.split("-")[1], workdir)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def resolve_bf16_arg(args: argparse.Namespace) -> None:
    """``--bf16 auto`` resolved once, in the parent, so that every child runs the same: 1 where the CPU
    computes bf16 natively (the engine's own rule; emulated bf16 is slower than fp32), else 0."""
    if args.bf16 == "auto":
        import torch

        from stratos.runtime import resolve_bf16

        args.bf16 = "1" if resolve_bf16("auto", torch.device("cpu")) else "0"
    args.bf16 = int(args.bf16)


def run_child(engine: str, args: argparse.Namespace, workdir: Path, script: str = __file__) -> dict:
    """Run ``script --engine ENGINE`` with the same options in a fresh process; return the dict it prints."""
    cmd = [sys.executable, script, "--engine", engine, "--workdir", str(workdir)]
    for k, v in vars(args).items():
        if k not in ("engine", "engines", "workdir") and v is not False:  # a store_true flag: named when set
            cmd.append(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}"))
    print(f"running {engine} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{engine} failed")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24, help="timed optimizer steps per engine")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=STUDENT_LAYERS, help="the student: this many of the teacher's 30 layers")
    p.add_argument("--bf16", choices=["auto", "1", "0"], default="auto",
                   help="bf16 autocast for both engines: auto (the engine's own rule: where the CPU computes bf16 "
                        "natively; emulated bf16 is slower than fp32), 1 or 0")
    p.add_argument("--engines", default="trl,stratos-online,stratos-cached")
    p.add_argument("--mode", choices=["peers", "workers"], default="peers",
                   help="peers: against TRL (--engines); workers: the teacher in worker processes against in-process")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side in all")
    p.add_argument("--teacher-workers", type=int, default=1, help="--mode workers: teacher worker processes")
    p.add_argument("--teacher-threads", type=int, default=1, help="--mode workers: threads of each worker")
    p.add_argument("--in-flight", type=int, default=2, help="--mode workers: micro-batches sent ahead")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    resolve_bf16_arg(args)
    if args.engine:
        return child(args)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in cpuinfo]
    print(f"bf16 autocast: {bool(args.bf16)} (CPU flags: {', '.join(flags) or 'none of avx2/avx512/bf16'})",
          flush=True)

    from stratos.models import load

    load(TEACHER, with_tokenizer=False)  # download/convert once, outside the timings
    if args.mode == "workers":
        return workers_table(args)
    results = {}
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
            build = run_child("cache-build", args, Path(tmp)) if engine == "stratos-cached" else None
            results[engine] = run_child(engine, args, Path(tmp))
            if build:
                results[engine]["cache_seconds"] = build["cache_seconds"]
                results[engine]["cache_build_peak_rss_mb"] = build["peak_rss_mb"]

    from rich.console import Console
    from rich.table import Table

    from stratos.models import load_tokenizer

    d, v = 576, len(load_tokenizer(TEACHER))
    base = results.get("trl")
    table = Table(title=f"Off-policy KD, teacher SmolLM2-135M -> {args.student_layers}-layer student, batch "
                        f"{args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps, bf16={bool(args.bf16)}")
    for col in ("engine", "tokens/s", "vs TRL", "peak RSS (MB)", "vs TRL", "teacher signal", "cache build (s, peak MB)",
                "one epoch vs TRL, cache build counted"):
        table.add_column(col, justify="right" if col != "engine" else "left")

    def epoch_seconds(r: dict) -> float:
        # One pass over the data (the warm-up and timed steps: what the cache holds), at the timed steps' rate,
        # plus the cache build where there is one: what a single-epoch run pays.
        return r["seconds"] * (args.steps + args.warmup) / args.steps + r["cache_seconds"]

    for engine, r in results.items():
        tps = r["tokens"] / r["seconds"]
        sig = {"trl": f"logits, {v * 4:,} B/token", "stratos-online": f"hidden, {d * 4:,} B/token (in memory)",
               "stratos-cached": f"hidden, {d * 2:,} B/token (bf16 on disk)"}[engine]
        table.add_row(
            engine, f"{tps:,.0f}", f"{tps / (base['tokens'] / base['seconds']):.2f}x" if base else "-",
            f"{r['peak_rss_mb']:,.0f}", f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-", sig,
            f"{r['cache_seconds']:.1f}, {r['cache_build_peak_rss_mb']:,.0f}" if r["cache_seconds"] else "-",
            f"{epoch_seconds(base) / epoch_seconds(r):.2f}x" if base else "-",
        )
    Console(width=160).print(table)
    print(f"teacher signal per token: full logits {v * 4:,} B (fp32) vs hidden states {d * 2:,} B (bf16): "
          f"{v * 4 / (d * 2):.0f}x smaller")
    print(json.dumps({"args": vars(args), "results": results}))


def workers_table(args: argparse.Namespace) -> None:
    results = {}
    for engine in ("stratos-online", "stratos-workers", "teacher-alone", "student-alone"):
        with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
            results[engine] = run_child(engine, args, Path(tmp))
    from rich.console import Console
    from rich.table import Table

    t_in, t_dec = results["stratos-online"]["seconds"], results["stratos-workers"]["seconds"]
    t_teacher, t_student = results["teacher-alone"]["seconds"], results["student-alone"]["seconds"]
    ideal = t_in / max(t_teacher, t_student)
    tokens = results["stratos-online"]["tokens"]
    split = f"{args.teacher_workers} worker(s) x {args.teacher_threads} thread(s) + training " \
            f"{max(1, args.threads - args.teacher_workers * args.teacher_threads)}"
    table = Table(title=f"Online teacher in the training process vs in worker processes, {args.threads} threads "
                        f"in all, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps, "
                        f"bf16={bool(args.bf16)}, {args.in_flight} micro-batches in flight")
    for col in ("run", "threads", "seconds", "tokens/s", "vs in-process"):
        table.add_column(col, justify="right" if col != "run" else "left")
    table.add_row("in-process online teacher", str(args.threads), f"{t_in:.1f}", f"{tokens / t_in:,.0f}", "1.00x")
    table.add_row("teacher workers, overlapped", split, f"{t_dec:.1f}", f"{tokens / t_dec:,.0f}",
                  f"{t_in / t_dec:.2f}x")
    table.add_row("  teacher alone (the same forwards)", str(results["teacher-alone"]["threads"]),
                  f"{t_teacher:.1f}", "", "")
    table.add_row("  student alone (precomputed states)", str(results["student-alone"]["threads"]),
                  f"{t_student:.1f}", "", "")
    table.add_row("ideal bound: in-process / slower part", "", f"{max(t_teacher, t_student):.1f}",
                  f"{tokens / max(t_teacher, t_student):,.0f}", f"{ideal:.2f}x")
    Console(width=160).print(table)
    print(f"decoupled reaches {t_in / t_dec / ideal:.0%} of the ideal bound ({t_in / t_dec:.2f}x of {ideal:.2f}x)")
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
