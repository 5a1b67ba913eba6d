"""The server catalog: offerings across providers, plus the local machine.

The shipped file (``stratos/data/servers.csv``) holds datasheet figures and list prices, each row
with its source and date. They are approximate: prices change and spot rates float, so a user
adds or replaces rows with a CSV of the same columns (``plan.catalog``). The local machine is
always an offering: its speed comes from ``stratos profile`` (or a conservative default), its
price from ``plan.local_price_per_hour`` (default 0).
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from stratos.errors import UserError

COLUMNS = (
    "name", "provider", "region", "gpu", "gpu_count", "gpu_memory_gb", "bf16_tflops", "mem_bw_tbs",
    "interconnect", "on_demand_usd_hr", "spot_usd_hr", "source", "date", "notes",
)
LOCAL = "local"


class CatalogError(UserError, ValueError):
    """A bad catalog file; the message names the file and line."""


@dataclass(frozen=True)
class Server:
    """One offering. Per-GPU figures (memory, TFLOP/s, bandwidth) times ``gpu_count`` give the whole."""

    name: str
    provider: str
    region: str
    gpu: str  # accelerator model, or 'cpu' for the local machine without one
    gpu_count: int
    gpu_memory_gb: float  # per GPU (for a CPU: usable RAM)
    bf16_tflops: float  # dense 16-bit tensor TFLOP/s per GPU (for a CPU: measured matmul TFLOP/s)
    mem_bw_tbs: float  # memory bandwidth per GPU, TB/s
    interconnect: str
    on_demand_usd_hr: float  # whole instance
    spot_usd_hr: float | None
    source: str
    date: str
    notes: str = ""

    @property
    def is_local(self) -> bool:
        return self.provider == LOCAL

    @property
    def memory_bytes(self) -> float:
        return self.gpu_memory_gb * 1e9 * self.gpu_count

    @property
    def flops(self) -> float:
        return self.bf16_tflops * 1e12 * self.gpu_count

    @property
    def bandwidth(self) -> float:
        return self.mem_bw_tbs * 1e12 * self.gpu_count

    def price(self, spot: bool = False) -> float:
        """$/hour; spot where asked and known, else on-demand."""
        if spot and self.spot_usd_hr is not None:
            return self.spot_usd_hr
        return self.on_demand_usd_hr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_NUMERIC = {"gpu_count": int, "gpu_memory_gb": float, "bf16_tflops": float, "mem_bw_tbs": float,
            "on_demand_usd_hr": float, "spot_usd_hr": float}
_REQUIRED = ("name", "provider", "gpu", "gpu_count", "gpu_memory_gb", "bf16_tflops", "mem_bw_tbs", "on_demand_usd_hr")


def _row_to_server(row: dict[str, str], where: str) -> Server:
    unknown = set(row) - set(COLUMNS) - {None}
    if unknown:
        raise CatalogError(f"{where}: unknown column(s) {', '.join(sorted(unknown))}; columns are {', '.join(COLUMNS)}")
    values: dict[str, Any] = {}
    for col in COLUMNS:
        raw = (row.get(col) or "").strip()
        if not raw:
            if col in _REQUIRED:
                raise CatalogError(f"{where}: column {col!r} is empty")
            values[col] = None if col == "spot_usd_hr" else ""
            continue
        if col in _NUMERIC:
            try:
                values[col] = _NUMERIC[col](raw)
            except ValueError:
                raise CatalogError(f"{where}: column {col!r}: {raw!r} is not a number") from None
            if values[col] < 0 or (col in ("gpu_count", "gpu_memory_gb", "bf16_tflops", "mem_bw_tbs") and values[col] <= 0):
                raise CatalogError(f"{where}: column {col!r} must be positive (got {raw})")
        else:
            values[col] = raw
    return Server(**values)


def read_catalog(path: str | Path) -> list[Server]:
    """Read a catalog CSV; an error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CatalogError(f"{path}: cannot read file: {e.strerror}") from None
    return _parse(text.splitlines(), str(path))


def _parse(lines: list[str], source: str) -> list[Server]:
    reader = csv.DictReader(lines)
    if not reader.fieldnames or "name" not in reader.fieldnames:
        raise CatalogError(f"{source}:1: header must name the columns: {', '.join(COLUMNS)}")
    out, seen = [], set()
    for row in reader:
        where = f"{source}:{reader.line_num}"
        server = _row_to_server(row, where)
        if server.name in seen:
            raise CatalogError(f"{where}: duplicate server name {server.name!r}")
        seen.add(server.name)
        out.append(server)
    return out


def shipped_catalog() -> list[Server]:
    text = resources.files("stratos").joinpath("data/servers.csv").read_text(encoding="utf-8")
    return _parse(text.splitlines(), "stratos/data/servers.csv")


def local_server(price_per_hour: float = 0.0, calibration: dict[str, Any] | None = None, *,
                 device: Any = None, processes: int = 1) -> Server:
    """The machine Stratos runs on, as the device its stages use (``stratos.runtime``; default the
    ``auto`` one): its GPUs when that is CUDA, else its CPU. Measured figures come from ``stratos
    profile`` on that device; without them a deliberately modest guess (a few cores) is used and
    the plan says so. ``processes``: how many train the student (``--nproc``): one GPU each, as many
    as the machine has; on a CPU they share its cores, which the calibration measured together."""
    import torch

    from stratos.runtime import resolve_device

    cal = calibration or {}
    device = torch.device(device) if device is not None else resolve_device("auto")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        count = max(1, min(processes, torch.cuda.device_count()))  # one device per process
        gpu, mem_gb = props.name, props.total_memory / 1e9
    else:
        gpu, count, mem_gb = "cpu", 1, _ram_gb()
    measured = "peak_flops" in cal
    return Server(
        name=LOCAL, provider=LOCAL, region="here", gpu=gpu, gpu_count=count,
        gpu_memory_gb=round(cal.get("memory_gb", mem_gb), 1),
        bf16_tflops=cal.get("peak_flops", 50e9 * (os.cpu_count() or 1)) / 1e12,
        mem_bw_tbs=cal.get("bandwidth", 5e9) / 1e12,
        interconnect="-", on_demand_usd_hr=price_per_hour, spot_usd_hr=None,
        source="stratos profile (measured)" if measured else "default guess: run `stratos profile`",
        date=str(cal.get("measured_at", ""))[:10],
    )


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


def load_catalog(
    path: str | Path | None = None,
    *,
    mode: str = "add",
    local_price: float = 0.0,
    calibration: dict[str, Any] | None = None,
    device: Any = None,
    processes: int = 1,
) -> list[Server]:
    """The offerings a plan chooses from: shipped rows (unless ``mode='replace'``), the user's rows
    (replacing shipped rows of the same name), and the local machine, always (trained by
    ``processes`` processes: see :func:`local_server`)."""
    rows = [] if (mode == "replace" and path is not None) else shipped_catalog()
    if path is not None:
        own = read_catalog(path)
        names = {s.name for s in own}
        rows = [s for s in rows if s.name not in names] + own
    rows = [s for s in rows if s.name != LOCAL]
    return [local_server(local_price, calibration, device=device, processes=processes)] + rows


def filter_servers(
    servers: list[Server],
    *,
    only: list[str] | None = None,
    provider: str | None = None,
    gpu: str | None = None,
    min_memory_gb: float | None = None,
    max_price: float | None = None,
) -> list[Server]:
    """Rows matching every filter. ``only`` names offerings, providers or GPU models (case-insensitive)."""

    def keep(s: Server) -> bool:
        if only and not any(o.lower() in (s.name.lower(), s.provider.lower(), s.gpu.lower()) for o in only):
            return False
        if provider and provider.lower() != s.provider.lower():
            return False
        if gpu and gpu.lower() not in s.gpu.lower():
            return False
        if min_memory_gb is not None and s.gpu_memory_gb * s.gpu_count < min_memory_gb:
            return False
        if max_price is not None and s.on_demand_usd_hr > max_price:
            return False
        return True

    return [s for s in servers if keep(s)]


def write_catalog(path: str | Path, servers: list[Server]) -> None:
    """Write rows in the catalog format (a starting point for a user's own file)."""
    from stratos.io import atomic_write_text
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for s in servers:
        w.writerow({f.name: ("" if getattr(s, f.name) is None else getattr(s, f.name)) for f in fields(s)})
    atomic_write_text(path, buf.getvalue())
