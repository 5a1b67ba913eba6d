"""Training algorithms: small registered plug-ins over the one training loop.

An algorithm turns one micro-batch into loss terms: sums over the batch's target tokens of
``loss`` (what is minimised), ``kd``, ``ce`` and ``agree`` (the student's argmax equals the
teacher's). The trainer (``distill/trainer.py``) owns everything else for every algorithm: the
data schedule, the step, accumulation and normalisation by the step's target tokens, clipping,
the optimizer, checkpoints, metrics, evaluation and resume. Add your own::

    from stratos.distill.algorithms import register_algorithm, student_terms

    @register_algorithm("ce_on_long_answers", needs_teacher=lambda cfg: False)
    def ce_on_long_answers(ctx, batch):
        # per-token weights: only tokens of answers longer than 8 tokens count
        long = (batch.labels[:, 1:] != -100).sum(dim=1, keepdim=True) > 8
        return student_terms(ctx, batch.with_weights(long.expand_as(batch.target_mask)[batch.target_mask].float()))

and name it in the spec (``distill.algorithm: ce_on_long_answers``, or as a phase).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from stratos.distill.data import Batch
from stratos.distill.head import OutputHead, last_hidden
from stratos.distill.kd import Objective, kd_terms
from stratos.distill.losses import get_loss


@dataclass
class StepContext:
    """What an algorithm may use to turn a batch into loss terms."""

    student: torch.nn.Module
    s_head: OutputHead
    t_head: OutputHead | None  # the teacher's output head, when the settings need the teacher
    signal: Any  # the teacher signal (hidden states, or top-k log-probs), or None
    objective: Objective
    device: torch.device
    bf16: bool


Terms = Callable[[StepContext, Batch], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Algorithm:
    name: str
    terms: Terms
    needs_teacher: Callable[[Any], bool]  # (DistillSpec) -> does it need the teacher's signal with these settings
    configure: Callable[[Any], Any]  # (DistillSpec) -> the settings it trains with (e.g. sft: loss ce)
    description: str
    # Where its batches come from (stratos.distill.sources), built from keyword arguments records,
    # examples, tokenizer, cfg, out_dir, task, pad_id; None: the fixed training data.
    source: Callable[..., Any] | None = None
    # The teacher scores sequences the student makes while training: it must run beside the loop (its
    # hidden states online), never from a cache or an API's log-probs of its own generations.
    on_policy: bool = False
    # For the cost model: (completions the student samples, sequences trained) per training example and
    # epoch; None: (0, 1), fixed data only.
    rollouts: Callable[[Any], tuple[float, float]] | None = None
    fallback: str = "sft"  # what it trains as when the pair gives no usable teacher signal


ALGORITHMS: dict[str, Algorithm] = {}


def _same(cfg: Any) -> Any:
    return cfg


def register_algorithm(name: str, *, needs_teacher: Callable[[Any], bool], configure: Callable[[Any], Any] = _same,
                       source: Callable[..., Any] | None = None, description: str = "",
                       on_policy: bool = False,
                       rollouts: Callable[[Any], tuple[float, float]] | None = None,
                       fallback: str = "sft") -> Callable[[Terms], Terms]:
    def deco(fn: Terms) -> Terms:
        ALGORITHMS[name] = Algorithm(name, fn, needs_teacher, configure, description or (fn.__doc__ or "").strip(),
                                     source, on_policy, rollouts, fallback)
        return fn

    return deco


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(ALGORITHMS))}") from None


def student_terms(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """The chunked objective on the student's last hidden states at the batch's target positions,
    against the teacher's signal when the objective needs it (hidden states, or an API teacher's
    top-k log-probs), each token weighted by ``batch.weights`` when the batch carries them."""
    obj, device = ctx.objective, ctx.device
    mask = batch.target_mask.to(device)
    t_hidden = ctx.signal.hidden(batch).to(device) if ctx.t_head is not None and ctx.signal is not None else None
    topk = None
    if obj.needs_teacher and hasattr(ctx.signal, "topk"):
        topk = tuple(t.to(device) for t in ctx.signal.topk(batch))
    weights = batch.weights.to(device) if batch.weights is not None else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
        h = last_hidden(ctx.student, batch.input_ids.to(device), batch.attention_mask.to(device))
        return kd_terms(h[:, :-1][mask], t_hidden, batch.targets.to(device), ctx.s_head, ctx.t_head, obj, topk=topk,
                        weights=weights)


def _kd_needs_teacher(cfg: Any) -> bool:
    return get_loss(cfg.loss).needs_teacher and cfg.kd_ratio > 0


def _as_sft(cfg: Any) -> Any:
    return cfg if cfg.loss == "ce" and cfg.kd_ratio == 0 else cfg.model_copy(update={"loss": "ce", "kd_ratio": 0.0})


@register_algorithm("sft", needs_teacher=lambda cfg: False, configure=_as_sft)
def sft(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Supervised fine-tuning: cross-entropy on the response tokens; no teacher."""
    return student_terms(ctx, batch)


@register_algorithm("kd", needs_teacher=_kd_needs_teacher)
def kd(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Off-policy KD: kd_ratio x the registered divergence to the teacher (its logits recomputed from
    its hidden states, or its top-k log-probs) + (1 - kd_ratio) x cross-entropy, on fixed data."""
    return student_terms(ctx, batch)


def _rejection_source(**context: Any) -> Any:
    from stratos.distill.sources import RejectionSource

    return RejectionSource(**context)


@register_algorithm("rft", needs_teacher=lambda cfg: False, configure=_as_sft, source=_rejection_source)
def rft(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Rejection fine-tuning: each of rft_rounds rounds, the student samples num_generations answers per
    train prompt, the task's verifier keeps the correct ones, and the round trains (cross-entropy) on the
    data plus every answer kept so far."""
    return student_terms(ctx, batch)


def _on_policy_source(**context: Any) -> Any:
    from stratos.distill.sources import OnPolicySource

    return OnPolicySource(context["examples"], context["tokenizer"], context["cfg"], context["pad_id"])


def _online_teacher(cfg: Any) -> Any:
    return cfg if cfg.teacher_signal == "online" else cfg.model_copy(update={"teacher_signal": "online"})


@register_algorithm("gkd", needs_teacher=_kd_needs_teacher, configure=_online_teacher, source=_on_policy_source,
                    on_policy=True, rollouts=lambda cfg: (cfg.lmbda, 1.0))
def gkd(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """On-policy KD (GKD; TRL's GKDTrainer): with probability lmbda a micro-batch holds the student's own
    samples of its prompts, which the teacher scores (its hidden states, online) with the registered
    divergence (jsd with loss_kwargs beta is GKD's; rkl is on-policy reverse KL); kd_ratio mixes in CE on
    the batch's tokens as in kd."""
    return student_terms(ctx, batch)


def _group_source(**context: Any) -> Any:
    from stratos.distill.sources import GroupSource

    return GroupSource(context["records"], context["tokenizer"], context["cfg"], context["task"], context["pad_id"])


def _policy_loss(ctx: StepContext, h: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy-gradient loss ``-sum(weight x ratio)`` over the target tokens (the weights are the
    advantages, already scaled for loss_type), and each token's log-probability. With one gradient step
    per batch of samples the PPO ratio exp(logp - logp_old) is 1: its gradient is that of logp."""
    size = ctx.objective.chunk_size
    logp = torch.cat([torch.log_softmax(ctx.s_head(h[i : i + size]), dim=-1).gather(-1, targets[i : i + size, None])[:, 0]
                      for i in range(0, len(targets), size)])
    return -(weights * torch.exp(logp - logp.detach())).sum(), logp


@register_algorithm("grpo", needs_teacher=lambda cfg: False, source=_group_source,
                    rollouts=lambda cfg: (float(cfg.num_generations), float(cfg.num_generations)))
def grpo(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """RL against the task's verifier (GRPO; TRL's GRPOTrainer): groups of num_generations samples per
    prompt, rewards from the verifier, group-normalised advantages as per-token weights (GroupSource);
    the policy-gradient loss -advantage x log p(token), averaged as loss_type says. No teacher."""
    device = ctx.device
    mask = batch.target_mask.to(device)
    targets = batch.targets.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
        h = last_hidden(ctx.student, batch.input_ids.to(device), batch.attention_mask.to(device))[:, :-1][mask]
        loss, logp = _policy_loss(ctx, h, targets, batch.weights.to(device))
    zero = torch.zeros((), device=device)
    return {"loss": loss, "kd": zero, "ce": -logp.detach().sum(), "agree": zero}


@register_algorithm("opd", needs_teacher=_kd_needs_teacher, configure=_online_teacher, source=_group_source,
                    on_policy=True, rollouts=lambda cfg: (float(cfg.num_generations), float(cfg.num_generations)),
                    fallback="grpo")
def opd(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """On-policy distillation with a verifier: grpo's groups and reward term, plus kd_ratio x the
    registered divergence to the teacher (rkl: per-token reverse KL) on the same samples, so a teacher
    and an oracle teach in one run. The teacher scores the samples online."""
    from dataclasses import replace

    if ctx.t_head is None:  # kd_ratio 0, or a loss without the teacher: the reward term alone
        return grpo(ctx, batch)
    device = ctx.device
    mask = batch.target_mask.to(device)
    targets = batch.targets.to(device)
    t_hidden = ctx.signal.hidden(batch).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
        h = last_hidden(ctx.student, batch.input_ids.to(device), batch.attention_mask.to(device))[:, :-1][mask]
        pg, logp = _policy_loss(ctx, h, targets, batch.weights.to(device))
        # The divergence alone (kd_ratio 1 inside), weighed against the reward term by the run's kd_ratio.
        kd = kd_terms(h, t_hidden, targets, ctx.s_head, ctx.t_head, replace(ctx.objective, kd_ratio=1.0))
    return {"loss": pg + ctx.objective.kd_ratio * kd["loss"], "kd": kd["kd"], "ce": -logp.detach().sum(),
            "agree": kd["agree"]}
