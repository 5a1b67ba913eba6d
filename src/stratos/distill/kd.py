"""The KD objective over hidden states, computed chunk by chunk.

Inputs are the student's and the teacher's last hidden states at the target positions
only ([N, d_s], [N, d_t]) plus both output heads. Each chunk of tokens recomputes both
models' logits, the loss and the statistics; under autograd the chunk's gradient (for the
student's hidden states and head) is taken right there, so each head runs once per chunk and
only [chunk, d]-sized gradients are kept for the backward pass. No [B, T, V] tensor ever
exists for either model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from stratos.distill.crosstok import CrossHead
from stratos.distill.head import OutputHead, chunk_rows
from stratos.distill.losses import Loss, cross_entropy, forward_kl, get_loss, reverse_kl
from stratos.distill.topk import topk_log_probs


@dataclass
class Objective:
    """What to minimise: ``kd_ratio * T^2 * D(p_T || q_T) + (1 - kd_ratio) * CE``."""

    loss: str = "fkl"
    loss_kwargs: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    scale_by_temperature: bool = True
    kd_ratio: float = 1.0
    label_smoothing: float = 0.0  # of the CE term: (1 - f) x the target + f spread over the vocabulary
    chunk_size: int | None = None  # rows of logits per chunk; None: head.chunk_rows chooses by device and vocabulary

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


def _teacher_logits(t_hidden: torch.Tensor | None, t_head: OutputHead | None, obj: Objective) -> torch.Tensor:
    if t_hidden is None or t_head is None:
        raise ValueError(f"loss {obj.loss!r} needs a teacher signal")
    with torch.no_grad():
        return t_head(t_hidden)


def _chunk_terms(
    s_logits: torch.Tensor,
    t_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    t_head: OutputHead | CrossHead | None,
    obj: Objective,
    topk_ids: torch.Tensor | None = None,
    topk_logp: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed [kd, ce, teacher-agreement, ce-without-kd] of one chunk's student logits, as one 4-vector
    (differentiable in ``s_logits`` through whichever registered loss the objective names).
    ``weights`` [chunk] scales each token's kd and ce (agreement stays a plain count). ``kd_mask``
    [chunk] (cross-tokenizer KD) marks the tokens that have a teacher counterpart; the others get no KD
    term and their whole loss is CE, whose sum is the fourth entry (see ``_combine``)."""
    ce_tok = F.cross_entropy(s_logits, targets, reduction="none", label_smoothing=obj.label_smoothing)
    ce = _wsum(ce_tok, weights)
    kd = agree = ce_free = s_logits.new_zeros(())
    if obj.spec.fn is cross_entropy:  # plain CE (SFT): the CE term, label smoothing included
        kd = ce
    elif not obj.spec.needs_teacher:  # a user's teacher-free loss
        kd = _wsum(obj.spec.fn(F.log_softmax(s_logits, dim=-1), None, targets, **obj.loss_kwargs), weights)
    elif obj.kd_ratio > 0 and topk_ids is not None:  # an API teacher's top-k log-probs (distill/topk.py)
        s_logp, t_logp = topk_log_probs(s_logits, topk_ids, topk_logp, obj.temperature)
        kd = _wsum(obj.spec.fn(s_logp, t_logp, targets, **obj.loss_kwargs), weights)
        if obj.scale_by_temperature:
            kd = kd * obj.temperature * obj.temperature
        agree = (s_logits.argmax(-1) == topk_ids[:, 0]).sum().to(kd.dtype).detach()
    elif obj.kd_ratio > 0 and isinstance(t_head, CrossHead):  # another tokenizer's teacher (distill/crosstok.py)
        if t_hidden is None:
            raise ValueError(f"loss {obj.loss!r} needs a teacher signal")
        per_token, hit = t_head.terms(s_logits, t_hidden, obj.spec.fn, obj.temperature, obj.loss_kwargs)
        if kd_mask is not None:
            per_token = per_token * kd_mask.to(per_token.dtype)
            hit = hit & kd_mask
            ce_free = _wsum(ce_tok * (~kd_mask).to(ce_tok.dtype), weights)
        kd = _wsum(per_token, weights)
        if obj.scale_by_temperature:
            kd = kd * obj.temperature * obj.temperature
        agree = hit.sum().to(kd.dtype).detach()
    elif obj.kd_ratio > 0:
        t_logits = _teacher_logits(t_hidden, t_head, obj)
        s_l, t_l = _common_vocab(s_logits, t_logits)
        temp = obj.temperature
        s_logp = F.log_softmax(s_l / temp, dim=-1)
        t_logp = F.log_softmax(t_l / temp, dim=-1)
        kd = _wsum(obj.spec.fn(s_logp, t_logp, targets, **obj.loss_kwargs), weights)
        if obj.scale_by_temperature:
            kd = kd * temp * temp
        agree = (s_l.argmax(-1) == t_l.argmax(-1)).sum().to(kd.dtype).detach()
    return torch.stack([kd, ce, agree, ce_free])


def _wsum(per_token: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_token.sum() if weights is None else (per_token * weights.to(per_token.dtype)).sum()


# Losses whose gradient in the student's logits has a closed form, used instead of autograd.
_CLOSED_FORM = {"fkl": forward_kl, "rkl": reverse_kl, "ce": cross_entropy}


def _closed_form(
    s_logits: torch.Tensor,
    t_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    t_head: OutputHead | None,
    obj: Objective,
    topk_ids: torch.Tensor | None = None,
    topk_logp: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(terms, d loss / d s_logits)`` of one chunk without an autograd graph over [chunk, V], for
    the common objectives: forward KL and/or CE over a full-vocabulary teacher. ``None`` for any
    other (the caller falls back to autograd). The formulas (q the student, p the teacher, both at
    temperature T; y the target):

        d CE / d z           = softmax(z) - onehot(y)            (label smoothing f: - (1 - f) onehot(y) - f / V)
        d T^2 KL(p||q) / d z = T (q - p)                      (T^2 scaling on; (q - p) / T without it)
        d T^2 KL(q||p) / d z = T q (log q - log p - KL(q||p))  (the token's reverse KL; / T without T^2)

    Only the built-in ``fkl``/``rkl``/``ce`` over unweighted tokens of a same-vocabulary teacher qualify:
    a user who re-registers one of these names, a batch with per-token weights or a cross-tokenizer
    teacher gets autograd."""
    name = obj.loss
    builtin = _CLOSED_FORM.get(name)
    if (builtin is None or obj.spec.fn is not builtin or topk_ids is not None or obj.loss_kwargs or weights is not None
            or kd_mask is not None or isinstance(t_head, CrossHead)):
        return None
    ce_w = 1.0 if name == "ce" else 1.0 - obj.kd_ratio  # a pure-CE objective's loss is its CE
    z = s_logits.detach().float()
    logp = F.log_softmax(z, dim=-1)
    smooth = obj.label_smoothing
    ce = -logp.gather(-1, targets.unsqueeze(-1)).sum()
    if smooth > 0:  # F.cross_entropy's label smoothing, over all of the student's logits
        ce = (1.0 - smooth) * ce - smooth * logp.mean(-1).sum()
    grad = None
    if ce_w > 0:
        grad = torch.exp(logp).mul_(ce_w)
        if smooth > 0:
            grad.sub_(ce_w * smooth / z.shape[-1])
        grad.scatter_add_(-1, targets.unsqueeze(-1),
                          torch.full_like(targets, -ce_w * (1.0 - smooth), dtype=grad.dtype).unsqueeze(-1))
    kd = agree = z.new_zeros(())
    if name == "ce":
        kd = ce
    elif obj.kd_ratio > 0:
        t_l = _teacher_logits(t_hidden, t_head, obj).float()
        s_l, t_l = _common_vocab(z, t_l)
        v, temp = s_l.shape[-1], obj.temperature
        s_logp = logp if temp == 1.0 and v == z.shape[-1] else F.log_softmax(s_l / temp, dim=-1)
        t_logp = F.log_softmax(t_l / temp, dim=-1)
        scale = temp * temp if obj.scale_by_temperature else 1.0
        if name == "fkl":
            p = torch.exp(t_logp)
            kd = torch.sub(t_logp, s_logp).mul_(p).sum() * scale
            g_kd = torch.exp(s_logp).sub_(p).mul_(obj.kd_ratio * scale / temp)
        else:  # rkl
            q = torch.exp(s_logp)
            diff = torch.sub(s_logp, t_logp)
            per_token = (q * diff).sum(-1, keepdim=True)
            kd = per_token.sum() * scale
            g_kd = diff.sub_(per_token).mul_(q).mul_(obj.kd_ratio * scale / temp)
        agree = (s_l.argmax(-1) == t_l.argmax(-1)).sum().to(kd.dtype)
        if grad is None and v == z.shape[-1]:
            grad = g_kd
        else:
            grad = torch.zeros_like(z) if grad is None else grad
            grad[:, :v] += g_kd
    return torch.stack([kd, ce, agree, z.new_zeros(())]), grad.to(s_logits.dtype)


def kd_terms(
    s_hidden: torch.Tensor,
    t_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    s_head: OutputHead,
    t_head: OutputHead | None,
    obj: Objective,
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Sums over all target tokens of the KD term, the CE term and the combined loss.

    Sums, not means: the caller divides by the number of target tokens of the whole
    optimizer step, so every token weighs the same however the step is split into
    micro-batches (and, later, processes). ``topk`` ([N, k] ids, [N, k] log-probs) replaces the
    teacher's hidden states with an API teacher's top-k targets. ``weights`` ([N]) scales each
    token's terms: advantages, masks or curricula, with no special case in the loop. ``kd_mask`` ([N]
    bool) marks the tokens with a teacher counterpart (cross-tokenizer KD: ``CrossTokenizerSignal``);
    the others train on CE alone, whatever kd_ratio.
    """
    vocab = max(s_head.vocab_size, getattr(t_head, "vocab_size", 0))  # the wider logits of a chunk
    obj = replace(obj, chunk_size=chunk_rows(obj.chunk_size, vocab, s_hidden.device))
    args = (t_hidden, targets, t_head, obj, *((None, None) if topk is None else topk), weights, kd_mask)
    if torch.is_grad_enabled() and s_hidden.requires_grad:
        params = [p for p in s_head.parameters() if p.requires_grad]
        loss, terms = _ChunkedTerms.apply(s_hidden, s_head, *args, *params)
        kd, ce, agree, _ = terms.unbind()
        return {"loss": loss, "kd": kd, "ce": ce, "agree": agree}
    total = s_hidden.new_zeros(4, dtype=torch.float32)
    for sl in _chunks(s_hidden.shape[0], obj.chunk_size):
        total = total + _chunk_terms(s_head(s_hidden[sl]), *_sliced(args, sl))
    kd, ce, agree, _ = total.unbind()
    loss = _combine(total, obj)
    return {"loss": loss, "kd": kd.detach(), "ce": ce.detach(), "agree": agree.detach()}


def _combine(terms: torch.Tensor, obj: Objective) -> torch.Tensor:
    """The loss of summed terms [kd, ce, agree, ce_free]: ``kd_ratio * kd + (1 - kd_ratio) * ce``, where
    the tokens without a KD term (``ce_free``, their CE) count their CE in full."""
    kd, ce, _, ce_free = terms.unbind()
    if not obj.spec.needs_teacher:
        return kd
    return obj.kd_ratio * kd + (1.0 - obj.kd_ratio) * ce + obj.kd_ratio * ce_free


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
    comes from autograd. The built-in forward KL and CE skip that graph: their gradient in the
    logits has a closed form (``_closed_form``), so only the head's own backward remains."""

    @staticmethod
    def forward(ctx, s_hidden, s_head, t_hidden, targets, t_head, obj, topk_ids, topk_logp, weights, kd_mask, *params):
        args = (t_hidden, targets, t_head, obj, topk_ids, topk_logp, weights, kd_mask)
        grad_h = torch.zeros_like(s_hidden)
        grad_p = [torch.zeros_like(p) for p in params]
        total = s_hidden.new_zeros(4, dtype=torch.float32)
        for sl in _chunks(s_hidden.shape[0], obj.chunk_size):
            h = s_hidden[sl].detach().requires_grad_(True)
            chunk_args = _sliced(args, sl)
            with torch.enable_grad():
                s_logits = s_head(h)
                fast = _closed_form(s_logits, *chunk_args)
                if fast is None:
                    terms = _chunk_terms(s_logits, *chunk_args)
                    grads = torch.autograd.grad(_combine(terms, obj), [h, *params], allow_unused=True)
                else:
                    terms, grad_logits = fast
                    grads = torch.autograd.grad(s_logits, [h, *params], grad_outputs=grad_logits, allow_unused=True)
            grad_h[sl] = grads[0]
            for acc, g in zip(grad_p, grads[1:]):
                if g is not None:
                    acc += g
            total = total + terms.detach()
        ctx.save_for_backward(grad_h, *grad_p)
        terms = total.clone()
        ctx.mark_non_differentiable(terms)
        return _combine(total, obj), terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        grad_h, *grad_p = ctx.saved_tensors
        # In place: these tensors exist only for this backward, and a head-sized copy is ~100 MB.
        return (grad_h.mul_(grad_loss), None, None, None, None, None, None, None, None, None,
                *(g.mul_(grad_loss) for g in grad_p))
