"""The teacher signal protocol: all the engine knows of a teacher.

A signal has the teacher's ``head`` (an OutputHead: the student side recomputes exact teacher logits
from hidden states, chunk by chunk) and ``hidden(batch)``: the teacher's last hidden states at the
batch's target positions, [batch.num_targets, d_t], row by row, left to right. A signal from an
API teacher has no head and gives ``topk(batch)`` instead: the top-k token ids and log-probs at
those positions. A signal may also take ``submit(batch)``: the batch is sent now and computed while
the loop does other work (``stratos.distill.trainer.InFlight`` sends batches ahead to it). Where the
teacher runs (in this process, earlier into a disk cache, behind an API, in worker processes) is
the business of ``stratos.teachers``, never of the loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from stratos.distill.data import IGNORE, Batch, Encoded, collate
from stratos.distill.head import OutputHead


class TeacherSignal(Protocol):
    head: OutputHead | None

    def hidden(self, batch: Batch) -> torch.Tensor: ...


class TeacherView:
    """A signal over another (``inner``, in the teacher's own batches): each student batch becomes the batch
    the teacher reads (``_teacher_batch``), is sent ahead to a teacher service when the inner signal takes
    batches early (``submit``), and ``hidden`` returns the inner signal's rows for it. Subclasses say how a
    batch is rebuilt for the teacher: ``PromptedSignal`` (its own prompt), and
    ``stratos.distill.crosstok.CrossTokenizerSignal`` (its own tokens)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.head = inner.head
        # Teacher batches sent ahead, by the student batch's tensor (as TeacherPool keys its own).
        self._sent: dict[int, tuple[torch.Tensor, Batch]] = {}
        if hasattr(inner, "submit"):  # a teacher service: batches may be sent ahead (trainer.InFlight)
            self.submit = self._submit

    def _teacher_batch(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def _submit(self, batch: Batch) -> None:
        t_batch = self._teacher_batch(batch)
        self._sent[id(batch.input_ids)] = (batch.input_ids, t_batch)
        self.inner.submit(t_batch)

    def teacher_hidden(self, batch: Batch) -> torch.Tensor:
        """The inner signal's hidden states for ``batch``'s teacher batch (the one sent ahead, if it was)."""
        sent = self._sent.pop(id(batch.input_ids), None)
        return self.inner.hidden(sent[1] if sent is not None else self._teacher_batch(batch))

    def hidden(self, batch: Batch) -> torch.Tensor:
        return self.teacher_hidden(batch)

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()

    def __getattr__(self, name: str) -> Any:  # restarts, path, meta, ... of the inner signal
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def prompted_example(ex: Encoded, prompts: dict[tuple[int, ...], list[int]]) -> Encoded:
    """``ex`` as the teacher reads it: its prompt swapped for the teacher's (``prompts``, by the student's
    prompt ids), the same response; ``ex`` itself when the teacher was not asked its prompt otherwise."""
    first = next((k for k, t in enumerate(ex.labels) if t != IGNORE), None)
    prompt = prompts.get(tuple(ex.input_ids[:first])) if first is not None else None
    if prompt is None:
        return ex
    return Encoded(prompt + ex.input_ids[first:], [IGNORE] * len(prompt) + ex.labels[first:])


class PromptedSignal(TeacherView):
    """Context distillation: the teacher reads its own prompt (``prompts``: its prompt ids by the student's,
    ``stratos.distill.data.teacher_prompts``), then the row's response as the student reads it, so each
    target's hidden state is the teacher's with its worked examples, rules or system prompt in view, and the
    student learns to answer as it does without them. Works on any batch: the data's rows and the student's
    own samples (gkd, opd) alike, since each row's prompt is looked up by its tokens. Rows whose prompt the
    teacher was not asked otherwise are read as they are."""

    def __init__(self, inner: Any, prompts: dict[tuple[int, ...], list[int]], pad_id: int):
        super().__init__(inner)
        self.prompts, self.pad_id = prompts, pad_id

    def _teacher_batch(self, batch: Batch) -> Batch:
        rows = []
        for r in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[r].sum())
            rows.append(prompted_example(Encoded(batch.input_ids[r, :n].tolist(), batch.labels[r, :n].tolist()), self.prompts))
        t_batch = collate(rows, batch.indices, self.pad_id)
        if t_batch.num_targets != batch.num_targets:  # the same response tokens: a bug, not bad data
            raise AssertionError(f"teacher batch has {t_batch.num_targets} targets, the student's {batch.num_targets}")
        return t_batch
