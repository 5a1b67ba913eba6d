"""The teacher pool's workers as Ray actors: ``TeacherPool(teacher, workers=N, backend="ray")``.

:class:`RayBackend` implements the pool's :class:`~stratos.teachers.pool.Backend` protocol; the pool's
bookkeeping (splitting batches, jobs, restarts) is the same as with local processes. Ray is an optional
dependency (``pip install 'stratos[ray]'``): this module is imported only when a pool asks for it.

- **Workers**: one actor per rank, each holding the teacher and returning its last hidden states at a
  batch's target positions, float32, exactly as a local worker (:func:`stratos.teachers.pool._serve`):
  the same ``hidden_at_targets``, autocast and torch threads.
- **What travels**: the teacher's weights go into Ray's object store once (:class:`ModelState`); every
  actor builds the model from them, and actors on one node map the same read-only pages (on a GPU each
  copies them to its device). Token ids and masks go with each call; the hidden states come back as the
  call's return value, through the object store.
- **Placement** is Ray's: each actor asks for ``num_cpus=threads``, and ``num_gpus=gpus_per_worker`` (1,
  or a fraction to share a GPU) when its device is CUDA; Ray sets the GPU it gets as the actor's ``cuda``.
- **Cluster**: with no ``address`` and Ray not yet initialised, a local cluster starts (:func:`init_ray`)
  and shuts down when the pool closes; ``address`` joins a running one (``"auto"``, ``"ray://head:10001"``);
  if Ray is already initialised (by the caller) it is used as it is and left running. (So a second
  pool in a process uses the first one's Ray, which stops when the first pool closes.)
- **Failures**: an actor that dies (killed, out of memory, its node lost) is reported as a dead rank, and
  the pool starts it again and resends its jobs; an error raised in an actor stops the run with
  TeacherError and the actor's traceback, as with local processes.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from stratos.teachers.base import TeacherError
from stratos.teachers.pool import Inputs, SharedModel

log = logging.getLogger("stratos.teachers")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, **options: Any) -> bool:
    """Start a local Ray cluster (``address`` None) or join the one at ``address``, unless Ray is
    initialised already; True when this call did it (so its caller shuts it down).

    The local cluster is kept light: no dashboard, ``num_cpus`` logical CPUs (default: this machine's);
    ``options`` go to ``ray.init`` as they are (``object_store_memory``, ``num_gpus``, ...)."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **options)
    else:
        ray.init(address=address, **options)
    return True


class ModelState:
    """A model as Ray ships it: its modules with every weight replaced by a placeholder on the meta device
    (pickled, small), and each distinct weight's bytes as a numpy array, which Ray keeps once in its object
    store and hands to every actor of a node without copying (read-only; the teacher never writes its
    weights). Calling it builds the model on the CPU around those arrays. Tied weights stay tied."""

    def __init__(self, model: torch.nn.Module):
        index: dict[int, int] = {}  # id(tensor) -> its position in self.arrays
        self.arrays: list[np.ndarray] = []
        self.specs: list[tuple[torch.dtype, tuple[int, ...]]] = []
        self.slots: list[tuple[int, str, str, int]] = []  # (module's position in modules(), kind, name, array)
        memo: dict[int, Any] = {}
        for m, module in enumerate(model.modules()):
            for kind, tensors in (("param", module._parameters), ("buffer", module._buffers)):
                for name, t in tensors.items():
                    if t is None:
                        continue
                    if id(t) not in index:
                        index[id(t)] = len(self.arrays)
                        # Raw bytes: numpy has no bfloat16; a CPU model's are copied once, by ray.put.
                        self.arrays.append(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                        self.specs.append((t.dtype, tuple(t.shape)))
                        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=False) if kind == "param" else meta
                    self.slots.append((m, kind, name, index[id(t)]))
        self.skeleton = copy.deepcopy(model, memo)  # the weights come out as their meta placeholders

    def __call__(self) -> torch.nn.Module:
        with warnings.catch_warnings():  # "the given NumPy array is not writable": the object store's pages
            warnings.simplefilter("ignore", UserWarning)
            tensors = [torch.from_numpy(a).view(dtype).reshape(shape)
                       for a, (dtype, shape) in zip(self.arrays, self.specs)]
        modules, params = list(self.skeleton.modules()), {}
        for m, kind, name, i in self.slots:
            if kind == "param":
                if i not in params:
                    params[i] = torch.nn.Parameter(tensors[i], requires_grad=False)
                modules[m]._parameters[name] = params[i]
            else:
                modules[m]._buffers[name] = tensors[i]
        return self.skeleton


# max_restarts=0: the pool restarts a dead worker and resends its jobs, not Ray. "watch" runs beside the
# teacher's calls: its call never returns, and fails when the actor dies (a process's sentinel, for Ray).
@ray.remote(max_restarts=0, concurrency_groups={"watch": 1})
class TeacherActor:
    """One worker: the teacher on ``device``; ``hidden`` computes what ``_serve`` computes."""

    def __init__(self, load: Callable[[], torch.nn.Module], device: str, threads: int,
                 autocast_dtype: torch.dtype | None):
        if torch.device(device).type == "cpu":
            torch.set_num_threads(threads)
        self.model = load().to(device).eval()
        self.autocast_dtype = autocast_dtype

    def ready(self) -> str:
        """The id of the node it runs on (once it holds the teacher)."""
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        threading.Event().wait()

    def hidden(self, inputs: Inputs) -> torch.Tensor | str:
        """[targets, d] float32 on the CPU, or the traceback of what went wrong."""
        from stratos.teachers.signal import hidden_at_targets

        try:
            h = hidden_at_targets(self.model, *(torch.tensor(inputs[k]) for k in  # a copy: Ray's arrays are read-only
                                                ("input_ids", "attention_mask", "target_mask")), self.autocast_dtype)
            return h.cpu()
        except Exception:  # noqa: BLE001 - reported to the pool with the traceback, which stops the run
            return traceback.format_exc()


class RayBackend:
    """Workers as Ray actors (see the module's docstring). ``address``: a Ray cluster to join (default: the
    one this process already initialised, else a new local one); ``gpus_per_worker``: each CUDA worker's
    share of a GPU; ``init_options``: more ``ray.init`` arguments where this backend starts Ray."""

    def __init__(self, load: Callable[[], torch.nn.Module], *, hidden_size: int, threads: int, devices: list[str],
                 autocast_dtype: torch.dtype | None, address: str | None = None, gpus_per_worker: float = 1.0,
                 init_options: dict[str, Any] | None = None):
        del hidden_size  # hidden states come back as return values: no buffers to size
        self._threads, self._devices, self._autocast = threads, devices, autocast_dtype
        self._gpus = [gpus_per_worker if torch.device(d).type == "cuda" else 0 for d in devices]
        self._actors: dict[int, Any] = {}
        self._nodes: dict[int, str] = {}  # rank -> node id, once it holds the teacher
        self._watches: dict[Any, int] = {}  # ObjectRef of each actor's watch() -> its rank
        self._pending: dict[Any, tuple[int, int]] = {}  # ObjectRef of a job's result -> (rank, job)
        # A local cluster gets at least the CPUs its actors ask for (logical CPUs: Ray's count, not cores).
        self._started = init_ray(address, **{"num_cpus": max(os.cpu_count() or 1, threads * len(devices)),
                                             **(init_options or {})})
        if self._started and address is None:  # a local cluster grows no nodes: say now what it cannot place
            have = ray.cluster_resources()
            if sum(self._gpus) > have.get("GPU", 0):
                self.close()
                raise TeacherError(f"the local Ray cluster has {have.get('GPU', 0):g} GPU(s); the teacher pool's "
                                   f"CUDA workers need {sum(self._gpus):g}")
        self._load = ray.put(ModelState(load.model) if isinstance(load, SharedModel) else load)

    @property
    def local_threads(self) -> int:
        """Torch threads of the CPU workers on this machine's node (the pool takes them out of its own)."""
        here = ray.get_runtime_context().get_node_id()
        return sum(self._threads for rank, node in self._nodes.items()
                   if node == here and torch.device(self._devices[rank]).type == "cpu")

    def start(self, rank: int) -> None:
        self._stop(rank)
        device = self._devices[rank]
        if torch.device(device).type == "cuda":
            device = "cuda"  # the GPU Ray gives the actor is the only one it sees
        actor = TeacherActor.options(num_cpus=self._threads, num_gpus=self._gpus[rank]).remote(
            self._load, device, self._threads, self._autocast)
        self._actors[rank] = actor
        self._watches[actor.watch.remote()] = rank
        # Wait until it holds the teacher, as the process backend does; if it dies, wait() reports it.
        ready, waited = actor.ready.remote(), 0
        while not ray.wait([ready], timeout=60)[0]:
            waited += 60
            log.warning("teacher worker %d is not ready after %d s: loading the teacher, or waiting for Ray to place "
                        "it (it asks for %s CPU and %s GPU; free in the cluster: %s)", rank, waited, self._threads,
                        self._gpus[rank], ray.available_resources())
        try:
            self._nodes[rank] = ray.get(ready)
        except ray.exceptions.RayActorError:
            pass

    def send(self, rank: int, job: int, inputs: Inputs, rows: int) -> None:
        # To a dead actor too: the call's result raises RayActorError, and wait() reports the rank.
        self._pending[self._actors[rank].hidden.remote(inputs)] = (rank, job)

    def wait(self, timeout: float) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
        refs = [*self._pending, *self._watches]
        if not refs:
            return [], []
        ray.wait(refs, num_returns=1, timeout=timeout)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        dead = {self._watches[ref] for ref in ready if ref in self._watches}
        finished = []
        for ref in (r for r in ready if r in self._pending):  # results returned before a death are good: taken
            rank, job = self._pending.pop(ref)
            try:
                h = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                # The actor died, or the node holding its result did: the pool restarts the rank and resends.
                dead.add(rank)
                continue
            except ray.exceptions.RayTaskError as e:  # raised by Ray around the call, not by the teacher
                raise TeacherError(f"teacher worker {rank} failed:\n{e}") from None
            if isinstance(h, str):
                raise TeacherError(f"teacher worker {rank} failed:\n{h}")
            finished.append((job, h))
        for rank in dead:  # its other calls fail too, and the pool sends them again when it restarts it
            self._forget(rank)
        return finished, sorted(dead)

    def kill(self, rank: int) -> None:
        """Kill worker ``rank``'s actor, and return once Ray knows it is dead (tests, and a user's check
        that a run survives a lost worker)."""
        ray.kill(self._actors[rank], no_restart=True)
        ray.wait([ref for ref, r in self._watches.items() if r == rank], timeout=60)

    def _forget(self, rank: int) -> None:
        """Stop waiting for worker ``rank``: its watch and its jobs' results."""
        self._watches = {ref: r for ref, r in self._watches.items() if r != rank}
        self._pending = {ref: rj for ref, rj in self._pending.items() if rj[0] != rank}

    def _stop(self, rank: int) -> None:
        self._forget(rank)
        self._nodes.pop(rank, None)
        actor = self._actors.pop(rank, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def close(self) -> None:
        for rank in list(self._actors):
            self._stop(rank)
        self._load = None
        if self._started:
            ray.shutdown()
            self._started = False
