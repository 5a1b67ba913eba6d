"""The distillation engine: off-policy KD on a hidden-state teacher signal.

    result = distill(student, tokenizer, records, DistillSpec(loss="fkl"), "out/", teacher=teacher)

The engine consumes only the signal protocol (``stratos.distill.signal``); the signals themselves
(the teacher's last hidden states computed in the loop, ``teacher_signal: online``, or once into a
disk cache, ``cached``, the default, that later epochs, students and runs reuse; an API teacher's
top-k log-probs) come from ``stratos.teachers``. The student is saved as a Hugging Face folder at
``result.model_dir``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from stratos.distill.algorithms import ALGORITHMS, get_algorithm, register_algorithm, responses_needed
from stratos.distill.data import Records, collate, encode, encode_record, load_records, teacher_prompts
from stratos.distill.head import OutputHead, last_hidden
from stratos.distill.kd import Objective, kd_terms
from stratos.distill.losses import LOSSES, get_loss, register_loss
from stratos.distill.signal import TeacherSignal
from stratos.distill.trainer import TrainResult, apply_lora, train
from stratos.io import DataError, read_jsonl, replace_dir, write_json, write_jsonl
from stratos.spec import DistillSpec

__all__ = [
    "ALGORITHMS",
    "LOSSES",
    "DistillResult",
    "Objective",
    "OutputHead",
    "TeacherSignal",
    "distill",
    "encode",
    "get_algorithm",
    "get_loss",
    "kd_terms",
    "kl_on_own_samples",
    "kl_to_teacher",
    "load_records",
    "register_algorithm",
    "register_loss",
    "run_phases",
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
    precision: str = ""  # "bf16" (autocast) or "fp32", as trained; "" in results written before it was recorded

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_dir"] = str(self.model_dir)
        return d


def _with_empty_responses(records: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """Prompt-only records (RL's data) with an empty response, so they encode like any other; the
    records keep where they came from."""
    if all("response" in r or "prompt" not in r for r in records):
        return records
    return Records((r if "response" in r or "prompt" not in r else {**r, "response": ""} for r in records),
                   getattr(records, "where", ()))


def same_vocab(student_tok: Any, teacher_tok: Any) -> bool:
    """Whether both sides use one vocabulary (plain logit KD); if not, KD goes across tokenizers
    (``stratos.distill.crosstok``)."""
    return teacher_tok is None or student_tok.get_vocab() == teacher_tok.get_vocab()


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
    evaluator: Any = None,
    task: Any = None,
) -> DistillResult:
    """Distil ``teacher`` (or a ready ``signal``) into ``student`` on ``records``; save the student.

    ``records`` is a list of training records or a JSONL path (see stratos.distill.data).
    With ``loss: ce`` (or ``kd_ratio: 0``) no teacher is needed: plain SFT.

    ``out_dir`` is created only once the records are encoded and checked (by ``train``), so bad
    data (a DataError naming the record) leaves nothing behind. A run that diverges, or a resume from a
    checkpoint of other settings or data, raises TrainingError (see ``train``) and saves no model.
    """
    from stratos.distill.parallel import Parallel

    out_dir = Path(out_dir)
    algo = get_algorithm(cfg.algorithm)
    par = Parallel.from_env(cfg, student, next(student.parameters()).device)  # one process unless under torchrun
    if par.distributed:
        _check_distributed(cfg, algo, evaluator, next(student.parameters()).device)
    if isinstance(records, (str, Path)):
        records = load_records(records, need_response=responses_needed([cfg.algorithm]))
    if algo.rewarded:  # RL samples the responses: a prompt alone is a record (its prompt tokens are what count)
        records = _with_empty_responses(records)
    cfg = algo.configure(cfg)
    needs_teacher = algo.needs_teacher(cfg)
    topk = cfg.teacher_signal == "topk" and needs_teacher and signal is None
    cross = needs_teacher and signal is None and not same_vocab(tokenizer, teacher_tokenizer)
    if cross and topk:
        raise ValueError(
            "the teacher's tokenizer is not the student's: teacher_signal topk with a white-box teacher cannot distil "
            "across tokenizers; use teacher_signal cached or online (cross-tokenizer KD on its hidden states, "
            "distill.ctkd), or sft on the teacher's text; an API teacher's top-k log-probs (no teacher tokenizer "
            "given) are aligned to the student's tokens by bytes")
    if topk:
        from stratos.teachers.topk import TopKSignal, with_teacher_tokens

        records = with_teacher_tokens(records, tokenizer)
    examples, stats = encode(records, tokenizer, cfg.max_length)
    if not examples:
        raise DataError(f"no usable training examples: {stats.summary()}")
    prompts = teacher_prompts(records, tokenizer)  # what the teacher reads in place of the student's prompts
    signal_info: dict[str, Any] = {}
    if topk:
        signal = TopKSignal.from_records(records, tokenizer, cfg.max_length)
        signal_info = {"mode": "topk", "k": signal.k, **signal.stats}
        if not signal.stats["with_topk"]:
            raise DataError("teacher_signal 'topk' but no record carries aligned top-k log-probs (rec['topk']); "
                             "make the data with synth.top_logprobs > 0 from a teacher sharing the student's tokenizer")
    made_signal = needs_teacher and signal is None
    if made_signal:
        if teacher is None:
            raise ValueError(f"loss {cfg.loss!r} (kd_ratio {cfg.kd_ratio}) needs a teacher")
        root = Path(cache_root) if cache_root else None
        if cross:
            signal, signal_info = par.in_turn(lambda: _cross_tokenizer_signal(
                teacher, tokenizer, teacher_tokenizer, records, examples, cfg, student, root, progress and par.is_main,
                sampled=algo.on_policy))
        else:  # a cache is built by rank 0 and read by the others
            signal, signal_info = par.in_turn(lambda: _same_tokenizer_signal(
                teacher, tokenizer.pad_token_id, prompts, examples, cfg, root, progress and par.is_main))
        from stratos.runtime import resolve_bf16

        head = getattr(signal, "head", None)
        if hasattr(head, "hold_in") and resolve_bf16(cfg.bf16, next(student.parameters()).device):
            # This call's own copy of the teacher's head computes under bf16 autocast only: its fp32 weights
            # would sit unused. Only a signal made here: a caller's signal (distill(signal=...)) may serve an fp32
            # training later, so its head is left as it is.
            head.hold_in(torch.bfloat16)
    if cfg.lora is not None:
        student = apply_lora(student, cfg)
    source = None
    if algo.source is not None:  # e.g. rft's rounds of student samples checked by the task's verifier
        source = algo.source(records=records, examples=examples, tokenizer=tokenizer, cfg=cfg, out_dir=out_dir,
                             task=task, pad_id=tokenizer.pad_token_id, student=student, teacher=teacher,
                             teacher_prompts=prompts)
    t0 = time.perf_counter()
    try:
        res: TrainResult = train(
            student, examples, cfg, out_dir, pad_id=tokenizer.pad_token_id, signal=signal,
            resume=resume, progress=progress, stop_after=stop_after, evaluator=evaluator, source=source, par=par,
        )
    finally:
        if made_signal and hasattr(signal, "close"):
            signal.close()  # teacher workers: stopped with the training, however it ends
    if getattr(signal, "restarts", 0):
        signal_info["worker_restarts"] = signal.restarts
    if made_signal and cross and algo.on_policy:  # what the student's samples paired, counted as they came
        counts = {k: int(v) for k, v in zip(signal.stats, par.sum(list(signal.stats.values())))}  # every rank's
        targets = counts["student_targets"]
        signal_info["ctkd"].update(sampled=counts, aligned_share=counts["aligned_targets"] / targets if targets else 0.0)
    model_dir = out_dir / "model"
    if par.distributed:
        state = par.model_state(student)  # every rank takes part; rank 0 writes
        if par.is_main:
            save_student(student, tokenizer, model_dir, state_dict=state)
        signal_info["processes"] = {"world_size": par.world, "parallel": par.mode}
    else:
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
        precision=res.precision,
    )
    if par.is_main:
        write_json(out_dir / "result.json", result.to_dict())
    par.barrier()  # the model and result are on disk before any rank goes on (a next phase loads the model)
    return result


def _check_distributed(cfg: DistillSpec, algo: Any, evaluator: Any, device: Any = None) -> None:
    """What a student across processes does not do yet, refused before any work."""
    if cfg.fsdp_cpu_offload and (cfg.parallel == "ddp" or getattr(device, "type", "cpu") != "cuda"):
        raise ValueError("distill.fsdp_cpu_offload keeps FSDP2's shards in host memory while the student computes "
                         "on GPUs: it needs parallel fsdp (or auto) and a CUDA device; this run has "
                         f"parallel {cfg.parallel} on {getattr(device, 'type', 'cpu')}")
    if algo.on_policy or algo.source is not None or algo.rewarded:
        raise ValueError(f"algorithm {cfg.algorithm}: across processes (--nproc, torchrun) only fixed data trains "
                         "yet (sft, kd); run it in one process")
    if cfg.lora is not None:
        raise ValueError("distill.lora across processes (--nproc, torchrun) is not supported yet; run it in one process")
    if cfg.eval_steps is not None and evaluator is not None:
        raise ValueError("distill.eval_steps across processes (--nproc, torchrun) is not supported yet: leave it "
                         "unset (the eval stage measures the student) or run in one process")
    if cfg.teacher_workers:
        raise ValueError("distill.teacher_workers across processes (--nproc, torchrun) is not supported yet: each "
                         "rank computes its own rows' teacher signal")


def _same_tokenizer_signal(teacher: Any, pad: int, prompts: dict[tuple[int, ...], list[int]] | None,
                           examples: Sequence[Any], cfg: DistillSpec, cache_root: Path | None,
                           progress: bool) -> tuple[Any, dict[str, Any]]:
    """The teacher's hidden-state signal on the student's tokens; with ``prompts`` (``teacher_prompts``: records
    that carry ``teacher_messages``), on the teacher's own prompts with the same responses (``PromptedSignal``:
    context distillation)."""
    from stratos.distill.signal import PromptedSignal, prompted_example
    from stratos.teachers.signal import hidden_state_signal

    if prompts is None:
        return hidden_state_signal(teacher, examples, cfg, pad, cache_root, progress)
    t_examples = [prompted_example(e, prompts) for e in examples]  # what a cache holds: the teacher's view
    inner, info = hidden_state_signal(teacher, t_examples, cfg, pad, cache_root, progress)
    changed = [(t, e) for t, e in zip(t_examples, examples) if t is not e]
    extra = sum(len(t.input_ids) - len(e.input_ids) for t, e in changed) / max(1, len(changed))
    return PromptedSignal(inner, prompts, pad), {**info, "teacher_prompts": {
        "examples": len(changed), "of": len(examples), "extra_prompt_tokens": round(extra, 1)}}


def _cross_tokenizer_signal(teacher: Any, tokenizer: Any, teacher_tokenizer: Any, records: Sequence[dict[str, Any]],
                           examples: Sequence[Any], cfg: DistillSpec, student: Any, cache_root: Path | None,
                           progress: bool, sampled: bool = False) -> tuple[Any, dict[str, Any]]:
    """The teacher's hidden-state signal over its own tokenisation of ``records``, in the student's tokens
    (``stratos.distill.crosstok``), and what the run records about it (the map's and the alignment's shares).
    ``sampled`` (on-policy algorithms): the batches hold text sampled while training, so each is paired
    when it comes (``SampledCrossSignal``, over the online teacher)."""
    from stratos.distill.crosstok import CrossTokenizerSignal, SampledCrossSignal, VocabMap, pair_records
    from stratos.teachers.signal import hidden_state_signal

    t_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else teacher_tokenizer.eos_token_id
    if sampled:  # nothing to pair ahead: the online teacher alone
        inner, info = hidden_state_signal(teacher, [], cfg, t_pad, cache_root, progress)
    else:
        paired = pair_records(records, tokenizer, teacher_tokenizer, cfg.max_length, cfg.ctkd.max_chain)
        if [e.input_ids for e in paired.student] != [e.input_ids for e in examples]:
            raise AssertionError("cross-tokenizer pairing encoded the records unlike encode()")  # a bug, not bad data
        inner, info = hidden_state_signal(teacher, paired.teacher, cfg, t_pad, cache_root, progress)
    vmap = VocabMap.build(tokenizer, teacher_tokenizer, student_rows=student.get_output_embeddings().weight.shape[0],
                          teacher_rows=inner.head.vocab_size, mapping=cfg.ctkd.map)
    if sampled:
        kept = [r for r in records if encode_record(r, tokenizer, cfg.max_length)[0].num_targets]  # as encode keeps
        signal = SampledCrossSignal(inner, kept, tokenizer, teacher_tokenizer, vmap, teacher_pad_id=t_pad,
                                    method=cfg.ctkd.method, uld_weight=cfg.ctkd.uld_weight,
                                    max_chain=cfg.ctkd.max_chain)
        return signal, {**info, "ctkd": {"method": cfg.ctkd.method, "max_chain": cfg.ctkd.max_chain,
                                         "paired": "per batch, as sampled", **vmap.stats}}
    signal = CrossTokenizerSignal(inner, paired, vmap, teacher_pad_id=t_pad, method=cfg.ctkd.method,
                                  uld_weight=cfg.ctkd.uld_weight)
    return signal, {**info, "ctkd": {"method": cfg.ctkd.method, "max_chain": cfg.ctkd.max_chain, **vmap.stats,
                                     **paired.stats}}


def run_phases(
    student: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]] | str | Path,
    settings: Any,
    out_dir: str | Path,
    *,
    teacher: Any = None,
    teacher_tokenizer: Any = None,
    resume: bool = True,
    progress: bool = True,
    evaluator: Any = None,
    task: Any = None,
) -> DistillResult:
    """Train the phases of ``settings`` (``stratos.distill.recipe.Settings``) one after the other.

    One phase trains in ``out_dir`` itself, exactly as ``distill``. Several train in
    ``out_dir/phase-N-ALGORITHM/``: each starts from the model the phase before it saved (read back
    from its folder, so a resumed run continues from the same weights as an uninterrupted one), a
    finished phase is skipped on a rerun, an interrupted one resumes from its checkpoint. The last
    phase's model is also saved as ``out_dir/model``; ``out_dir/metrics.jsonl`` holds every phase's
    rows, steps counted across phases, each tagged with its phase."""
    out_dir = Path(out_dir)
    phases = settings.phases
    if isinstance(records, (str, Path)):
        records = load_records(records, need_response=responses_needed(p.algorithm for p in settings.phases))

    def run(phase: Any, model: Any, where: Path) -> DistillResult:
        return distill(model, tokenizer, records, phase.spec, where, teacher=teacher if phase.needs_teacher else None,
                       teacher_tokenizer=teacher_tokenizer if phase.needs_teacher else None, resume=resume,
                       progress=progress, evaluator=evaluator, task=task)

    if len(phases) == 1:
        result = run(phases[0], student, out_dir)
        write_json(out_dir / "result.json", result.to_dict() | {"settings": settings.to_dict()})
        return result
    from stratos.models import load

    results: list[DistillResult] = []
    model = student
    for i, phase in enumerate(phases):
        where = out_dir / f"phase-{i + 1}-{phase.algorithm}"
        done = where / "result.json"
        if resume and done.is_file() and (where / "model").is_dir():
            results.append(DistillResult(**{**json.loads(done.read_text()), "model_dir": where / "model"}))
        else:
            results.append(run(phase, model, where))
        if i + 1 < len(phases):  # the next phase starts from exactly what this one saved
            model = load(where / "model", with_tokenizer=False)
    last = results[-1]
    tmp = out_dir / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last.model_dir, tmp)
    replace_dir(tmp, out_dir / "model")
    rows, offset = [], 0
    for i, (phase, res) in enumerate(zip(phases, results)):
        path = out_dir / f"phase-{i + 1}-{phase.algorithm}" / "metrics.jsonl"
        for row in read_jsonl(path) if path.is_file() else []:
            rows.append({**row, "step": row["step"] + offset, "phase": i + 1, "algorithm": phase.algorithm})
        offset += res.steps
    write_jsonl(out_dir / "metrics.jsonl", rows)
    # Steps in the last phase's metrics count from its start; across phases they follow the others.
    before_last = offset - last.steps
    final = {k: (v + before_last if k in ("best_step", "model_step") and isinstance(v, int) else v)
             for k, v in last.final_metrics.items()}
    result = DistillResult(
        model_dir=out_dir / "model", steps=offset, resumed_from=results[-1].resumed_from,
        tokens_per_second=sum(r.tokens_per_second * r.seconds for r in results) / max(1e-9, sum(r.seconds for r in results)),
        seconds=sum(r.seconds for r in results), final_metrics=final, data=last.data,
        signal=next((r.signal for r in results if r.signal), {}),
        precision="+".join(dict.fromkeys(r.precision for r in results if r.precision)),
    )
    write_json(out_dir / "result.json", result.to_dict() | {"settings": settings.to_dict(),
                                                            "phases": [r.to_dict() for r in results]})
    return result


BASELINE_DIR = "sft-baseline"


def train_sft_baseline(new_student: Any, tokenizer: Any, records: Sequence[dict[str, Any]], settings: Any,
                       out_dir: str | Path, **kw: Any) -> DistillResult | None:
    """``distill.sft_baseline``: the student of ``new_student()`` (built as the distilled one was, same seed)
    trained in ``out_dir/sft-baseline`` with every phase that learns from the teacher made SFT
    (``recipe.sft_baseline``), on the same records and schedule. None when no phase uses the teacher:
    then the student is its own SFT baseline. ``kw``: ``run_phases``' options."""
    from stratos.distill.recipe import sft_baseline

    if settings.signal == "none":
        return None
    return run_phases(new_student(), tokenizer, records, sft_baseline(settings), Path(out_dir) / BASELINE_DIR, **kw)


def save_student(student: Any, tokenizer: Any, path: Path, state_dict: dict[str, Any] | None = None) -> None:
    """An ordinary HF folder with safetensors; LoRA adapters are merged so no peft is needed to load it.
    ``state_dict``: the weights to write instead of the model's own (a distributed student's, gathered)."""
    from stratos.io import replace_dir

    model = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    tmp = path.with_name(f".tmp-{path.name}")
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
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
    response tokens of ``records``, at temperature 1. Where records carry ``teacher_messages`` the teacher
    reads those (as it taught: context distillation), the student its own prompt."""
    examples, _ = encode(records, tokenizer, max_length)
    return _mean_divergence(student, teacher, examples, tokenizer.pad_token_id, loss, batch_size,
                            teacher_prompts(records, tokenizer))


@torch.no_grad()
def kl_on_own_samples(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    loss: str = "rkl",
) -> float:
    """Mean per-token divergence (reverse KL by default) of the student to the teacher on completions
    the student samples itself for the prompts of ``records``: the quantity on-policy KD lowers, measured
    where the student really goes rather than on the data's responses (``kl_to_teacher``); the teacher reads
    the records' ``teacher_messages`` where they have them."""
    from stratos.distill.data import IGNORE, Encoded
    from stratos.distill.sources import prompt_ids
    from stratos.models.generate import _eos_ids, sample_ids

    prompts = [prompt_ids(r, tokenizer) for r in records]
    eos, pad = _eos_ids(student, tokenizer), tokenizer.pad_token_id
    examples = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        outs = sample_ids(student, chunk, max_new_tokens=max_new_tokens, temperature=temperature, pad_id=pad,
                          eos_ids=eos, seed=seed * 1_000_003 + start)
        examples += [Encoded(p + c, [IGNORE] * len(p) + c) for p, c in zip(chunk, outs)]
    return _mean_divergence(student, teacher, examples, pad, loss, batch_size, teacher_prompts(records, tokenizer))


def _mean_divergence(student: Any, teacher: Any, examples: Sequence[Any], pad_id: int, loss: str,
                     batch_size: int, prompts: dict[tuple[int, ...], list[int]] | None = None) -> float:
    """The registered divergence ``loss`` of the student to the teacher, per target token of ``examples``;
    with ``prompts`` (``teacher_prompts``) the teacher reads its own prompts."""
    from stratos.distill.signal import PromptedSignal
    from stratos.teachers.signal import OnlineTeacher

    signal: Any = OnlineTeacher(teacher)
    if prompts:
        signal = PromptedSignal(signal, prompts, pad_id)
    s_head, obj = OutputHead.from_model(student), Objective(loss=loss)
    total, tokens = 0.0, 0
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        batch = collate([examples[i] for i in idx], idx, pad_id)
        h = last_hidden(student, batch.input_ids.to(device), batch.attention_mask.to(device))[:, :-1][batch.target_mask]
        terms = kd_terms(h, signal.hidden(batch).to(device), batch.targets.to(device), s_head, signal.head, obj)
        total += float(terms["kd"])
        tokens += batch.num_targets
    student.train(was_training)
    return total / max(1, tokens)
