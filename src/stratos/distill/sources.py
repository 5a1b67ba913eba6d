"""Batch sources: where each optimizer step's micro-batches come from.

A source is a pure function of the step number (plus what it wrote to disk), so a checkpoint needs
only the step to resume with no step lost or repeated:

- :class:`FixedSource`: fixed training examples, a seeded permutation per epoch (SFT, off-policy KD);
- :class:`RejectionSource`: rejection fine-tuning; each round the student samples answers for the
  train prompts, the task's verifier keeps the correct ones, and the round trains on the fixed data
  plus every answer kept so far;
- :class:`OnPolicySource`: on-policy KD (gkd); a share of the micro-batches hold the student's own
  samples for the batch's prompts, sampled at the step they train, seeded by (seed, step);
- :class:`GroupSource`: RL (grpo, opd); groups of the student's samples per prompt, rewarded by the
  task's verifier or the user's reward functions, their group-normalised advantages per token.

``prepare(step, model)`` runs before a step: a source that makes data from the model (rollouts) does
it there, at its boundaries, and returns values to log (or None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from stratos.distill.data import IGNORE, Batch, Encoded, collate, encode
from stratos.io import atomic_save_tensors, read_jsonl, write_jsonl


class Source(Protocol):
    total_steps: int

    def prepare(self, step: int, model: torch.nn.Module) -> dict[str, float] | None: ...

    def micro_batches(self, step: int) -> list[Batch]: ...

    def epoch(self, steps_done: int) -> float: ...


@dataclass(frozen=True)
class Schedule:
    """Which examples each micro-batch holds: a seeded permutation per epoch."""

    num_examples: int
    batch_size: int
    accumulation: int
    total_steps: int
    seed: int

    @classmethod
    def from_config(cls, n: int, cfg: Any) -> "Schedule":
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


class FixedSource:
    """Fixed examples in a seeded order: today's SFT and off-policy KD data."""

    known_ahead = True  # a later step's micro-batches are known now: they can go to the teacher early

    def __init__(self, examples: Sequence[Encoded], cfg: Any, pad_id: int):
        self.examples, self.pad_id = examples, pad_id
        self.schedule = Schedule.from_config(len(examples), cfg)
        self.total_steps = self.schedule.total_steps
        self.share: Any = None  # Parallel.share of a distributed student: this rank's rows of each micro-batch

    def prepare(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        return None

    def micro_batches(self, step: int) -> list[Batch]:
        out = []
        for idx in self.schedule.micro_batches(step):
            mine = self.share(idx) if self.share is not None else idx
            if not mine:  # fewer rows than ranks: a row without targets, since every rank runs each micro-batch
                e = self.examples[idx[0]]
                out.append(collate([Encoded(e.input_ids, [IGNORE] * len(e.labels))], idx[:1], self.pad_id))
            else:
                out.append(collate([self.examples[i] for i in mine], mine, self.pad_id))
        return out

    def epoch(self, steps_done: int) -> float:
        return steps_done * self.schedule.accumulation / self.schedule.batches_per_epoch


class RejectionSource:
    """Rejection fine-tuning (RFT) as a batch source, for ``rft_rounds`` rounds of equal length.

    At the first step of round r the student samples ``num_generations`` answers (``temperature``,
    at most ``max_completion_length`` tokens, seeded by (seed, r)) for every training record that
    carries a checkable ``answer``; the task's verifier keeps the correct ones, new (prompt, answer)
    pairs only. They are written to ``out_dir/rft/round-r.jsonl`` before the round trains, so a resumed
    run reads them instead of sampling again. Round r trains on the fixed records plus the rows kept in
    rounds 0..r, in a seeded order; a round lasts as many steps as ``num_train_epochs`` (or
    ``max_steps`` / ``rft_rounds``) over the fixed records alone."""

    def __init__(self, records: Sequence[dict[str, Any]], examples: Sequence[Encoded], tokenizer: Any, cfg: Any,
                 out_dir: Path, task: Any, pad_id: int):
        from stratos.errors import TrainingError

        if task is None:
            raise TrainingError("algorithm rft needs the task, to check the student's answers: run it from a spec "
                                "(stratos run, or stratos distill SPEC)")
        self.records, self.fixed, self.tokenizer, self.cfg = records, list(examples), tokenizer, cfg
        self.dir, self.task, self.pad_id = Path(out_dir) / "rft", task, pad_id
        self.prompts = [r for r in records if "prompt" in r and "answer" in r]  # the verifier needs the reference
        rounds = cfg.rft_rounds
        per_round = Schedule.from_config(len(self.fixed), cfg.model_copy(update={"max_steps": None})).total_steps
        self.steps_per_round = max(1, cfg.max_steps // rounds) if cfg.max_steps else per_round
        self.total_steps = self.steps_per_round * rounds
        self._round, self._examples, self._schedule = -1, self.fixed, None

    def _round_path(self, r: int) -> Path:
        return self.dir / f"round-{r}.jsonl"

    def _sample(self, r: int, model: torch.nn.Module, seen: set[tuple[str, str]]) -> tuple[list[dict], float]:
        from stratos.models.generate import generate
        from stratos.tasks import grade

        gens = generate(model, self.tokenizer, [p["prompt"] for p in self.prompts],
                        max_new_tokens=self.cfg.max_completion_length, n=self.cfg.num_generations,
                        temperature=self.cfg.temperature, seed=self.cfg.seed * 1_000_003 + r)
        kept, correct, total = [], 0, 0
        for rec, outs in zip(self.prompts, gens):
            ex = record_example(rec)
            for g in outs:
                total += 1
                if not grade(self.task, ex, g.text)[1].correct:
                    continue
                correct += 1
                key = (rec["prompt"], g.text.strip())
                if key not in seen:
                    seen.add(key)
                    kept.append({"prompt": rec["prompt"], "response": g.text, "answer": rec["answer"],
                                 "type": ex.type, "id": ex.id, "source": "rft", "round": r})
        return kept, correct / max(1, total)

    def prepare(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        r = step // self.steps_per_round
        if r == self._round:
            return None
        seen = {(x["prompt"], x["response"].strip()) for x in self.records if "prompt" in x and "response" in x}
        rows: list[dict] = []
        for k in range(r):  # rounds before this one were sampled before their checkpoints: read them back
            rows += read_jsonl(self._round_path(k)) if self._round_path(k).is_file() else []
        seen |= {(x["prompt"], x["response"].strip()) for x in rows}
        info = None
        path = self._round_path(r)
        if path.is_file():
            new = read_jsonl(path)
        else:
            new, acceptance = self._sample(r, model, seen)
            write_jsonl(path, new)  # before the round trains: a resume reads it instead of sampling again
            info = {"rft_round": float(r), "rft_acceptance": acceptance, "rft_new_rows": float(len(new))}
        extra, _ = encode(rows + new, self.tokenizer, self.cfg.max_length)
        self._examples = self.fixed + extra
        self._schedule = Schedule(len(self._examples), self.cfg.per_device_train_batch_size,
                                  self.cfg.gradient_accumulation_steps, self.steps_per_round, self.cfg.seed + r)
        self._round = r
        return info

    def micro_batches(self, step: int) -> list[Batch]:
        local = step - self._round * self.steps_per_round
        # Indices past the fixed examples are this round's rows: no teacher signal is cached for them,
        # which is why rft trains with SFT only.
        return [collate([self._examples[i] for i in idx], idx, self.pad_id) for idx in self._schedule.micro_batches(local)]

    def epoch(self, steps_done: int) -> float:
        # Passes over the fixed records (a round's kept rows come on top of them): the unit a round's
        # length is given in, so rft_rounds rounds of num_train_epochs end at rounds x num_train_epochs.
        per_epoch = math.ceil(len(self.fixed) / self.cfg.per_device_train_batch_size)
        return steps_done * self.cfg.gradient_accumulation_steps / per_epoch


class OnPolicySource:
    """On-policy distillation data (GKD, Agarwal et al. 2024; TRL's GKDTrainer): the fixed examples in
    their seeded order, where each micro-batch is, with probability ``lmbda``, replaced by the student's
    own completions of the same prompts (at ``temperature``, at most ``max_completion_length`` tokens,
    ending at the student's EOS). The algorithm then scores those tokens against the teacher.

    With ``seq_kd`` the other micro-batches hold the teacher's samples of their prompts (sequence-level KD,
    Kim & Rush 2016; TRL's ``seq_kd``) instead of the data's responses; where the records gave the teacher
    its own prompts (``teacher_prompts``: worked examples, rules), it samples from those, and its answer
    trains after the student's prompt (context distillation).

    Which micro-batches go on-policy is seeded by (seed, step, micro-batch), the samples by (seed, step),
    all of a step's in one batched generation per sampler, drawn from the weights that train on them,
    in ``prepare`` before the step: a run killed and resumed from a checkpoint samples exactly what the
    uninterrupted run sampled.

    With ``max_staleness`` 1 the trainer prepares each step while the step before it trains (from the
    weights that step starts from), and every step's batches are written to ``out_dir/rollouts/`` before
    they are used: a resumed run reads the rollouts its checkpoint's weights could no longer draw."""

    def __init__(self, examples: Sequence[Encoded], tokenizer: Any, cfg: Any, pad_id: int, teacher: Any = None,
                 out_dir: Path | None = None, teacher_prompts: dict[tuple[int, ...], list[int]] | None = None):
        from stratos.errors import TrainingError

        if cfg.seq_kd and teacher is None:
            raise TrainingError("seq_kd needs the teacher model, to sample its own answers (not a cache or an API)")
        self.fixed = FixedSource(examples, cfg, pad_id)
        self.examples, self.tokenizer, self.cfg, self.pad_id = examples, tokenizer, cfg, pad_id
        self.teacher = teacher if cfg.seq_kd else None
        self.teacher_prompts = teacher_prompts or {}  # the teacher's prompt ids by the student's
        self.total_steps = self.fixed.total_steps
        self.dir = Path(out_dir) / "rollouts" if out_dir is not None and cfg.max_staleness else None
        self._ready: dict[int, list[Batch]] = {}  # prepared steps' batches: this step's, and the next with staleness

    @staticmethod
    def _prompt(e: Encoded) -> list[int]:
        first = next(i for i, t in enumerate(e.labels) if t != IGNORE)  # the first response token
        return e.input_ids[:first]

    def on_policy(self, step: int, micro: int) -> bool:
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 101 + micro)
        return float(torch.rand((), generator=g)) < self.cfg.lmbda

    def prepare(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        import time

        from stratos.models.generate import _eos_ids, sample_ids

        if step in self._ready:
            return None
        path = self.dir / f"step-{step:06d}.safetensors" if self.dir is not None else None
        if path is not None and path.is_file():
            self._ready[step] = _load_batches(path)
            return None
        t0 = time.perf_counter()
        indices = self.fixed.schedule.micro_batches(step)
        micro = [[self.examples[i] for i in idx] for idx in indices]
        # Every row with a prompt in an on-policy micro-batch gets the student's completion, in the others
        # the teacher's (seq_kd); a text row (all targets, no prompt) keeps its own. One batched generation
        # per sampler for the whole step: the decode loop is faster on more rows at once.
        wanted: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # on-policy? -> (micro-batch, row)
        for m, rows in enumerate(micro):
            on_policy = self.on_policy(step, m)
            if on_policy or self.teacher is not None:
                wanted[on_policy] += [(m, j) for j, e in enumerate(rows) if self._prompt(e)]
        stats = {}
        for on_policy, where in wanted.items():
            if not where:
                continue
            sampler = model if on_policy else self.teacher
            eos = _eos_ids(sampler, self.tokenizer)
            prompts = [self._prompt(micro[m][j]) for m, j in where]
            asked = prompts if on_policy else [self.teacher_prompts.get(tuple(p), p) for p in prompts]
            outs = sample_ids(sampler, asked, max_new_tokens=self.cfg.max_completion_length,
                              temperature=self.cfg.temperature, pad_id=self.pad_id, eos_ids=eos,
                              seed=(self.cfg.seed * 1_000_003 + step) * 2 + on_policy)
            for (m, j), p, c in zip(where, prompts, outs):
                micro[m][j] = Encoded(p + c, [IGNORE] * len(p) + c)
            stats[on_policy] = (len(outs), sum(len(c) for c in outs), sum(1 for c in outs if c and c[-1] in eos))
        batches = [collate(rows, idx, self.pad_id) for rows, idx in zip(micro, indices)]
        # Each target token of the student's own samples is marked (values["own"] 1.0): gkd trains those on the
        # divergence alone, never on cross-entropy against what the student itself just wrote.
        own = set(wanted[True])
        for m in {m for m, _ in own}:
            b = batches[m]
            row_own = torch.tensor([(m, j) in own for j in range(b.input_ids.shape[0])])
            batches[m] = b.with_values(own=row_own[:, None].expand_as(b.target_mask)[b.target_mask].float())
        if path is not None:
            _save_batches(path, batches)  # before they train: a resume reads them
        self._ready = {k: v for k, v in self._ready.items() if k >= step - 1}  # the step training now stays
        self._ready[step] = batches
        sampled, tokens, ended = stats.get(True, (0, 0, 0))
        teacher_rows = stats.get(False, (0, 0, 0))[0]
        n = sum(len(b.indices) for b in batches)
        info = {"on_policy_fraction": sampled / n}
        if self.teacher is not None:
            info["teacher_sampled_fraction"] = teacher_rows / n
        if sampled:
            info.update(rollout_tokens=float(tokens), rollout_ended=ended / sampled)
        if sampled or teacher_rows:
            info["rollout_s"] = time.perf_counter() - t0
        return info

    def micro_batches(self, step: int) -> list[Batch]:
        assert step in self._ready, "prepare(step) comes first"
        return self._ready[step]

    def epoch(self, steps_done: int) -> float:
        return self.fixed.epoch(steps_done)


def record_example(record: dict[str, Any], default_id: str = "") -> Any:
    """A training record with a checkable ``answer`` as the task's Example, for its verifier."""
    from stratos.tasks import Example

    return Example(id=str(record.get("id", default_id)), question=record["prompt"], answer=record["answer"],
                   type=str(record.get("type", "default")), meta=dict(record.get("meta") or {}))


def prompt_ids(record: dict[str, Any], tokenizer: Any) -> list[int]:
    """A record's prompt as the engine tokenises it (chat template, generation prompt): what the
    student continues when it samples an answer."""
    from stratos.distill.data import encode_record

    ex, _ = encode_record({**record, "response": ""}, tokenizer, 10**6)
    return ex.input_ids[: next(i for i, t in enumerate(ex.labels) if t != IGNORE)]


def advantages(rewards: torch.Tensor, scale: str, batch_std: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group-relative advantages of ``rewards`` [groups, g]: each reward minus its group's mean, divided by
    the group's standard deviation (``scale`` 'group'), by ``batch_std``, the step's (``'batch'``), or by
    nothing (``'none'``), as TRL's GRPOTrainer does (Bessel-corrected, + 1e-4). Also how many groups have
    rewards that all tie (no signal)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (std + 1e-4)
    elif scale == "batch":
        adv = adv / (batch_std + 1e-4)
    return adv, int((std == 0).sum())


class GroupSource:
    """GRPO's data (Shao et al. 2024; TRL's GRPOTrainer): each micro-batch takes
    ``per_device_train_batch_size // num_generations`` train prompts (a seeded order over the records
    with a prompt, and an ``answer`` when the verifier rewards), and the student samples
    ``num_generations`` completions of each (at ``temperature``, at most ``max_completion_length``
    tokens), all of a step's in one batched generation seeded by (seed, step). The rewards (``stratos.distill.rewards``: the task's
    verifier, or the user's functions) score each completion; its advantage is its reward minus its
    group's mean (divided by the group's standard deviation with ``scale_rewards``).

    Each batch carries, per target token: ``values['advantage']``; ``weights``, the scale that makes the
    loop's division by the step's tokens give ``loss_type``'s average; with ``num_iterations`` > 1 the
    sampling policy's log-probabilities ``values['old_logp']`` (the PPO ratio's denominator; with one
    update per batch the ratio is 1 and the loss takes the current ones, detached); with ``beta`` > 0
    the reference's ``values['ref_logp']`` (the reference is the student as this phase starts: a frozen
    copy, so beta costs a second student in memory).

    A batch of rollouts trains ``num_iterations`` consecutive optimizer steps. With more than one, it is
    written to ``out_dir/grpo/rollouts-STEP.safetensors`` before it trains, so a run resumed from a
    checkpoint inside the block reads the samples (and their old log-probabilities) the killed run drew
    from weights the checkpoint no longer holds."""

    def __init__(self, records: Sequence[dict[str, Any]], tokenizer: Any, cfg: Any, task: Any, pad_id: int,
                 out_dir: Path | None = None, student: torch.nn.Module | None = None):
        import copy

        from stratos.distill.rewards import Rewards
        from stratos.errors import TrainingError
        from stratos.spec import VERIFIER_REWARDS

        self.rewards = Rewards.from_config(cfg, task)
        needs_answer = bool(set(VERIFIER_REWARDS) & set(cfg.reward_funcs))
        self.prompts = [r for r in records if "prompt" in r and ("answer" in r or not needs_answer)]
        if not self.prompts:
            raise TrainingError(f"algorithm {cfg.algorithm} needs records with a prompt"
                                + (" and an answer, for the verifier to reward completions" if needs_answer else ""))
        if cfg.num_generations < 2:
            raise TrainingError(f"algorithm {cfg.algorithm} needs num_generations >= 2: advantages compare a "
                                "prompt's samples")
        self.tokenizer, self.cfg, self.pad_id = tokenizer, cfg, pad_id
        self.iterations = cfg.num_iterations
        self.per_micro = max(1, cfg.per_device_train_batch_size // cfg.num_generations)
        blocks = math.ceil(cfg.max_steps / self.iterations) if cfg.max_steps else None
        self.schedule = Schedule.from_config(len(self.prompts), cfg.model_copy(
            update={"per_device_train_batch_size": self.per_micro, "max_steps": blocks}))
        self.total_steps = cfg.max_steps or self.schedule.total_steps * self.iterations
        self.dir = Path(out_dir) / "grpo" if out_dir is not None else None
        # Rollouts drawn by weights no checkpoint keeps (num_iterations > 1, or one update early with
        # max_staleness) are written to disk before they train, with the sampling policy's log-probs.
        self.stored = self.iterations > 1 or cfg.max_staleness > 0
        if self.stored and self.dir is None:
            raise TrainingError("num_iterations > 1 or max_staleness needs an output directory for its rollouts")
        self.reference = None
        if cfg.beta > 0:
            if student is None:
                raise TrainingError("beta > 0 needs the student as the phase starts, as the KL reference")
            self.reference = copy.deepcopy(student).eval().requires_grad_(False)
        self._ids = [prompt_ids(r, tokenizer) for r in self.prompts]
        self._block, self._batches = -1, []

    def _path(self, block: int) -> Path:
        return self.dir / f"rollouts-{block:06d}.safetensors"

    def prepare(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        block = step - step % self.iterations  # the step whose policy sampled this step's rollouts
        if block == self._block:
            return None
        if self.stored and self._path(block).is_file():
            self._batches, self._block = _load_batches(self._path(block)), block
            return None
        if block != step:
            from stratos.errors import TrainingError

            raise TrainingError(f"the rollouts of step {block} are missing ({self._path(block)}): step {step} trains "
                                "on them; resume from a checkpoint at the start of a num_iterations block")
        info = self._roll_out(block, model)
        if self.stored:
            _save_batches(self._path(block), self._batches)  # before it trains: a resume reads it
        return info

    def _roll_out(self, block: int, model: torch.nn.Module) -> dict[str, float]:
        import time

        from stratos.distill.head import batch_token_logps
        from stratos.models.generate import _eos_ids, sample_ids
        from stratos.runtime import resolve_bf16

        t0, cfg, g = time.perf_counter(), self.cfg, self.cfg.num_generations
        eos = _eos_ids(model, self.tokenizer)
        micro: list[tuple[list[int], list[list[int]], list[float]]] = []
        # The whole step's groups in one batched generation (the decode loop is faster on more rows at once).
        per_micro = [[i for i in idx for _ in range(g)] for idx in self.schedule.micro_batches(block // self.iterations)]
        flat_rows = [i for rows in per_micro for i in rows]
        outs_all = sample_ids(model, [self._ids[i] for i in flat_rows], max_new_tokens=cfg.max_completion_length,
                              temperature=cfg.temperature, pad_id=self.pad_id, eos_ids=eos,
                              seed=cfg.seed * 1_000_003 + block)
        texts = [self.tokenizer.decode(o, skip_special_tokens=True) for o in outs_all]
        rewards_all, parts = self.rewards([self.prompts[i] for i in flat_rows], texts)
        start = 0
        for rows in per_micro:
            micro.append((rows, outs_all[start : start + len(rows)], rewards_all[start : start + len(rows)]))
            start += len(rows)
        flat = len(rewards_all)
        n_tokens = sum(len(o) for _, outs, _ in micro for o in outs)
        rollout_s = time.perf_counter() - t0
        device = next(model.parameters()).device
        bf16 = resolve_bf16(cfg.bf16, device)
        batches, zero_std = [], 0
        batch_std = torch.tensor(rewards_all).std() if len(rewards_all) > 1 else torch.tensor(0.0)
        for rows, outs, rewards in micro:
            adv, zeros = advantages(torch.tensor(rewards).view(-1, g), cfg.scale_rewards, batch_std)
            zero_std += zeros
            examples, scales, per_token = [], [], []
            for i, out, a in zip(rows, outs, adv.flatten().tolist()):
                p = self._ids[i]
                examples.append(Encoded(p + out, [IGNORE] * len(p) + out))
                # The loop divides the step's summed loss by its tokens; these make that loss_type's average.
                if cfg.loss_type == "grpo":  # each completion's mean, then the mean over completions
                    scale = n_tokens / (flat * len(out))
                elif cfg.loss_type == "dr_grpo":  # over completions x max_completion_length
                    scale = n_tokens / (flat * cfg.max_completion_length)
                else:  # dapo: every token of the step counts once
                    scale = 1.0
                scales += [scale] * len(out)
                per_token += [a] * len(out)
            batch = collate(examples, rows, self.pad_id).with_weights(torch.tensor(scales))
            values = {"advantage": torch.tensor(per_token)}
            if self.stored:  # the ratio's denominator: the policy that sampled, not the one that trains
                values["old_logp"] = batch_token_logps(model, batch, chunk_size=cfg.chunk_size, bf16=bf16).cpu()
            if self.reference is not None:
                ref = self.reference.to(device)
                values["ref_logp"] = batch_token_logps(ref, batch, chunk_size=cfg.chunk_size, bf16=bf16).cpu()
            batches.append(batch.with_values(**values))
        self._block, self._batches = block, batches
        rt = torch.tensor(rewards_all)
        return {"reward": float(rt.mean()), "reward_std": float(rt.std()) if len(rt) > 1 else 0.0,
                **parts,
                "groups_without_signal": zero_std / max(1, flat // g), "rollout_tokens": float(n_tokens),
                "rollout_s": rollout_s}

    def micro_batches(self, step: int) -> list[Batch]:
        assert step - step % self.iterations == self._block, "prepare(step) comes first"
        return self._batches

    def epoch(self, steps_done: int) -> float:
        # Passes over the prompts: a block of num_iterations steps trains one schedule step's prompts.
        return steps_done / self.iterations * self.schedule.accumulation / self.schedule.batches_per_epoch


def _save_batches(path: Path, batches: list[Batch]) -> None:
    """Batches (their tensors, weights and per-token values) to one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for m, b in enumerate(batches):
        tensors.update({f"{m}.input_ids": b.input_ids, f"{m}.attention_mask": b.attention_mask,
                        f"{m}.labels": b.labels, f"{m}.indices": torch.tensor(b.indices, dtype=torch.long)})
        if b.weights is not None:
            tensors[f"{m}.weights"] = b.weights
        tensors.update({f"{m}.values.{k}": v for k, v in b.values.items()})
    atomic_save_tensors(tensors, path, metadata={"batches": str(len(batches))})


def _load_batches(path: Path) -> list[Batch]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        n = int((fh.metadata() or {})["batches"])
    t = load_file(str(path))
    out = []
    for m in range(n):
        values = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"{m}.values.")}
        out.append(Batch(t[f"{m}.input_ids"], t[f"{m}.attention_mask"], t[f"{m}.labels"], t[f"{m}.indices"].tolist(),
                         t.get(f"{m}.weights"), values))
    return out
