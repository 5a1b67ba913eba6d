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

from typing import Protocol

import torch

from stratos.distill.data import Batch
from stratos.distill.head import OutputHead


class TeacherSignal(Protocol):
    head: OutputHead | None

    def hidden(self, batch: Batch) -> torch.Tensor: ...
