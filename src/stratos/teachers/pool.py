"""The teacher as a service: worker processes that hold the teacher and send back its last hidden states.

    pool = TeacherPool(teacher, workers=2, threads=1)   # starts the workers; the weights are shared, not copied
    pool.submit(batch)     # sent now: the workers compute while this process trains on something else
    h = pool.hidden(batch) # [batch.num_targets, d] float32: what OnlineTeacher(teacher).hidden(batch) returns
    pool.close()

The pool implements the engine's signal protocol (``head``, ``hidden(batch)``) and adds ``submit``,
which the trainer uses to keep micro-batches in flight (``distill.teacher_in_flight``), so that the
teacher's forward passes for the next batches run while the student trains on the current one.

How work is split. Each batch is cut into one part per worker: contiguous rows, balanced by token
count, every part keeping the batch's padded length. The cut depends only on the batch and the number
of workers (never on timing or on which worker is alive), so a run computes the same numbers every
time it runs. With one worker a batch goes whole and its hidden states equal the in-process ones
bitwise; split across workers they equal them within float rounding (``tests/test_teacher_pool.py``
checks both).

What travels. Token ids and masks (a few KB per batch) go to a worker pickled through its pipe; the
hidden states (rows x d floats, the bulk) come back through shared memory: each worker writes into a
buffer this process allocated and handed it once, and only ``(job, rows)`` comes back through the
pipe. Each worker returns the teacher's last hidden states after the final norm, only at the
batch's target positions, in float32 (computed under bf16 autocast where the run uses it), exactly
as ``OnlineTeacher``.

Failures. A worker that dies (killed, out of memory) is started again and sent the jobs it held, in
order; results are kept by job, so no batch is lost and none is counted twice. A worker that dies
again after ``max_restarts`` restarts in a row without finishing a job stops the run with
TeacherError; one that raises an error (a bug, a bad input) stops it with the worker's own traceback.

Backends. The pool's bookkeeping (splitting, jobs, restarts) is written once against a small
protocol (:class:`Backend`): start worker ``rank``, send it a job, wait for finished jobs and dead
workers, close. :class:`ProcessBackend` (``backend="process"``, the default) runs workers as local
processes (one per GPU, spawned, or several on the CPU with their threads set, forked from a forkserver);
``stratos.teachers.ray_pool.RayBackend`` (``backend="ray"``, Ray installed) runs them as Ray actors,
on this machine or a cluster's nodes.
"""

from __future__ import annotations

import os
import signal as _signal
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as _wait_any
from typing import Any, Protocol

import numpy as np
import torch

from stratos.distill.data import Batch
from stratos.distill.head import OutputHead
from stratos.teachers.base import TeacherError

Inputs = dict[str, np.ndarray]  # input_ids, attention_mask [rows, T]; target_mask [rows, T-1]


def split_rows(attention_mask: torch.Tensor, parts: int) -> list[slice]:
    """Contiguous row ranges, at most ``parts`` and none empty, with about equal token counts each."""
    counts = attention_mask.sum(dim=1).tolist()
    n = min(parts, len(counts))
    total, bounds, acc, k = sum(counts), [0], 0, 1
    for row, c in enumerate(counts[:-1]):
        acc += c
        # Cut after this row once the running count reaches the k-th share, leaving a row for each part left.
        if k < n and (acc >= total * k / n or len(counts) - (row + 1) == n - k):
            bounds.append(row + 1)
            k += 1
    bounds.append(len(counts))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class Backend(Protocol):
    """Where the pool's workers run. ``send`` never blocks on a dead worker (``wait`` reports it).

    A backend may also say how many torch threads its workers run on this machine (``local_threads``,
    read once they started): the pool takes them out of its own process's."""

    def start(self, rank: int) -> None: ...  # start (or start again) worker ``rank``

    def send(self, rank: int, job: int, inputs: Inputs, rows: int) -> None: ...

    def wait(self, timeout: float) -> tuple[list[tuple[int, torch.Tensor]], list[int]]: ...  # (job, hidden), dead ranks

    def close(self) -> None: ...


@dataclass
class _Job:
    rank: int
    inputs: Inputs
    rows: int


class TeacherPool:
    """Teacher workers behind the signal protocol (see the module's docstring).

    ``teacher`` is a model (shared with the workers, not copied) or a picklable callable returning one,
    which each worker calls. ``threads`` is each CPU worker's torch threads; ``devices`` the device of each worker
    (default: the teacher's, so workers share a GPU with the trainer; give ``["cuda:1", ...]`` to give
    each its own). ``autocast_dtype``: bf16 autocast in the workers, as ``OnlineTeacher``'s.
    ``backend``: where the workers run, by name (``"process"``: local processes; ``"ray"``: Ray actors,
    with ``backend_options`` such as ``{"address": "auto"}``, see ``stratos.teachers.ray_pool``) or a
    :class:`Backend` of one's own.
    """

    def __init__(self, teacher: Any, *, workers: int = 1, threads: int = 1, devices: Sequence[str] | None = None,
                 autocast_dtype: torch.dtype | None = None, max_restarts: int = 3,
                 backend: Backend | str = "process", backend_options: Mapping[str, Any] | None = None):
        if workers < 1:
            raise ValueError(f"a teacher pool needs at least one worker, got {workers}")
        model = teacher if isinstance(teacher, torch.nn.Module) else teacher()
        self.head = OutputHead.from_model(model)
        self.workers, self.max_restarts = workers, max_restarts
        if devices is None:
            devices = [str(next(model.parameters()).device)] * workers
        load = SharedModel(model) if model is teacher else teacher
        if isinstance(backend, str):
            backend = backend_class(backend)(load, hidden_size=self.head.hidden_size, threads=threads,
                                             devices=list(devices), autocast_dtype=autocast_dtype,
                                             **(backend_options or {}))
        elif backend_options:
            raise ValueError("backend_options go with a backend given by name")
        self.backend: Backend = backend
        self._jobs: dict[int, _Job] = {}  # sent, not finished
        self._done: dict[int, torch.Tensor] = {}  # finished, not yet taken by hidden()
        self._tickets: dict[int, tuple[torch.Tensor, list[int]]] = {}  # id(batch.input_ids) -> (that tensor, jobs)
        self._next_job = 0
        self._deaths = [0] * workers  # in a row, per rank: reset when the rank finishes a job
        self.restarts = 0
        for rank in range(workers):
            self.backend.start(rank)
        # Local CPU workers' threads come out of this process's: two cores shared by a trainer and a
        # worker that each run two threads would run four, and both would slow down.
        self._threads_before = torch.get_num_threads()
        local = getattr(self.backend, "local_threads", 0)
        torch.set_num_threads(max(1, self._threads_before - local))

    def submit(self, batch: Batch) -> None:
        """Send ``batch`` to the workers now (once: a batch already sent is not sent again)."""
        key = id(batch.input_ids)  # batches made from it by with_weights/with_values share the tensor
        if key in self._tickets:
            return
        tmask = batch.target_mask
        jobs = []
        for rank, rows in enumerate(split_rows(batch.attention_mask, self.workers)):
            inputs = {"input_ids": batch.input_ids[rows].numpy(), "attention_mask": batch.attention_mask[rows].numpy(),
                      "target_mask": tmask[rows].numpy()}
            job = self._next_job
            self._next_job += 1
            self._jobs[job] = _Job(rank, inputs, int(inputs["target_mask"].sum()))
            self.backend.send(rank, job, inputs, self._jobs[job].rows)
            jobs.append(job)
        self._tickets[key] = (batch.input_ids, jobs)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """The teacher's last hidden states at ``batch``'s target positions, [num_targets, d] float32."""
        self.submit(batch)
        _, jobs = self._tickets.pop(id(batch.input_ids))
        while any(j not in self._done for j in jobs):
            self._collect(timeout=1.0)
        return torch.cat([self._done.pop(j) for j in jobs])

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet taken."""
        return len(self._tickets)

    def _collect(self, timeout: float) -> None:
        finished, dead = self.backend.wait(timeout)
        for job, h in finished:
            spec = self._jobs.pop(job, None)
            if spec is not None:  # a job finishes once: its result is kept by job id
                self._done[job] = h
                self._deaths[spec.rank] = 0
        for rank in dead:
            self._restart(rank)

    def _restart(self, rank: int) -> None:
        self._deaths[rank] += 1
        if self._deaths[rank] > self.max_restarts:
            raise TeacherError(f"teacher worker {rank} died {self._deaths[rank]} times in a row without finishing "
                               "a batch; see its output above (out of memory?)")
        self.restarts += 1
        self.backend.start(rank)
        for job, spec in sorted(self._jobs.items()):  # in the order they were first sent
            if spec.rank == rank:
                self.backend.send(rank, job, spec.inputs, spec.rows)

    def close(self) -> None:
        self.backend.close()
        torch.set_num_threads(self._threads_before)

    def __enter__(self) -> "TeacherPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def backend_class(name: str) -> Callable[..., Backend]:
    """The backend called ``name``; Ray's is imported only when asked for (an optional dependency)."""
    if name == "process":
        return ProcessBackend
    if name == "ray":
        try:
            from stratos.teachers.ray_pool import RayBackend
        except ModuleNotFoundError as e:
            if e.name != "ray":
                raise
            raise ImportError("the teacher pool's Ray backend needs Ray: pip install 'stratos[ray]'") from e
        return RayBackend
    raise ValueError(f"unknown teacher pool backend {name!r}: 'process' or 'ray'")


class SharedModel:
    """The teacher handed to local workers through their pipes: pickled, its weights move to shared
    memory once and every worker maps the same pages (CUDA weights travel by CUDA IPC)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self) -> torch.nn.Module:
        return self.model


@dataclass
class _Buffer:
    id: int
    tensor: torch.Tensor  # [capacity, d] float32 in shared memory


def start_method(devices: Sequence[str]) -> str:
    """How local workers start: ``forkserver`` where every worker runs on the CPU, ``spawn`` where any
    runs on a GPU.

    A forkserver's workers fork from a clean single-threaded server that imported torch and the
    teacher's model code once, so a worker (re)starts in well under a second, without the OpenMP
    threads of the training process (as a plain fork would have) and without importing everything
    again (as spawn does). But a process forked after CUDA was initialised cannot use CUDA, and on an
    H200 (torch 2.11, transformers 5.25) forkserver workers failed with "Cannot re-initialize CUDA in
    forked subprocess" as they unpickled the teacher's CUDA weights: something the server imported had
    initialised it (which import was not traced). So GPU workers start fresh interpreters, which costs
    seconds per (re)start instead."""
    return "spawn" if any(torch.device(d).type == "cuda" for d in devices) else "forkserver"


class ProcessBackend:
    """Workers as local processes: forked from a forkserver on the CPU, spawned for GPUs (start_method)."""

    def __init__(self, load: Callable[[], torch.nn.Module], *, hidden_size: int, threads: int, devices: list[str],
                 autocast_dtype: torch.dtype | None):
        import torch.multiprocessing as mp

        self._ctx = mp.get_context(start_method(devices))
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(["stratos.teachers.pool", "stratos.teachers.signal",
                                              *([load.model.__class__.__module__] if isinstance(load, SharedModel)
                                                else [])])
        self._load, self._d, self._threads, self._devices = load, hidden_size, threads, devices
        self.local_threads = threads * sum(torch.device(d).type == "cpu" for d in devices)
        self._autocast = autocast_dtype
        self._procs: dict[int, Any] = {}
        self._conns: dict[int, Any] = {}
        self._known: dict[int, set[int]] = {}  # buffer ids each worker holds
        self._free: list[_Buffer] = []
        self._busy: dict[int, tuple[int, _Buffer]] = {}  # job -> (rank, the buffer it writes)
        self._next_buffer = 0

    def start(self, rank: int) -> None:
        self._stop(rank)
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self._devices[rank], self._threads, self._autocast),
                                 name=f"stratos-teacher-{rank}", daemon=True)
        proc.start()
        child.close()
        # The teacher goes through the pipe, not the process's arguments: the forkserver passes those
        # with their file descriptors in one message of at most 256, one per shared weight tensor.
        self._procs[rank], self._conns[rank], self._known[rank] = proc, parent, set()
        try:
            parent.send(self._load)
            # Wait until it holds the teacher, so that a run's clock starts with its workers ready and a
            # teacher that cannot load shows up here; if it dies instead, wait() reports it.
            _wait_any([parent, proc.sentinel])
            if parent.poll():
                parent.recv()  # ("ready",), always its first message
        except (EOFError, OSError):
            pass

    def _buffer(self, rows: int) -> _Buffer:
        fits = [b for b in self._free if b.tensor.shape[0] >= rows]
        if fits:
            buf = min(fits, key=lambda b: b.tensor.shape[0])
            self._free.remove(buf)
            return buf
        capacity = 1 << max(8, (max(rows, 1) - 1).bit_length())  # powers of two: few sizes, reused
        self._next_buffer += 1
        return _Buffer(self._next_buffer, torch.empty(capacity, self._d).share_memory_())

    def send(self, rank: int, job: int, inputs: Inputs, rows: int) -> None:
        buf = self._buffer(rows)
        self._busy[job] = (rank, buf)
        first = buf.id not in self._known[rank]
        self._known[rank].add(buf.id)
        try:
            self._conns[rank].send((job, buf.id, buf.tensor if first else None, inputs))
        except OSError:  # BrokenPipeError and kin: the worker died; wait() reports it and the pool resends
            pass

    def wait(self, timeout: float) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
        sentinels = {p.sentinel: rank for rank, p in self._procs.items()}
        ready = _wait_any([*self._conns.values(), *sentinels], timeout)
        finished, dead = [], []
        woken = {sentinels[r] for r in ready if isinstance(r, int)} | {k for k, c in self._conns.items() if c in ready}
        for rank in sorted(woken):
            conn = self._conns[rank]
            while True:  # results a worker sent before it died are good: take them first
                try:
                    if not conn.poll():
                        break
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "error":
                    raise TeacherError(f"teacher worker {rank} failed:\n{msg[2]}")
                job, n = msg
                _, buf = self._busy.pop(job)
                finished.append((job, buf.tensor[:n].clone()))
                self._free.append(buf)
            if not self._procs[rank].is_alive():
                dead.append(rank)
                for job in [j for j, (r, _) in self._busy.items() if r == rank]:
                    self._free.append(self._busy.pop(job)[1])  # the dead worker writes no more
        return finished, dead

    def kill(self, rank: int) -> None:
        """SIGKILL worker ``rank`` (tests, and a user's check that a run survives a lost worker)."""
        os.kill(self._procs[rank].pid, _signal.SIGKILL)

    def _stop(self, rank: int) -> None:
        proc, conn = self._procs.pop(rank, None), self._conns.pop(rank, None)
        if conn is not None:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
        if proc is not None:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def close(self) -> None:
        for rank in list(self._procs):
            self._stop(rank)
        self._free.clear()
        self._busy.clear()


def _serve(conn: Any, device: str, threads: int, autocast_dtype: torch.dtype | None) -> None:
    """A worker's loop: receive the teacher, then take (job, buffer, inputs), write the hidden states into
    the buffer and answer (job, rows)."""
    from stratos.teachers.signal import hidden_at_targets

    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        load = conn.recv()
    except (EOFError, OSError):
        return
    model = load().to(device).eval()
    conn.send(("ready",))
    buffers: dict[int, torch.Tensor] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the pool went away
        if msg is None:
            return
        job, buf_id, buf, inputs = msg
        try:
            if buf is not None:
                buffers[buf_id] = buf
            h = hidden_at_targets(model, *(torch.from_numpy(inputs[k]) for k in
                                           ("input_ids", "attention_mask", "target_mask")), autocast_dtype)
            buffers[buf_id][: h.shape[0]].copy_(h)
            answer: tuple = (job, h.shape[0])
        except Exception:  # noqa: BLE001 - reported to the pool with the traceback, which stops the run
            answer = ("error", job, traceback.format_exc())
        try:
            conn.send(answer)
        except OSError:
            return  # the pool closed while this job ran (batches sent ahead of a run's last step)
