"""The KD objective over hidden states, computed chunk by chunk.

Inputs are the student's and the teacher's last hidden states at the target positions
only ([N, d_s], [N, d_t]) plus both output heads. Each chunk of tokens recomputes both
models' logits, the loss and the statistics; under autograd the chunk's gradient (for the
student's hidden states and head) is taken right there, so each head runs once per chunk and
only [chunk, d]-sized gradients are kept for the backward pass. No [B, T, V] tensor ever
exists for either model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    """Summed [kd, ce, teacher-agreement] of one chunk, as one 3-vector."""
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
    args = (t_hidden, targets, s_head, t_head, obj, *((None, None) if topk is None else topk))
    if torch.is_grad_enabled() and s_hidden.requires_grad:
        params = [p for p in s_head.parameters() if p.requires_grad]
        loss, terms = _ChunkedTerms.apply(s_hidden, *args, *params)
        kd, ce, agree = terms.unbind()
        return {"loss": loss, "kd": kd, "ce": ce, "agree": agree}
    total = s_hidden.new_zeros(3, dtype=torch.float32)
    for sl in _chunks(s_hidden.shape[0], obj.chunk_size):
        total = total + _chunk_terms(s_hidden[sl], *_sliced(args, sl))
    kd, ce, agree = total.unbind()
    loss = _combine(kd, ce, obj)
    return {"loss": loss, "kd": kd.detach(), "ce": ce.detach(), "agree": agree.detach()}


def _combine(kd: torch.Tensor, ce: torch.Tensor, obj: Objective) -> torch.Tensor:
    return obj.kd_ratio * kd + (1.0 - obj.kd_ratio) * ce if obj.spec.needs_teacher else kd


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


def _sliced(args: tuple, sl: slice) -> tuple:
    """``args`` cut to one chunk: every tensor among them is per token ([N, ...]); heads and the objective are not."""
    return tuple(a[sl] if isinstance(a, torch.Tensor) else a for a in args)


class _ChunkedTerms(torch.autograd.Function):
    """The loss over all chunks, with each chunk's gradient taken in the forward pass.

    Checkpointing each chunk would run its output heads twice (the student's once for the loss
    and again for the gradient; the teacher's too). Here each chunk runs once: a local autograd
    call turns its loss into gradients for the student's hidden states ([chunk, d]) and its
    head's trainable parameters right away, so no [chunk, V] tensor outlives its chunk and the
    backward pass only scales what was kept. Any registered loss works unchanged: its gradient
    comes from autograd, not from a hand-written formula."""

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, targets, s_head, t_head, obj, topk_ids, topk_logp, *params):
        args = (t_hidden, targets, s_head, t_head, obj, topk_ids, topk_logp)
        grad_h = torch.zeros_like(s_hidden)
        grad_p = [torch.zeros_like(p) for p in params]
        total = s_hidden.new_zeros(3, dtype=torch.float32)
        for sl in _chunks(s_hidden.shape[0], obj.chunk_size):
            h = s_hidden[sl].detach().requires_grad_(True)
            with torch.enable_grad():
                terms = _chunk_terms(h, *_sliced(args, sl))
                loss = _combine(terms[0], terms[1], obj)
                grads = torch.autograd.grad(loss, [h, *params], allow_unused=True)
            grad_h[sl] = grads[0]
            for acc, g in zip(grad_p, grads[1:]):
                if g is not None:
                    acc += g
            total = total + terms.detach()
        ctx.save_for_backward(grad_h, *grad_p)
        kd, ce, _ = total.unbind()
        terms = total.clone()
        ctx.mark_non_differentiable(terms)
        return _combine(kd, ce, obj), terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        grad_h, *grad_p = ctx.saved_tensors
        return (grad_h * grad_loss, None, None, None, None, None, None, None, *(g * grad_loss for g in grad_p))
