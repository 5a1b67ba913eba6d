"""The KD objective over hidden states, computed chunk by chunk.

Inputs are the student's and the teacher's last hidden states at the target positions
only ([N, d_s], [N, d_t]) plus both output heads. Each chunk of tokens recomputes both
models' logits, the loss and the statistics; under autograd the chunk is checkpointed,
so only its hidden states are kept and the [chunk, V] logits are rebuilt in backward.
No [B, T, V] tensor ever exists for either model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stratos.distill.head import OutputHead
from stratos.distill.losses import Loss, get_loss
from stratos.distill.topk import topk_log_probs


@dataclass
class Objective:
    """What to minimise: ``kd_ratio * T^2 * D(p_T || q_T) + (1 - kd_ratio) * CE``."""

    loss: str = "fkl"
    loss_kwargs: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    scale_by_temperature: bool = True
    kd_ratio: float = 1.0
    chunk_size: int = 256

    @property
    def spec(self) -> Loss:
        return get_loss(self.loss)

    @property
    def needs_teacher(self) -> bool:
        return self.spec.needs_teacher and self.kd_ratio > 0


def _common_vocab(s_logits: torch.Tensor, t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student may pad the same tokenizer's vocabulary to different sizes (e.g. to a
    multiple of 64). The padding rows are not tokens; compare on the shared real ones."""
    v = min(s_logits.shape[-1], t_logits.shape[-1])
    return s_logits[..., :v], t_logits[..., :v]


def _chunk_terms(
    s_hidden: torch.Tensor,
    t_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    s_head: OutputHead,
    t_head: OutputHead | None,
    obj: Objective,
    topk_ids: torch.Tensor | None = None,
    topk_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed [kd, ce, teacher-agreement] of one chunk (a 3-vector, so it checkpoints as one tensor)."""
    s_logits = s_head(s_hidden)
    ce = F.cross_entropy(s_logits, targets, reduction="sum")
    kd = agree = s_logits.new_zeros(())
    if not obj.spec.needs_teacher:  # plain CE, or a user's teacher-free loss
        kd = obj.spec.fn(F.log_softmax(s_logits, dim=-1), None, targets, **obj.loss_kwargs).sum()
    elif obj.kd_ratio > 0 and topk_ids is not None:  # an API teacher's top-k log-probs (distill/topk.py)
        s_logp, t_logp = topk_log_probs(s_logits, topk_ids, topk_logp, obj.temperature)
        kd = obj.spec.fn(s_logp, t_logp, targets, **obj.loss_kwargs).sum()
        if obj.scale_by_temperature:
            kd = kd * obj.temperature * obj.temperature
        agree = (s_logits.argmax(-1) == topk_ids[:, 0]).sum().to(kd.dtype).detach()
    elif obj.kd_ratio > 0:
        if t_hidden is None or t_head is None:
            raise ValueError(f"loss {obj.loss!r} needs a teacher signal")
        with torch.no_grad():
            t_logits = t_head(t_hidden)
        s_l, t_l = _common_vocab(s_logits, t_logits)
        temp = obj.temperature
        s_logp = F.log_softmax(s_l / temp, dim=-1)
        t_logp = F.log_softmax(t_l / temp, dim=-1)
        kd = obj.spec.fn(s_logp, t_logp, targets, **obj.loss_kwargs).sum()
        if obj.scale_by_temperature:
            kd = kd * temp * temp
        agree = (s_l.argmax(-1) == t_l.argmax(-1)).sum().to(kd.dtype).detach()
    return torch.stack([kd, ce, agree])


def kd_terms(
    s_hidden: torch.Tensor,
    t_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    s_head: OutputHead,
    t_head: OutputHead | None,
    obj: Objective,
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Sums over all target tokens of the KD term, the CE term and the combined loss.

    Sums, not means: the caller divides by the number of target tokens of the whole
    optimizer step, so every token weighs the same however the step is split into
    micro-batches (and, later, processes). ``topk`` ([N, k] ids, [N, k] log-probs) replaces the
    teacher's hidden states with an API teacher's top-k targets.
    """
    n = s_hidden.shape[0]
    total = s_hidden.new_zeros(3, dtype=torch.float32)
    grad = torch.is_grad_enabled() and s_hidden.requires_grad
    for start in range(0, n, obj.chunk_size):
        sl = slice(start, start + obj.chunk_size)
        args = (s_hidden[sl], None if t_hidden is None else t_hidden[sl], targets[sl], s_head, t_head, obj,
                *((None, None) if topk is None else (topk[0][sl], topk[1][sl])))
        if grad:
            total = total + checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            total = total + _chunk_terms(*args)
    kd, ce, agree = total.unbind()
    loss = obj.kd_ratio * kd + (1.0 - obj.kd_ratio) * ce if obj.spec.needs_teacher else kd
    return {"loss": loss, "kd": kd.detach(), "ce": ce.detach(), "agree": agree.detach()}
