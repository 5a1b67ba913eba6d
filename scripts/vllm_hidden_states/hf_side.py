"""HF transformers side of the vLLM hidden-state check.

Run with the Stratos venv:  .venv/bin/python scripts/vllm_hidden_states/hf_side.py MODEL_DIR TAG
(MODEL_DIR: a Hugging Face folder with a tokenizer, e.g. the SmolLM2 teacher saved by
`from stratos.models import load; m, t = load('smollm2-135m-instruct'); m.save_pretrained(D); t.save_pretrained(D)`).
The .npy files go to $VLLM_CHECK_DIR (default ./vllm-check).
  1. writes ids.npy (8 x 128 token ids, seed 0) if it is not there yet;
  2. writes hf_post_TAG.npy (model.model(ids).last_hidden_state, after the final RMSNorm) and
     hf_pre_TAG.npy (the input of model.model.norm, i.e. the last decoder layer's output);
  3. if vllm_TAG.npy exists (written by vllm_side.py), compares it against both.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

HERE = Path(os.environ.get("VLLM_CHECK_DIR", "vllm-check"))  # the .npy files both sides exchange
HERE.mkdir(exist_ok=True)
model_dir, tag = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(os.environ.get("HF_THREADS", "2")))

ids_path = HERE / "ids.npy"
if not ids_path.exists():
    g = np.random.default_rng(0)
    np.save(ids_path, g.integers(3, 49152, size=(8, 128), dtype=np.int64))
ids = torch.from_numpy(np.load(ids_path))

model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
print("rms_norm_eps", model.config.rms_norm_eps, "rope", getattr(model.config, "rope_parameters", None))

captured = {}
hook = model.model.norm.register_forward_hook(lambda mod, inp, out: captured.__setitem__("pre", inp[0].detach()))
with torch.no_grad():
    out = model.model(ids, output_hidden_states=True)
    post = out.last_hidden_state
    pre = captured["pre"]
    # which one is hidden_states[-1]?
    hs_last = out.hidden_states[-1]
    print("hidden_states[-1] vs post-norm max|d|:", (hs_last - post).abs().max().item(),
          " vs pre-norm:", (hs_last - pre).abs().max().item())
    print("norm(pre) vs last_hidden_state max|d|:", (model.model.norm(pre) - post).abs().max().item())
    hook.remove()
    model.model(ids[:, :16])  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.model(ids)
        times.append(time.perf_counter() - t0)
print(f"HF forward 8x128 (model.model, fp32, {torch.get_num_threads()} threads): best {min(times):.3f}s, all {[round(t, 3) for t in times]}")
np.save(HERE / f"hf_post_{tag}.npy", post.numpy())
np.save(HERE / f"hf_pre_{tag}.npy", pre.numpy())

vpath = HERE / f"vllm_{tag}.npy"
if vpath.exists():
    v = np.load(vpath)
    print("vLLM array", v.shape, v.dtype)
    v = v.reshape(post.shape).astype(np.float32)
    p, q = post.numpy(), pre.numpy()
    print(f"max|vLLM - HF post-norm| = {np.abs(v - p).max():.3e}   mean {np.abs(v - p).mean():.3e}  (post-norm |x| max {np.abs(p).max():.2f})")
    print(f"max|vLLM - HF pre-norm|  = {np.abs(v - q).max():.3e}   mean {np.abs(v - q).mean():.3e}  (pre-norm |x| max {np.abs(q).max():.2f})")
    print("vLLM per-token L2 norms (first 5):", np.linalg.norm(v[0, :5], axis=-1).round(3),
          " HF post-norm:", np.linalg.norm(p[0, :5], axis=-1).round(3))
else:
    print(f"{vpath} not there yet: run vllm_side.py then this again to compare")
