"""The student across processes, on PyTorch's own engines: DDP, or FSDP2 (``fully_shard``).

    par = Parallel.from_env(cfg)          # one process unless torchrun started this one (WORLD_SIZE > 1, or
                                          # one process with parallel fsdp: FSDP2 over one device)
    forward = par.wrap(student, bf16)     # (input_ids, attention_mask) -> last hidden states, through the
                                          # wrapper's hooks (DDP's reducer, FSDP2's all-gathers)
    par.share(idx)                        # this rank's rows of a micro-batch
    par.sum(x)                            # summed over the ranks

``torchrun --nproc-per-node N -m stratos.cli distill ...`` (or ``stratos distill --nproc N``, which
starts torchrun itself) runs one process per rank. Every rank reads the same seeded schedule and takes
rows ``rank, rank + N, ...`` of each micro-batch, so N processes train on the global batch one process
would; the loss of a step is divided by the step's target tokens summed over the ranks and multiplied
by N (DDP and FSDP2 average gradients over the ranks), so the update is one process's. A rank whose
share of a micro-batch is empty runs a masked row instead (no target, so no loss), because every rank
must take part in each forward's and backward's collectives.

- ``ddp`` (the default where the student fits one device, ``parallel: auto``): ``DistributedDataParallel``
  over the student; gradients all-reduced in the backward pass (not on micro-batches before the last).
- ``fsdp``: ``fully_shard`` on each decoder layer and on the root (the student with its embeddings and
  output head); with bf16, parameters in bf16 and gradients reduced in fp32; ``fsdp_cpu_offload`` keeps
  the sharded parameters and optimizer state in host memory. The output head is read after the root's
  forward, while FSDP2 keeps the root's parameters gathered (it does not reshard the root after forward),
  and its gradient goes back through FSDP2's reduce-scatter like every other.

Only rank 0 writes metrics, checkpoints and the model. Checkpoints hold full (unsharded) state dicts,
gathered with ``torch.distributed.checkpoint.state_dict``: a checkpoint resumes at any world size,
including one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class StudentRoot(nn.Module):
    """The module a distributed wrapper wraps: the whole student (so the root owns its embeddings and
    output head), called for the backbone's last hidden states only (no [B, T, V] logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from stratos.distill.head import last_hidden

        return last_hidden(self.model, input_ids, attention_mask)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The student's transformer blocks, for one ``fully_shard`` each."""
    from stratos.models.arch import backbone

    layers = getattr(backbone(model), "layers", None)
    if layers is None:
        raise ValueError(f"FSDP: {type(model).__name__} has no decoder layers where a causal LM keeps them (model.layers)")
    return list(layers)


@dataclass
class Parallel:
    rank: int = 0
    world: int = 1
    mode: str = "none"  # none, ddp or fsdp
    cpu_offload: bool = False
    wrapped: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group (torchrun): several processes, or one with FSDP2 over its device."""
        return self.world > 1 or self.mode != "none"

    @classmethod
    def from_env(cls, cfg: Any, model: nn.Module | None = None, device: torch.device | None = None) -> "Parallel":
        """One process, or the rank torchrun started (``WORLD_SIZE``, ``RANK``); joins the process group
        (gloo on the CPU; on CUDA, NCCL with gloo for CPU tensors) the first time. Under torchrun, one process
        with ``parallel: fsdp`` or ``fsdp_cpu_offload`` runs FSDP2 over its one device; one plain process
        refuses ``fsdp_cpu_offload``."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # torchrun with one process and FSDP2 asked for (parallel fsdp, or its CPU offload): FSDP2 over one
        # device, e.g. one GPU whose student needs its optimizer state in host memory.
        one_shard = "TORCHELASTIC_RUN_ID" in os.environ and (cfg.parallel == "fsdp" or cfg.fsdp_cpu_offload)
        if world <= 1 and not one_shard:
            if cfg.fsdp_cpu_offload:
                raise ValueError("distill.fsdp_cpu_offload is FSDP2's, and FSDP2 runs under torchrun: start this "
                                 "run with --nproc N, or with torchrun --nproc-per-node=1 for one GPU "
                                 "(docs/distributed.md); one plain process would ignore it")
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            # NCCL for the student's tensors on GPUs, gloo for the small CPU tensors of the reductions.
            backend = "cpu:gloo,cuda:nccl" if device is not None and device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        mode = cfg.parallel
        if one_shard:
            mode = "fsdp"
        elif mode == "auto":
            mode = "fsdp" if model is not None and not fits_one_device(model, device) else "ddp"
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), mode=mode, cpu_offload=cfg.fsdp_cpu_offload)

    # ----------------------------------------------------------------------------- the model

    def wrap(self, student: nn.Module, bf16: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The student's forward to its last hidden states, through DDP or FSDP2 when distributed."""
        from stratos.distill.head import last_hidden

        if not self.distributed:
            return lambda ids, mask: last_hidden(student, ids, mask)
        root = StudentRoot(student)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(student.parameters()).device
            self.wrapped = DistributedDataParallel(root, device_ids=[device] if device.type == "cuda" else None)
        elif self.mode == "fsdp":
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

            kw: dict[str, Any] = {}
            if bf16:
                kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.cpu_offload:
                kw["offload_policy"] = CPUOffloadPolicy()
            for layer in decoder_layers(student):
                fully_shard(layer, **kw)
            self.wrapped = fully_shard(root, **kw)  # the root: embeddings, final norm and output head
        else:
            raise ValueError(f"distill.parallel must be auto, ddp or fsdp, not {self.mode!r}")
        return self.wrapped

    def no_sync(self, last: bool) -> Any:
        """DDP all-reduces gradients only on a step's last micro-batch (FSDP2 reduces each one)."""
        if self.mode == "ddp" and not last:
            return self.wrapped.no_sync()
        return nullcontext()

    # ----------------------------------------------------------------------------- data and reductions

    def share(self, rows: Sequence[int]) -> list[int]:
        """This rank's rows of a micro-batch: ``rank, rank + world, ...``."""
        return list(rows)[self.rank :: self.world]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (one all-reduce for them all)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    # ----------------------------------------------------------------------------- state

    def full_state(self, student: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        """The trainable weights and the optimizer state, full (unsharded) and on the CPU, keyed by
        parameter name: a collective when distributed (every rank calls it); rank 0 writes them."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.distributed)
        names = {n for n, p in student.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in get_model_state_dict(student, options=opts).items() if k in names}
        return weights, get_optimizer_state_dict(student, opt, options=opts)

    def model_state(self, student: nn.Module) -> dict[str, torch.Tensor]:
        """The student's whole state dict, full and on the CPU, to save it as a model folder (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Tied weights once, as the model saves them itself (named_parameters lists a shared one once).
        names = {n for n, _ in student.named_parameters()} | {n for n, _ in student.named_buffers()}
        return {k: v for k, v in state.items() if k in names}

    def in_turn(self, make: Callable[[], Any]) -> Any:
        """``make()`` on rank 0 first, then on the others: what rank 0 writes (a teacher-signal cache),
        the others then find and read."""
        if not self.distributed:
            return make()
        if self.is_main:
            out = make()
            self.barrier()
            return out
        self.barrier()
        return make()

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def load_state(self, student: nn.Module, opt: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                   optim: dict) -> None:
        """Load full state from a checkpoint into a (possibly sharded) student and its optimizer. When
        distributed, only rank 0 has read the checkpoint (the others pass empty dicts) and broadcasts it:
        the other nodes need not see rank 0's disk."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=self.distributed)
        set_model_state_dict(student, weights, options=opts)
        set_optimizer_state_dict(student, opt, optim, options=opts)

    @staticmethod
    def shutdown() -> None:
        """Leave the process group, if this process joined one (at the end of a torchrun worker)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def fits_one_device(model: nn.Module, device: torch.device | None) -> bool:
    """Whether AdamW training of ``model`` (fp32 weights, gradients and two moments: 16 bytes a
    parameter) takes at most half of one device's memory: then DDP, else FSDP2."""
    need = 16 * sum(p.numel() for p in model.parameters())
    if device is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return need <= total / 2
