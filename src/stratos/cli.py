"""The ``stratos`` command line: one Typer app, one command per stage.

Commands are thin: they parse options, build the spec section a stage needs, and call
the stage's Python function. Errors a user can fix (bad spec, missing file) are printed
as one line each with exit code 2, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from stratos.spec import SpecError, load_spec

app = typer.Typer(
    name="stratos",
    help="Distil large language models into small, fast, task-specific ones: from one YAML spec to a served model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def fail(lines: list[str] | str, code: int = 2) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        console.print(f"[red]error:[/red] {line}", highlight=False, markup=True)
    raise typer.Exit(code)


def _spec_or_fail(path: Path):
    try:
        return load_spec(path)
    except SpecError as e:
        fail([f"{e.path}: {p}" for p in e.problems])


@app.command()
def validate(spec: Path = typer.Argument(..., help="Pipeline spec (YAML).")) -> None:
    """Check a spec: every unknown key, wrong type or impossible value is reported with its field path."""
    s = _spec_or_fail(spec)
    console.print(
        f"[green]ok[/green] {spec}: task {s.task.name}, {len(s.teachers)} teacher(s), {len(s.students)} student(s)",
        highlight=False,
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)


if __name__ == "__main__":
    main()
