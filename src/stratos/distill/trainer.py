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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stratos.distill.algorithms import StepContext, get_algorithm
from stratos.distill.data import Encoded, data_fingerprint
from stratos.distill.head import OutputHead
from stratos.distill.sources import FixedSource, Schedule, Source  # noqa: F401  (Schedule: public here too)
from stratos.distill.kd import Objective
from stratos.distill.signal import TeacherSignal
from stratos.errors import TrainingError
from stratos.io import write_json
from stratos.runtime import resolve_bf16
from stratos.progress import progress_bar
from stratos.spec import DistillSpec


# --------------------------------------------------------------------------- setup helpers


def objective_from(cfg: DistillSpec) -> Objective:
    return Objective(
        loss=cfg.loss,
        loss_kwargs=dict(cfg.loss_kwargs),
        temperature=cfg.temperature,
        scale_by_temperature=cfg.scale_by_temperature,
        kd_ratio=cfg.kd_ratio,
        label_smoothing=cfg.label_smoothing_factor,
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
    with warnings.catch_warnings():
        # peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates (FutureWarning) in
        # favour of `is_activation_checkpointing`: peft's call, nothing a user can change.
        warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def checkpoint_layers(model: Any) -> None:
    """``distill.gradient_checkpointing``: each decoder layer keeps only its input and recomputes its
    activations in the backward pass (transformers' own layer checkpointing, non-reentrant, so LoRA and
    FSDP2 need nothing more). The model is left so; generation runs in eval mode, where it does nothing."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainingError(f"distill.gradient_checkpointing: {type(model).__name__} does not support it "
                            "(transformers' supports_gradient_checkpointing is false); turn it off")
    enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.x
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --------------------------------------------------------------------------- checkpoints


CKPT_RE = re.compile(r"^step-(\d+)$")
# Sums every step window keeps (every algorithm returns the first four); others an algorithm returns are
# logged per target token under their own names.
BASE_TERMS = ("loss", "kd", "ce", "agree", "tokens")

# Settings that change only what is written, never the optimisation: a run may resume with others.
# eval_steps and eval_samples only add measurements: the evaluator scores the model in eval mode under a
# forked RNG, so every step's weights, moments and RNG are those of a run without it. load_best_model_at_end
# picks which weights end the run and which checkpoint the rotation spares, never what a checkpoint holds:
# a run may turn it on when resumed (the scores so far are in state.json; should the best checkpoint have been
# rotated away before, the best one left is loaded, with a warning). Being bookkeeping, they are also not in
# the made_from of checkpoints, so those written before these options existed still resume.
BOOKKEEPING = {"save_steps", "save_total_limit", "logging_steps", "report_to",
               "eval_steps", "eval_samples", "load_best_model_at_end",
               "parallel", "fsdp_cpu_offload",  # the same update however many processes compute it
               "gradient_checkpointing",  # the same update, its activations recomputed in the backward
               "sft_baseline"}  # a second student trained beside this one; this one's updates are the same


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
    origin: dict[str, Any], *, evals: dict[int, float] | None = None, protect: int | None = None,
    full_state: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> Path:
    """Write ``step-N`` into a temporary folder and rename it into place: a checkpoint either
    exists whole or not at all, whatever kills the process. ``state.json`` holds the step, the
    scheduler and, as ``made_from``, the ``origin`` from :func:`made_from`, which
    :func:`check_made_from` compares before a resume; with ``evals`` (the eval_accuracy of every
    evaluated checkpoint so far, by step) also those and the best of them, so that a resumed run
    keeps its best. Only the ``keep`` latest checkpoints stay, and checkpoint ``protect`` (the best,
    with load_best_model_at_end) whatever its age. ``full_state``: the weights and optimizer state a
    distributed student gathered (``Parallel.full_state``, keyed by parameter name), instead of the
    model's and the optimizer's own."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = _ckpt_path(ckpt_dir, step)
    tmp = ckpt_dir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights, optim = full_state if full_state is not None else (_trainable(model), opt.state_dict())
    save_file({n: p.detach().contiguous() for n, p in weights.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optim, tmp / "optimizer.pt")
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    state: dict[str, Any] = {"step": step, "scheduler": sched.state_dict(), "made_from": origin}
    if evals:
        best = best_of(evals)
        state["evals"] = {str(s): a for s, a in sorted(evals.items())}
        state["best"] = {"step": best, "eval_accuracy": evals[best]}
    write_json(tmp / "state.json", state)
    for f in tmp.iterdir():  # make the files durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old_step, old in sorted(checkpoints(ckpt_dir))[:-keep]:
        if old_step != protect:  # as Hugging Face does: the best checkpoint outlives the rotation
            shutil.rmtree(old, ignore_errors=True)
    return final


def best_of(evals: dict[int, float]) -> int:
    """The step of the highest eval_accuracy; of equal ones, the earliest (the cheaper model to have got)."""
    return min(evals, key=lambda s: (-evals[s], s))


def read_evals(path: Path) -> dict[int, float]:
    """The eval_accuracy by step that checkpoint ``path`` recorded (empty if none)."""
    state = json.loads((path / "state.json").read_text())
    return {int(s): float(a) for s, a in (state.get("evals") or {}).items()}


def _ckpt_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:07d}"


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Copy checkpoint ``path``'s trainable weights into ``model`` (the rest of it is frozen, so the same)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = _trainable(model)
    missing = set(params) ^ set(weights)
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model (differs in {sorted(missing)[:3]} ...)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    par: Any = None) -> int:
    """Restore checkpoint ``path``. One written by a distributed student holds full state keyed by
    parameter name and loads at any world size (``Parallel.load_state``); one written by a single
    process holds the optimizer's own state, and resumes in a single process."""
    from stratos.distill.parallel import Parallel

    par = par or Parallel()
    main = par.is_main  # only rank 0 reads the files; it broadcasts what it read
    optim = torch.load(path / "optimizer.pt", weights_only=True) if main else {}
    by_name = par.from_main(any(isinstance(k, str) for k in optim.get("state", {})))
    if par.distributed or by_name:
        if par.distributed and not by_name:
            raise TrainingError(f"checkpoint {path} was written by one process; resume it in one process "
                                "(without --nproc), or start over")
        par.load_state(model, opt, load_file(str(path / "trainable.safetensors")) if main else {}, optim)
    else:
        load_trainable(path, model)
        opt.load_state_dict(optim)
    state, rng = par.from_main((json.loads((path / "state.json").read_text()),
                                load_file(str(path / "rng.safetensors"))["torch"]) if main else None)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng)
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
        # 7 significant digits, not 6 decimals: a loss of 0.003 keeps its relative precision.
        row = {"step": step, **{k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in values.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        for k, v in values.items():
            if self._tb is not None:
                tag = f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"train/{k}"
                self._tb.add_scalar(tag, v, step)
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
    """What ``train`` did. ``last``: the last logged training row, the last evaluation's values and,
    when the run was evaluated, ``best_step`` and ``best_eval_accuracy`` (and ``model_step``, the step
    whose weights the model holds, when load_best_model_at_end loaded them)."""

    steps: int
    resumed_from: int
    tokens: int
    seconds: float
    last: dict[str, float] = field(default_factory=dict)
    eval_seconds: float = 0.0  # of ``seconds``, spent evaluating while training
    best_step: int | None = None  # the evaluated checkpoint with the highest eval_accuracy (ties: the earlier)
    best_eval_accuracy: float | None = None
    model_step: int | None = None  # the step whose weights the model holds: best_step with load_best_model_at_end
    precision: str = "fp32"  # "bf16": bf16 autocast over fp32 weights (resolve_bf16 said the device computes it)

    @property
    def tokens_per_second(self) -> float:
        train_s = self.seconds - self.eval_seconds
        return self.tokens / train_s if train_s > 0 else 0.0


class InFlight:
    """A step's data, prepared and sent to a teacher service (a signal with ``submit``, e.g. a
    TeacherPool) before it trains: each step's micro-batches all at once when the step begins, and
    up to ``depth`` more of later steps where the source knows them ahead (``known_ahead``: fixed data),
    so that the teacher's forward passes for the next batches run while the student trains on this one.
    That changes when the teacher computes, not what: a run with it trains to the same weights.

    With ``stale`` (max_staleness 1, on-policy sources) the next step is prepared (its rollouts
    sampled) from the weights this step starts from, before this step trains, and sent: the teacher
    scores rollouts one update old while the student trains."""

    def __init__(self, source: Source, signal: Any, depth: int, stale: bool = False):
        self.source, self.submit = source, getattr(signal, "submit", None)
        self.depth = depth if getattr(source, "known_ahead", False) else 0
        self.stale = stale and self.submit is not None
        self.held: dict[int, list[Any]] = {}  # later steps' micro-batches, already sent
        self.made: dict[int, dict[str, float] | None] = {}  # what preparing a later step reported

    def step(self, step: int, total: int, model: torch.nn.Module) -> tuple[dict[str, float] | None, list[Any]]:
        """What preparing ``step`` reported (e.g. its rollouts' rewards; logged on its row) and its micro-batches."""
        made = self.made.pop(step) if step in self.made else self.source.prepare(step, model)
        batches = self.batches(step, total)
        if self.stale and step + 1 < total:
            self.made[step + 1] = self.source.prepare(step + 1, model)  # from the weights this step starts from
            self.held[step + 1] = self.source.micro_batches(step + 1)
            for b in self.held[step + 1]:
                self.submit(b)
        return made, batches

    def batches(self, step: int, total: int) -> list[Any]:
        if step in self.held:  # sent earlier
            batches = self.held.pop(step)
        else:
            batches = self.source.micro_batches(step)
            for b in batches if self.submit is not None else ():
                self.submit(b)
        if self.submit is None:
            return batches
        ahead, later = 0, step + 1
        while later < total and ahead < self.depth:
            if later not in self.held:
                self.held[later] = self.source.micro_batches(later)
                for b in self.held[later]:
                    self.submit(b)
            ahead += len(self.held[later])
            later += 1
        return batches


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
    evaluator: Callable[[Any, int], dict[str, float]] | None = None,
    source: Source | None = None,
    par: Any = None,
) -> TrainResult:
    """Train ``student`` in place on ``examples`` with the objective in ``cfg``.

    Checkpoints go to ``out_dir/checkpoints``; with ``resume`` the latest one is restored, after
    checking it was made from the same settings and data (else TrainingError, before anything is
    written). ``stop_after`` ends the run after that many optimizer steps of this call (for tests
    and on-policy rounds); the schedule still spans ``total_steps``.

    With ``cfg.eval_steps``, ``evaluator(student, step)`` (e.g. ``stratos.distill.evaluation.TaskEvaluator``)
    runs after the optimizer step at every multiple of it and at the last step; its values (``eval_``
    keys) join that step's metrics.jsonl row. Among the evaluated checkpoints the best is the highest
    ``eval_accuracy`` (ties: the earlier); with ``cfg.load_best_model_at_end`` the rotation never deletes
    it and, once the last step is done, its weights are loaded into ``student``. See :class:`TrainResult`.

    A step whose loss or gradient norm is not finite raises TrainingError before the optimizer
    steps: the weights, the checkpoints and metrics.jsonl keep only the good steps before it.

    ``par`` (``stratos.distill.parallel.Parallel``): the student across processes under torchrun; each
    rank trains its rows of every micro-batch, and only rank 0 writes.
    """
    from stratos.distill.parallel import Parallel

    par = par or Parallel()
    out_dir = Path(out_dir)
    device = device or next(student.parameters()).device
    torch.manual_seed(cfg.seed)
    algo = get_algorithm(cfg.algorithm)
    cfg = algo.configure(cfg)
    obj = objective_from(cfg)
    needs_teacher = algo.needs_teacher(cfg)
    if needs_teacher and signal is None:
        raise ValueError(f"loss {cfg.loss!r} with kd_ratio {cfg.kd_ratio} needs a teacher signal")
    bf16 = resolve_bf16(cfg.bf16, device)
    if cfg.gradient_checkpointing:
        checkpoint_layers(student)
    forward = par.wrap(student, bf16)  # before the optimizer: FSDP2 replaces the parameters with their shards
    s_head = OutputHead.from_model(student, frozen_copy=False)
    t_head = signal.head.to(device) if signal is not None and signal.head is not None and needs_teacher else None
    ctx = StepContext(student, s_head, t_head, signal if needs_teacher else None, obj, device, bf16, cfg,
                      forward=forward)

    source = source or FixedSource(examples, cfg, pad_id)
    if par.distributed:
        if not isinstance(source, FixedSource):
            raise TrainingError(f"algorithm {cfg.algorithm} samples from the student: across processes (--nproc) "
                                "only fixed data trains yet (sft, kd)")
        source.share = par.share
    total = source.total_steps
    flight = InFlight(source, ctx.signal, cfg.teacher_in_flight, stale=cfg.max_staleness > 0)
    opt = make_optimizer(student, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    ckpt_dir = out_dir / "checkpoints"
    origin = made_from(cfg, examples)
    start = 0
    evals: dict[int, float] = {}  # eval_accuracy of each evaluated checkpoint, by step: the best is chosen from it
    found = par.from_main(checkpoints(ckpt_dir) if resume and par.is_main else [])  # rank 0's disk decides
    if found:
        if par.is_main:
            check_made_from(found[-1][1], origin)
        start = load_checkpoint(found[-1][1], student, opt, sched, par)
        evals = par.from_main(read_evals(found[-1][1]) if par.is_main else None)
    evaluating = cfg.eval_steps is not None and evaluator is not None
    if cfg.eval_steps is not None and evaluator is None:
        warnings.warn("distill.eval_steps is set but train() got no evaluator: no evaluation while training "
                      "(stratos.distill.evaluation.evaluator_for makes one)", stacklevel=2)
    if par.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)  # only after the checks above: a refused run writes nothing
    metrics = Metrics(out_dir, cfg.report_to, start, cfg.model_dump()) if par.is_main else None

    student.train()
    end = total if stop_after is None else min(total, start + stop_after)
    tokens_done, t0, last, last_eval, eval_s = 0, time.perf_counter(), {}, {}, 0.0
    loss_status = eval_status = ""
    window = dict.fromkeys(BASE_TERMS, 0.0)
    with progress_bar("distilling", total=total, enabled=progress and par.is_main, status=True) as bar:
        bar.advance(start)
        for step in range(start, end):
            # The step's data (e.g. its rollouts), sent to teacher workers if there are any, with later steps'.
            made, batches = flight.step(step, total, student)
            # The step's target tokens over every rank: each rank's sums over it add up to one process's mean,
            # and DDP and FSDP2 average the ranks' gradients, hence x world.
            step_tokens = par.sum([sum(b.num_targets for b in batches)])[0]
            scale, step_loss = par.world / step_tokens, 0.0
            for i, batch in enumerate(batches):
                with par.no_sync(last=i == len(batches) - 1):
                    if batch.num_targets == 0:  # an empty share: the collectives run, nothing is learnt
                        zero = ctx.hidden(batch).sum() * 0 + sum(p.sum() * 0 for p in s_head.parameters())
                        zero.backward()
                        continue
                    terms = algo.terms(ctx, batch)
                    (terms["loss"] * scale).backward()
                for k, v in terms.items():  # loss, kd, ce, agree, and any sums of the algorithm's own
                    window[k] = window.get(k, 0.0) + float(v.detach())
                step_loss += float(terms["loss"].detach())
            step_loss = par.sum([step_loss])[0]
            window["tokens"] += step_tokens
            # The norm is always computed (an infinite max clips nothing) so that the check below has it.
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in student.parameters() if p.requires_grad], cfg.max_grad_norm or math.inf
            )
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                # Stop before the optimizer spreads NaN into the weights and moments: every
                # checkpoint and metrics row written so far holds only good steps.
                if metrics is not None:
                    metrics.close()
                raise diverged(step + 1, step_loss, grad_norm, ckpt_dir, cfg)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens_done += step_tokens
            done = step + 1
            row: dict[str, float] = dict(made or {})  # this step's metrics row: training, source and eval values
            if done % cfg.logging_steps == 0 or done == total:
                if par.distributed:  # every rank's sums (the tokens are already the step's global count)
                    keys = [k for k in window if k != "tokens"]
                    window.update(zip(keys, par.sum([window[k] for k in keys])))
                n = max(1, window["tokens"])
                elapsed = time.perf_counter() - t0
                last = {
                    "loss": window["loss"] / n,
                    "kd": window["kd"] / n,
                    "ce": window["ce"] / n,
                    "teacher_agreement": window["agree"] / n,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_done / max(1e-9, elapsed - eval_s),  # training time only
                    "elapsed_s": elapsed,  # wall time since this call started training
                    "epoch": source.epoch(done),
                    **{k: v / n for k, v in window.items() if k not in BASE_TERMS},  # e.g. grpo's kl_ref
                }
                row.update(last)
                window = dict.fromkeys(window, 0.0)
                loss_status = f"loss {last['loss']:.4f}  {last['tokens_per_s']:.0f} tok/s"
                bar.update(status=loss_status + eval_status)
            saving = done % cfg.save_steps == 0 or done == end  # also when stop_after ends this call early
            if evaluating and (done % cfg.eval_steps == 0 or done == total):
                te = time.perf_counter()
                last_eval = _evaluate(evaluator, student, done, device)
                eval_s += time.perf_counter() - te
                row.update(last_eval)
                acc = last_eval.get("eval_accuracy")
                if saving and isinstance(acc, (int, float)) and math.isfinite(acc):
                    evals[done] = float(acc)  # a candidate for the best: its checkpoint is written just below
                best_note = f", best {evals[best_of(evals)]:.3f} @ {best_of(evals)}" if evals else ""
                eval_status = f"  eval acc {acc:.3f}{best_note}" if isinstance(acc, (int, float)) else ""
                bar.update(status=loss_status + eval_status)
            if row and metrics is not None:
                metrics.log(done, row)  # one row per step, before its checkpoint (a resume keeps rows up to it)
            if saving:
                protect = best_of(evals) if cfg.load_best_model_at_end and evals else None
                full = par.full_state(student, opt) if par.distributed else None  # a collective: every rank
                if par.is_main:
                    save_checkpoint(ckpt_dir, done, student, opt, sched, cfg.save_total_limit, origin,
                                    evals=evals, protect=protect, full_state=full)
                par.barrier()  # a rank killed after this has a checkpoint to resume from, the same for all
            bar.advance(1)
    if metrics is not None:
        metrics.close()
    model_step = None
    if cfg.load_best_model_at_end and end == total:  # not when stop_after ends a call early
        model_step = load_best(ckpt_dir, student, evals, end)
    best = best_of(evals) if evals else None
    summary = {**last, **last_eval}
    if best is not None:
        summary.update(best_step=best, best_eval_accuracy=evals[best])
    if model_step is not None:
        summary["model_step"] = model_step
    return TrainResult(
        steps=end, resumed_from=start, tokens=tokens_done, seconds=time.perf_counter() - t0, last=summary,
        eval_seconds=eval_s, best_step=best, best_eval_accuracy=evals[best] if best is not None else None,
        model_step=model_step, precision="bf16" if bf16 else "fp32",
    )


def _evaluate(evaluator: Callable[[Any, int], Any], model: torch.nn.Module, step: int,
              device: torch.device) -> dict[str, float]:
    """One evaluation while training: no gradients, the RNG forked (the training steps stay those of a
    run without evaluation), the model back in train mode after; keys prefixed ``eval_`` as HF does."""
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            out = evaluator(model, step)
        finally:
            model.train()
    if not isinstance(out, Mapping):
        raise TypeError(f"the evaluator returned {type(out).__name__}, not a dict of metrics like "
                        "{'eval_accuracy': 0.5}")
    return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in out.items()}


def load_best(ckpt_dir: Path, model: torch.nn.Module, evals: dict[int, float], last_step: int) -> int:
    """Load the best evaluated checkpoint's trainable weights into ``model`` and return its step
    (``last_step``, the weights left as they are, when there is none to load, with a warning)."""
    if not evals:
        warnings.warn("load_best_model_at_end: no checkpoint was evaluated; the model is the last step's",
                      stacklevel=3)
        return last_step
    best = best_of(evals)
    left = {s: a for s, a in evals.items() if (_ckpt_path(ckpt_dir, s) / "trainable.safetensors").is_file()}
    if not left:
        warnings.warn(f"load_best_model_at_end: the best checkpoint (step {best}) and every other evaluated one "
                      f"are gone from {ckpt_dir}; the model is the last step's", stacklevel=3)
        return last_step
    pick = best_of(left)
    if pick != best:
        warnings.warn(f"load_best_model_at_end: the best checkpoint (step {best}, eval_accuracy {evals[best]:.4f}) "
                      f"is gone from {ckpt_dir} (was the run started without load_best_model_at_end?); loading the "
                      f"best one left, step {pick} ({left[pick]:.4f})", stacklevel=3)
    load_trainable(_ckpt_path(ckpt_dir, pick), model)
    return pick


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
