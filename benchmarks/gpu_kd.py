"""Off-policy KD on one GPU: a 7B-class teacher and a 0.5B-class student, the teacher in the training
process against the teacher in a worker process overlapped with training (stratos.teachers.pool).

Nothing is downloaded: both models are built from Qwen2.5-7B's and Qwen2.5-0.5B's published shapes
with random weights (speed does not depend on the values), the data are random token ids (256 prompt
tokens, the rest response), bf16 autocast, the same batches for both runs. Prints tokens/s and MFU:
model FLOPs per token, 6 x student params + 2 x teacher params + attention (causal, counted as half of
the 4 x layers x length x width multiply-adds per token, three times for the student's forward and
backward), times tokens/s, over the GPU's dense bf16 peak (--peak-tflops; H100/H200 SXM: 989).

    python benchmarks/gpu_kd.py                            # on a GPU (not yet run on one)
    python benchmarks/gpu_kd.py --tiny --steps 2 --warmup 1 # the script itself, on a CPU, in seconds

docs/benchmarks.md says where and when it ran (or that no GPU was available).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHAPES = {  # Qwen2.5 configs (vocabularies as published: the 7B's is padded to 152,064)
    "teacher": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064),
    "student": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
TINY = {
    "teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1024),
    "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True),
}


def build(shape: dict, dtype, device):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(max_position_embeddings=4096, **shape)
    with torch.device(device):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(dtype)
    return model


def flops_per_token(teacher, student, seq_len: int) -> float:
    def params(m):
        return sum(p.numel() for p in m.parameters())

    def attention(m):  # causal: half of 4 x layers x length x width multiply-adds, 2 FLOPs each
        c = m.config
        return 2 * 2 * c.num_hidden_layers * seq_len * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) / 2

    return 6 * params(student) + 2 * params(teacher) + 3 * attention(student) + attention(teacher)


def run(args, workers: int, teacher, device, examples, out: Path) -> dict:
    import torch

    from stratos.distill.trainer import train
    from stratos.spec import DistillSpec
    from stratos.teachers.signal import hidden_state_signal

    student = build(TINY["student"] if args.tiny else SHAPES["student"], torch.float32, device)
    cfg = DistillSpec(loss="fkl", teacher_signal="online", teacher_workers=workers, teacher_threads=1,
                      teacher_in_flight=args.in_flight, max_steps=args.warmup + args.steps,
                      per_device_train_batch_size=args.batch_size, max_length=args.seq_len, learning_rate=1e-5,
                      warmup_ratio=0.0, lr_scheduler_type="constant", save_steps=10_000, logging_steps=1,
                      report_to=[], bf16=device != "cpu", chunk_size=args.chunk_size)
    signal, info = hidden_state_signal(teacher, examples, cfg, 0, None, progress=False)
    try:
        train(student, examples, cfg, out, pad_id=0, signal=signal, progress=False, stop_after=args.warmup)
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        train(student, examples, cfg, out, pad_id=0, signal=signal, progress=False)
    finally:
        if hasattr(signal, "close"):
            signal.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > args.warmup]
    tokens = args.steps * args.batch_size * args.seq_len
    seconds = timed[-1]["elapsed_s"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else float("nan")
    return {"workers": workers, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak,
            "signal": info}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--in-flight", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    args = p.parse_args()

    import torch

    from stratos.distill.data import IGNORE, Encoded

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to check the script on a CPU")
    shapes = TINY if args.tiny else SHAPES
    t0 = time.perf_counter()
    teacher = build(shapes["teacher"], torch.float32 if args.tiny else torch.bfloat16, device).eval()
    print(f"teacher built in {time.perf_counter() - t0:.0f}s", flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = shapes["student"]["vocab_size"]
    prompt = min(256, args.seq_len // 4)
    examples = []
    for _ in range(args.batch_size * (args.warmup + args.steps)):
        ids = torch.randint(1, vocab, (args.seq_len,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    student_probe = build(shapes["student"], torch.float32, "meta")
    per_token = flops_per_token(teacher, student_probe, args.seq_len)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-kd-") as tmp:
        for workers in (0, 1):
            results.append(run(args, workers, teacher, device, examples, Path(tmp) / f"w{workers}"))
            print(json.dumps(results[-1]), flush=True)

    from rich.console import Console
    from rich.table import Table

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny shapes: not a measurement)"
    table = Table(title=f"Off-policy KD on {name}: batch {args.batch_size} x {args.seq_len} tokens, "
                        f"{args.steps} timed steps, {'bf16 autocast' if device != 'cpu' else 'fp32'}, "
                        f"{per_token / 1e9:.1f} GFLOP per token (tokens: prompt and response)")
    for col in ("teacher", "tokens/s", "vs in-process", "MFU", "peak GPU memory, training process (GiB)"):
        table.add_column(col, justify="left" if col == "teacher" else "right")
    base = results[0]["tokens_per_s"]
    for r in results:
        mfu = r["tokens_per_s"] * per_token / (args.peak_tflops * 1e12)
        table.add_row("in the training process" if r["workers"] == 0 else f"{r['workers']} worker process, overlapped",
                      f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base:.2f}x", f"{mfu:.1%}",
                      f"{r['peak_gib']:.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
