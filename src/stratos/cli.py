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


@app.command("eval")
def eval_cmd(
    spec: Optional[Path] = typer.Argument(None, help="Pipeline spec; its task and eval sections give the defaults."),
    model: str = typer.Option(..., "--model", "-m", help="Model: hub id, folder, .gguf or alias."),
    task: Optional[str] = typer.Option(None, "--task", help="Task, e.g. mahjong:waits, arithmetic (default: the spec's)."),
    n: Optional[int] = typer.Option(None, "--n", help="Eval examples (default: spec eval.n or task.eval_size, else 200)."),
    option: list[str] = typer.Option([], "--option", "-O", help="Task option KEY=VALUE (YAML value), repeatable."),
    rules: bool = typer.Option(False, "--rules", help="Put the task's rules in the prompt (knowledge injection)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per generation batch."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation limit per answer."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the eval split."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every prediction to this JSONL file."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary metrics to this JSON file."),
) -> None:
    """Evaluate a model on a task: accuracy with a 95% CI, per-type breakdown, latency and tokens/s."""
    import yaml

    from stratos.evaluate import evaluate, result_table
    from stratos.io import DataError, write_json
    from stratos.models import load
    from stratos.spec import EvalSpec, TaskSpec
    from stratos.tasks import get_task

    task_spec, eval_spec = None, EvalSpec()
    if spec is not None:
        s = _spec_or_fail(spec)
        task_spec, eval_spec = s.task, s.eval
    if task:
        task_spec = TaskSpec(name=task, options=task_spec.options if task_spec and task_spec.name == task else {})
    if task_spec is None:
        fail("no task: pass --task or a spec")
    options = dict(task_spec.options)
    for item in option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            fail(f"--option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    if task_spec.name.partition(":")[0] == "jsonl":
        options.setdefault("path", task_spec.path)
        options.setdefault("scorer", task_spec.scorer)
    count = n or eval_spec.n or (task_spec.eval_size if spec is not None else 200)
    try:
        t = get_task(task_spec.name, **options)
        examples = t.examples("eval", count, seed=task_spec.seed if seed is None else seed)
        m, tok = load(model)
        result = evaluate(m, tok, t, examples, batch_size=batch_size or eval_spec.batch_size,
                          max_new_tokens=max_new_tokens or eval_spec.max_new_tokens, rules=rules,
                          predictions_path=out, progress=True)
    except (KeyError, DataError, FileNotFoundError, ValueError) as e:
        fail(str(e).strip('"'))
    Console().print(result_table(result, title=f"{model} on {task_spec.name}{' (rules in prompt)' if rules else ''}"))
    if json_out:
        write_json(json_out, {"model": model, "task": task_spec.name, "rules": rules, **result.to_dict()})
    if out:
        console.print(f"predictions written to {out}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)


if __name__ == "__main__":
    main()
