"""The pipeline spec: pydantic models of the YAML file.

This module is the single source of every option and its default. Stages receive the
part of the spec they need (``spec.distill``, ``spec.task`` ...) and never invent
options of their own. Every model forbids unknown keys so that a typo in a YAML file
is an error naming the field, not a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- task


class TaskSpec(_Strict):
    """What the student must learn to do, and how answers are checked."""

    name: str = Field(description="Registered task, optionally with a sub-task: 'mahjong:waits', 'arithmetic', 'jsonl'.")
    path: Path | None = Field(None, description="Data file for file-backed tasks (jsonl).")
    scorer: str = Field("exact", description="jsonl scorer: exact, normalized, regex, numeric, or 'module:function'.")
    train_size: int = Field(1000, gt=0, description="Examples in the train split.")
    eval_size: int = Field(200, gt=0, description="Examples in the held-out eval split.")
    seed: int = Field(0, description="Seed of the split; the same seed gives the same data.")
    options: dict[str, Any] = Field(default_factory=dict, description="Task-specific options.")


# --------------------------------------------------------------------------- constraints


class Constraints(_Strict):
    """Hard limits the plan must respect."""

    min_accuracy: float | None = Field(None, ge=0, le=1, description="Minimum task accuracy of the deployed student.")
    max_latency_ms: float | None = Field(None, gt=0, description="Maximum serving latency per request, in milliseconds.")
    budget_usd: float | None = Field(None, ge=0, description="Maximum total spend (API teachers, training, serving trial).")


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

    @model_validator(mode="after")
    def _check_backend(self) -> "TeacherSpec":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url")
        return self

    @property
    def label(self) -> str:
        return self.name or self.model


class StudentSpec(_Strict):
    """A candidate student. It may be a pretrained model or one built from a (shrunk) config."""

    name: str | None = None
    model: str = Field(description="HF hub id, local folder, .gguf file or alias; also the source of the tokenizer.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random' builds a fresh model from the config (after overrides)."
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Config fields to change, e.g. {num_hidden_layers: 4}; implies a new model."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False

    @property
    def label(self) -> str:
        return self.name or self.model


# --------------------------------------------------------------------------- stages


class LoraSpec(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DistillSpec(_Strict):
    """Options of the KD engine. Names follow Hugging Face TrainingArguments where one exists."""

    loss: str = Field("fkl", description="Registered divergence: fkl, rkl, jsd, skl, srkl, tvd, akl, ce, or your own.")
    loss_kwargs: dict[str, float] = Field(default_factory=dict, description="Extra loss parameters, e.g. {beta: 0.5}.")
    temperature: float = Field(1.0, gt=0)
    scale_by_temperature: bool = Field(True, description="Multiply the KD term by T^2 (Hinton et al.).")
    kd_ratio: float = Field(1.0, ge=0, le=1, description="loss = kd_ratio * KD + (1 - kd_ratio) * CE.")
    teacher_signal: Literal["online", "cached"] = Field(
        "cached", description="'cached' stores teacher hidden states on disk once and reuses them."
    )
    cache_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    chunk_size: int = Field(1024, gt=0, description="Tokens per chunk when computing logits and loss.")
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
    save_steps: int = Field(200, gt=0, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(10, gt=0)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    seed: int = 0

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from stratos.distill.losses import LOSSES

        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; registered: {', '.join(sorted(LOSSES))}")
        return v


class SynthSpec(_Strict):
    samples_per_prompt: int = Field(4, gt=0, description="Teacher samples per prompt (best-of-n / rejection sampling).")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0)
    reverse_synthesis: int = Field(0, ge=0, description="Oracle-checked reverse-synthesised examples to add.")
    knowledge_injection: bool = Field(False, description="Add the task's rules corpus and put rules in teacher prompts.")


class CompressSpec(_Strict):
    enabled: bool = False
    prune_ratio: float | None = Field(None, gt=0, lt=1, description="Fraction of parameters to remove.")
    quantize: Literal["none", "int8", "int4", "int8-dynamic"] = "none"
    recovery_steps: int = Field(0, ge=0)


class ServeSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    backend: Literal["auto", "builtin", "vllm"] = "auto"
    api_key_env: str | None = None


class EvalSpec(_Strict):
    n: int | None = Field(None, gt=0, description="Eval examples (default: the task's eval_size).")
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(64, gt=0)


class PlanSpec(_Strict):
    objective: Literal["balanced", "accuracy-first", "cost-first"] = "balanced"
    probe_size: int = Field(50, gt=0, description="Eval examples used to probe each teacher.")


# --------------------------------------------------------------------------- the spec


class Spec(_Strict):
    """A whole pipeline: task, constraints, candidate models and stage options."""

    name: str = "stratos-run"
    seed: int = 0
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


# --------------------------------------------------------------------------- loading


class SpecError(Exception):
    """A spec that cannot be used. ``problems`` holds one human-readable line per problem."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a field path in the YAML text, using PyYAML's node marks."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
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


def format_validation_error(err: ValidationError, text: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        msg = msg.removeprefix("Value error, ")
        where = _field_path(loc)
        line = _line_of(text, loc) if text else None
        lines.append(f"{'line ' + str(line) + ': ' if line else ''}{where}: {msg}")
    return lines


def parse_spec(data: dict[str, Any], *, source: str = "<spec>", text: str = "") -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, format_validation_error(err, text)) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec. Raises SpecError with one line per problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(path, [f"cannot read file: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(path, [f"{where}invalid YAML: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(data, dict):
        raise SpecError(path, ["the spec must be a mapping of keys to values"])
    spec = parse_spec(data, source=str(path), text=text)
    # Relative data paths are relative to the spec file, as a user reading the YAML expects.
    if spec.task.path is not None and not spec.task.path.is_absolute():
        spec.task.path = (path.parent / spec.task.path).resolve()
    return spec
