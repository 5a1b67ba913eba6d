"""Where the work runs: the device, its compute dtype, and (later) rank and world size.

Every stage asks this module; none picks a device itself.

    rt = runtime("auto")          # CUDA when one is visible, else the CPU
    model.to(rt.device)
    bf16 = resolve_bf16("auto", rt.device)   # autocast only where the device computes bf16 natively

``device`` settings: ``auto`` (the default), ``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``.
A CUDA setting on a machine without one is an error, never a silent fallback to the CPU.
``bf16: auto`` means bf16 autocast where the device computes bf16 natively: every recent GPU, and
CPUs with AVX512-BF16 or AMX. Many CPUs have neither; there bf16 is emulated, slower than fp32, and
autocast stays off. ``STRATOS_CPU_BF16=0`` (or ``1``) overrides what the CPU's flags say, for every
stage and every process the run starts: ``0`` runs a bf16 CPU the way a CPU without it runs (fp32),
which is how the demo's fp32 timing was measured on a bf16 CPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from stratos.errors import UserError
from stratos.spec import DEVICE_PATTERN

DEVICE_RE = re.compile(DEVICE_PATTERN)
DEVICE_HELP = "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'"


class DeviceError(UserError):
    """A device setting this machine cannot honour."""


def resolve_device(setting: str = "auto") -> torch.device:
    """The torch device a ``device`` setting names on this machine."""
    if not DEVICE_RE.match(setting or ""):
        raise DeviceError(f"device {setting!r}: expected {DEVICE_HELP}")
    if setting == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {setting!r}: this machine has no CUDA device (torch {torch.__version__} sees "
                          "none); use device: auto or cpu")
    index = int(setting.partition(":")[2] or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {setting!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


CPU_BF16_ENV = "STRATOS_CPU_BF16"


@lru_cache(maxsize=None)
def _cpu_bf16() -> bool:
    override = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if override:
        if override not in ("0", "1", "false", "true"):
            raise DeviceError(f"{CPU_BF16_ENV}={override!r}: expected 0 or 1 (unset: the CPU's flags decide)")
        return override in ("1", "true")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _cpu_bf16()


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """A ``bf16`` setting (``auto``, true, false) on ``device``."""
    return bf16_supported(device) if setting == "auto" else bool(setting)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Runtime:
    """The device a process computes on. ``rank`` and ``world_size`` describe distributed runs
    (a single process is rank 0 of 1)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def name(self) -> str:
        """What a manifest records: ``cpu`` or ``cuda:N``."""
        return str(self.device)

    def describe(self) -> str:
        """The device in words, for logs: ``cuda:0 (NVIDIA H200)`` or ``cpu (16 threads)``."""
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return f"cpu ({torch.get_num_threads()} threads)"


def runtime(device: str = "auto") -> Runtime:
    """The runtime of this process for a ``device`` setting."""
    return Runtime(resolve_device(device))
