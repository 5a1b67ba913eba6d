"""Progress bars for long steps: rich bars on a terminal, periodic plain lines in logs and CI."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


class _Bar:
    def advance(self, n: int = 1) -> None: ...

    def update(self, **fields: Any) -> None: ...


class _RichBar(_Bar):
    def __init__(self, progress: Progress, task: Any):
        self._p, self._t = progress, task

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._t, n)

    def update(self, **fields: Any) -> None:
        self._p.update(self._t, **fields)


class _LogBar(_Bar):
    """Without a terminal a redrawn bar is invisible; print a line every ``every`` seconds instead."""

    def __init__(self, description: str, total: int | None, every: float = 30.0):
        self.description, self.total, self.every = description, total, every
        self.done, self.status = 0, ""
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or (self.total and self.done >= self.total):
            self.last = now
            elapsed = now - self.start
            eta = ""
            if self.total and self.done:
                eta = f", eta {elapsed / self.done * (self.total - self.done):.0f}s"
            of = f"/{self.total}" if self.total else ""
            _console.print(f"{self.description}: {self.done}{of} ({elapsed:.0f}s{eta}) {self.status}", highlight=False)

    def update(self, **fields: Any) -> None:
        self.status = fields.get("status", self.status)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True, status: bool = False) -> Iterator[_Bar]:
    """A progress bar with count, elapsed time and ETA; ``status=True`` adds a free text field."""
    if not enabled:
        yield _Bar()
        return
    if not _console.is_terminal:
        yield _LogBar(description, total)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=_console, transient=False) as p:
        task = p.add_task(description, total=total, status="")
        yield _RichBar(p, task)
