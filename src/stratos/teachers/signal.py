"""The white-box teacher's distillation signal: its last hidden states and its output head.

Each class here implements the engine's protocol (``stratos.distill.signal.TeacherSignal``): the
teacher's ``head`` and ``hidden(batch)``, its last hidden states at the batch's target positions.
The engine never sees the teacher model itself, so the teacher can run in this process
(OnlineTeacher), have run earlier (HiddenStateCache), or live in worker processes
(``stratos.teachers.pool.TeacherPool``) behind the same two members. ``hidden_state_signal`` picks
one for a run's settings; an API teacher's signal (top-k log-probs stored with its generations) is
``stratos.teachers.topk``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from stratos.distill.data import Batch, Encoded, collate
from stratos.distill.head import OutputHead, last_hidden
from stratos.io import atomic_save_tensors, write_json
from stratos.progress import progress_bar

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_fingerprint(model: Any) -> str:
    """A content hash of a model: its config and every parameter's and saved buffer's name, shape,
    dtype and raw bytes.

    One pass over the weights (sha256 reads 1-2 GB/s: about ten seconds for a 7B teacher) and
    independent of where the model came from, so a cache keyed by it is never reused for other
    weights. The bytes themselves are hashed, not a checksum such as their sum: two weight sets
    with equal sums (a swapped pair of entries) would otherwise share a cache.
    """
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    saved = model.state_dict(keep_vars=True).keys()  # persistent buffers; derived ones (rotary inv_freq) are not
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in saved)]
    with torch.no_grad():
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
            # A uint8 view gives the raw bytes of any dtype (bfloat16 has no numpy counterpart).
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@torch.no_grad()
def hidden_at_targets(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                      autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The teacher's last hidden states (after the final norm) at the target positions, [targets, d]
    float32, row by row: what every white-box signal returns, wherever the teacher runs."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        h = last_hidden(model, input_ids.to(device), attention_mask.to(device))
    return h[:, :-1][target_mask.to(device)].float()


class OnlineTeacher:
    """The teacher runs its forward pass inside the training loop (no disk, more compute)."""

    def __init__(self, model: Any, *, autocast_dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.head = OutputHead.from_model(model)
        self.autocast_dtype = autocast_dtype

    def hidden(self, batch: Batch) -> torch.Tensor:
        return hidden_at_targets(self.model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                 self.autocast_dtype)


class HiddenStateCache:
    """Teacher hidden states on disk: safetensors shards in bf16/fp16, keyed by teacher and data.

    Layout of ``root/<key>/``: ``head.safetensors`` (the teacher's output head, so a later run
    needs no teacher at all), ``shard-00000.safetensors`` ... each holding ``hidden`` [rows, d]
    and ``offsets`` [examples + 1], and ``meta.json``, written last, marking the cache complete.
    Shards are written atomically, so a crash while building loses at most one shard of work.
    """

    SHARD_EXAMPLES = 512

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.head = OutputHead.load(self.path / "head.safetensors")
        self._files: dict[int, Any] = {}
        self._offsets: dict[int, list[int]] = {}

    @staticmethod
    def key(teacher_fingerprint: str, data_fingerprint: str, dtype: str) -> str:
        return hashlib.sha256(f"{teacher_fingerprint}:{data_fingerprint}:{dtype}".encode()).hexdigest()[:24]

    @classmethod
    def exists(cls, root: Path, key: str) -> bool:
        return (Path(root) / key / "meta.json").is_file()

    @classmethod
    def build(
        cls,
        teacher: Any,
        examples: Sequence[Encoded],
        root: Path,
        key: str,
        *,
        pad_id: int,
        dtype: str = "bfloat16",
        batch_size: int = 8,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = True,
        signal: Any = None,
    ) -> "HiddenStateCache":
        """Run the teacher once over ``examples`` and store its hidden states; resumes a partial build.
        ``signal`` (e.g. a TeacherPool) computes them instead of ``teacher`` in this process; a shard's
        batches are all sent to it at once, so its workers run side by side."""
        path = Path(root) / key
        if (path / "meta.json").is_file():
            return cls(path)
        path.mkdir(parents=True, exist_ok=True)
        online = signal or OnlineTeacher(teacher, autocast_dtype=autocast_dtype)
        online.head.save(path / "head.safetensors")
        n = len(examples)
        shards = range(0, n, cls.SHARD_EXAMPLES)
        total_tokens = 0
        with progress_bar("caching teacher hidden states", total=n, enabled=progress) as bar:
            for shard_id, start in enumerate(shards):
                shard_path = path / f"shard-{shard_id:05d}.safetensors"
                stop = min(start + cls.SHARD_EXAMPLES, n)
                if shard_path.is_file():
                    bar.advance(stop - start)
                    continue
                rows, offsets = [], [0]
                spans = [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
                batches = [collate([examples[i] for i in idx], idx, pad_id) for idx in spans]
                for batch in batches if hasattr(online, "submit") else ():
                    online.submit(batch)
                for batch in batches:
                    h = online.hidden(batch).to(_DTYPES[dtype])
                    per_row = batch.target_mask.sum(dim=1).tolist()
                    for count in per_row:
                        offsets.append(offsets[-1] + count)
                    rows.append(h)
                    bar.advance(len(batch.indices))
                hidden = torch.cat(rows).contiguous()
                total_tokens += hidden.shape[0]
                atomic_save_tensors({"hidden": hidden, "offsets": torch.tensor(offsets, dtype=torch.long)}, shard_path)
        write_json(
            path / "meta.json",
            {
                "examples": n,
                "shard_examples": cls.SHARD_EXAMPLES,
                "hidden_size": online.head.hidden_size,
                "vocab_size": online.head.vocab_size,
                "dtype": dtype,
                "bytes_per_token": online.head.hidden_size * _DTYPES[dtype].itemsize,
            },
        )
        return cls(path)

    def _shard(self, shard_id: int) -> tuple[Any, list[int]]:
        if shard_id not in self._files:
            fh = safe_open(str(self.path / f"shard-{shard_id:05d}.safetensors"), framework="pt")
            self._files[shard_id] = fh
            self._offsets[shard_id] = fh.get_tensor("offsets").tolist()
        return self._files[shard_id], self._offsets[shard_id]

    def example(self, i: int) -> torch.Tensor:
        shard_id, j = divmod(i, self.meta["shard_examples"])
        fh, offsets = self._shard(shard_id)
        return fh.get_slice("hidden")[offsets[j] : offsets[j + 1]]

    def hidden(self, batch: Batch) -> torch.Tensor:
        return torch.cat([self.example(i) for i in batch.indices]).float()

    @property
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("shard-*.safetensors"))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def hidden_state_signal(
    teacher: Any,
    examples: Sequence[Encoded],
    cfg: Any,
    pad_id: int,
    cache_root: Path | None,
    progress: bool,
) -> tuple[OnlineTeacher | HiddenStateCache, dict[str, Any]]:
    """The signal of a white-box ``teacher`` model for a run's settings ``cfg`` (a DistillSpec):
    computed in the loop (``teacher_signal: online``) or once into the disk cache (``cached``, keyed by
    the teacher's weights, the data and the dtype, so later epochs, students and runs reuse it), on the
    teacher's device with bf16 autocast where ``cfg.bf16`` and the device allow. Returns the signal
    and what the run records about it."""
    from stratos.distill.data import data_fingerprint
    from stratos.runtime import resolve_bf16

    device = next(teacher.parameters()).device
    autocast = torch.bfloat16 if resolve_bf16(cfg.bf16, device) else None
    if cfg.teacher_signal == "online":
        if cfg.teacher_workers:
            pool, pool_info = teacher_pool(teacher, cfg, autocast)
            return pool, {"mode": "online", **pool_info}
        return OnlineTeacher(teacher, autocast_dtype=autocast), {"mode": "online"}
    from stratos.models import cache_dir

    root = cache_root or cache_dir() / "teacher-signal"
    key = HiddenStateCache.key(model_fingerprint(teacher), data_fingerprint(examples), cfg.cache_dtype)
    reused = HiddenStateCache.exists(root, key)
    # Workers only to build a missing cache: a cache already there needs no teacher at all.
    pool, pool_info = teacher_pool(teacher, cfg, autocast) if cfg.teacher_workers and not reused else (None, {})
    try:
        cache = HiddenStateCache.build(
            teacher, examples, root, key, pad_id=pad_id, dtype=cfg.cache_dtype,
            batch_size=cfg.per_device_train_batch_size, autocast_dtype=autocast, progress=progress, signal=pool,
        )
    finally:
        if pool is not None:
            pool.close()  # the cache is built: training reads it, not the workers
    info = {"mode": "cached", "path": str(cache.path), "reused": reused, **cache.meta, "bytes_on_disk": cache.bytes_on_disk,
            **({"built_by": pool_info} if pool_info else {})}
    return cache, info


def teacher_pool(teacher: Any, cfg: Any, autocast: torch.dtype | None) -> tuple[Any, dict[str, Any]]:
    """The worker pool of a run's settings (``teacher_workers``, ``teacher_threads``, ``teacher_devices``)
    and what the run records about it. CPU workers' threads come out of this process's own until the
    pool closes: half of them by default, split among the workers."""
    from stratos.teachers.pool import TeacherPool

    n = cfg.teacher_workers
    devices = cfg.teacher_devices or [str(next(teacher.parameters()).device)] * n  # one each: the spec checks it
    threads = cfg.teacher_threads or max(1, torch.get_num_threads() // (2 * n))
    ray = cfg.teacher_backend == "ray"
    pool = TeacherPool(teacher, workers=n, threads=threads, devices=devices, autocast_dtype=autocast,
                       backend=cfg.teacher_backend, backend_options={"address": cfg.teacher_ray_address} if ray else None)
    return pool, {"workers": n, "backend": cfg.teacher_backend, "devices": devices, "threads_per_worker": threads,
                  "training_threads": torch.get_num_threads(),
                  **({"ray_address": cfg.teacher_ray_address or "local cluster"} if ray else {})}
