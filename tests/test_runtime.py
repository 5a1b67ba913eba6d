"""The runtime: one place decides the device; every setting is checked before work; the plan's
server choice is carried out (this machine trains, or the run stops and writes the launch recipe);
an API teacher's top-k KD is wired by the plan itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from stratos.cli import app
from stratos.models.tiny import build_tokenizer, save_model, tiny_llama
from stratos.runtime import DeviceError, bf16_supported, resolve_bf16, resolve_device, runtime
from tests.conftest import expected_device


def test_auto_is_cuda_when_present_else_cpu_and_cuda_is_never_a_silent_fallback():
    assert resolve_device("auto").type == expected_device()
    assert resolve_device("cpu") == torch.device("cpu")
    assert runtime("cpu").name == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"device 'cuda:1': this machine has no CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(DeviceError, match=r"device 'gpu': expected 'auto'"):
        resolve_device("gpu")
    # bf16: auto is native support only (CPUs without AVX512-BF16/AMX emulate it, slower than fp32).
    assert resolve_bf16("auto", runtime("cpu").device) == bf16_supported(torch.device("cpu"))
    assert resolve_bf16(False, runtime("cpu").device) is False


def test_stratos_cpu_bf16_overrides_the_cpu_flags_and_a_bad_value_names_the_variable(monkeypatch):
    from stratos import runtime as rt

    cpu = torch.device("cpu")
    try:
        for value, native in (("0", False), ("1", True), ("false", False), ("true", True)):
            monkeypatch.setenv("STRATOS_CPU_BF16", value)
            rt._cpu_bf16.cache_clear()
            assert bf16_supported(cpu) is native and resolve_bf16("auto", cpu) is native
            assert resolve_bf16(True, cpu) is True and resolve_bf16(False, cpu) is False  # explicit settings win
        monkeypatch.setenv("STRATOS_CPU_BF16", "maybe")
        rt._cpu_bf16.cache_clear()
        with pytest.raises(DeviceError, match=r"STRATOS_CPU_BF16='maybe': expected 0 or 1"):
            bf16_supported(cpu)
        monkeypatch.delenv("STRATOS_CPU_BF16")
        rt._cpu_bf16.cache_clear()
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        assert bf16_supported(cpu) is ("avx512_bf16" in flags or "amx_bf16" in flags)
    finally:
        rt._cpu_bf16.cache_clear()  # later tests see this machine's own answer


def _models(root: Path) -> tuple[Path, Path]:
    tok = build_tokenizer(vocab_size=260)
    teacher = save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=1, seed=1), tok, root / "teacher")
    student = save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=1, seed=2), tok, root / "student")
    return teacher, student


def _spec(path: Path, teacher: Path, student: Path, **extra) -> Path:
    data = {
        "name": "rt", "task": {"name": "arithmetic", "options": {"digits": 2}, "train_size": 16, "eval_size": 4},
        "teachers": [{"model": str(teacher)}], "students": [{"model": str(student)}],
        "plan": {"probe_size": 4, "probe_rules": False, "probe_max_new_tokens": 4},
        "synth": {"prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 4, "reverse_synthesis": 12},
        "distill": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 32, "report_to": []},
        "eval": {"n": 4, "max_new_tokens": 4, "bench_clients": 1, "bench_requests": 2},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_device_this_machine_lacks_fails_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    teacher, student = _models(tmp_path)
    spec = _spec(tmp_path / "s.yaml", teacher, student, device="tpu")
    r = CliRunner().invoke(app, ["validate", str(spec)])
    assert r.exit_code == 2 and "device: 'tpu' is not a device: use auto" in r.output, r.output
    if torch.cuda.is_available():
        return
    spec = _spec(tmp_path / "s.yaml", teacher, student)
    r = CliRunner().invoke(app, ["run", str(spec), "--device", "cuda", "--no-progress"])
    assert r.exit_code == 2 and "device 'cuda': this machine has no CUDA device" in r.output, r.output
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.fixture
def calibrated(tmp_path, monkeypatch):
    """A private model cache with a quick calibration of this machine, so a plan does not profile."""
    from stratos.plan.calibration import calibration_path, run_profile

    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    run_profile(progress=False, sizes=[(64, 1)], seconds=0.02, out=calibration_path(resolve_device("auto")))
    return tmp_path


def test_a_plan_that_trains_elsewhere_stops_the_run_and_writes_its_launch_recipe(calibrated, monkeypatch):
    """Only a cloud server is offered: the run plans, then stops (exit 3) instead of training here,
    and RUN/launch holds a SkyPilot task, a script and a spec that pins the plan to that machine."""
    from typer.testing import CliRunner

    from stratos.plan.catalog import shipped_catalog

    tmp_path = calibrated
    monkeypatch.chdir(tmp_path)
    teacher, student = _models(tmp_path)
    cloud = next(s for s in shipped_catalog() if s.provider == "aws" and s.gpu_count == 1)
    spec = _spec(tmp_path / "s.yaml", teacher, student, plan={"servers": [cloud.name], "probe_size": 4,
                                                                 "probe_rules": False, "probe_max_new_tokens": 4})
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", str(spec), "--run-dir", str(run_dir), "--no-progress"])
    assert r.exit_code == 4, r.output  # not 3: that is a finished run whose student misses a constraint
    said = " ".join(r.output.split())
    assert f"the plan trains on {cloud.name}" in said and "set plan.servers: [local]" in said, r.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["plan"]["status"] == "done"
    assert "synth" not in manifest["stages"] and not (run_dir / "synth").exists()  # nothing trained here
    task = yaml.safe_load((run_dir / "launch" / "sky-train.yaml").read_text())
    assert task["resources"]["accelerators"] == f"{cloud.gpu.split('-')[0]}:1"
    assert task["resources"]["infra"] == f"aws/{cloud.region}"
    assert "stratos run" in task["run"] and str(teacher) in task["file_mounts"]
    remote = yaml.safe_load((run_dir / "launch" / "spec.yaml").read_text())
    assert remote["plan"]["servers"] == ["local"]
    assert remote["plan"]["local_price_per_hour"] == cloud.on_demand_usd_hr
    assert remote["teachers"][0]["model"] == str(teacher) and remote["device"] == "auto"
    assert "distill" in remote and remote["distill"] == {"max_steps": 2, "per_device_train_batch_size": 4,
                                                          "max_length": 32, "report_to": []}  # only what was written
    assert (run_dir / "launch" / "train.sh").stat().st_mode & 0o100


def test_the_plan_wires_top_k_kd_for_an_api_teacher_itself():
    """An API teacher that generates: the plan asks for top-k log-probs and trains KD on them,
    without synth.top_logprobs or distill.teacher_signal in the spec; a written 0 still wins."""
    from stratos.distill.recipe import resolve
    from stratos.plan.matching import Match
    from stratos.plan.probe import TaskProfile, TeacherProbe
    from stratos.plan.strategy import TOPK_LOGPROBS, SpecValues, apply_spec, choose_strategy
    from stratos.spec import DistillSpec

    probe = TeacherProbe("api", 20, accuracy=0.9, accuracy_rules=None, latency_s=0.1)
    task = TaskProfile("arithmetic", 10, 3, 3, 0, verifier=True, oracle=True, train_size=100)
    m = Match("api", "student", "topk", 50.0)
    st = choose_strategy(probe, task, m)
    assert st.teacher_generates and st.top_logprobs == TOPK_LOGPROBS and st.topk_data
    assert any("top-k KD" in r for r in st.reasons)
    settings = resolve(DistillSpec(), match="topk", strategy=st, topk_data=st.topk_data)
    assert settings.signal == "topk" and settings.phases[-1].config["teacher_signal"] == "topk"

    written = apply_spec(st, SpecValues(top_logprobs=0), task)
    assert written.top_logprobs == 0 and not written.topk_data
    sft = resolve(DistillSpec(), match="topk", strategy=written, topk_data=written.topk_data)
    assert [p.algorithm for p in sft.phases] == ["sft"] and "synth.top_logprobs 0" in sft.phases[0].reason
    # The spec makes an injection plan's API teacher generate and train KD: the log-probs come with it.
    weak = choose_strategy(TeacherProbe("api", 20, accuracy=0.0, accuracy_rules=None, latency_s=0.1), task, m)
    assert weak.kind == "injection" and not weak.topk_data
    made = apply_spec(weak, SpecValues(prompts=8, loss="fkl", kd_ratio=0.5, loss_needs_teacher=True), task)
    assert made.teacher_generates and made.topk_data
    assert resolve(DistillSpec(loss="fkl", kd_ratio=0.5), match="topk", strategy=made,
                   topk_data=made.topk_data).signal == "topk"
    # A white-box pair never asks for log-probs: its signal is the hidden states.
    assert choose_strategy(probe, task, Match("t", "s", "logit", 5.0)).top_logprobs == 0


def test_a_tiny_random_initialised_spec_runs_end_to_end_on_the_auto_device(calibrated, monkeypatch):
    """Every stage of `stratos run` with `device: auto` records the device it computed on: the
    CPU here, CUDA on a GPU machine (scripts/gpu_check.sh runs this there)."""
    from stratos.runner import STAGE_NAMES, run
    from stratos.spec import load_spec

    tmp_path = calibrated
    teacher, student = _models(tmp_path)
    spec = _spec(tmp_path / "s.yaml", teacher, student,
                 students=[{"model": str(student), "init": "random", "config_overrides": {"hidden_size": 32}}],
                 plan={"servers": ["local"], "probe_size": 4, "probe_rules": False, "probe_max_new_tokens": 4},
                 distill={"algorithm": "kd", "loss": "fkl", "kd_ratio": 0.5, "max_steps": 2,
                          "per_device_train_batch_size": 4, "max_length": 32, "report_to": []})
    manifest = run(load_spec(spec), tmp_path / "run", progress=False).data
    stages = manifest["stages"]
    assert [s for s in STAGE_NAMES if stages[s]["status"] == "done"] == STAGE_NAMES
    assert {stages[s]["device"].partition(":")[0] for s in STAGE_NAMES} == {expected_device()}
    assert stages["plan"]["artifacts"]["device"] == stages["distill"]["device"]
    assert stages["distill"]["artifacts"]["signal"] == "cached"  # the teacher's hidden states, on that device
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<th>device</th>" in html
