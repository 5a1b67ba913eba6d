"""The student across processes (stratos.distill.parallel): real torchrun processes on the CPU (gloo,
fp32) training a tiny Llama with DDP and FSDP2, against one process and against FSDP2 over one process;
a 2-process run SIGKILLed and resumed; `stratos run --nproc 2` end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stratos.models.tiny import build_tokenizer, save_model, tiny_llama
from stratos.serve.server import free_port
from tests.conftest import addition_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny teacher and student sharing a tokenizer, 37 addition records (so with 3 per micro-batch the
    last micro-batch of an epoch holds one row: one of two ranks gets none), and a spec per mode."""
    base = tmp_path_factory.mktemp("dist")
    tok = build_tokenizer(vocab_size=260)
    save_model(tiny_llama(tok, hidden_size=64, num_hidden_layers=2, seed=1), tok, base / "teacher")
    save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=2, seed=2), tok, base / "student")
    with open(base / "data.jsonl", "w") as f:
        for r in addition_records(37, seed=3):
            f.write(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n")
    for mode in ("ddp", "fsdp"):
        (base / f"{mode}.yaml").write_text(yaml.safe_dump({
            "task": {"name": "arithmetic"}, "teachers": [{"model": str(base / "teacher")}],
            "students": [{"model": str(base / "student")}],
            "distill": {"parallel": mode, "logging_steps": 1, "per_device_train_batch_size": 3,
                        "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "bf16": False,
                        "teacher_signal": "cached"}}))
    return base


def _env(base: Path) -> dict[str, str]:
    return {**os.environ, "STRATOS_CACHE": str(base / "cache"), "PYTHONPATH": str(ROOT / "src")}


def _distill(base: Path, mode: str, out: Path, nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stratos.cli", "distill", str(base / f"{mode}.yaml"), "--data", str(base / "data.jsonl"),
            "--out", str(out), "--nproc", str(nproc), *extra]


def _start(base: Path, mode: str, out: Path, nproc: int, *extra: str) -> subprocess.Popen:
    # One thread per process, as torchrun gives each of its processes here: the same float order within a rank,
    # whatever else runs beside it (some runs below start together: they share the teacher's cache).
    return _popen(base, _distill(base, mode, out, nproc, *extra))


def _popen(base: Path, cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**_env(base), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(*procs: subprocess.Popen) -> None:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]


def _one_process(base: Path, mode: str, out: Path, *extra: str, env: dict[str, str] | None = None) -> None:
    """`stratos distill` without --nproc, in this process (a process fewer to start), on one thread as a rank;
    ``env``: more environment for it (torchrun's, for one rank)."""
    from typer.testing import CliRunner

    from stratos.cli import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done = CliRunner().invoke(app, _distill(base, mode, out, 1, *extra)[3:], env={**_env(base), **(env or {})})
    finally:
        torch.set_num_threads(threads)
    assert done.exit_code == 0, (done.output[-3000:], done.exception)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


STEPS = ["--max-steps", "40", "--save-steps", "4"]  # 80 micro-batches of 3: several of one row


@pytest.fixture(scope="module")
def trained(work):
    """One process (parallel is not used), two with DDP, two with FSDP2 (uninterrupted: also the
    reference of the killed run) and one with FSDP2 as torchrun's one process, the same steps each."""
    runs = {name: work / f"trained-{name}" for name in ("one", "ddp", "fsdp", "fsdp-one")}
    _one_process(work, "ddp", runs["one"], *STEPS)  # parallel is not used by one process
    # The environment torchrun gives its one process (torchrun --standalone --nproc-per-node=1, as for one
    # GPU; stratos distill --nproc 1 is a plain process): the process group joined, and left at the end.
    torchrun_env = {"TORCHELASTIC_RUN_ID": "one-rank", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                    "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    _one_process(work, "fsdp", runs["fsdp-one"], *STEPS, env=torchrun_env)
    # Each two-rank run alone (two ranks that share their cores with other work spin in their collectives
    # while the other waits for a core).
    for mode in ("ddp", "fsdp"):
        _finish(_start(work, mode, runs[mode], 2, *STEPS))
    return runs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_as_one(work, trained, mode):
    one_process, out = trained["one"], trained[mode]
    result = json.loads((out / "result.json").read_text())
    assert result["signal"]["processes"] == {"world_size": 2, "parallel": mode}
    ref, got = _losses(one_process), _losses(out)
    assert len(ref) == len(got) == 40
    # The same global batch each step: the same loss, up to the order of float sums (the ranks' partial
    # gradients are summed by the all-reduce), a difference that grows slowly as the weights drift apart.
    for step, (a, b) in enumerate(zip(ref, got), 1):
        assert abs(a - b) <= (1e-5 if step <= 12 else 1e-4) * abs(a), (step, ref, got)
    wa, wb = _weights(one_process), _weights(out)
    assert wa.keys() == wb.keys()  # FSDP2's state dict, gathered, saves as the model itself does (tied once)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k
    assert not torch.equal(wa["model.embed_tokens.weight"], _weights_of(work / "student")["model.embed_tokens.weight"])


def test_one_process_under_torchrun_with_fsdp_is_fsdp2_over_one_device(trained):
    """FSDP2 at world size 1 (what a single GPU with fsdp_cpu_offload runs): the one plain process's steps.
    The run had torchrun's environment in this process, and left its process group when it ended."""
    assert not torch.distributed.is_initialized()
    out, one = trained["fsdp-one"], trained["one"]
    assert json.loads((out / "result.json").read_text())["signal"]["processes"] == {"world_size": 1, "parallel": "fsdp"}
    ref, got = _losses(one), _losses(out)
    assert len(got) == 40 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref, got)), (ref, got)
    wa, wb = _weights(one), _weights(out)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_killed_two_process_run_resumes_to_the_same_weights(work, trained):
    steps, full = STEPS, trained["fsdp"]
    killed = work / "kill"
    ckpts = killed / "checkpoints"
    # One thread per rank, as the runs it is compared with: torchrun sets that only where OMP_NUM_THREADS is unset.
    proc = subprocess.Popen(_distill(work, "fsdp", killed, 2, *steps), env={**_env(work), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not any(p.name >= "step-0000008" for p in ckpts.glob("step-*")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, torchrun and both ranks, at a moment none chose
    proc.wait()
    assert not (killed / "model").exists()
    other = work / "kill-one-process"
    shutil.copytree(killed, other)

    # Resumed in 2 processes (the same world size) and, from a copy, in 1.
    _finish(_start(work, "fsdp", killed, 2, *steps, "--resume"))
    _one_process(work, "fsdp", other, *steps, "--resume")
    result = json.loads((killed / "result.json").read_text())
    assert result["resumed_from"] >= 8 and result["steps"] == 40
    a, b = _weights(full), _weights(killed)  # the same world size: bitwise the same weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A checkpoint of two processes resumes in one (full state dicts): the same weights up to float order.
    assert json.loads((other / "result.json").read_text())["resumed_from"] >= 8
    c = _weights(other)
    assert all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6) for k in a)


def test_stratos_run_nproc_2_end_to_end(work, tmp_path):
    spec = {
        "name": "dist", "task": {"name": "arithmetic", "options": {"digits": 2}, "train_size": 24, "eval_size": 8},
        "teachers": [{"model": str(work / "teacher"), "name": "tiny-teacher"}],
        "students": [{"model": str(work / "student"), "name": "tiny-student"}],
        "plan": {"servers": ["local"], "probe_size": 4, "probe_rules": False, "probe_max_new_tokens": 8},
        "synth": {"samples_per_prompt": 1, "max_new_tokens": 8, "prompts": 4, "reverse_synthesis": 24},
        "distill": {"algorithm": "kd", "loss": "fkl", "kd_ratio": 0.5, "max_steps": 6, "save_steps": 3,
                    "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 64, "parallel": "fsdp",
                    "sft_baseline": True},
        "eval": {"n": 8, "max_new_tokens": 8, "bench_clients": 2, "bench_requests": 4},
    }
    path = tmp_path / "dist.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "stratos.cli", "run", str(path), "--run-dir", str(run_dir),
                           "--no-progress", "--nproc", "2"], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert all(stages[s]["status"] == "done" for s in stages)
    assert stages["distill"]["artifacts"]["processes"] == 2 and stages["distill"]["artifacts"]["steps"] == 6
    result = json.loads((run_dir / "distill" / "result.json").read_text())
    assert result["signal"]["processes"] == {"world_size": 2, "parallel": "fsdp"}
    # The model two processes trained is what the later stages served and measured.
    rows = json.loads((run_dir / "eval" / "results.json").read_text())["rows"]
    assert rows[-1]["role"] == "deployed student" and rows[-1]["n"] == 8
    # distill.sft_baseline under torchrun too: the two processes trained it after the student, and eval measured it.
    baseline = stages["distill"]["artifacts"]["sft_baseline"]
    assert baseline["steps"] == 6 and (run_dir / baseline["model"] / "README.md").is_file()
    assert json.loads((run_dir / "distill" / "sft-baseline" / "result.json").read_text())["signal"]["processes"] == \
        {"world_size": 2, "parallel": "fsdp"}
    assert any(r["role"] == "SFT baseline" and r["n"] == 8 for r in rows)


def test_what_does_not_run_across_processes_yet_is_refused():
    from stratos.distill import _check_distributed
    from stratos.distill.algorithms import get_algorithm
    from stratos.spec import DistillSpec

    _check_distributed(DistillSpec(algorithm="kd"), get_algorithm("kd"), None)  # fixed data: fine
    with pytest.raises(ValueError, match="algorithm gkd: across processes"):
        _check_distributed(DistillSpec(algorithm="gkd"), get_algorithm("gkd"), None)
    with pytest.raises(ValueError, match="distill.lora across processes"):
        _check_distributed(DistillSpec(lora={"r": 4}), get_algorithm("kd"), None)
    with pytest.raises(ValueError, match="distill.eval_steps across processes"):
        _check_distributed(DistillSpec(eval_steps=5), get_algorithm("kd"), object())
    # One plain process (no torchrun) would ignore FSDP2's offload: refused, saying how to start it.
    from stratos.distill.parallel import Parallel

    assert Parallel.from_env(DistillSpec(parallel="fsdp")).mode == "none"  # parallel is for torchrun's processes
    with pytest.raises(ValueError, match="fsdp_cpu_offload is FSDP2's, and FSDP2 runs under torchrun"):
        Parallel.from_env(DistillSpec(fsdp_cpu_offload=True))
    with pytest.raises(ValueError, match="fsdp_cpu_offload .* needs parallel fsdp \\(or auto\\) and a CUDA device"):
        _check_distributed(DistillSpec(parallel="fsdp", fsdp_cpu_offload=True), get_algorithm("kd"), None,
                           torch.device("cpu"))


def test_a_bad_input_is_said_once_per_machine_under_torchrun(work, tmp_path, monkeypatch):
    """Every rank of a machine reads the same files: its first rank prints the error, the others only exit."""
    from typer.testing import CliRunner

    from stratos.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1 ="}\n')
    args = ["distill", str(work / "ddp.yaml"), "--data", str(bad), "--out", str(tmp_path / "out")]
    said = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 2, done.output
        said[rank] = done.output
    assert "bad.jsonl:1: a record with 'prompt' needs 'response' too" in said["0"] and said["1"] == ""
