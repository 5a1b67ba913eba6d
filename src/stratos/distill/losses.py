"""Distillation losses: a registry of small functions.

Every loss takes per-token log-probabilities of the student and the teacher over the
same vocabulary, ``s_logp`` and ``t_logp`` of shape [N, V] (fp32, already divided by the
temperature), and the target token ids ``labels`` [N], and returns the loss of each
token, shape [N]. The engine sums and normalises; a loss never reduces.

Add your own::

    from stratos.distill.losses import register_loss

    @register_loss("my_kl")
    def my_kl(s_logp, t_logp, labels, *, alpha=0.5):
        ...

Conventions follow DistiLLM (Ko et al., 2024) and "Rethinking KL divergence in KD for
LLMs" (Wu et al., 2024): p is the teacher, q the student.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Loss:
    fn: LossFn
    needs_teacher: bool = True


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, *, needs_teacher: bool = True) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = Loss(fn, needs_teacher)
        return fn

    return deco


def get_loss(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; registered: {', '.join(sorted(LOSSES))}") from None


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, with 0 * log 0 = 0."""
    return torch.sum(torch.exp(logp_a) * (logp_a - logp_b), dim=-1)


def _log_mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) computed stably in log space."""
    if weight_a <= 0.0:
        return logp_b
    if weight_a >= 1.0:
        return logp_a
    return torch.logaddexp(logp_a + math.log(weight_a), logp_b + math.log1p(-weight_a))


@register_loss("fkl")
def forward_kl(s_logp, t_logp, labels=None):
    """KL(p || q): mode-covering; the classic KD loss."""
    return _kl(t_logp, s_logp)


@register_loss("rkl")
def reverse_kl(s_logp, t_logp, labels=None):
    """KL(q || p): mode-seeking (MiniLLM)."""
    return _kl(s_logp, t_logp)


@register_loss("jsd")
def jsd(s_logp, t_logp, labels=None, *, beta: float = 0.5):
    """Generalised JSD (GKD): beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q."""
    m = _log_mix(t_logp, s_logp, beta)
    return beta * _kl(t_logp, m) + (1.0 - beta) * _kl(s_logp, m)


@register_loss("skl")
def skew_kl(s_logp, t_logp, labels=None, *, alpha: float = 0.1):
    """Skew KL (DistiLLM): KL(p || alpha * p + (1 - alpha) * q)."""
    return _kl(t_logp, _log_mix(t_logp, s_logp, alpha))


@register_loss("srkl")
def skew_reverse_kl(s_logp, t_logp, labels=None, *, alpha: float = 0.1):
    """Skew reverse KL (DistiLLM): KL(q || alpha * q + (1 - alpha) * p)."""
    return _kl(s_logp, _log_mix(s_logp, t_logp, alpha))


@register_loss("tvd")
def total_variation(s_logp, t_logp, labels=None):
    """Total variation distance: 0.5 * sum |p - q|, in [0, 1]."""
    return 0.5 * torch.sum(torch.abs(torch.exp(t_logp) - torch.exp(s_logp)), dim=-1)


@register_loss("akl")
def adaptive_kl(s_logp, t_logp, labels=None, *, mu: float = 0.5):
    """Adaptive KL (Wu et al., 2024): FKL and RKL weighted by the student's gap on the head and tail.

    The tail is the set of lowest-probability teacher tokens whose mass adds up to less
    than ``mu``; the head is the rest. The weights are treated as constants.
    """
    p = torch.exp(t_logp)
    q = torch.exp(s_logp)
    sorted_p, idx = torch.sort(p, dim=-1)
    gap = torch.abs(sorted_p - q.gather(-1, idx))
    tail = (torch.cumsum(sorted_p, dim=-1) < mu).to(gap.dtype)
    g_head = torch.sum(gap * (1.0 - tail), dim=-1).detach()
    g_tail = torch.sum(gap * tail, dim=-1).detach()
    total = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
    return (g_head / total) * _kl(t_logp, s_logp) + (g_tail / total) * _kl(s_logp, t_logp)


@register_loss("ce", needs_teacher=False)
def cross_entropy(s_logp, t_logp, labels):
    """Plain SFT: negative log-likelihood of the reference token; ignores the teacher."""
    return -s_logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
