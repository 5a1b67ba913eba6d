"""Throughput and latency of `stratos serve` under 1, 8 and 32 concurrent clients.

    python benchmarks/serve_bench.py                       # SmolLM2-135M-Instruct (cached after first use)
    python benchmarks/serve_bench.py --model /path/to/student --requests 128 --max-tokens 64
    python benchmarks/serve_bench.py --tiny                # a tiny random Llama: the batcher's own overhead

Starts the built-in server as a subprocess, runs `bench_serve` (streaming completions, fixed
output length) at each concurrency, prints a table and writes JSON. Numbers depend on the machine
and its load: rerun on yours.
"""

from __future__ import annotations

import argparse
import json
import platform

from stratos.serve import bench_serve, running_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", default="serve_bench.json")
    ap.add_argument("--tiny", action="store_true", help="Serve a tiny random Llama (built in a temp folder).")
    args = ap.parse_args()
    if args.tiny:
        import tempfile

        from stratos.models.tiny import build_tokenizer, save_model, tiny_llama

        tok = build_tokenizer(vocab_size=320)
        args.model = str(save_model(tiny_llama(tok), tok, tempfile.mkdtemp(prefix="stratos-tiny-")))
    rows = []
    with running_server(args.model, args=["--max-batch-size", str(max(args.clients))]) as server:
        bench_serve(server.url, clients=4, requests=8, max_tokens=4)  # warm-up
        for clients in args.clients:
            r = bench_serve(server.url, clients=clients, requests=max(args.requests, clients),
                            max_tokens=args.max_tokens)
            rows.append(r.to_dict())
            print(f"{clients:>3} clients: {r.output_tokens_per_s:8.1f} tok/s  {r.requests_per_s:6.2f} req/s  "
                  f"latency p50 {r.latency_ms['p50']:7.0f} ms  p99 {r.latency_ms['p99']:7.0f} ms  "
                  f"TTFT p50 {r.ttft_ms['p50']:6.0f} ms  errors {sum(r.errors.values())}", flush=True)
    with open(args.json, "w") as fh:
        json.dump({"machine": platform.processor() or platform.machine(), "model": "tiny" if args.tiny else args.model,
                   "max_tokens": args.max_tokens, "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
