"""Calibrating the cost model by measurement.

``profile`` times a few short real runs on the local machine (a big matmul, a memory copy, a few
training steps, forward passes and KV-cache decoding of a small Llama) and derives the peak
FLOP/s, the bandwidth and the efficiency factors the cost model uses for the ``local`` offering.
It measures on the device the stages run on (``stratos.runtime``) and stores them in
``<cache>/plan/calibration.json`` (``calibration-cuda.json`` for a GPU), so a plan for this machine
predicts for the device its stages will really use. The file names the machine it measured
(``machine_id``): a cache shared by several machines (a home folder on a network drive) gives none of
them another's figures; a plan on another machine measures its own.

Every run can also ``record_stage`` the predicted and the measured time of a stage, and after its
eval the deployed student's latency (``record_stage("latency", ...)``) and accuracy
(``record_accuracy``); the records (``<cache>/plan/measurements.jsonl``) make the model's error
visible, and ``corrections`` / ``accuracy_corrections`` turn them into per-stage factors (median
measured/predicted) and per-task accuracy offsets (median measured - predicted) that later plans apply.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stratos.plan.costmodel import CPU_DEFAULT, GPU_DEFAULT, Efficiency, ModelShape

log = logging.getLogger(__name__)

CORRECTION_WINDOW = 20  # most recent records per (server, stage) used for a correction


def plan_cache() -> Path:
    from stratos.models import cache_dir

    return cache_dir() / "plan"


def calibration_path(device: Any = "cpu") -> Path:
    """Where the calibration of a device type (``cpu``, ``cuda``) is stored."""
    kind = getattr(device, "type", None) or str(device).partition(":")[0]
    return plan_cache() / ("calibration.json" if kind == "cpu" else f"calibration-{kind}.json")


def measurements_path() -> Path:
    return plan_cache() / "measurements.jsonl"


def machine_id(device: Any = "cpu") -> str:
    """What a calibration and a stage's timing are only good for: the device's model (a GPU's name; for the
    CPU its model name and core count)."""
    kind = getattr(device, "type", None) or str(device).partition(":")[0]
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {os.cpu_count()} cores"


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_calibration(path: str | Path | None = None, *, device: Any = "cpu") -> dict[str, Any]:
    """The stored calibration of ``device``'s type, or {} when ``stratos profile`` has not measured it on
    this machine (another machine's, named by its ``machine_id``, is left alone) or the file is unreadable."""
    p = Path(path) if path else calibration_path(device)
    try:
        cal = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    here = machine_id(device)
    if "decode_layer_s" not in cal.get("efficiency", {"decode_layer_s": 0}):
        log.info("plan: the calibration in %s predates the per-layer decoding cost: measured again", p)
        return {}
    if cal.get("machine_id", here) != here:
        log.info("plan: the calibration in %s was measured on %s, not on this machine (%s): not used", p,
                 cal["machine_id"], here)
        return {}
    return cal


def local_efficiency(cal: dict[str, Any], has_gpu: bool = False) -> Efficiency:
    if "efficiency" in cal:
        e = cal["efficiency"]
        return Efficiency(train=e["train"], forward=e["forward"], decode=e["decode"], n_half=e["n_half"],
                          decode_layer_s=e.get("decode_layer_s", 0.0),
                          source=f"calibrated by stratos profile on {cal.get('measured_at', '?')[:10]}"
                          + (f", while other work kept {cal['busy_cores']:.1f} cores busy: its speeds are low"
                             if cal.get("busy") else ""))
    return GPU_DEFAULT if has_gpu else CPU_DEFAULT


# --------------------------------------------------------------------------- measurement records


# What a ``latency`` record's prediction was of. Records written before 2026-12-05 set the p50 under the eval's
# load test over a prediction for one request served alone, of the task's answer length (a ratio of 3-11 on
# the examples): unlike things, so the corrections leave them out.
LATENCY_BASIS = "eval load test"


def latency_basis(predicted: dict[str, Any], clients: int, new_tokens: int) -> str | None:
    """``LATENCY_BASIS`` where a plan's ``predicted`` latency was for the load the eval ran (``clients``
    concurrent clients, ``new_tokens`` each), else None: a plan written before plans predicted the load test,
    or an eval whose ``bench_clients`` was edited since (it does not rerun the plan), predicted another load."""
    return LATENCY_BASIS if predicted.get("latency_load") == {"clients": clients, "new_tokens": new_tokens} else None


def record_stage(stage: str, server: str, predicted_s: float, measured_s: float, *,
                 run_dir: str | Path | None = None, note: str = "", run: str | None = None,
                 basis: str | None = None) -> dict[str, Any]:
    """Append one predicted-vs-measured record to the cache (and to ``run_dir/plan-measurements.jsonl``).
    ``run``: what the record measures once (a run's eval): a later record of the same stage and run
    replaces it in the corrections. ``basis``: what the prediction was of (``LATENCY_BASIS``)."""
    return _append({"stage": stage, "server": server, "machine": machine_id(), "predicted_s": predicted_s,
                    "measured_s": measured_s, "ratio": measured_s / predicted_s if predicted_s > 0 else None,
                    "note": note, **({"run": run} if run else {}), **({"basis": basis} if basis else {})}, run_dir)


def _append(rec: dict[str, Any], run_dir: str | Path | None) -> dict[str, Any]:
    """Time-stamp a record and append it to the cache's log (and to ``run_dir/plan-measurements.jsonl``)."""
    rec = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **rec}
    paths = [measurements_path()] + ([Path(run_dir) / "plan-measurements.jsonl"] if run_dir else [])
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8") as fh:  # append-only log: one line per record
            fh.write(json.dumps(rec) + "\n")
    return rec


def read_measurements(path: str | Path | None = None) -> list[dict[str, Any]]:
    p = Path(path) if path else measurements_path()
    try:
        return _parse_records(p.read_text())
    except OSError:
        return []


def _parse_records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn line from a crash; the rest is still good
    return out


def corrections(server: str, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Per stage: the median measured/predicted ratio of the latest records on ``server`` made on this
    machine (``machine_id``; records written before they named one count too) (stage ``latency``: the
    deployed student's p50 under the eval's load test over the plan's prediction for that load; records of
    another ``basis`` are left out)."""
    latest: dict[tuple[str, Any], dict[str, Any]] = {}  # a record with a run replaces that run's earlier one
    here = machine_id()
    for i, r in enumerate(records if records is not None else read_measurements()):
        if r.get("stage") == "latency" and r.get("basis") != LATENCY_BASIS:
            continue
        if r.get("server") == server and r.get("ratio") and "stage" in r and r.get("machine", here) == here:
            key = (r["stage"], r.get("run") or i)
            latest.pop(key, None)
            latest[key] = r  # re-inserted: dict order stays the order of the latest records
    by_stage: dict[str, list[float]] = {}
    for (stage, _), r in latest.items():
        by_stage.setdefault(stage, []).append(float(r["ratio"]))
    return {stage: statistics.median(v[-CORRECTION_WINDOW:]) for stage, v in by_stage.items()}


def task_key(task: Any) -> str:
    """The task a spec names, with its options: what accuracy records are kept and looked up by."""
    options = json.dumps(getattr(task, "options", None) or {}, sort_keys=True, default=str)
    return f"{task.name} {options}" if options != "{}" else task.name


def student_key(student: Any) -> str:
    """A student spec's identity for accuracy records: what decides how well it can learn (the model it is
    built from, its initialisation and pruning, shape overrides and tokenizer), not its name."""
    return json.dumps({"model": student.model, "init": student.init, "config_overrides": student.config_overrides,
                       "tokenizer": student.tokenizer,
                       **({"vocab": student.tokenizer_vocab_size} if student.tokenizer == "task" else {}),
                       **({"prune": student.prune.model_dump(mode="json")} if student.init == "pruned" else {})},
                      sort_keys=True, default=str)


def recipe_key(strategy: Any, teacher_model: str) -> str:
    """How a student is trained, as far as its accuracy goes (``stratos.plan.strategy.Strategy``, the spec's
    values applied): the data's size, the epochs, the loss and its weight against CE (``kd_ratio``), the teacher
    where it gives data or signal, the worked examples it was shown (``synth.few_shot``), and whether its
    samples were kept unchecked (``synth.verify: false``).
    An accuracy record corrects only plans of the same recipe: the prior does not see the data's size, so a
    run on 8,000 examples says nothing of one on 800, nor one at kd_ratio 0.5 of one at 0.9, nor one on
    verified answers of one on answers right or wrong."""
    key = f"{strategy.data_size} examples x {strategy.epochs:g} epochs, loss {strategy.loss}"
    key += f" (kd_ratio {strategy.kd_ratio:g})" if strategy.loss != "ce" else ""
    key += f", teacher {teacher_model}" if strategy.teacher_generates or strategy.loss != "ce" else ""
    # Worked examples before the teacher's questions make other data (and another teacher signal).
    if strategy.few_shot and strategy.teacher_generates:
        key += f", the teacher shown {strategy.few_shot} worked examples"
    # Every sample kept, right or wrong: other data than the verified answers of the same prompts.
    return key + (", every sample kept unchecked" if strategy.teacher_generates and not strategy.verify else "")


def record_accuracy(task: str, method: str, predicted: float, measured: float, *, run: str, student: str,
                    recipe: str, run_dir: str | Path | None = None, note: str = "") -> dict[str, Any]:
    """Append the plan's predicted accuracy for ``task`` (by ``method``: prior or pilot) and the deployed
    student's measured one in ``run`` (a run directory: a rerun of its eval replaces its record), for the
    ``student`` (``student_key``) trained by ``recipe`` (``recipe_key``), to the same logs as ``record_stage``."""
    return _append({"kind": "accuracy", "task": task, "student": student, "recipe": recipe, "method": method,
                    "predicted": predicted, "measured": measured, "error": measured - predicted, "run": run,
                    "note": note}, run_dir)


def shipped_measurements() -> list[dict[str, Any]]:
    """Accuracy records of runs that Stratos' authors measured (``stratos/data/accuracy_records.jsonl``; each
    says in ``shipped`` how it was run): plans on a fresh install learn from them as from its own runs, for the
    same task, student and recipe only. They come first, so a machine's own runs take their place in the window."""
    from importlib import resources

    return _parse_records(resources.files("stratos").joinpath("data/accuracy_records.jsonl").read_text(encoding="utf-8"))


def accuracy_records(task: str, student: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The accuracy records of ``task`` with ``student`` (``student_key``) among ``records`` (the planner
    passes the shipped ones, then this machine's), in order. Another student's error says little about this
    one's (a 4-layer student's miss would otherwise lower a 6-layer one's prediction), and records written
    before students were recorded are not used."""
    return [r for r in records if r.get("kind") == "accuracy" and r.get("task") == task and r.get("student") == student]


def accuracy_corrections(records: list[dict[str, Any]], recipe: str) -> dict[str, tuple[float, float, int, int]]:
    """Per prediction method: the median error (measured - predicted accuracy) and the median measured accuracy
    of the latest runs among ``records`` (``accuracy_records``: one task and student) trained by ``recipe``
    (``recipe_key``), how many runs they come from, and how many of those are shipped
    (``shipped_measurements``). A plan predicts that student and recipe's accuracy from them (the planner: a
    prior is replaced by the measured median, a pilot's prediction corrected by the error). Records written
    before recipes were recorded are not used."""
    latest: dict[str, dict[str, Any]] = {}  # by run: the last record of each
    for r in records:
        if r.get("recipe") == recipe:
            latest.pop(r.get("run", ""), None)
            latest[r.get("run", "")] = r  # re-inserted: dict order stays the order of the latest records
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in latest.values():
        by_method.setdefault(r["method"], []).append(r)
    out = {}
    for m, rs in by_method.items():
        window = rs[-CORRECTION_WINDOW:]
        out[m] = (statistics.median(float(r["error"]) for r in window),
                  statistics.median(float(r["measured"]) for r in window), len(window),
                  sum(1 for r in window if r.get("shipped")))
    return out


# --------------------------------------------------------------------------- profiling


def _copy_bandwidth(device: Any, seconds: float) -> float:
    """Bytes per second read and written by a 128 MiB copy: well beyond any CPU cache."""
    import torch

    x = torch.empty(32 * 2**20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _timed(lambda: y.copy_(x), seconds, device=device)


def _timed(fn, min_seconds: float, min_reps: int = 2, device: Any = None) -> float:
    """Seconds per call of ``fn``: one warm-up call, then repeats until ``min_seconds`` have passed
    (with the device's queue drained before each clock reading: CUDA runs asynchronously)."""
    from stratos.runtime import synchronize

    def sync() -> None:
        if device is not None:
            synchronize(device)

    fn()
    sync()
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_seconds:
        fn()
        reps += 1
        sync()
    return (time.perf_counter() - t0) / reps


def _small_llama(hidden: int, layers: int, vocab: int = 2048):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), intermediate_size=4 * hidden, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _shape(model, dtype_bytes: float) -> ModelShape:
    c = model.config
    return ModelShape(name="profile", params=float(sum(p.numel() for p in model.parameters())), hidden=c.hidden_size,
                      layers=c.num_hidden_layers, vocab=c.vocab_size,
                      kv_dim=c.num_key_value_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
                      bytes_per_param=dtype_bytes)


def _autocast(device: Any, bf16: bool) -> Any:
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _decode_bytes(shape: ModelShape) -> float:
    """What a decoding step of the profile moves: the weights and the KV cache of 80 tokens."""
    return shape.params * shape.bytes_per_param + 80 * shape.kv_bytes_per_token(shape.bytes_per_param)


def _measure_model(model, *, bf16: bool, batch: int, seq: int, decode_steps: int, seconds: float) -> dict[str, float]:
    """Seconds per training step, per forward pass and per decoding step (batch 1) of one small model, on its
    device."""
    import torch

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with _autocast(device, bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), _autocast(device, bf16):
            model(input_ids=ids)

    model.train()
    t_train = _timed(train_step, seconds, device=device)
    model.eval()
    t_fwd = _timed(forward, seconds / 2, device=device)
    return {"train_step_s": t_train, "forward_s": t_fwd, "tokens": batch * seq,
            "decode_step_s": _decode_step_s(model, bf16=bf16, steps=decode_steps, seconds=seconds / 2)}


def _decode_step_s(model, *, bf16: bool, steps: int, seconds: float, batch: int = 1) -> float:
    """Seconds per greedy decoding step with the KV cache, after a 16-token prompt, of ``batch`` sequences."""
    import torch
    from transformers import DynamicCache

    from stratos.models.arch import cache_arg

    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)

    def decode():
        with torch.no_grad(), _autocast(device, bf16):
            cache = DynamicCache()  # filled in place by every forward
            tok = model(input_ids=prompt, use_cache=True, **cache_arg(model, cache)).logits[:, -1:].argmax(-1)
            for _ in range(steps):
                tok = model(input_ids=tok, use_cache=True, **cache_arg(model, cache)).logits[:, -1:].argmax(-1)

    model.eval()
    return _timed(decode, seconds, device=device) / (steps + 1)


def _fit_n_half(points: list[tuple[float, float]], default: float) -> float:
    """Fit eff(N) = e * N / (N + h) through two (N, eff) points; the default when they don't allow it."""
    if len(points) < 2:
        return default
    (n1, f1), (n2, f2) = points[0], points[-1]
    # f1 (n1 + h) / n1 = f2 (n2 + h) / n2  ->  h = (f2 - f1) / (f1 / n1 - f2 / n2)
    denom = f1 / n1 - f2 / n2
    if denom <= 0:
        return default
    h = (f2 - f1) / denom
    return float(min(max(h, 0.0), 1e10))


# (hidden, layers) of the model whose decoding alone is timed beside the others': wide and shallow.
WIDE_DECODE = (1024, 2)


def _fit_decode(points: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Fit t = layers x d + s / e through (layers, s, t) points, ``s`` the seconds moving the step's bytes at the
    full measured bandwidth and ``t`` the measured step: the bandwidth efficiency ``e`` (at most 1) and the
    per-layer seconds ``d`` (at least 0), by least squares. Where the points do not separate the two (one
    point, or a fit outside those bounds), d is 0 and e the mean of s / t, as before the per-layer cost."""
    def plain() -> tuple[float, float]:
        return statistics.mean(min(1.0, s / t) for _, s, t in points), 0.0

    if len(points) < 2:
        return plain()
    # Least squares in (d, k = 1/e): minimise sum (L d + s k - t)^2.
    a11 = sum(L * L for L, _, _ in points)
    a12 = sum(L * s for L, s, _ in points)
    a22 = sum(s * s for _, s, _ in points)
    b1 = sum(L * t for L, _, t in points)
    b2 = sum(s * t for _, s, t in points)
    det = a11 * a22 - a12 * a12
    if det <= 0:
        return plain()
    d, k = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    if d < 0 or k < 1:  # no per-layer cost to see, or faster than the bandwidth allows
        return plain()
    return 1 / k, d


# A CPU profiled while other work holds this share of its cores or more is said to have been busy.
BUSY_SHARE = 0.5


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds every process on the machine has used (hypervisor steal included: a neighbour's
    work slows ours too), CPU seconds of this process and its children), or None without ``/proc/stat``."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *steal = fields
    t = os.times()
    return (time.perf_counter(), (user + nice + system + irq + softirq + sum(steal)) / os.sysconf("SC_CLK_TCK"),
            t.user + t.system + t.children_user + t.children_system)


class OtherWork:
    """How many cores other processes kept busy between ``start()`` and ``cores()``: the machine's CPU time
    (``/proc/stat``) less this process's, over the wall time. Where ``/proc/stat`` is missing, the 1-minute load
    average, a lagging figure that counts this process too (after ``pip install`` it still reads 1.1-1.3 on an
    idle 2-core machine, which is why it is not the first choice)."""

    def start(self) -> "OtherWork":
        self._t0 = _cpu_seconds()
        return self

    def cores(self) -> float | None:
        end = _cpu_seconds()
        if self._t0 is None or end is None or end[0] <= self._t0[0]:
            try:
                return os.getloadavg()[0]
            except (AttributeError, OSError):
                return None
        wall, machine, mine = (b - a for a, b in zip(self._t0, end))
        return max(0.0, (machine - mine) / wall)


def run_profile(*, quick: bool = False, progress: bool = True, out: str | Path | None = None,
                sizes: list[tuple[int, int]] | None = None, seconds: float | None = None,
                device: Any = None, store_busy: bool = True) -> dict[str, Any]:
    """Measure this machine's ``device`` (a torch device; default: the ``auto`` one of
    ``stratos.runtime``) and store its calibration. Returns it, with a ``checks`` list of
    predicted (with the previous calibration or defaults) vs measured times per stage.

    ``sizes`` are (hidden, layers) of the Llamas timed (default: one in quick mode, two otherwise,
    so the small-model overhead can be fitted); ``seconds`` is the minimum time per measurement.
    ``store_busy`` False: a CPU measured busy (``busy``) is not stored, so the next plan measures it again."""
    import torch

    from stratos.io import write_json
    from stratos.plan.catalog import local_server
    from stratos.plan.costmodel import decode_step_seconds, forward_seconds, train_seconds
    from stratos.progress import progress_bar
    from stratos.runtime import bf16_supported, resolve_device

    seconds = seconds or (0.3 if quick else 1.0)
    others = OtherWork().start()  # other work sharing the CPU makes every speed below look slower than it is
    device = torch.device(device) if device is not None else resolve_device("auto")
    gpu = device.type == "cuda"
    bf16 = bf16_supported(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    previous = load_calibration(out, device=device)
    prev_server = local_server(0.0, previous, device=device)
    prev_eff = local_efficiency(previous, gpu)
    sizes = sizes or ([(256, 4)] if quick else [(128, 2), (384, 6)])
    steps = 3 + len(sizes)
    results: dict[str, Any] = {}
    with progress_bar("profiling", steps, enabled=progress) as bar:
        # Peak: the faster of fp32 and bf16 matmul (bf16 autocast leaves some ops in fp32, and CPUs
        # without bf16 units run bf16 slower than fp32).
        n, peak = 1024, 0.0
        for dt in {torch.float32, dtype}:
            a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
            peak = max(peak, 2 * n**3 / _timed(lambda: a @ b, seconds / 2, device=device))
        bar.advance()
        bandwidth = _copy_bandwidth(device, seconds)
        bar.advance()
        models = []
        for hidden, layers in sizes:
            model = _small_llama(hidden, layers).to(device)
            m = _measure_model(model, bf16=bf16, batch=4, seq=128, decode_steps=16, seconds=seconds)
            models.append((_shape(model, 2.0 if bf16 else 4.0), m))
            del model
            bar.advance()
        # Decoding alone, of a wide shallow model: its step is mostly moving weights, where the small models'
        # are mostly their layers' fixed cost; the two kinds together separate bandwidth from per-layer cost.
        wide = _small_llama(*WIDE_DECODE).to(device)
        dec_only = [(_shape(wide, 2.0 if bf16 else 4.0),
                     _decode_step_s(wide, bf16=bf16, steps=16, seconds=seconds / 2))]
        del wide
        bar.advance()
    busy = others.cores()
    cal_server = local_server(0.0, {"peak_flops": peak, "bandwidth": bandwidth}, device=device)
    train_pts, fwd_pts, dec_pts, checks = [], [], [], []
    for shape, m in models:
        tok = m["tokens"]
        train_pts.append((shape.params, 6 * shape.params * tok / m["train_step_s"] / peak))
        fwd_pts.append((shape.params, 2 * shape.params * tok / m["forward_s"] / peak))
        dec_pts.append((shape, m["decode_step_s"]))
        # What the model predicted for these measurements before this calibration.
        for stage, predicted, measured in (
            ("train", train_seconds(shape, tok, prev_server, prev_eff), m["train_step_s"]),
            ("forward", forward_seconds(shape, tok, prev_server, prev_eff), m["forward_s"]),
            ("decode", decode_step_seconds(shape, 1, 80, prev_server, prev_eff), m["decode_step_s"]),
        ):
            checks.append({"stage": stage, "params": shape.params, "predicted_s": predicted, "measured_s": measured,
                           "error": predicted / measured - 1})
    n_half = _fit_n_half(train_pts, CPU_DEFAULT.n_half)

    def eff_max(points):
        # Undo the small-model penalty at each measured size; average over sizes.
        return statistics.mean(min(1.0, f * (p + n_half) / p) for p, f in points)

    # Decoding moves the weights, the KV cache and the fixed overhead (n_half parameters' worth of bytes), and
    # each layer costs a fixed time besides.
    decode_eff, decode_layer_s = _fit_decode([(sh.layers, (_decode_bytes(sh) + n_half * sh.bytes_per_param) / bandwidth, t)
                                              for sh, t in dec_pts + dec_only])
    results = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{machine_id(device)}, torch {torch.__version__}",
        "machine_id": machine_id(device),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "busy_cores": busy,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_flops": peak,
        "bandwidth": bandwidth,
        "memory_gb": cal_server.gpu_memory_gb,
        "efficiency": {"train": eff_max(train_pts), "forward": eff_max(fwd_pts), "decode": decode_eff, "n_half": n_half,
                       "decode_layer_s": decode_layer_s},
        "models": [{"params": s.params, **m} for s, m in models],
        "decode_only": [{"params": sh.params, "layers": sh.layers, "decode_step_s": t} for sh, t in dec_only],
        "checks": checks,
    }
    path = Path(out) if out else calibration_path(device)
    cores = os.cpu_count() or 1
    results["busy"] = device.type == "cpu" and busy is not None and busy >= BUSY_SHARE * cores
    stored = not (results["busy"] and not store_busy)
    if stored:
        write_json(path, results)
    if results["busy"]:
        then = (f"every later plan on this machine predicts stages slower than they run; stored in {path}: rerun "
                "`stratos profile` when nothing else runs" if stored else
                "this plan predicts stages and latency slower than they run; not stored: the next plan measures it "
                "again (or run `stratos profile` when nothing else runs)")
        log.warning("the CPU was busy while it was profiled (other work kept %.1f of its %d cores busy): its speeds "
                    "are low (a layer's fixed cost in decoding measured up to 10x its quiet value on 2 cores), so %s",
                    busy, cores, then)
    if not stored:
        return results
    for c in checks:
        record_stage(f"profile-{c['stage']}", "local", c["predicted_s"], c["measured_s"], note=f"{c['params']:.0f} params")
    return results
