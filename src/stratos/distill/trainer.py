"""The one training loop: SFT, off-policy KD and (later) on-policy KD all run through it.

Read it top to bottom: a step gathers its micro-batches, asks the teacher signal for
hidden states, computes the chunked objective, normalises by the step's target tokens,
checks the step is finite, steps the optimizer. The data position is a pure function of
the step number, so a checkpoint needs only the step, the weights, the optimizer and the
RNG to resume with no step lost or repeated; it also records the settings and data it was
made from, so it is never resumed by a run of other settings or data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stratos.distill.data import Batch, Encoded, collate, data_fingerprint
from stratos.distill.head import OutputHead, last_hidden
from stratos.distill.kd import Objective, kd_terms
from stratos.distill.signal import TeacherSignal
from stratos.errors import TrainingError
from stratos.io import write_json
from stratos.progress import progress_bar
from stratos.spec import DistillSpec


# --------------------------------------------------------------------------- setup helpers


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    return bf16_supported(device) if setting == "auto" else bool(setting)


def objective_from(cfg: DistillSpec) -> Objective:
    return Objective(
        loss=cfg.loss,
        loss_kwargs=dict(cfg.loss_kwargs),
        temperature=cfg.temperature,
        scale_by_temperature=cfg.scale_by_temperature,
        kd_ratio=cfg.kd_ratio,
        chunk_size=cfg.chunk_size,
    )


def lr_lambda(cfg: DistillSpec, total_steps: int) -> Callable[[int], float]:
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(model: torch.nn.Module, cfg: DistillSpec) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Norm gains and biases are not decayed (the usual practice).
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2)}
    try:  # one fused kernel per step on CPU and CUDA (what HF Trainer also defaults to)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, **kwargs)


def apply_lora(model: Any, cfg: DistillSpec) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    assert lora is not None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- data order


@dataclass(frozen=True)
class Schedule:
    """Which examples each micro-batch holds: a seeded permutation per epoch."""

    num_examples: int
    batch_size: int
    accumulation: int
    total_steps: int
    seed: int

    @classmethod
    def from_config(cls, n: int, cfg: DistillSpec) -> "Schedule":
        per_epoch = math.ceil(n / cfg.per_device_train_batch_size)
        steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))
        return cls(n, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, steps, cfg.seed)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        out = []
        for m in range(step * self.accumulation, (step + 1) * self.accumulation):
            epoch, b = divmod(m, self.batches_per_epoch)
            out.append(self._perm(epoch)[b * self.batch_size : (b + 1) * self.batch_size])
        return out


# --------------------------------------------------------------------------- checkpoints


CKPT_RE = re.compile(r"^step-(\d+)$")

# Settings that change only what is written, never the optimisation: a run may resume with others.
BOOKKEEPING = {"save_steps", "save_total_limit", "logging_steps", "report_to"}


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def made_from(cfg: DistillSpec, examples: Sequence[Encoded]) -> dict[str, Any]:
    """What a checkpoint was made from: the settings that shape the optimisation (every DistillSpec
    field but the BOOKKEEPING ones; max_steps and num_train_epochs count, they shape the LR schedule),
    as values so that a refusal can name them, and the hash of the tokenised data."""
    config = json.loads(json.dumps(cfg.model_dump(mode="json", exclude=BOOKKEEPING)))  # as state.json reads back
    return {"config": config, "data": data_fingerprint(examples)}


def check_made_from(path: Path, expected: dict[str, Any]) -> None:
    """Refuse to resume from checkpoint ``path`` unless it was made from the ``expected`` settings and
    data: continuing another run's weights, optimizer moments and schedule would silently train a mix
    of two runs. A checkpoint that does not record what it was made from is refused too."""
    stored = json.loads((path / "state.json").read_text()).get("made_from")
    advice = "start over with a new --out, or with --overwrite instead of --resume"
    if stored is None:
        raise TrainingError(f"checkpoint {path} does not record the settings and data it was made from "
                            f"(an older Stratos wrote it), so it cannot be resumed safely: {advice}")
    then, now = stored.get("config", {}), expected["config"]
    diffs = [f"distill.{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(then.keys() | now.keys())
             if then.get(k) != now.get(k)]
    if stored.get("data") != expected["data"]:
        diffs.append("the training data differs")
    if diffs:
        raise TrainingError(f"checkpoint {path} was made from other settings or data ({'; '.join(diffs)}): "
                            f"resume with the same ones, or {advice}")


def save_checkpoint(
    ckpt_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, keep: int,
    origin: dict[str, Any],
) -> Path:
    """Write ``step-N`` into a temporary folder and rename it into place: a checkpoint either
    exists whole or not at all, whatever kills the process. ``state.json`` holds the step, the
    scheduler and, as ``made_from``, the ``origin`` from :func:`made_from`, which
    :func:`check_made_from` compares before a resume."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().contiguous() for n, p in _trainable(model).items()}, str(tmp / "trainable.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    write_json(tmp / "state.json", {"step": step, "scheduler": sched.state_dict(), "made_from": origin})
    for f in tmp.iterdir():  # make the files durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(checkpoints(ckpt_dir))[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> int:
    weights = load_file(str(path / "trainable.safetensors"))
    params = _trainable(model)
    missing = set(params) ^ set(weights)
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model (differs in {sorted(missing)[:3]} ...)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    return int(state["step"])


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Metrics to ``metrics.jsonl`` (and TensorBoard / wandb / mlflow when asked and installed)."""

    def __init__(self, out_dir: Path, report_to: Sequence[str], resume_step: int, config: dict[str, Any]):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # drop rows a killed run wrote after its last checkpoint
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step))
        self._fh = open(self.path, "a")
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                warnings.warn("report_to: tensorboard is not installed; skipping", stacklevel=2)
        if "wandb" in report_to:
            try:
                import wandb

                self._wandb = wandb.init(config=config, resume="allow")
            except ImportError:
                warnings.warn("report_to: wandb is not installed; skipping", stacklevel=2)
        if "mlflow" in report_to:
            try:
                import mlflow

                self._mlflow = mlflow
                mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
            except ImportError:
                warnings.warn("report_to: mlflow is not installed; skipping", stacklevel=2)

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        for k, v in values.items():
            if self._tb is not None:
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    tokens: int
    seconds: float
    last: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train(
    student: torch.nn.Module,
    examples: Sequence[Encoded],
    cfg: DistillSpec,
    out_dir: str | Path,
    *,
    pad_id: int,
    signal: TeacherSignal | None = None,
    resume: bool = True,
    progress: bool = True,
    device: torch.device | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``student`` in place on ``examples`` with the objective in ``cfg``.

    Checkpoints go to ``out_dir/checkpoints``; with ``resume`` the latest one is restored, after
    checking it was made from the same settings and data (else TrainingError, before anything is
    written). ``stop_after`` ends the run after that many optimizer steps of this call (for tests
    and on-policy rounds); the schedule still spans ``total_steps``.

    A step whose loss or gradient norm is not finite raises TrainingError before the optimizer
    steps: the weights, the checkpoints and metrics.jsonl keep only the good steps before it.
    """
    out_dir = Path(out_dir)
    device = device or next(student.parameters()).device
    torch.manual_seed(cfg.seed)
    obj = objective_from(cfg)
    if obj.needs_teacher and signal is None:
        raise ValueError(f"loss {cfg.loss!r} with kd_ratio {cfg.kd_ratio} needs a teacher signal")
    bf16 = resolve_bf16(cfg.bf16, device)
    s_head = OutputHead.from_model(student, frozen_copy=False)
    t_head = signal.head.to(device) if signal is not None and signal.head is not None and obj.needs_teacher else None

    sched_data = Schedule.from_config(len(examples), cfg)
    opt = make_optimizer(student, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, sched_data.total_steps))
    ckpt_dir = out_dir / "checkpoints"
    origin = made_from(cfg, examples)
    start = 0
    found = checkpoints(ckpt_dir) if resume else []
    if found:
        check_made_from(found[-1][1], origin)
        start = load_checkpoint(found[-1][1], student, opt, sched)
    out_dir.mkdir(parents=True, exist_ok=True)  # only after the checks above: a refused run writes nothing
    metrics = Metrics(out_dir, cfg.report_to, start, cfg.model_dump())

    student.train()
    end = sched_data.total_steps if stop_after is None else min(sched_data.total_steps, start + stop_after)
    tokens_done, t0, last = 0, time.perf_counter(), {}
    window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "agree": 0.0, "tokens": 0}
    with progress_bar("distilling", total=sched_data.total_steps, enabled=progress, status=True) as bar:
        bar.advance(start)
        for step in range(start, end):
            batches = [collate([examples[i] for i in idx], idx, pad_id) for idx in sched_data.micro_batches(step)]
            step_tokens, step_loss = sum(b.num_targets for b in batches), 0.0
            for batch in batches:
                terms = _micro_step(student, batch, signal, s_head, t_head, obj, device, bf16)
                (terms["loss"] / step_tokens).backward()
                for k in ("loss", "kd", "ce", "agree"):
                    window[k] += float(terms[k].detach())
                step_loss += float(terms["loss"].detach())
            window["tokens"] += step_tokens
            # The norm is always computed (an infinite max clips nothing) so that the check below has it.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in student.parameters() if p.requires_grad], cfg.max_grad_norm or math.inf
            ))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                # Stop before the optimizer spreads NaN into the weights and moments: every
                # checkpoint and metrics row written so far holds only good steps.
                metrics.close()
                raise diverged(step + 1, step_loss, grad_norm, ckpt_dir, cfg)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens_done += step_tokens
            done = step + 1
            if done % cfg.logging_steps == 0 or done == sched_data.total_steps:
                n = max(1, window["tokens"])
                elapsed = time.perf_counter() - t0
                last = {
                    "loss": window["loss"] / n,
                    "kd": window["kd"] / n,
                    "ce": window["ce"] / n,
                    "teacher_agreement": window["agree"] / n,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_done / elapsed,
                    "elapsed_s": elapsed,  # wall time since this call started training
                    "epoch": done * sched_data.accumulation / sched_data.batches_per_epoch,
                }
                metrics.log(done, last)
                window = dict.fromkeys(window, 0.0)
                window["tokens"] = 0
                bar.update(status=f"loss {last['loss']:.4f}  {last['tokens_per_s']:.0f} tok/s")
            if done % cfg.save_steps == 0 or done == end:  # also when stop_after ends this call early
                save_checkpoint(ckpt_dir, done, student, opt, sched, cfg.save_total_limit, origin)
            bar.advance(1)
    metrics.close()
    return TrainResult(steps=end, resumed_from=start, tokens=tokens_done, seconds=time.perf_counter() - t0, last=last)


def diverged(step: int, loss: float, grad_norm: float, ckpt_dir: Path, cfg: DistillSpec) -> TrainingError:
    """The one-line error of a step whose loss or gradient norm is not finite: which, the
    checkpoint that stays as it was, and what to change."""
    what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
    found = checkpoints(ckpt_dir)
    kept = f"the last good checkpoint {found[-1][1]} is kept" if found else "there is no checkpoint yet"
    clip = ", set distill.max_grad_norm (e.g. 1.0)" if cfg.max_grad_norm is None else ""
    return TrainingError(
        f"training diverged at step {step}: the {what} is not finite; stopped before the optimizer step, "
        f"{kept} and no model was saved: lower distill.learning_rate (--lr, now {cfg.learning_rate:g}){clip}, "
        f"or check the data for corrupt or extreme examples"
    )


def _micro_step(
    student: torch.nn.Module,
    batch: Batch,
    signal: TeacherSignal | None,
    s_head: OutputHead,
    t_head: OutputHead | None,
    obj: Objective,
    device: torch.device,
    bf16: bool,
) -> dict[str, torch.Tensor]:
    mask = batch.target_mask.to(device)
    t_hidden = signal.hidden(batch).to(device) if t_head is not None and signal is not None else None
    topk = None
    if obj.needs_teacher and hasattr(signal, "topk"):  # API teacher: top-k log-probs instead of hidden states
        topk = tuple(t.to(device) for t in signal.topk(batch))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        h = last_hidden(student, batch.input_ids.to(device), batch.attention_mask.to(device))
        s_hidden = h[:, :-1][mask]
        return kd_terms(s_hidden, t_hidden, batch.targets.to(device), s_head, t_head, obj, topk=topk)
