"""How far the plan's cost model is from what this machine measures, per model shape.

For Llamas of the shapes Stratos' examples train and serve (random weights: speed does not depend on them),
it times a training step, a forward pass and KV-cache decoding at batch 1 and at the eval's load-test
batch, as ``stratos profile`` times its small models (``stratos.plan.calibration._measure_model``), and
prints each beside the cost model's prediction with this machine's calibration (``stratos profile``, run
first if the cache has none). A ratio measured / predicted near 1 for every shape means the cost model's
size scaling holds; a ratio that grows with depth at a fixed parameter count is per-layer overhead the
model does not have.

    python benchmarks/cost_model.py                      # ~1 minute on 2 cores; nothing else running
    python benchmarks/cost_model.py --shapes pruned,8-layer --seconds 2
"""

from __future__ import annotations

import argparse

# name -> (hidden, layers, intermediate, heads, kv heads, vocab)
SHAPES = {
    "profile-quick": (256, 4, 1024, 4, 2, 2048),  # the model `stratos profile --quick` times
    "mahjong-tiny": (256, 6, 768, 4, 2, 434),  # examples/mahjong.yaml's student
    "pruned": (240, 30, 648, 3, 3, 49152),  # examples/alignment.yaml's student (SmolLM2-135M pruned to 25%)
    "8-layer": (576, 8, 1536, 9, 3, 49152),  # the 8-layer SmolLM2 student of the KD benchmarks
    "smollm2-135m": (576, 30, 1536, 9, 3, 49152),  # the teacher's shape
}


def build(hidden: int, layers: int, inter: int, heads: int, kv: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                        intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                                        head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of: " + ", ".join(SHAPES))
    ap.add_argument("--batch", type=int, default=16, help="training and forward batch (the examples' 16)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per training sequence")
    ap.add_argument("--clients", type=int, default=4, help="the load test's batch (eval.bench_clients)")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement")
    args = ap.parse_args()

    import torch

    from stratos.plan.calibration import _decode_step_s, _measure_model, _shape, load_calibration, local_efficiency, run_profile
    from stratos.plan.catalog import local_server
    from stratos.plan.costmodel import decode_step_seconds, forward_seconds, train_seconds
    from stratos.runtime import bf16_supported, resolve_device

    device = resolve_device("auto")
    cal = load_calibration(device=device) or run_profile(quick=True, progress=False, device=device)
    server, eff = local_server(0.0, cal, device=device), local_efficiency(cal, device.type == "cuda")
    bf16 = bf16_supported(device)
    print(f"{cal['machine']}, {torch.get_num_threads()} threads, {'bf16' if bf16 else 'fp32'}; calibration of "
          f"{cal['measured_at'][:16]}: peak {cal['peak_flops'] / 1e9:,.0f} GFLOP/s, bandwidth "
          f"{cal['bandwidth'] / 1e9:,.1f} GB/s, efficiency train {eff.train:.3f} forward {eff.forward:.3f} decode "
          f"{eff.decode:.3f}, n_half {eff.n_half:.2g}")
    print(f"train step: batch {args.batch} x {args.seq} tokens; decode: one step after a 16-token prompt, at batch 1 "
          f"and {args.clients}; ratio = measured / predicted\n")
    head = f"{'shape':<14}{'params':>8}{'layers':>7}  " + "".join(
        f"{k:>26}" for k in ("train step ms (ratio)", "forward ms (ratio)", "decode b1 ms (ratio)",
                             f"decode b{args.clients} ms (ratio)"))
    print(head)
    for name in args.shapes.split(","):
        model = build(*SHAPES[name]).to(device)
        shape = _shape(model, 2.0 if bf16 else 4.0)
        m = _measure_model(model, bf16=bf16, batch=args.batch, seq=args.seq, decode_steps=32, seconds=args.seconds)
        wide = _decode_step_s(model, bf16=bf16, steps=32, seconds=args.seconds / 2, batch=args.clients)
        tok = args.batch * args.seq
        cells = [(m["train_step_s"], train_seconds(shape, tok, server, eff)),
                 (m["forward_s"], forward_seconds(shape, tok, server, eff)),
                 (m["decode_step_s"], decode_step_seconds(shape, 1, 32, server, eff)),
                 (wide, decode_step_seconds(shape, args.clients, 32, server, eff))]
        print(f"{name:<14}{shape.params / 1e6:>7.1f}M{shape.layers:>7}  "
              + "".join(f"{1e3 * got:>14,.1f} ({got / want:>5.2f}x)  " for got, want in cells))
        del model


if __name__ == "__main__":
    main()
