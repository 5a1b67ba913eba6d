"""Top-k KD's bucket math: the student's and an API teacher's distributions over the teacher's top-k
tokens plus one bucket for the rest of the mass (the targets come from ``stratos.teachers.topk``)."""

from __future__ import annotations

import torch

FLOOR = -1e4  # stands in for log 0: exp() is exactly 0 and 0 * (FLOOR - x) stays finite


def topk_log_probs(s_logits: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities over the k + 1 buckets, [N, k + 1] each.

    The student's are exact (its softmax restricted to the k tokens, the rest summed); the
    teacher's remainder is ``1 - sum(top-k)``, and at ``temperature != 1`` the k + 1 teacher
    buckets are tempered and renormalised (the remainder as one bucket: an approximation)."""
    valid = ids >= 0
    idx = torch.where(valid, ids, ids[:, :1])  # empty slots repeat the first (always valid) token
    z = s_logits / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    s_top = (z.gather(-1, idx) - lse).masked_fill(~valid, FLOOR)
    s_rest = torch.logsumexp(z.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True) - lse
    s = torch.cat([s_top, s_rest.clamp_min(FLOOR)], dim=-1)
    t_top = t_logp.masked_fill(~valid, FLOOR)
    mass = torch.exp(t_top).sum(-1, keepdim=True)
    t_rest = torch.log((1.0 - mass).clamp_min(0.0)).clamp_min(FLOOR)
    t = torch.cat([t_top, t_rest], dim=-1)
    if temperature != 1.0:
        t = torch.where(t > FLOOR, t / temperature, t)
    t = (t - torch.logsumexp(t, dim=-1, keepdim=True)).clamp_min(FLOOR)
    return s, t
