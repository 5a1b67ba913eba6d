"""Memory and time of the chunked KD objective when every batch has a different number of target tokens.

On CPU, oneDNN keeps a primitive for each matmul shape a process runs (up to 1,024, for the process's life),
and an output head's primitives hold buffers of about the head's size. The KD objective runs both output
heads ([rows, d] x [d, V]) chunk by chunk, and a batch's last chunk has as many rows as remain, so over a
run the heads meet nearly every row count up to the chunk's and the process grows by about the heads'
size for each. ``stratos.distill.head.padded_rows`` pads a wide head's rows on CPU to a power of two
(chunks of a power of two rows: ``chunk_rows``).

Each side runs in its own process (the primitive cache is per process), back to back, with the same
heads and the same sequence of batch sizes: ``unpadded`` is the engine before 2026-12-05 (chunks of as
many rows as fit 32 MiB of fp32 logits, the last chunk as it comes), ``padded`` the engine's. The table
gives, per side, the distinct row counts the heads' matmuls ran on, the process's RSS after the first
batch and at the end, its peak, and the time per batch (forward KL + CE at kd_ratio 0.5 with its gradient,
the teacher's logits recomputed from its hidden states, as in training):

    python benchmarks/head_shapes.py                         # SmolLM2's heads: V 49,152, student d 240, teacher d 576
    python benchmarks/head_shapes.py --vocab 151936 --student-dim 896 --teacher-dim 1536   # Qwen2.5's

Give it the machine: the times are of two processes run one after the other.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

SIDES = ("unpadded", "padded")


def unpadded_chunk_rows(chunk_size: int | None, vocab: int, device) -> int:
    """The chunk before 2026-12-05: as many rows as keep one [rows, vocab] fp32 matrix within 32 MiB."""
    from stratos.distill.head import CPU_CHUNK_BYTES, GPU_CHUNK_ROWS

    return chunk_size or max(16, min(GPU_CHUNK_ROWS, CPU_CHUNK_BYTES // (4 * max(1, vocab))))


def run_side(args: argparse.Namespace) -> dict:
    import torch

    from stratos.compress.measure import rss_mb
    from stratos.distill import head, kd
    from stratos.distill.head import OutputHead
    from stratos.runtime import bf16_supported

    torch.set_num_threads(args.threads)
    if args.side == "unpadded":
        head.padded_rows = lambda rows: rows
        kd.chunk_rows = unpadded_chunk_rows
    shapes: set[int] = set()
    linear = torch.nn.functional.linear

    def counted(x, weight, bias=None):  # the row counts the heads' matmuls run on
        if weight.shape[0] == args.vocab:
            shapes.add(x.shape[0])
        return linear(x, weight, bias)

    torch.nn.functional.linear = counted
    torch.manual_seed(args.seed)
    s_head = OutputHead(torch.nn.Parameter(torch.randn(args.vocab, args.student_dim) * 0.02))
    device = torch.device("cpu")
    bf16 = bf16_supported(device) if args.bf16 == "auto" else args.bf16 == "1"
    t_head = OutputHead(torch.randn(args.vocab, args.teacher_dim) * 0.02)
    obj = kd.Objective(loss="fkl", kd_ratio=0.5)
    size = kd.chunk_rows(None, args.vocab, device)
    counts = random.Random(args.seed).choices(range(args.rows_min, args.rows_max + 1), k=args.batches)
    after_first, seconds = 0.0, []
    for i, n in enumerate(counts):
        s_hidden = torch.randn(n, args.student_dim, requires_grad=True)
        t_hidden = torch.randn(n, args.teacher_dim)
        targets = torch.randint(0, args.vocab, (n,))
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = kd.kd_terms(s_hidden, t_hidden, targets, s_head, t_head, obj)
        (out["loss"] / n).backward()
        s_head.weight.grad = None
        seconds.append(time.perf_counter() - t0)
        if i == 0:
            after_first = rss_mb()
    return {"side": args.side, "row_counts": len(shapes), "chunk": size, "bf16": bf16,
            "rss_first_mb": after_first, "rss_end_mb": rss_mb(),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "s_per_batch": sum(seconds[1:]) / max(1, len(seconds) - 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--student-dim", type=int, default=240)
    ap.add_argument("--teacher-dim", type=int, default=576)
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--rows-min", type=int, default=150, help="fewest target tokens in a batch")
    ap.add_argument("--rows-max", type=int, default=400, help="most target tokens in a batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", choices=("auto", "0", "1"), default="auto",
                    help="bf16 autocast (auto: where the CPU computes bf16 natively, as training does)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args)), flush=True)
        return

    results = {}
    for side in SIDES:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    first = results["unpadded"]
    print(f"\n### The KD objective's output heads over {args.batches} batches of {args.rows_min}-{args.rows_max} "
          f"target tokens: V {args.vocab:,}, student d {args.student_dim}, teacher d {args.teacher_dim}, "
          f"chunks of {first['chunk']} rows unpadded, {results['padded']['chunk']} padded, "
          f"{'bf16 autocast' if first['bf16'] else 'fp32'}, torch threads {args.threads}\n")
    print("| cut | head row counts | RSS after batch 1 MB | RSS at the end MB | growth MB | peak RSS MB "
          "| s per batch | vs unpadded |")
    print("|---|---|---|---|---|---|---|---|")
    for side, r in results.items():
        print(f"| {side} | {r['row_counts']} | {r['rss_first_mb']:,.0f} | {r['rss_end_mb']:,.0f} "
              f"| {r['rss_end_mb'] - r['rss_first_mb']:,.0f} | {r['peak_mb']:,.0f} | {r['s_per_batch']:.3f} "
              f"| {r['s_per_batch'] / first['s_per_batch']:.2f}x |")
    print("\n" + json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
