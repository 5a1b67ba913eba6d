"""The distillation engine: off-policy KD on a hidden-state teacher signal.

    result = distill(student, tokenizer, records, DistillSpec(loss="fkl"), "out/", teacher=teacher)

The teacher's last hidden states are either computed in the loop (``teacher_signal:
online``) or once into a disk cache (``cached``, the default) that later epochs, students
and runs reuse. The student is saved as a Hugging Face folder at ``result.model_dir``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from stratos.distill.data import Encoded, EncodeStats, collate, data_fingerprint, encode, load_records
from stratos.distill.head import OutputHead, last_hidden
from stratos.distill.kd import Objective, kd_terms
from stratos.distill.losses import LOSSES, get_loss, register_loss
from stratos.distill.signal import HiddenStateCache, OnlineTeacher, TeacherSignal, model_fingerprint
from stratos.distill.topk import TopKSignal, with_teacher_tokens
from stratos.distill.trainer import TrainResult, apply_lora, objective_from, resolve_bf16, train
from stratos.io import DataError, write_json
from stratos.spec import DistillSpec

__all__ = [
    "LOSSES",
    "DistillResult",
    "HiddenStateCache",
    "Objective",
    "OnlineTeacher",
    "OutputHead",
    "TeacherSignal",
    "TopKSignal",
    "distill",
    "encode",
    "get_loss",
    "kd_terms",
    "kl_to_teacher",
    "load_records",
    "register_loss",
    "train",
]


@dataclass
class DistillResult:
    model_dir: Path
    steps: int
    resumed_from: int
    tokens_per_second: float
    seconds: float
    final_metrics: dict[str, float]
    data: dict[str, Any]
    signal: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_dir"] = str(self.model_dir)
        return d


def check_same_vocab(student_tok: Any, teacher_tok: Any) -> None:
    """White-box KD compares distributions token by token: both sides must use one tokenizer."""
    if teacher_tok is None:
        return
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            "teacher and student tokenizers differ; logit KD needs a shared vocabulary "
            "(use text distillation, loss: ce, on teacher outputs instead)"
        )


def _teacher_signal(
    teacher: Any,
    examples: Sequence[Encoded],
    cfg: DistillSpec,
    pad_id: int,
    cache_root: Path | None,
    progress: bool,
) -> tuple[TeacherSignal, dict[str, Any]]:
    device = next(teacher.parameters()).device
    autocast = torch.bfloat16 if resolve_bf16(cfg.bf16, device) else None
    if cfg.teacher_signal == "online":
        return OnlineTeacher(teacher, autocast_dtype=autocast), {"mode": "online"}
    from stratos.models import cache_dir

    root = cache_root or cache_dir() / "teacher-signal"
    key = HiddenStateCache.key(model_fingerprint(teacher), data_fingerprint(examples), cfg.cache_dtype)
    reused = HiddenStateCache.exists(root, key)
    cache = HiddenStateCache.build(
        teacher, examples, root, key, pad_id=pad_id, dtype=cfg.cache_dtype,
        batch_size=cfg.per_device_train_batch_size, autocast_dtype=autocast, progress=progress,
    )
    info = {"mode": "cached", "path": str(cache.path), "reused": reused, **cache.meta, "bytes_on_disk": cache.bytes_on_disk}
    return cache, info


def distill(
    student: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]] | str | Path,
    cfg: DistillSpec,
    out_dir: str | Path,
    *,
    teacher: Any = None,
    teacher_tokenizer: Any = None,
    signal: TeacherSignal | None = None,
    cache_root: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> DistillResult:
    """Distil ``teacher`` (or a ready ``signal``) into ``student`` on ``records``; save the student.

    ``records`` is a list of training records or a JSONL path (see stratos.distill.data).
    With ``loss: ce`` (or ``kd_ratio: 0``) no teacher is needed: plain SFT.

    ``out_dir`` is created only once the records are encoded and checked (by ``train``), so bad
    data (a DataError naming the record) leaves nothing behind. A run that diverges, or a resume from a
    checkpoint of other settings or data, raises TrainingError (see ``train``) and saves no model.
    """
    out_dir = Path(out_dir)
    if isinstance(records, (str, Path)):
        records = load_records(records)
    check_same_vocab(tokenizer, teacher_tokenizer)
    obj = objective_from(cfg)
    topk = cfg.teacher_signal == "topk" and obj.needs_teacher and signal is None
    if topk:
        records = with_teacher_tokens(records, tokenizer)
    examples, stats = encode(records, tokenizer, cfg.max_length)
    if not examples:
        raise DataError(f"no usable training examples: {stats.summary()}")
    signal_info: dict[str, Any] = {}
    if topk:
        signal = TopKSignal.from_records(records, tokenizer, cfg.max_length)
        signal_info = {"mode": "topk", "k": signal.k, **signal.stats}
        if not signal.stats["with_topk"]:
            raise ValueError("teacher_signal 'topk' but no record carries aligned top-k log-probs (rec['topk']); "
                             "make the data with synth.top_logprobs > 0 from a teacher sharing the student's tokenizer")
    if obj.needs_teacher and signal is None:
        if teacher is None:
            raise ValueError(f"loss {cfg.loss!r} (kd_ratio {cfg.kd_ratio}) needs a teacher")
        signal, signal_info = _teacher_signal(
            teacher, examples, cfg, tokenizer.pad_token_id, Path(cache_root) if cache_root else None, progress
        )
    if cfg.lora is not None:
        student = apply_lora(student, cfg)
    t0 = time.perf_counter()
    res: TrainResult = train(
        student, examples, cfg, out_dir, pad_id=tokenizer.pad_token_id, signal=signal,
        resume=resume, progress=progress, stop_after=stop_after,
    )
    model_dir = out_dir / "model"
    save_student(student, tokenizer, model_dir)
    result = DistillResult(
        model_dir=model_dir,
        steps=res.steps,
        resumed_from=res.resumed_from,
        tokens_per_second=res.tokens_per_second,
        seconds=time.perf_counter() - t0,
        final_metrics=res.last,
        data={"records": stats.records, "kept": stats.kept, "truncated": stats.truncated, "dropped_empty": stats.dropped_empty},
        signal=signal_info,
    )
    write_json(out_dir / "result.json", result.to_dict())
    return result


def save_student(student: Any, tokenizer: Any, path: Path) -> None:
    """An ordinary HF folder with safetensors; LoRA adapters are merged so no peft is needed to load it."""
    from stratos.io import replace_dir

    model = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    tmp = path.with_name(f".tmp-{path.name}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, path)


@torch.no_grad()
def kl_to_teacher(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    max_length: int = 512,
    batch_size: int = 8,
    loss: str = "fkl",
) -> float:
    """Mean per-token divergence (forward KL by default) of the student to the teacher on the
    response tokens of ``records``, at temperature 1."""
    examples, _ = encode(records, tokenizer, max_length)
    signal = OnlineTeacher(teacher)
    s_head = OutputHead.from_model(student)
    obj = Objective(loss=loss)
    total, tokens = 0.0, 0
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        batch = collate([examples[i] for i in idx], idx, tokenizer.pad_token_id)
        h = last_hidden(student, batch.input_ids.to(device), batch.attention_mask.to(device))[:, :-1][batch.target_mask]
        terms = kd_terms(h, signal.hidden(batch), batch.targets, s_head, signal.head, obj)
        total += float(terms["kd"])
        tokens += batch.num_targets
    student.train(was_training)
    return total / max(1, tokens)
