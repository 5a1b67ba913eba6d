"""Training algorithms: small registered plug-ins over the one training loop.

An algorithm turns one micro-batch into loss terms: sums over the batch's target tokens of
``loss`` (what is minimised), ``kd``, ``ce`` and ``agree`` (the student's argmax equals the
teacher's), and any sums of its own (grpo: ``kl_ref``, ``clipped``), logged per target token. The
trainer (``distill/trainer.py``) owns everything else for every algorithm: the data schedule, the
step, accumulation and normalisation by the step's target tokens, clipping, the optimizer,
checkpoints, metrics, evaluation and resume. Add your own::

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
from dataclasses import dataclass, replace
from typing import Any

import torch

from stratos.distill.data import Batch
from stratos.distill.head import OutputHead, last_hidden, token_logps
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
    cfg: Any = None  # the settings it trains with (DistillSpec, after its configure): e.g. grpo's epsilon, beta
    # The student's forward to its last hidden states: through DDP or FSDP2 when the student is distributed
    # (stratos.distill.parallel); None: the student itself.
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def hidden(self, batch: Batch) -> torch.Tensor:
        """The student's last hidden states of ``batch`` [B, T, d]."""
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        return self.forward(ids, mask) if self.forward is not None else last_hidden(self.student, ids, mask)


Terms = Callable[[StepContext, Batch], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Algorithm:
    name: str
    terms: Terms
    needs_teacher: Callable[[Any], bool]  # (DistillSpec) -> does it need the teacher's signal with these settings
    configure: Callable[[Any], Any]  # (DistillSpec) -> the settings it trains with (e.g. sft: loss ce)
    description: str
    # Where its batches come from (stratos.distill.sources), built from keyword arguments records,
    # examples, tokenizer, cfg, out_dir, task, pad_id, student (as the run starts, before a resume loads its
    # checkpoint), teacher (the model, or None), teacher_prompts (``stratos.distill.data.teacher_prompts``:
    # the teacher's prompt ids by the student's, or None); None: the fixed training data.
    source: Callable[..., Any] | None = None
    # The teacher scores sequences the student makes while training: it must run beside the loop (its
    # hidden states online), never from a cache or an API's log-probs of its own generations.
    on_policy: bool = False
    # For the cost model: (completions the student samples, sequences trained) per training example and
    # epoch; None: (0, 1), fixed data only.
    rollouts: Callable[[Any], tuple[float, float]] | None = None
    fallback: str = "sft"  # what it trains as when the pair gives no usable teacher signal
    rewarded: bool = False  # it trains on rewards (reward_funcs), not only on a loss against data or teacher


ALGORITHMS: dict[str, Algorithm] = {}


def _same(cfg: Any) -> Any:
    return cfg


def register_algorithm(name: str, *, needs_teacher: Callable[[Any], bool], configure: Callable[[Any], Any] = _same,
                       source: Callable[..., Any] | None = None, description: str = "",
                       on_policy: bool = False,
                       rollouts: Callable[[Any], tuple[float, float]] | None = None,
                       fallback: str = "sft", rewarded: bool = False) -> Callable[[Terms], Terms]:
    def deco(fn: Terms) -> Terms:
        ALGORITHMS[name] = Algorithm(name, fn, needs_teacher, configure, description or (fn.__doc__ or "").strip(),
                                     source, on_policy, rollouts, fallback, rewarded)
        return fn

    return deco


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(ALGORITHMS))}") from None


def responses_needed(algorithms: Any) -> bool:
    """Whether training records need a ``response``: unless every algorithm named is rewarded (RL samples
    its own responses, so a prompt alone is a record)."""
    return not all(get_algorithm(a).rewarded for a in algorithms)


def student_terms(ctx: StepContext, batch: Batch,
                  divergence_only: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The chunked objective on the student's last hidden states at the batch's target positions,
    against the teacher's signal when the objective needs it (hidden states, or an API teacher's
    top-k log-probs), each token weighted by ``batch.weights`` when the batch carries them. The target
    tokens ``divergence_only`` marks ([num_targets] bool) train on the divergence alone (kd_ratio 1), the
    others on the objective's mix."""
    obj, device = ctx.objective, ctx.device
    mask = batch.target_mask.to(device)
    t_hidden = ctx.signal.hidden(batch).to(device) if ctx.t_head is not None and ctx.signal is not None else None
    topk = None
    if obj.needs_teacher and hasattr(ctx.signal, "topk"):
        topk = tuple(t.to(device) for t in ctx.signal.topk(batch))
    weights = batch.weights.to(device) if batch.weights is not None else None
    # A cross-tokenizer signal marks the targets with a teacher counterpart (stratos.distill.crosstok).
    kd_mask = ctx.signal.kd_mask(batch).to(device) if t_hidden is not None and hasattr(ctx.signal, "kd_mask") else None
    targets = batch.targets.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
        h = ctx.hidden(batch)[:, :-1][mask]
        if divergence_only is None or not obj.needs_teacher or obj.kd_ratio >= 1 or not bool(divergence_only.any()):
            return kd_terms(h, t_hidden, targets, ctx.s_head, ctx.t_head, obj, topk=topk, weights=weights,
                            kd_mask=kd_mask)
        # Two disjoint sets of target tokens, each with its objective; the terms are sums, so they add.
        alone = divergence_only.to(device)
        parts = [(alone, replace(obj, kd_ratio=1.0)), (~alone, obj)]
        terms = [kd_terms(h[sel], _pick(t_hidden, sel), targets[sel], ctx.s_head, ctx.t_head, o,
                          topk=None if topk is None else tuple(t[sel] for t in topk), weights=_pick(weights, sel),
                          kd_mask=_pick(kd_mask, sel)) for sel, o in parts if bool(sel.any())]
        return {k: sum(t[k] for t in terms) for k in terms[0]}


def _pick(t: torch.Tensor | None, sel: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[sel]


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

    return RejectionSource(**{k: context[k] for k in ("records", "examples", "tokenizer", "cfg", "out_dir", "task",
                                                      "pad_id")})


@register_algorithm("rft", needs_teacher=lambda cfg: False, configure=_as_sft, source=_rejection_source)
def rft(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Rejection fine-tuning: each of rft_rounds rounds, the student samples num_generations answers per
    train prompt, the task's verifier keeps the correct ones, and the round trains (cross-entropy) on the
    data plus every answer kept so far."""
    return student_terms(ctx, batch)


def _on_policy_source(**context: Any) -> Any:
    from stratos.distill.sources import OnPolicySource

    return OnPolicySource(context["examples"], context["tokenizer"], context["cfg"], context["pad_id"],
                          teacher=context["teacher"], out_dir=context["out_dir"],
                          teacher_prompts=context["teacher_prompts"])


def _online_teacher(cfg: Any) -> Any:
    return cfg if cfg.teacher_signal == "online" else cfg.model_copy(update={"teacher_signal": "online"})


@register_algorithm("gkd", needs_teacher=_kd_needs_teacher, configure=_online_teacher, source=_on_policy_source,
                    on_policy=True, rollouts=lambda cfg: (cfg.lmbda, 1.0))
def gkd(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """On-policy KD (GKD; TRL's GKDTrainer): with probability lmbda a micro-batch holds the student's own
    samples of its prompts, which the teacher scores (its hidden states, online) with the registered
    divergence (jsd with loss_kwargs beta is GKD's; rkl is on-policy reverse KL), alone: the student's own
    tokens are no reference to learn by cross-entropy. kd_ratio mixes in CE on the data's responses (and the
    teacher's samples, with seq_kd) as in kd."""
    return student_terms(ctx, batch, divergence_only=batch.values["own"].bool() if "own" in batch.values else None)


def _group_source(**context: Any) -> Any:
    from stratos.distill.sources import GroupSource

    return GroupSource(context["records"], context["tokenizer"], context["cfg"], context["task"], context["pad_id"],
                       out_dir=context["out_dir"], student=context["student"])


def _policy_terms(ctx: StepContext, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """GRPO's per-token loss, summed with the batch's per-token weights (the scales of loss_type):
    ``-min(ratio x A, clip(ratio, 1 - epsilon, 1 + epsilon) x A) + beta x KL(policy || reference)``, where
    A is the token's advantage, ratio = exp(logp - logp_old) against the policy that sampled it (with one
    update per batch of rollouts that policy is the current one: the ratio is 1 and the gradient that of
    logp), and the KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 (Schulman; TRL's).
    Also returns ``logp`` and the sums ``kl_ref`` and ``clipped`` (tokens whose ratio was clipped)."""
    device, cfg = ctx.device, ctx.cfg
    targets = batch.targets.to(device)
    values = {k: v.to(device) for k, v in batch.values.items()}
    logp = token_logps(ctx.s_head, h, targets, ctx.objective.chunk_size)
    old = values.get("old_logp", logp.detach())
    adv = values["advantage"]
    ratio = torch.exp(logp - old)
    clipped_ratio = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    zero = torch.zeros((), device=device)
    kl = zero
    if "ref_logp" in values:
        d = values["ref_logp"] - logp
        per_kl = torch.exp(d) - d - 1
        per_token = per_token + cfg.beta * per_kl
        kl = per_kl.detach().sum()
    clipped = ((ratio * adv) > (clipped_ratio * adv)).float().sum().detach()
    return {"loss": (per_token * batch.weights.to(device)).sum(), "logp": logp, "kl_ref": kl, "clipped": clipped}


def _rl_terms(ctx: StepContext, batch: Batch, *, teacher: bool) -> dict[str, torch.Tensor]:
    """grpo's terms, and opd's: the same plus kd_ratio x the divergence to the teacher on the samples."""
    device = ctx.device
    mask = batch.target_mask.to(device)
    t_hidden = ctx.signal.hidden(batch).to(device) if teacher else None
    kd_mask = ctx.signal.kd_mask(batch).to(device) if teacher and hasattr(ctx.signal, "kd_mask") else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
        h = ctx.hidden(batch)[:, :-1][mask]
        pg = _policy_terms(ctx, h, batch)
        zero = torch.zeros((), device=device)
        kd = {"loss": zero, "kd": zero, "agree": zero}
        if teacher:  # the divergence alone (kd_ratio 1 inside), weighed against the reward term by the run's kd_ratio
            kd = kd_terms(h, t_hidden, batch.targets.to(device), ctx.s_head, ctx.t_head,
                          replace(ctx.objective, kd_ratio=1.0), kd_mask=kd_mask)
    return {"loss": pg["loss"] + ctx.objective.kd_ratio * kd["loss"], "kd": kd["kd"], "ce": -pg["logp"].detach().sum(),
            "agree": kd["agree"], "kl_ref": pg["kl_ref"], "clipped": pg["clipped"]}


def _rl_rollouts(cfg: Any) -> tuple[float, float]:
    # A group of num_generations samples per prompt, trained num_iterations times; the sampling policy's
    # log-probabilities (num_iterations > 1) and the reference's (beta > 0) are a forward pass each, about
    # a third of a training step's forward and backward.
    extra_forwards = (cfg.num_iterations > 1 or cfg.max_staleness > 0) + (cfg.beta > 0)
    return float(cfg.num_generations), cfg.num_generations * (cfg.num_iterations + extra_forwards / 3)


@register_algorithm("grpo", needs_teacher=lambda cfg: False, source=_group_source, rollouts=_rl_rollouts,
                    rewarded=True)
def grpo(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """RL against the task's verifier or the user's reward functions (GRPO; TRL's GRPOTrainer): groups of
    num_generations samples per prompt, group-normalised advantages (GroupSource), the clipped
    policy-gradient loss (epsilon, num_iterations) with an optional KL to the reference (beta), averaged as
    loss_type says. No teacher."""
    return _rl_terms(ctx, batch, teacher=False)


@register_algorithm("opd", needs_teacher=_kd_needs_teacher, configure=_online_teacher, source=_group_source,
                    on_policy=True, rollouts=_rl_rollouts, fallback="grpo", rewarded=True)
def opd(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """On-policy distillation with a verifier: grpo's groups and reward term, plus kd_ratio x the
    registered divergence to the teacher (rkl: per-token reverse KL) on the same samples, so a teacher
    and an oracle teach in one run. The teacher scores the samples online."""
    return _rl_terms(ctx, batch, teacher=ctx.t_head is not None)  # kd_ratio 0, or a loss without it: grpo's terms
