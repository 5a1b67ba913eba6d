"""Rollout decoding: Stratos' sampler (``stratos.models.generate.sample_ids``) against transformers'
``model.generate``, with its default dynamic KV cache and with a static one.

The same model (SmolLM2-135M-Instruct's 8 evenly spaced layers, the student of the KD benchmarks),
the same random prompts, temperature 1 over the full vocabulary, and exactly ``--new-tokens`` tokens
per row on every side (EOS ignored: ``ignore_eos`` for ours, ``min_new_tokens`` for transformers), so
the work is equal. Ours runs twice: with ``decode_layout`` (its default on the CPU: decode steps multiply
transposed copies of the fp32 weights) and with ``STRATOS_DECODE_LAYOUT=0`` (the weights as stored, as
``generate`` uses them; decode_layout puts the vocabulary head on oneDNN, ``STRATOS_DECODE_ONEDNN=0`` keeps it on a
transposed copy). Back to back in one process, interleaved, each side ``--repeats`` times; the table
gives the median of its runs. Sampled tokens differ between sides (different samplers, or float rounding),
not their number.

    python benchmarks/rollouts.py                       # batch 16 and 64, 64 new tokens
    python benchmarks/rollouts.py --batch 16 --new-tokens 128
    python benchmarks/rollouts.py --batch 16 --repeats 1 --profile    # where generate's time goes
    python benchmarks/rollouts.py --layouts                 # x @ W.T from W as stored vs from a transposed copy

docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", action="store_true", help="also print where transformers' generate spends its "
                    "time (torch.profiler, the first batch size): the share of each op")
    ap.add_argument("--layouts", action="store_true", help="only time one linear layer of each of the student's "
                    "shapes at a few rows: x @ W.T with W as stored ([out, in], nn.Linear) against a contiguous "
                    "transposed copy ([in, out]) and a oneDNN copy (decode_layout's two kinds)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.layouts:
        return layouts()

    from transformers import GenerationConfig

    from stratos.models import load
    from stratos.models.generate import sample_ids

    model, tok = load("smollm2-135m-instruct", config_overrides={"num_hidden_layers": args.layers})
    model.eval()
    pad, n = tok.pad_token_id if tok.pad_token_id is not None else 0, args.new_tokens
    eos = [tok.eos_token_id]

    def hf(ids: torch.Tensor, static: bool) -> int:
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=None,
                               top_p=None, pad_token_id=pad, eos_token_id=eos,
                               cache_implementation="static" if static else None)
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        return out.shape[0] * (out.shape[1] - ids.shape[1])

    def ours(ids: torch.Tensor, layout: bool = True) -> int:
        before = os.environ.get("STRATOS_DECODE_LAYOUT")
        os.environ["STRATOS_DECODE_LAYOUT"] = "1" if layout else "0"  # decode_layout reads it on each call
        try:
            out = sample_ids(model, ids.tolist(), max_new_tokens=n, temperature=1.0, seed=0, pad_id=pad,
                             eos_ids=eos, ignore_eos=True)
        finally:
            if before is None:
                os.environ.pop("STRATOS_DECODE_LAYOUT")
            else:
                os.environ["STRATOS_DECODE_LAYOUT"] = before
        return sum(len(o) for o in out)

    if args.profile:
        from torch.profiler import profile

        ids = torch.randint(100, tok.vocab_size - 100, (args.batch[0], args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0))
        with profile() as prof:
            hf(ids, False)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"transformers generate, batch {args.batch[0]}: share of self CPU time by op")
        for e in events[:8]:
            print(f"  {e.key:40s} {e.self_cpu_time_total / total:6.1%}")
        print()

    print(f"{args.layers}-layer SmolLM2 student, {args.prompt_tokens}-token prompts, {n} new tokens per row, "
          f"temperature 1, EOS ignored, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    print()
    print("| batch | decoder | tokens/s | vs transformers generate |")
    print("|---|---|---|---|")
    for batch in args.batch:
        ids = torch.randint(100, tok.vocab_size - 100, (batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(batch))
        sides = {"transformers generate (dynamic cache)": lambda: hf(ids, False),
                 "transformers generate (static cache)": lambda: hf(ids, True),
                 "stratos sample_ids, weights as stored (STRATOS_DECODE_LAYOUT=0)": lambda: ours(ids, False),
                 "stratos sample_ids (decode_layout)": lambda: ours(ids)}
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.repeats):  # interleaved, so drift in the machine hits every side alike
            for name, fn in sides.items():
                t0 = time.perf_counter()
                tokens = fn()
                assert tokens == batch * n, (name, tokens)
                rates[name].append(tokens / (time.perf_counter() - t0))
        base = statistics.median(rates["transformers generate (dynamic cache)"])
        for name, r in rates.items():
            m = statistics.median(r)
            print(f"| {batch} | {name} | {m:,.0f} | {m / base:.2f}x |")


def layouts(rows: tuple[int, ...] = (1, 8, 16, 32, 64, 128)) -> None:
    """Milliseconds per product for SmolLM2-135M's linear shapes (random fp32 weights), best of 3 runs of 20."""
    shapes = {"q, o (576 x 576)": (576, 576), "k, v (192 x 576)": (192, 576), "gate, up (1536 x 576)": (1536, 576),
              "down (576 x 1536)": (576, 1536), "head (49152 x 576)": (49152, 576)}

    def ms(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            best = min(best, (time.perf_counter() - t0) / 20 * 1e3)
        return best

    onednn = torch.backends.mkldnn.is_available()
    print(f"{torch.get_num_threads()} threads; ms per product: weights as stored (MKL) / transposed copy (MKL)"
          + (" / oneDNN copy (its input and output converted each call, as decode_layout does)" if onednn else "")
          + "; the best of them in bold")
    print()
    print(f"| layer | {' | '.join(f'{r} rows' for r in rows)} |")
    print(f"|---|{'---|' * len(rows)}")
    for name, (out_f, in_f) in shapes.items():
        w = torch.randn(out_f, in_f)
        wt = w.t().contiguous()
        wm = w.to_mkldnn() if onednn else None
        cells = []
        for r in rows:
            x = torch.randn(r, in_f)
            times = [ms(lambda: torch.nn.functional.linear(x, w)), ms(lambda: x @ wt)]
            if onednn:
                times.append(ms(lambda: torch._C._nn.mkldnn_linear(x.to_mkldnn(), wm).to_dense()))
            best = min(times)
            cells.append(" / ".join(f"**{t:.3f}**" if t == best else f"{t:.3f}" for t in times))
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
