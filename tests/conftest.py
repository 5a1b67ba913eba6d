"""Shared fixtures: tiny tokenizers and models built offline, and the real SmolLM2 when asked."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def expected_device() -> str:
    """What ``device: auto`` must give here; STRATOS_EXPECT_DEVICE makes a GPU check demand CUDA
    (scripts/gpu_check.sh), so a machine whose CUDA went unseen fails instead of passing on the CPU."""
    want = os.environ.get("STRATOS_EXPECT_DEVICE")
    if want:
        return want
    return "cuda" if torch.cuda.is_available() else "cpu"


def kill_when(cmd: list[str], env: dict[str, str], ready, timeout: float = 150.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true (polling), and wait for it to die: a
    crash at a moment the process did not choose. Fails if it ends first or never gets ready."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def addition_records(n: int, seed: int = 0, digits: int = 2) -> list[dict]:
    rng = random.Random(seed)
    hi = 10**digits - 1
    out = []
    for _ in range(n):
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        out.append({"prompt": f"{a}+{b}=", "response": f"{a + b}", "answer": a + b})
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from stratos.models.tiny import build_tokenizer

    return build_tokenizer([r["prompt"] + r["response"] for r in addition_records(500)], vocab_size=320)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct through the alias (downloaded and converted on first use)."""
    from stratos.models import load

    return load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_served(tiny_tokenizer, tmp_path_factory):
    """A tiny random Llama saved as an HF folder and served by `stratos serve` (the real
    OpenAI-compatible server). Its larger init makes its next-token distributions peaked like a
    trained LM's (top-20 holds ~80% of the mass). Waves hold one request of n <= 2 rows (no
    padding), so a seeded request gets the same tokens whatever runs beside it.
    Yields ``(server, model_dir)``."""
    from stratos.models.tiny import save_model, tiny_llama
    from stratos.serve import running_server

    path = save_model(tiny_llama(tiny_tokenizer, initializer_range=0.3), tiny_tokenizer, tmp_path_factory.mktemp("served") / "tiny")
    with running_server(path, args=["--max-batch-size", "2"]) as server:
        yield server, path
