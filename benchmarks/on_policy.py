"""On-policy training against TRL, back to back: on-policy KD throughput (gkd) and GRPO (grpo).

Each side runs in its own subprocess (peak memory, max RSS, is its own), with ``--threads`` torch
threads, fp32 unless ``--bf16 1`` (bf16 autocast on every side), learning rate constant, no warm-up
of the schedule, gradient clipping at 1, AdamW, one optimizer step per batch of rollouts.

``--mode gkd``: on-policy distillation throughput. The teacher is SmolLM2-135M-Instruct, the student
its 8 evenly spaced layers; the same prompts (``--prompt-tokens`` single-token words after "Explain:",
in the chat template), batch ``--batch-size``, fully on-policy (the student samples every row at
temperature 1 from the full distribution) and trained on the reverse KL to the teacher over the
full vocabulary. Sides:

  stratos           ``algorithm: gkd, lmbda: 1, loss: rkl, kd_ratio: 1, temperature: 1`` (teacher online)
  trl-gkd           ``trl.experimental.gkd.GKDTrainer``: GKDConfig(lmbda=1, beta=1 (reverse KL in the
                    generalised JSD), temperature=1, max_new_tokens=N, seq_kd=False)
  trl-distillation  ``trl.DistillationTrainer``: DistillationConfig(beta=1 (reverse KL), temperature=1,
                    top_k=0, top_p=1, max_completion_length=N)

``--device cuda`` trains every side on the GPU and reports torch's peak CUDA allocation instead of
RSS; ``--random-init DIR`` builds teacher and student from DIR's config and tokenizer (SmolLM2's) with
seeded random weights, for a machine without the trained weights: with EOS ignored the work is the same.

Every row gets exactly ``--new-tokens`` N new tokens, EOS ignored, so the work is equal: Stratos'
sampler is called with ``ignore_eos`` (``stratos.models.generate.sample_ids`` wrapped in the child
process; on the CPU it decodes through ``decode_layout``, its default, unless ``STRATOS_DECODE_LAYOUT=0``
is in the environment, which the children inherit), TRL's ``generate`` gets ``min_new_tokens=N``; each
child checks that every completion it trained on had N tokens and fails otherwise. Throughput is completion tokens trained per second of
whole optimizer steps (generation, teacher, student forward and backward, optimizer), the
``--warmup`` first steps excluded; generation time is Stratos' ``rollout_s`` and, for TRL, the
student's ``generate`` calls timed. Peak RSS is read at the end of the last step (before any save).
``--memory-trace 1`` also prints each side's RSS and peak RSS before and after every rollout and optimizer
step, which shows where a step's memory goes.

``--mode grpo``: GRPO, samples/s and reward over ``--seeds`` seeds. Stratos ``algorithm: grpo``
against ``trl.GRPOTrainer``, the same model (``--model student``: the 8-layer student above;
``teacher``: the whole SmolLM2-135M-Instruct; ``tiny``: a tiny random Llama, for a smoke run;
``sft-tiny``: a 4-layer Llama SFT'd first, made once before the sides run), the same reward
function (``reward_fn`` below: 1 when the completion's first number is a+b, 0.2 for a wrong number,
0 for none), the same arithmetic prompts (``--task sums``: distinct sums, each seen once per run;
``--task digits``: the 100 one-digit sums, back every 100 prompts, where ``sft-tiny`` starts from
two answer forms, one of which the reward counts wrong, so that it has something to teach; the order is each
side's own seeded shuffle), ``--prompts-per-step`` prompts x ``--num-generations`` completions per
step of at most ``--max-completion-length`` tokens (ending at EOS), temperature 1 over the full
vocabulary, beta 0, epsilon 0.2, loss_type grpo, group-scaled advantages, one iteration, one
generation per optimizer step. Reported per side: samples/s (completions per second of whole
steps, the ``--warmup`` first excluded), generation's share of that time, the mean completion
length, and the mean reward over the first and the last 20% of steps (as mean +- standard error over
seeds; the last also per seed).

    python benchmarks/on_policy.py --mode gkd --new-tokens 128
    python benchmarks/on_policy.py --mode gkd --new-tokens 128 --rounds 3   # 3 rounds, sides in rotating order
    python benchmarks/on_policy.py --mode gkd --new-tokens 512 --steps 3 --warmup 1
    python benchmarks/on_policy.py --mode gkd --device cuda --bf16 1 --random-init DIR   # on a GPU, no weights
    python benchmarks/on_policy.py --mode grpo --steps 20 --seeds 3
    python benchmarks/on_policy.py --mode grpo --model sft-tiny --task digits --steps 60 --lr 1e-4 \
        --num-generations 8 --max-completion-length 8
    python benchmarks/on_policy.py --mode grpo --model tiny --steps 3 --seeds 1    # smoke

Prints the command lines, markdown tables, and a final JSON line with everything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEACHER = "smollm2-135m-instruct"
STUDENT_LAYERS = 8
HERE = Path(__file__).resolve()
GKD_SIDES = ("stratos", "trl-gkd", "trl-distillation")
GRPO_SIDES = ("stratos", "trl")


# --------------------------------------------------------------------------- the shared task


def reward_fn(prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion's first integer equals the answer, 0.2 for another number, 0.0 for none.

    Called TRL-style by both sides: Stratos passes completions as strings, TRL (conversational
    prompts) as ``[{"role": "assistant", "content": ...}]``."""
    out = []
    for c, a in zip(completions, answer):
        text = c if isinstance(c, str) else c[-1]["content"]
        m = re.search(r"-?\d+", text)
        out.append(0.0 if m is None else 1.0 if int(m.group()) == int(a) else 0.2)
    return out


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    """n distinct 'What is a+b?' prompts with their answers (the same set for every side and seed)."""
    import random

    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append({"prompt": f"What is {a}+{b}? Answer with the number only.", "answer": str(a + b)})
    return out


def digit_facts_records(n: int, seed: int = 0) -> list[dict]:
    """``--task digits``: the 100 one-digit sums a+b (a, b in 0..9), in seeded shuffled passes, n prompts
    in all (the same list for every side and seed; each fact comes back every 100 prompts)."""
    import random

    rng, facts, out = random.Random(seed), [(a, b) for a in range(10) for b in range(10)], []
    while len(out) < n:
        rng.shuffle(facts)
        out += [{"prompt": f"What is {a}+{b}? Answer with the number only.", "answer": str(a + b)} for a, b in facts]
    return out[:n]


def task_records(args: argparse.Namespace, n: int) -> list[dict]:
    """The GRPO prompts of ``--task``: distinct sums up to 50+50 (``sums``) or the one-digit facts (``digits``)."""
    return digit_facts_records(n) if args.task == "digits" else arithmetic_records(n)


def kd_prompts(tok: Any, n: int, prompt_tokens: int, seed: int = 0) -> list[str]:
    """User messages of exactly ``prompt_tokens`` tokens ("Explain:" and single-token words), like
    kd_throughput.py's, so every row of every side has the same prompt length."""
    import random

    words = ["the", "tile", "hand", "wait", "pair", "meld", "discard", "ready", "winning", "suit", "honor", "dragon",
             "wind", "number", "sequence"]
    words = [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    head = len(tok("Explain:", add_special_tokens=False)["input_ids"])
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = "Explain:" + "".join(" " + rng.choice(words) for _ in range(max(1, prompt_tokens - head)))
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == max(prompt_tokens, head + 1), text
        out.append(text)
    return out


# --------------------------------------------------------------------------- child helpers


def _setup(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _peak_mb() -> float:
    """The process's peak memory so far: on a GPU (``--device cuda``), the CUDA memory torch allocated
    (MB), else the peak RSS (MB)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trace_memory(events: list[dict]) -> None:
    """Append the process's RSS and peak RSS (MB, from /proc/self/status) to ``events`` before and after every
    optimizer step (any torch optimizer: every side's) and around every rollout (Stratos' sampler; TRL's
    ``generate``): where a step's memory goes (``--memory-trace``)."""
    import re

    import torch.optim.optimizer as optim
    import transformers

    import stratos.models.generate as gen

    def mark(event: str) -> None:
        status = Path("/proc/self/status").read_text()
        rss, hwm = (int(re.search(k + r":\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM"))
        events.append({"event": event, "rss_mb": round(rss), "peak_mb": round(hwm)})

    def around(fn: Any, name: str) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            mark(f"before {name}")
            out = fn(*a, **kw)
            mark(f"after {name}")
            return out
        return wrapped

    mark("start (libraries imported, no model yet)")
    gen.sample_ids = around(gen.sample_ids, "rollout")
    transformers.GenerationMixin.generate = around(transformers.GenerationMixin.generate, "rollout")
    optim.register_optimizer_step_pre_hook(lambda *_: mark("before optimizer step"))
    optim.register_optimizer_step_post_hook(lambda *_: mark("after optimizer step"))


def _random_model(folder: str, layers: int | None, seed: int):
    """SmolLM2's architecture from ``folder``'s config.json with seeded random weights (``--random-init``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_pair(args: argparse.Namespace):
    """The gkd teacher (SmolLM2-135M-Instruct) and its ``--student-layers`` student on ``--device``; with
    ``--random-init DIR``, both with random weights and DIR's config and tokenizer."""
    from stratos.models import load

    layers = args.student_layers
    if args.random_init:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.random_init)
        teacher, student = _random_model(args.random_init, None, 0), _random_model(args.random_init, layers, 1)
    else:
        teacher, tok = load(TEACHER)
        student, _ = load(TEACHER, config_overrides={"num_hidden_layers": layers})
    return teacher.to(args.device), student.to(args.device), tok


def load_policy(args: argparse.Namespace):
    """The GRPO policy: the same weights on both sides (built deterministically in each child)."""
    from stratos.models import load

    if args.model == "tiny":
        from stratos.models.tiny import build_tokenizer, tiny_llama

        tok = build_tokenizer([r["prompt"] + " " + r["answer"] for r in arithmetic_records(200)], vocab_size=512)
        return tiny_llama(tok, hidden_size=64, num_hidden_layers=2, seed=0), tok
    if args.model == "sft-tiny":
        return load(args.start)
    if args.model == "teacher":
        return load(TEACHER)
    return load(TEACHER, config_overrides={"num_hidden_layers": args.student_layers})


def sft_start_records(args: argparse.Namespace) -> list[dict]:
    """The SFT data of ``--model sft-tiny``'s start.

    ``--task sums``: 500 sums that are not among the GRPO prompts (right answers), so that the policy
    answers with a number and is sometimes right. ``--task digits``: each of the 100 one-digit facts
    twice, answered ``s`` and ``a+b=s``. Both are right, but ``reward_fn`` reads the first number, so the
    second form scores as a wrong number: the policy samples the paid form about half the time, and the
    reward has one thing to teach it: which form to keep."""
    if args.task == "digits":
        out = []
        for r in digit_facts_records(100):
            sum_form = r["prompt"].removeprefix("What is ").split("?")[0] + "=" + r["answer"]
            out += [{"prompt": r["prompt"], "response": r["answer"]}, {"prompt": r["prompt"], "response": sum_form}]
        return out
    grpo = {r["prompt"] for r in arithmetic_records(args.prompts_per_step * args.steps)}
    sft = [{"prompt": r["prompt"], "response": r["answer"]} for r in arithmetic_records(50 * 50, seed=1)
           if r["prompt"] not in grpo][:500]
    if len(sft) < 500:
        raise SystemExit(f"--model sft-tiny: {args.prompts_per_step} x {args.steps} GRPO prompts leave "
                         f"{len(sft)} of the 2,500 sums for its SFT start (500 needed)")
    return sft


def build_sft_start(args: argparse.Namespace, path: Path) -> None:
    """``--model sft-tiny``'s policy, made once before the sides run: a 4-layer, 128-wide Llama with the
    ``tiny`` tokenizer, SFT'd by Stratos for 1,500 steps on ``sft_start_records`` (a weak start that GRPO
    can lift)."""
    from stratos.distill import distill
    from stratos.models.tiny import build_tokenizer, save_model, tiny_llama
    from stratos.spec import DistillSpec

    tok = build_tokenizer([r["prompt"] + " " + r["answer"] for r in arithmetic_records(200)], vocab_size=512)
    sft = sft_start_records(args)
    model = tiny_llama(tok, hidden_size=128, num_hidden_layers=4, seed=0)
    distill(model, tok, sft, DistillSpec(algorithm="sft", max_steps=1500, per_device_train_batch_size=16,
                                         learning_rate=3e-3, warmup_ratio=0.0, report_to=[], bf16=False,
                                         save_steps=10_000, seed=0), path / "sft", progress=False)
    save_model(model, tok, path / "model")


def _first_eos_lengths(new: Any, eos: list[int]) -> list[int]:
    """Per row, the generated tokens a trainer keeps: up to and including the first EOS."""
    out = []
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        out.append(len(row) if end is None else end + 1)
    return out


class GenerateTimer:
    """Wraps ``model.generate`` (an instance attribute): the seconds of each call, the trainer's step at
    the call, the prompt lengths and the kept completion lengths (to the first EOS) of every row."""

    def __init__(self, model: Any, eos: list[int], step: Any):
        self.calls: list[dict] = []
        self._orig, self._eos, self._step = model.generate, eos, step
        model.generate = self

    def __call__(self, *a: Any, **kw: Any) -> Any:
        ids = kw["input_ids"] if "input_ids" in kw else a[0]
        mask = kw.get("attention_mask")
        t0 = time.perf_counter()
        out = self._orig(*a, **kw)
        dt = time.perf_counter() - t0
        seqs = out.sequences if hasattr(out, "sequences") else out
        prompt = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * len(ids)
        self.calls.append({"step": self._step(), "seconds": dt, "prompt_tokens": prompt,
                           "completion_tokens": _first_eos_lengths(seqs[:, ids.shape[1]:], self._eos)})
        return out


def _clock(times: list[float], rss: list[float]):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter())
            rss.append(_peak_mb())

    return Clock()


def _trl_common(args: argparse.Namespace, workdir: Path, seed: int) -> dict:
    """TrainingArguments every TRL side shares."""
    return {"output_dir": str(workdir / "trl"), "learning_rate": args.lr, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "gradient_accumulation_steps": 1,
            "logging_steps": 1, "save_strategy": "no", "report_to": [], "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "gradient_checkpointing_kwargs": {"use_reentrant": False}, "use_cpu": args.device == "cpu",
            "dataloader_num_workers": 0, "seed": seed,
            "disable_tqdm": True}


def _trl_window(times: list[float], t_start: float, warmup: int) -> float:
    start = times[warmup - 1] if warmup else t_start
    return times[-1] - start


def _stratos_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _stratos_window(rows: list[dict], warmup: int) -> float:
    return rows[-1]["elapsed_s"] - (rows[warmup - 1]["elapsed_s"] if warmup else 0.0)


def _step_seconds(rows: list[dict]) -> list[float]:
    ends = [0.0] + [r["elapsed_s"] for r in rows]
    return [b - a for a, b in itertools.pairwise(ends)]


def _patch_rss_at_save(rss: list[float]) -> None:
    """Record the peak RSS when the trainer first checkpoints (after the last step): before the save."""
    from stratos.distill import trainer

    orig = trainer.save_checkpoint

    def save_checkpoint(*a: Any, **kw: Any) -> Any:
        if not rss:
            rss.append(_peak_mb())
        return orig(*a, **kw)

    trainer.save_checkpoint = save_checkpoint


def _fail(msg: str) -> None:
    raise SystemExit(f"EQUAL-WORK CHECK FAILED: {msg}")


# --------------------------------------------------------------------------- gkd sides


def _wrap_sample_ids(ignore_eos: bool) -> list[list[int]]:
    """Wrap Stratos' rollout sampler (the sources import it from its module inside their prepare(), so
    replacing the module attribute reaches them): record each call's prompt lengths and, with
    ``ignore_eos``, make every rollout run to max_new_tokens. Returns the list the calls append to."""
    import stratos.models.generate as gen

    orig, sampled = gen.sample_ids, []

    def sample_ids(*a: Any, **kw: Any) -> list[list[int]]:
        if ignore_eos:
            kw["ignore_eos"] = True
        sampled.append([len(p) for p in (kw["prompts"] if "prompts" in kw else a[1])])
        return orig(*a, **kw)

    gen.sample_ids = sample_ids
    return sampled


def gkd_stratos(args: argparse.Namespace, workdir: Path) -> dict:
    from stratos.distill import distill
    from stratos.spec import DistillSpec

    sampled = _wrap_sample_ids(ignore_eos=True)
    rss: list[float] = []
    _patch_rss_at_save(rss)

    teacher, student, tok = load_pair(args)
    n_steps, b, n = args.warmup + args.steps, args.batch_size, args.new_tokens
    records = [{"prompt": p, "response": "ok"} for p in kd_prompts(tok, b * n_steps, args.prompt_tokens)]
    cfg = DistillSpec(
        algorithm="gkd", lmbda=1.0, loss="rkl", kd_ratio=1.0, temperature=1.0, seq_kd=False, teacher_signal="online",
        max_completion_length=n, per_device_train_batch_size=b, gradient_accumulation_steps=1, max_steps=n_steps,
        learning_rate=args.lr, warmup_ratio=0.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        save_steps=10_000, logging_steps=1, report_to=[], bf16=bool(args.bf16), seed=0,
        gradient_checkpointing=bool(args.gradient_checkpointing),
    )
    distill(student, tok, records, cfg, workdir / "run", teacher=teacher, cache_root=workdir / "cache", progress=False)
    rows = _stratos_rows(workdir / "run")
    if len(rows) != n_steps or len(sampled) != n_steps:
        _fail(f"stratos: {len(rows)} metrics rows and {len(sampled)} rollouts for {n_steps} steps")
    bad = [r["step"] for r in rows if r.get("rollout_tokens") != b * n or r.get("on_policy_fraction") != 1.0]
    if bad:
        _fail(f"stratos: steps {bad} did not train {b} rows x {n} sampled tokens")
    timed = rows[args.warmup:]
    seconds = _stratos_window(rows, args.warmup)
    return {"seconds": seconds, "tokens": b * n * args.steps, "steps": len(timed),
            "generation_s": sum(r["rollout_s"] for r in timed),
            "step_s": _step_seconds(rows)[args.warmup:],
            "prompt_tokens": statistics.mean(x for s in sampled[args.warmup:] for x in s),
            "peak_rss_mb": rss[0] if rss else _peak_mb()}


def gkd_trl(args: argparse.Namespace, workdir: Path, kind: str) -> dict:
    from datasets import Dataset

    from stratos.models.generate import _eos_ids

    teacher, student, tok = load_pair(args)
    n_steps, b, n = args.warmup + args.steps, args.batch_size, args.new_tokens
    prompts = kd_prompts(tok, b * n_steps, args.prompt_tokens)
    times: list[float] = []
    rss: list[float] = []
    common = {**_trl_common(args, workdir, 0), "per_device_train_batch_size": b, "max_steps": n_steps}
    if kind == "trl-gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        # The dataset's response is never trained on (lmbda 1), but transformers normalises GKD's summed loss
        # by its token count (num_items_in_batch, counted before the rollouts replace it): about N tokens
        # keep that a per-token mean, as on the other sides.
        filler = " ".join(["the"] * max(1, n - 2))
        ds = Dataset.from_list([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": filler}]}
                                for p in prompts])
        extra = {"lmbda": 1.0, "beta": 1.0, "temperature": 1.0, "max_new_tokens": n, "seq_kd": False,
                 "disable_dropout": True}
        cfg = GKDConfig(**extra, **common)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                             callbacks=[_clock(times, rss)])
        trainer.generation_config.min_new_tokens = n  # EOS suppressed until N tokens: every row runs to N
        trainer.generation_kwargs["min_new_tokens"] = n
        config = {"GKDConfig": {**extra, **common}, "generation_config": trainer.generation_config.to_diff_dict()}
    else:
        from trl import DistillationConfig, DistillationTrainer

        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
        extra = {"beta": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_completion_length": n,
                 "generation_kwargs": {"min_new_tokens": n}, "disable_dropout": True, "use_vllm": False}
        cfg = DistillationConfig(**extra, **common)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                                      processing_class=tok, callbacks=[_clock(times, rss)])
        config = {"DistillationConfig": {**extra, **common},
                  "generation_config": trainer.generation_config.to_diff_dict()}
    timer = GenerateTimer(trainer.model, _eos_ids(trainer.model, tok), lambda: trainer.state.global_step)
    t_start = time.perf_counter()
    trainer.train()
    if len(times) != n_steps or len(timer.calls) != n_steps:
        _fail(f"{kind}: {len(times)} steps and {len(timer.calls)} generate calls for {n_steps} steps")
    for c in timer.calls:
        if c["completion_tokens"] != [n] * b:
            _fail(f"{kind}: step {c['step']} completions kept {c['completion_tokens']} tokens, not {b} x {n}")
    timed = [c for c in timer.calls if c["step"] >= args.warmup]
    starts = [times[args.warmup - 1] if args.warmup else t_start] + times[args.warmup:-1]
    return {"seconds": _trl_window(times, t_start, args.warmup), "tokens": b * n * args.steps, "steps": len(timed),
            "generation_s": sum(c["seconds"] for c in timed),
            "step_s": [e - s for s, e in zip(starts, times[args.warmup:])],
            "prompt_tokens": statistics.mean(x for c in timed for x in c["prompt_tokens"]),
            "peak_rss_mb": rss[-1], "config": config}


# --------------------------------------------------------------------------- grpo sides


def _last_share(values: list[float]) -> float:
    k = max(1, math.ceil(0.2 * len(values)))
    return statistics.mean(values[-k:])


def _first_share(values: list[float]) -> float:
    return _last_share(values[::-1])


def grpo_stratos(args: argparse.Namespace, workdir: Path) -> dict:
    from stratos.distill import distill
    from stratos.spec import DistillSpec

    sampled = _wrap_sample_ids(ignore_eos=False)
    rss: list[float] = []
    _patch_rss_at_save(rss)
    model, tok = load_policy(args)
    p, g = args.prompts_per_step, args.num_generations
    # distill() encodes every record (prompt and response) before the source takes over; grpo uses the prompts
    # and the columns only, so the response is an empty placeholder.
    records = [{**r, "response": ""} for r in task_records(args, p * args.steps)]
    cfg = DistillSpec(
        algorithm="grpo", reward_funcs=[f"{HERE}:reward_fn"], num_generations=g,
        max_completion_length=args.max_completion_length, beta=0.0, epsilon=0.2, loss_type="grpo",
        scale_rewards=True, num_iterations=1, temperature=1.0, per_device_train_batch_size=p * g,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, warmup_ratio=0.0,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, save_steps=10_000, logging_steps=1,
        report_to=[], bf16=bool(args.bf16), seed=args.seed, gradient_checkpointing=bool(args.gradient_checkpointing),
    )
    distill(model, tok, records, cfg, workdir / "run", progress=False)
    rows = _stratos_rows(workdir / "run")
    if len(rows) != args.steps or len(sampled) != args.steps or any(len(s) != p * g for s in sampled):
        _fail(f"stratos: {len(rows)} metrics rows and {len(sampled)} rollouts for {args.steps} steps of {p} x {g}")
    timed = rows[args.warmup:]
    rewards = [r["reward"] for r in rows]
    return {"seconds": _stratos_window(rows, args.warmup), "samples": p * g * len(timed), "steps": len(timed),
            "generation_s": sum(r["rollout_s"] for r in timed), "rewards": rewards,
            "reward_first20": _first_share(rewards), "reward_last20": _last_share(rewards),
            "completion_tokens": statistics.mean(r["rollout_tokens"] / (p * g) for r in rows),
            "prompt_tokens": statistics.mean(x for s in sampled for x in s),
            "peak_rss_mb": rss[0] if rss else _peak_mb()}


def grpo_trl(args: argparse.Namespace, workdir: Path) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from stratos.models.generate import _eos_ids

    model, tok = load_policy(args)
    p, g = args.prompts_per_step, args.num_generations
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                            for r in task_records(args, p * args.steps)])
    times: list[float] = []
    rss: list[float] = []
    extra = {"num_generations": g, "max_completion_length": args.max_completion_length, "beta": 0.0, "epsilon": 0.2,
             "loss_type": "grpo", "scale_rewards": "group", "num_iterations": 1, "steps_per_generation": 1,
             "temperature": 1.0, "top_k": 0, "top_p": 1.0, "mask_truncated_completions": False,
             "disable_dropout": True, "use_vllm": False, "per_device_train_batch_size": p * g,
             "max_steps": args.steps}
    cfg = GRPOConfig(**extra, **_trl_common(args, workdir, args.seed))
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn], args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[_clock(times, rss)])
    timer = GenerateTimer(trainer.model, _eos_ids(trainer.model, tok), lambda: trainer.state.global_step)
    t_start = time.perf_counter()
    trainer.train()
    if len(times) != args.steps or len(timer.calls) != args.steps:
        _fail(f"trl: {len(times)} steps and {len(timer.calls)} generate calls for {args.steps} steps")
    if any(len(c["completion_tokens"]) != p * g for c in timer.calls):
        _fail(f"trl: a generation did not sample {p} x {g} completions")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if len(rewards) != args.steps:
        _fail(f"trl: {len(rewards)} logged rewards for {args.steps} steps")
    timed = [c for c in timer.calls if c["step"] >= args.warmup]
    return {"seconds": _trl_window(times, t_start, args.warmup), "samples": p * g * len(timed), "steps": len(timed),
            "generation_s": sum(c["seconds"] for c in timed), "rewards": rewards,
            "reward_first20": _first_share(rewards), "reward_last20": _last_share(rewards),
            "completion_tokens": statistics.mean(x for c in timer.calls for x in c["completion_tokens"]),
            "prompt_tokens": statistics.mean(x for c in timer.calls for x in c["prompt_tokens"]),
            "peak_rss_mb": rss[-1],
            "config": {"GRPOConfig": {**extra, **_trl_common(args, workdir, args.seed)},
                       "effective": {k: getattr(trainer.args, k) for k in (
                           "generation_batch_size", "steps_per_generation", "num_iterations", "loss_type",
                           "scale_rewards", "epsilon", "epsilon_high", "beta", "optim")}}}


# --------------------------------------------------------------------------- processes


def child(args: argparse.Namespace) -> None:
    _setup(args)
    import torch

    workdir = Path(args.workdir)
    events: list[dict] = []
    if args.memory_trace:
        _trace_memory(events)
    if args.mode == "gkd":
        out = gkd_stratos(args, workdir) if args.side == "stratos" else gkd_trl(args, workdir, args.side)
    else:
        out = grpo_stratos(args, workdir) if args.side == "stratos" else grpo_trl(args, workdir)
    out["threads"] = torch.get_num_threads()
    if args.device == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
    out["process_peak_rss_mb"] = _peak_mb()
    if events:
        out["memory_trace"] = events
    # What every peak_*_mb figure here is: RSS, or torch's CUDA allocation with --device cuda.
    out["memory"] = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS (ru_maxrss)"
    print("RESULT " + json.dumps(out, default=str), flush=True)


GKD_ONLY = ("new_tokens", "batch_size", "prompt_tokens", "rounds")
GRPO_ONLY = ("model", "task", "seeds", "prompts_per_step", "num_generations", "max_completion_length")


def child_cmd(side: str, args: argparse.Namespace, workdir: Path, seed: int | None = None) -> list[str]:
    """The child's command line: the options its mode uses."""
    skip = {"side", "sides", "workdir", "seed", "seed_list", "seeds", *(GRPO_ONLY if args.mode == "gkd" else GKD_ONLY)}
    cmd = [sys.executable, str(HERE), "--side", side, "--workdir", str(workdir)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip and v is not None]
    return cmd + ([f"--seed={seed}"] if seed is not None else [])


def run_child(cmd: list[str], threads: int) -> dict:
    print(f"running {shlex.join(cmd[1:])} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-2000:], file=sys.stderr)
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{cmd[cmd.index('--side') + 1]} failed")
    return json.loads(line[len("RESULT "):])


def _busy_cores(seconds: float = 1.0) -> float:
    """Cores busy over the next ``seconds`` (from /proc/stat; 0 where it is absent)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return 0.0
    return (1 - (i1 - i0) / max(1, t1 - t0)) * (os.cpu_count() or 1)


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.mean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def _pm(xs: list[float], fmt: str) -> str:
    m, se = _mean_se(xs)
    return format(m, fmt) + ("" if math.isnan(se) else " ± " + format(se, fmt))


def print_memory_trace(title: str, events: list[dict]) -> None:
    print(f"### Memory of {title}: RSS and the peak so far (MB)")
    print()
    print("| # | event | RSS | peak so far |")
    print("|---|---|---|---|")
    for i, e in enumerate(events):
        print(f"| {i} | {e['event']} | {e['rss_mb']:,} | {e['peak_mb']:,} |")
    print()


def faster_trl(results: dict) -> str | None:
    """The TRL side with the higher completion tokens/s among one round's ``results`` (side -> child's output)."""
    trl = [s for s in results if s.startswith("trl")]
    return max(trl, key=lambda s: results[s]["tokens"] / results[s]["seconds"]) if trl else None


def report_rounds(rounds: dict[int, dict]) -> None:
    """Across rounds: each side's ratios to that round's faster TRL side, their median and range."""
    sides = list(rounds[0])
    print(f"### Across the {len(rounds)} rounds: each side against the faster TRL side of the same round")
    print()
    print("| side | completion tokens/s per round | speed vs faster TRL: per round | median | peak RSS vs faster TRL: "
          "per round | median |")
    print("|---|---|---|---|---|---|")
    for s in sides:
        rate = [r[s]["tokens"] / r[s]["seconds"] for r in rounds.values()]
        speed, memory = [], []
        for r in rounds.values():
            base = faster_trl(r)
            speed.append(r[s]["tokens"] / r[s]["seconds"] / (r[base]["tokens"] / r[base]["seconds"]))
            memory.append(r[s]["peak_rss_mb"] / r[base]["peak_rss_mb"])
        print(f"| {s} | {', '.join(f'{x:,.1f}' for x in rate)} | {', '.join(f'{x:.2f}x' for x in speed)} "
              f"| {statistics.median(speed):.2f}x | {', '.join(f'{x:.2f}x' for x in memory)} "
              f"| {statistics.median(memory):.2f}x |")
    print()


def report_gkd(args: argparse.Namespace, results: dict, title: str = "") -> None:
    rate = {s: r["tokens"] / r["seconds"] for s, r in results.items()}
    base = faster_trl(results)
    prec = "bf16 autocast" if args.bf16 else "fp32"
    ckpt = ", gradient checkpointing on every side" if args.gradient_checkpointing else ""
    where = (f"on {results[next(iter(results))].get('device_name', 'a GPU')}" if args.device == "cuda"
             else f"torch threads {args.threads}")
    weights = " (random weights of its shapes)" if args.random_init else ""
    print(f"### On-policy KD (lmbda 1, reverse KL, temperature 1): SmolLM2-135M-Instruct{weights} -> "
          f"{args.student_layers}-layer student, batch {args.batch_size}, {args.new_tokens} new tokens per row "
          f"(EOS ignored), {args.steps} timed steps after {args.warmup} warm-up, {prec}{ckpt}, {where}"
          + (f"; {title}" if title else ""))
    print()
    vs = f"vs {base}" if base else "vs TRL"
    memory = "peak GPU memory allocated MB" if args.device == "cuda" else "peak RSS MB"
    print(f"| side | completion tokens/s | {vs} | step s (mean) | generation s (share) | teacher + student s "
          f"| prompt tokens | {memory} | {vs} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, r in results.items():
        gen, rest = r["generation_s"], r["seconds"] - r["generation_s"]
        print(f"| {s} | {rate[s]:,.1f} | {rate[s] / rate[base]:.2f}x |" if base else f"| {s} | {rate[s]:,.1f} | - |",
              f"{r['seconds'] / r['steps']:.2f} | {gen:.2f} ({gen / r['seconds']:.0%}) | {rest:.2f} "
              f"| {r['prompt_tokens']:.0f} | {r['peak_rss_mb']:,.0f} |",
              f"{r['peak_rss_mb'] / results[base]['peak_rss_mb']:.2f}x |" if base else "- |")
    print()


def report_grpo(args: argparse.Namespace, results: dict) -> None:
    prec = "bf16 autocast" if args.bf16 else "fp32"
    name = {"tiny": "tiny random Llama", "teacher": "SmolLM2-135M-Instruct",
            "sft-tiny": "a 4-layer, 128-wide Llama SFT'd for 1,500 steps on "
                        + ("each fact answered 's' and 'a+b=s'" if args.task == "digits"
                           else "500 other sums"),
            "student": f"SmolLM2-135M-Instruct's {args.student_layers}-layer student"}[args.model]
    p, g = args.prompts_per_step, args.num_generations
    task = ("the 100 one-digit sums, each back every 100 prompts" if args.task == "digits"
            else "distinct sums a+b, a and b in 1..50, each prompt once")
    print(f"### GRPO on {task}: {name}, {p} prompts x {g} completions per step (<= {args.max_completion_length} tokens, "
          f"EOS ends), {args.steps} steps ({args.steps - args.warmup} timed), seeds {args.seed_list}, lr {args.lr}, "
          f"{prec}, torch threads {args.threads}")
    print()
    rates = {s: [r["samples"] / r["seconds"] for r in runs] for s, runs in results.items()}
    base = statistics.mean(rates["trl"]) if "trl" in rates else None
    print("| side | samples/s | vs TRL | generation share | prompt tokens | completion tokens (mean) "
          "| reward, first 20% of steps | reward, last 20% of steps | per seed | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, runs in results.items():
        share = [r["generation_s"] / r["seconds"] for r in runs]
        rew = [r["reward_last20"] for r in runs]
        print(f"| {s} | {_pm(rates[s], ',.2f')} | "
              + (f"{statistics.mean(rates[s]) / base:.2f}x" if base else "-")
              + f" | {_pm(share, '.0%')} | {statistics.mean(r['prompt_tokens'] for r in runs):.1f} "
              f"| {statistics.mean(r['completion_tokens'] for r in runs):.1f} "
              f"| {_pm([r['reward_first20'] for r in runs], '.3f')} "
              f"| {_pm(rew, '.3f')} | {', '.join(f'{x:.3f}' for x in rew)} "
              f"| {max(r['peak_rss_mb'] for r in runs):,.0f} |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("gkd", "grpo"), default="gkd")
    p.add_argument("--sides", help=f"comma-separated; gkd: {','.join(GKD_SIDES)}; grpo: {','.join(GRPO_SIDES)}")
    p.add_argument("--steps", type=int, help="optimizer steps (gkd: timed steps, default 3; grpo: all steps, default 20)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--bf16", type=int, default=0, help="1: bf16 autocast on every side; 0: fp32")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--student-layers", type=int, default=STUDENT_LAYERS)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="gkd: where every side trains (cuda: memory is torch's peak CUDA allocation, not RSS)")
    p.add_argument("--random-init", metavar="DIR",
                   help="gkd: teacher and student with seeded random weights, SmolLM2's config and tokenizer from DIR "
                        "(with EOS ignored the work is the same as with its trained weights)")
    p.add_argument("--memory-trace", type=int, default=0,
                   help="1: also print each side's RSS and peak RSS around every rollout and optimizer step (CPU)")
    p.add_argument("--gradient-checkpointing", type=int, default=0,
                   help="1: the student's activations recomputed in the backward on every side (TrainingArguments' "
                        "gradient_checkpointing, non-reentrant, and distill's); 0: off")
    g = p.add_argument_group("gkd")
    g.add_argument("--new-tokens", type=int, default=128, help="tokens every rollout generates (EOS ignored)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--rounds", type=int, default=1, help="run every side this many times, each round starting one "
                   "side later; a table per round and the ratios' median across rounds")
    g.add_argument("--prompt-tokens", type=int, default=60, help="tokens of each user message (before the template)")
    r = p.add_argument_group("grpo")
    r.add_argument("--model", choices=("student", "teacher", "tiny", "sft-tiny"), default="student")
    r.add_argument("--task", choices=("sums", "digits"), default="sums",
                   help="sums: distinct a+b with a, b in 1..50, each prompt seen once; digits: the 100 one-digit "
                   "facts, seen again every 100 prompts (with --model sft-tiny, a start SFT'd on two answer forms)")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--prompts-per-step", type=int, default=4)
    r.add_argument("--num-generations", type=int, default=4)
    r.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--start", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps is None:
        args.steps = 3 if args.mode == "gkd" else 20
    if args.mode == "grpo" and (args.device != "cpu" or args.random_init):
        p.error("--device and --random-init are for --mode gkd")
    if args.mode == "grpo" and args.warmup >= args.steps:
        p.error("grpo: --warmup must be below --steps (the timing spans steps warmup+1..steps)")
    if args.memory_trace and not Path("/proc/self/status").exists():
        p.error("--memory-trace reads /proc/self/status (Linux)")
    if args.side:
        return child(args)

    sides = (args.sides or ",".join(GKD_SIDES if args.mode == "gkd" else GRPO_SIDES)).split(",")
    valid = GKD_SIDES if args.mode == "gkd" else GRPO_SIDES
    if bad := [s for s in sides if s not in valid]:
        p.error(f"unknown sides {bad} for mode {args.mode}; choose from {','.join(valid)}")
    args.seed_list = list(range(args.seeds)) if args.mode == "grpo" else [0]

    from stratos.models import load

    if not args.random_init if args.mode == "gkd" else args.model not in ("tiny", "sft-tiny"):
        load(TEACHER, with_tokenizer=False)  # download/convert once, outside the timings

    with tempfile.TemporaryDirectory(prefix="on-policy-bench-") as tmp:
        if args.mode == "grpo" and args.model == "sft-tiny":
            build_sft_start(args, Path(tmp) / "start")
            args.start = str(Path(tmp) / "start" / "model")
        jobs = []  # (side, seed for grpo or round for gkd, command), each in a folder of its own
        if args.mode == "gkd":
            # Rounds of every side, each round starting one side later, so that no side always runs first
            # and a slower or faster hour of the machine falls on every side alike.
            runs = [(side, r) for r in range(args.rounds) for side in sides[r % len(sides):] + sides[:r % len(sides)]]
        else:
            runs = [(side, seed) for seed in args.seed_list for side in sides]
        for side, n in runs:
            wd = Path(tmp) / f"{side}-{n}"
            wd.mkdir()
            jobs.append((side, n, child_cmd(side, args, wd, n if args.mode == "grpo" else None)))
        print("$ python " + shlex.join([os.path.relpath(HERE)] + sys.argv[1:]))
        for _, _, cmd in jobs:
            print("$ " + shlex.join(["python", os.path.relpath(HERE)] + cmd[2:]))
        print()
        results: dict[str, Any] = {}
        for side, seed, cmd in jobs:
            # What else uses the CPU right before the child starts (a 1 s sample, not the load average, which
            # still carries the previous child's own work for a minute).
            busy = _busy_cores()
            out = {**run_child(cmd, args.threads), "busy_cores_before": busy}
            what = f"round {seed + 1}" if args.mode == "gkd" else f"seed {seed}"
            print(f"{side} ({what}) done: " + json.dumps(out, default=str), file=sys.stderr, flush=True)
            if busy > max(0.25, (os.cpu_count() or 1) - args.threads):
                print(f"WARNING: {side} ({what}): {busy:.1f} of {os.cpu_count()} cores were busy with other "
                      f"work just before it started with {args.threads} threads; its timings are not to be "
                      "trusted", flush=True)
            if out.get("memory_trace"):
                print_memory_trace(f"{side} ({what})", out["memory_trace"])
            if args.mode == "gkd":
                results.setdefault(seed, {})[side] = out
            else:
                results.setdefault(side, []).append({"seed": seed, **out})

    if args.mode == "gkd":
        for r, by_side in results.items():
            report_gkd(args, by_side, f"round {r + 1} of {args.rounds}" if args.rounds > 1 else "")
        if args.rounds > 1:
            report_rounds(results)
        prompts = {s: o["prompt_tokens"] for by_side in results.values() for s, o in by_side.items()}
        if args.rounds == 1:
            results = results[0]
    else:
        report_grpo(args, results)
        prompts = {s: statistics.mean(r["prompt_tokens"] for r in runs) for s, runs in results.items()}
    if len(set(prompts.values())) > 1:
        print(f"WARNING: the sides' prompts differ in length (mean tokens {prompts}): the work is not equal")
    used = {k: v for k, v in vars(args).items() if k not in ("side", "workdir", "seed", "start")
            and k not in (GRPO_ONLY if args.mode == "gkd" else GKD_ONLY)}
    print(json.dumps({"args": used, "results": results}, default=str))


if __name__ == "__main__":
    main()
