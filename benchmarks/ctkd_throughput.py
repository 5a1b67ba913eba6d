"""Cross-tokenizer KD throughput and memory: the Stratos engine against TRL's GOLD trainer.

The same teacher (SmolLM2-135M-Instruct, 49,152 tokens), the same student (a from-scratch Llama of
SmolLM2-135M's width, 8 layers, with its own byte-level BPE tokenizer trained on the data), the same
records, batch size, maximum length, learning rate and steps, on the response tokens:

  gold     TRL's GOLDTrainer (trl.experimental.gold) with its ULD loss, extended (byte-offset)
           alignment and its hybrid mode: JSD (beta 0.5) on the tokens whose vocabulary strings match,
           ULD (sorted probabilities) on the rest; no CE term (its default). The teacher's full
           logits are computed in the loop.
  stratos  ``ctkd: {method: hybrid}`` with ``loss: jsd`` (beta 0.5), ``kd_ratio: 1``: JSD on the
           teacher tokens whose bytes equal one student token, ULD on the rest, at each position that
           starts a span both tokenizations share; positions inside a span train on CE (the engine
           always does; GOLD merges them into the span's probabilities instead).
           online: the teacher's hidden states computed in the loop, as GOLD's logits are;
           cached: read from the disk cache, built beforehand by another process (its time and peak
           memory are reported apart and counted in "one epoch").

The two objectives are close, not identical (the notes above); what this compares is the cost of a
step of cross-tokenizer KD of the same models on the same data. Each engine runs in its own
subprocess, back to back, so peak memory (max RSS) is its own. Throughput is the student's non-padding
tokens per step (the run's tokens over its steps: the same for both) over the seconds per timed step
(warm-up steps excluded, the same clock for both: step end to step end). ``--epochs`` passes over the
records make the steps: GOLD runs its teacher at every step of every epoch, the cache is built once.

    python benchmarks/ctkd_throughput.py                       # 16 timed steps of batch 8 x 128 tokens
    python benchmarks/ctkd_throughput.py --steps 24 --seq-len 256
    python benchmarks/ctkd_throughput.py --seq-len 512 --steps 10 --gradient-checkpointing   # both engines

Prints one table; docs/benchmarks.md records a run of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_throughput import resolve_bf16_arg, run_child, trl_inputs  # noqa: E402  (the benchmarks' shared helpers)

TEACHER = "smollm2-135m-instruct"


def make_records(n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs of real English words (the teacher's whole-word tokens), long enough to
    fill ``seq_len`` teacher tokens after the chat template; a student tokenizer of a few thousand
    tokens splits many of them, so spans of several tokens on one side are common."""
    from stratos.models import load_tokenizer

    vocab = load_tokenizer(TEACHER).get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) > 3)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "Repeat these words: " + " ".join(rng.choice(words) for _ in range(seq_len // 4))
        response = " ".join(rng.choice(words) for _ in range(seq_len // 2))
        out.append({"prompt": prompt, "response": response})
    return out


def student_tokenizer(args: argparse.Namespace, records: list[dict]):
    from stratos.models.tiny import build_tokenizer

    return build_tokenizer([r["prompt"] + " " + r["response"] for r in records], vocab_size=args.student_vocab)


def load_pair(args: argparse.Namespace, records: list[dict]):
    """The teacher and its tokenizer; the student (seeded) and its own tokenizer."""
    from stratos.models import load
    from stratos.models.tiny import tiny_llama

    teacher, t_tok = load(TEACHER)
    tok = student_tokenizer(args, records)
    c = teacher.config
    student = tiny_llama(tok, hidden_size=c.hidden_size, num_hidden_layers=args.student_layers,
                         num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                         intermediate_size=c.intermediate_size, max_position_embeddings=2 * args.seq_len, seed=0)
    return teacher, t_tok, student, tok


def _records(args: argparse.Namespace) -> list[dict]:
    """One epoch's records: ``--epochs`` passes over them make the warm-up and timed steps."""
    steps = args.steps + args.warmup
    if steps % args.epochs:
        raise SystemExit(f"--steps + --warmup ({steps}) must be a multiple of --epochs ({args.epochs})")
    return make_records(args.batch_size * steps // args.epochs, args.seq_len)


def _cfg(args: argparse.Namespace, mode: str):
    from stratos.spec import DistillSpec

    return DistillSpec(
        algorithm="kd", loss="jsd", loss_kwargs={"beta": 0.5}, kd_ratio=1.0, ctkd={"method": "hybrid"},
        teacher_signal=mode, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        max_length=args.seq_len, learning_rate=1e-4, warmup_ratio=0.0, lr_scheduler_type="constant",
        save_steps=10_000, logging_steps=1, report_to=[], bf16=bool(args.bf16), seed=0,
        chunk_size=args.chunk_size or None, gradient_checkpointing=args.gradient_checkpointing,
    )


def build_cache(args: argparse.Namespace, workdir: Path) -> dict:
    """Cached mode, step one (its own process): the teacher's hidden states over its own tokenisation of
    the records, into the cache, and the student's initial weights, so that training never loads the teacher."""
    from stratos.distill import _cross_tokenizer_signal, save_student
    from stratos.distill.data import encode

    records = _records(args)
    teacher, t_tok, student, tok = load_pair(args, records)
    cfg = _cfg(args, "cached")
    t0 = time.perf_counter()
    examples, _ = encode(records, tok, cfg.max_length)
    signal, info = _cross_tokenizer_signal(teacher, tok, t_tok, records, examples, cfg, student, workdir / "cache",
                                           progress=False)
    seconds = time.perf_counter() - t0
    save_student(student, tok, workdir / "student-init")
    (workdir / "cache-path").write_text(info["path"])
    return {"cache_seconds": seconds, "ctkd": info["ctkd"]}


def run_stratos(args: argparse.Namespace, mode: str, workdir: Path) -> dict:
    import torch

    from stratos.distill import distill

    records = _records(args)
    cfg = _cfg(args, mode)
    if mode == "cached":  # the cache was built by build_cache in another process: no teacher weights here
        from stratos.distill.crosstok import CrossTokenizerSignal, VocabMap, pair_records
        from stratos.models import load, load_tokenizer
        from stratos.teachers.signal import HiddenStateCache

        student, tok = load(workdir / "student-init")
        t_tok = load_tokenizer(TEACHER)
        inner = HiddenStateCache(Path((workdir / "cache-path").read_text()))
        paired = pair_records(records, tok, t_tok, cfg.max_length)
        vmap = VocabMap.build(tok, t_tok, student_rows=student.get_output_embeddings().weight.shape[0],
                              teacher_rows=inner.head.vocab_size)
        signal = CrossTokenizerSignal(inner, paired, vmap, teacher_pad_id=t_tok.pad_token_id, method="hybrid")
        teacher = None
    else:
        teacher, t_tok, student, tok = load_pair(args, records)
        signal = None
    res = distill(student, tok, records, cfg, workdir / "run", teacher=teacher, teacher_tokenizer=t_tok, signal=signal,
                  cache_root=workdir / "cache", progress=False)
    # One run; the warm-up steps (allocator, first-call overheads) are left out of the clock, as for GOLD:
    # from the end of the last warm-up step to the end of the last step.
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = rows[-1]["elapsed_s"] - (rows[args.warmup - 1]["elapsed_s"] if args.warmup else 0.0)
    return {"seconds": seconds, "tokens": _timed_tokens(records, tok, args), "steps": res.steps - args.warmup,
            "threads": torch.get_num_threads(), "cache_seconds": 0.0, "student_vocab": len(tok),
            "final_loss": rows[-1].get("loss")}


def run_gold(args: argparse.Namespace, workdir: Path) -> dict:
    import torch
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    records = _records(args)
    teacher, t_tok, student, tok = load_pair(args, records)
    t_tok.save_pretrained(workdir / "teacher-tokenizer")  # GOLD loads the teacher's tokenizer by path
    ds, times, clock = trl_inputs(records)

    cfg = GOLDConfig(
        output_dir=str(workdir / "gold"), use_uld_loss=True, uld_use_hybrid_loss=True, use_extended_uld=True,
        teacher_tokenizer_name_or_path=str(workdir / "teacher-tokenizer"), lmbda=0.0, beta=0.5, seq_kd=False,
        temperature=1.0, max_completion_length=args.seq_len // 2, per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_length=args.seq_len, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], bf16=bool(args.bf16), gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[clock])
    t_start = time.perf_counter()
    trainer.train()
    start = times[args.warmup - 1] if args.warmup else t_start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": times[-1] - start, "tokens": _timed_tokens(records, tok, args),
            "steps": len(times) - args.warmup, "threads": torch.get_num_threads(), "cache_seconds": 0.0,
            "student_vocab": len(tok), "final_loss": losses[-1] if losses else None}


def _timed_tokens(records: list[dict], tok, args: argparse.Namespace) -> int:
    """Non-padding tokens the student processes in the timed steps (prompt + response in its chat
    template, truncated at ``seq_len`` as both engines do): the epochs' tokens, less the warm-up steps'
    share (each step sees a batch of the same records, shuffled; the share is exact on average)."""
    from stratos.distill.data import encode

    examples, _ = encode(records, tok, args.seq_len)
    return round(sum(len(e.input_ids) for e in examples) * args.epochs * args.steps / (args.steps + args.warmup))


def child(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    if args.engine == "gold":
        out = run_gold(args, workdir)
    elif args.engine == "cache-build":
        out = build_cache(args, workdir)
    else:
        out = run_stratos(args, args.engine.split("-")[1], workdir)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=22, help="timed optimizer steps per engine")
    p.add_argument("--epochs", type=int, default=1, help="passes over the records, which make the warm-up and "
                   "timed steps: the cache is built once for all of them")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=0,
                   help="our engine's rows of logits per chunk (distill.chunk_size); 0: its default")
    p.add_argument("--student-vocab", type=int, default=8192, help="the student tokenizer's BPE vocabulary size")
    p.add_argument("--bf16", choices=["auto", "1", "0"], default="auto",
                   help="bf16 autocast for both engines: auto (where the CPU computes bf16 natively), 1 or 0")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="both engines recompute the student's layer activations in the backward pass "
                        "(TrainingArguments' and distill's gradient_checkpointing)")
    p.add_argument("--engines", default="gold,stratos-online,stratos-cached")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    resolve_bf16_arg(args)
    if args.engine:
        return child(args)
    print(f"bf16 autocast: {bool(args.bf16)}", flush=True)

    from stratos.models import load

    load(TEACHER, with_tokenizer=False)  # download/convert once, outside the timings
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    results = {}
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory(prefix="ctkd-bench-") as tmp:
            build = run_child("cache-build", args, Path(tmp), script=__file__) if engine == "stratos-cached" else None
            results[engine] = run_child(engine, args, Path(tmp), script=__file__)
            if build:
                results[engine].update(cache_seconds=build["cache_seconds"], ctkd=build["ctkd"],
                                       cache_build_peak_rss_mb=build["peak_rss_mb"])

    from rich.console import Console
    from rich.table import Table

    base = results.get("gold")
    vocab = next(iter(results.values()))["student_vocab"]
    table = Table(title=f"Cross-tokenizer KD, teacher SmolLM2-135M (49,152 tokens) -> {args.student_layers}-layer "
                        f"student ({vocab:,}-token BPE), batch {args.batch_size} x {args.seq_len} tokens, "
                        f"{args.steps} timed steps, bf16={bool(args.bf16)}"
                        + (f", our chunk_size {args.chunk_size}" if args.chunk_size else "")
                        + (", gradient checkpointing on both" if args.gradient_checkpointing else ""))
    for col in ("engine", "tokens/s", "vs GOLD", "peak RSS (MB)", "vs GOLD", "cache build (s, peak MB)",
                f"{args.epochs} epoch(s) vs GOLD, cache build counted", "last loss"):
        table.add_column(col, justify="right" if col != "engine" else "left")

    def epoch_seconds(r: dict) -> float:
        # The whole run (warm-up and timed steps, every epoch) at the timed rate, plus the cache build where there is one.
        return r["seconds"] * (args.steps + args.warmup) / args.steps + r["cache_seconds"]

    for engine, r in results.items():
        tps = r["tokens"] / r["seconds"]
        table.add_row(
            engine, f"{tps:,.0f}", f"{tps / (base['tokens'] / base['seconds']):.2f}x" if base else "-",
            f"{r['peak_rss_mb']:,.0f}", f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-",
            f"{r['cache_seconds']:.1f}, {r['cache_build_peak_rss_mb']:,.0f}" if r["cache_seconds"] else "-",
            f"{epoch_seconds(base) / epoch_seconds(r):.2f}x" if base else "-",
            f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-",
        )
    Console(width=170).print(table)
    ctkd = next((r["ctkd"] for r in results.values() if "ctkd" in r), None)
    if ctkd:
        print(f"alignment (ours): {json.dumps(ctkd)}")
    print("the two engines' losses are different sums (the notes at the top); the column shows each trained")
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
