"""The ``stratos`` command line: one Typer app, one command per stage.

Commands are thin: they parse options, build the spec section a stage needs, and call
the stage's Python function. Errors a user can fix (bad spec, missing file) are printed
as one line each with exit code 2, never as a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from stratos.spec import SpecError, load_spec


class _Commands(TyperGroup):
    """The command group, and the one place that turns every error a user can fix (a ``UserError``:
    bad spec, bad data, missing model, diverged run) into one ``error:`` line per problem and exit
    code 2: no command can leak a traceback for bad input, however it is invoked."""

    def invoke(self, ctx: Any) -> Any:
        from stratos.errors import UserError

        try:
            return super().invoke(ctx)
        except UserError as e:
            fail(e.lines(), code=e.exit_code)
        except UnicodeDecodeError as e:  # a file that is not text, read where no caller named it
            fail(f"not UTF-8 text: {e.reason} at byte {e.start}")
        except OSError as e:
            if e.filename is None:
                raise
            fail(f"{e.filename}: {e.strerror or e}")


app = typer.Typer(
    cls=_Commands,
    name="stratos",
    help="Distil large language models into small, fast, task-specific ones: from one YAML spec to a served model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def fail(lines: list[str] | str, code: int = 2) -> None:
    from rich.markup import escape

    if os.environ.get("LOCAL_RANK", "0") != "0":
        # A torchrun rank after the first on its machine: the ranks of one machine read the same spec, data
        # and models, so their first rank says it once (each machine's first rank says its own).
        raise typer.Exit(code)
    for line in [lines] if isinstance(lines, str) else lines:  # a message's own [brackets] are text, not markup
        console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _task_and_options(task_spec: Any, task: str | None, option: list[str], missing: str) -> tuple[Any, dict]:
    """The spec's task, or the one ``--task`` names (keeping the spec's options when it is the same
    task), and its options with ``-O KEY=VALUE`` applied (values read as YAML)."""
    import yaml

    from stratos.spec import TaskSpec

    if task:
        task_spec = TaskSpec(name=task, options=task_spec.options if task_spec and task_spec.name == task else {})
    if task_spec is None:
        fail(missing)
    options = dict(task_spec.options)
    for item in option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            fail(f"--option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return task_spec, options


def _spec_or_fail(path: Path):
    try:
        return load_spec(path)
    except SpecError as e:
        fail(e.lines())


@app.command()
def validate(spec: Path = typer.Argument(..., help="Pipeline spec (YAML).")) -> None:
    """Check a spec: every unknown key, wrong type or impossible value is reported with its field path."""
    s = _spec_or_fail(spec)
    console.print(
        f"[green]ok[/green] {spec}: task {s.task.name}, {len(s.teachers)} teacher(s), {len(s.students)} student(s)",
        highlight=False,
    )


DEVICE_OPTION = typer.Option(None, "--device", help="Where to compute: auto (CUDA when present, else CPU), cpu, cuda, "
                             "cuda:N. Default: the spec's device, else auto.")


def _device(option: str | None, spec: Any = None) -> str:
    """The ``device`` setting a command uses: ``--device``, else the spec's (a Spec or its path), else auto.
    Checked here, so a bad value or a CUDA device this machine lacks fails before any work."""
    from stratos.runtime import resolve_device

    if option is None and spec is not None:
        option = (_spec_or_fail(spec) if isinstance(spec, Path) else spec).device
    setting = option or "auto"
    resolve_device(setting)
    return setting


def _overrides(**values) -> dict:
    """CLI options left unset fall back to the spec's defaults: the spec stays the one place for them."""
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def distill(
    spec: Optional[Path] = typer.Argument(None, help="Pipeline spec; its first teacher/student and distill section are used."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Teacher: hub id, folder, .gguf or alias."),
    student: Optional[str] = typer.Option(None, "--student", "-s", help="Student: hub id, folder, .gguf or alias."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Training JSONL: prompt/response, messages, or text records "
                                        "(default with a spec: its task's train split, with rationales when synth.rationales)."),
    out: Path = typer.Option(Path("runs/distill"), "--out", "-o", help="Output folder: checkpoints, metrics, model/."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="plan.json of `stratos plan` (with a spec): train exactly "
                                        "the settings `stratos run` would (phases, losses, teacher signal)."),
    algorithm: Optional[str] = typer.Option(None, help="Training algorithm: sft, kd, gkd (on-policy KD), grpo (RL; needs a spec for its task), opd (both), rft (rejection fine-tuning; needs a spec), or a registered one."),
    loss: Optional[str] = typer.Option(None, help="Divergence: fkl, rkl, jsd, skl, srkl, tvd, akl, ce."),
    signal: Optional[str] = typer.Option(None, help="Teacher signal: cached (default) or online."),
    temperature: Optional[float] = typer.Option(None, help="Softmax temperature of the KD term."),
    kd_ratio: Optional[float] = typer.Option(None, help="Weight of KD vs CE (1 = pure KD)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the data."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per micro-batch."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    max_length: Optional[int] = typer.Option(None, help="Max tokens per example."),
    save_steps: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    lora_r: Optional[int] = typer.Option(None, help="Train LoRA adapters of this rank instead of all weights."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: where supported)."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    teacher_workers: Optional[int] = typer.Option(None, help="Teacher worker processes, overlapped with training "
                                                  "(distill.teacher_workers; 0: in the training process)."),
    teacher_backend: Optional[str] = typer.Option(None, help="Where the teacher workers run: process (default) or "
                                                  "ray (distill.teacher_backend)."),
    teacher_ray_address: Optional[str] = typer.Option(None, help="With --teacher-backend ray: the cluster to join "
                                                      "(distill.teacher_ray_address; default a local cluster)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard checkpoints already in --out."),
    device: Optional[str] = DEVICE_OPTION,
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes that train the student together (torchrun on "
                              "this machine; distill.parallel: DDP or FSDP2). See docs/distributed.md."),
) -> None:
    """Distil a teacher into a student on prompt/response data (off-policy KD on the teacher's hidden states).

    The settings (phases, algorithm, loss, what the teacher provides) come from the one rule the
    pipeline uses, ``stratos.distill.recipe.resolve``; they are printed before training."""
    import shutil

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_torchrun(nproc, ["distill", *_without_nproc(sys.argv[1:])]))
    rank = int(os.environ.get("RANK", "0"))
    say = console.print if rank == 0 else (lambda *a, **k: None)  # one process speaks for all

    from stratos.spec import DistillSpec, StudentSpec, TeacherSpec

    base = DistillSpec()
    t_spec = s_spec = task_spec = s = the_plan = None
    if spec is not None:
        s = _spec_or_fail(spec)
        base, t_spec, s_spec, task_spec = s.distill, s.teachers[0], s.students[0], s.task
    if plan is not None:
        if s is None:
            fail("--plan needs the spec it was made from")
        from stratos.plan.planner import Plan

        try:
            the_plan = Plan.from_json(plan)
        except (OSError, ValueError) as e:
            fail(f"{plan}: {e}")
        t_spec, s_spec = s.teachers[the_plan.teacher["index"]], s.students[the_plan.student["index"]]
    if teacher:
        t_spec = TeacherSpec(model=teacher)
    if student:
        s_spec = StudentSpec(model=student)
    if s_spec is None:
        fail("no student: pass --student or a spec")
    if data is None and task_spec is None:
        fail("no training data: pass --data FILE.jsonl or a spec with a task")
    try:
        cfg = DistillSpec.model_validate(
            {
                **base.model_dump(exclude_unset=True),  # what the spec wrote stays "written" for the settings
                **_overrides(
                    algorithm=algorithm, loss=loss, teacher_signal=signal, temperature=temperature, kd_ratio=kd_ratio, max_steps=max_steps,
                    num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch_size,
                    gradient_accumulation_steps=grad_accum, max_length=max_length, save_steps=save_steps, bf16=bf16,
                    seed=seed, teacher_workers=teacher_workers, teacher_backend=teacher_backend,
                    teacher_ray_address=teacher_ray_address,
                ),
                # alpha = 2r; a bad r is reported once, on r, not again on the alpha made from it.
                **({"lora": {"r": lora_r, "alpha": 2 * max(1, lora_r)}} if lora_r is not None else {}),
            }
        )
    except Exception as e:  # pydantic.ValidationError
        from pydantic import ValidationError

        from stratos.spec import format_validation_error

        # Field paths as in a spec (distill.learning_rate), the section the options override.
        fail([f"distill.{line}" for line in format_validation_error(e)] if isinstance(e, ValidationError) else str(e))
    from stratos.distill import BASELINE_DIR
    from stratos.distill.trainer import checkpoints

    # A one-phase run keeps its checkpoints in OUT/checkpoints, a multi-phase one in OUT/phase-N-ALGO/; an SFT
    # baseline the same under OUT/sft-baseline/.
    trained = [d for base in (out, out / BASELINE_DIR)
               for d in (base / "checkpoints", *sorted(base.glob("phase-*/checkpoints"))) if checkpoints(d)]
    discard = bool(trained) and not resume
    if discard and not overwrite:
        fail(f"{out} already has checkpoints: pass --resume to continue that run or --overwrite to start over")
    from stratos.distill import load_records, run_phases, train_sft_baseline
    from stratos.distill.evaluation import evaluator_for
    from stratos.io import DataError
    from stratos.models import load, load_student
    from stratos.tasks import task_from_spec, to_records

    try:
        task = task_from_spec(task_spec) if task_spec is not None else None
        if data is not None:
            # Bad data fails before minutes of model loading; prompt-only records are RL's data (grpo, opd).
            from stratos.distill.algorithms import responses_needed

            phases = cfg.phase_configs() if cfg.phases else [cfg]
            records = load_records(data, need_response=responses_needed(c.algorithm for c in phases))
        else:  # the reference answers of the spec's task, as prompt/response pairs (with synth.rationales: worked)
            records = to_records(task, task.examples("train", task_spec.train_size, seed=task_spec.seed),
                                 rationale=bool(s and s.synth.rationales))
        settings = _distill_settings(cfg, s, the_plan, t_spec, s_spec, records)
        for line in [f"settings: {settings.summary()}", *settings.reasons]:
            say(f"  {line}", highlight=False, soft_wrap=True)
        if settings.needs_teacher_model and t_spec is None:
            fail(f"{settings.phases[-1].label} needs a teacher: pass --teacher or a spec (or use --algorithm sft)")
        from stratos.runtime import runtime

        rt = runtime(_device(device, s))
        where = rt.device
        if "LOCAL_RANK" in os.environ and where.type == "cuda":  # torchrun: one GPU per process on this node
            import torch

            where = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(where)
        say(f"  device: {rt.describe()}" + (f", {os.environ['WORLD_SIZE']} processes" if "WORLD_SIZE" in os.environ
                                            else ""), highlight=False)
        model, tok = load_student(s_spec, task_spec, device=where, seed=cfg.seed, calibration=records)
        eval_tokens = s.eval.max_new_tokens if s else 64
        evaluator = evaluator_for(task_spec, tok, settings, max_new_tokens=eval_tokens,
                                  held_out=s.eval_questions if s else None, batch_size=s.eval.batch_size if s else 16, task=task)
        t_model = t_tok = None
        if settings.needs_teacher_model:
            t_model, t_tok = load(t_spec.model, dtype=t_spec.dtype, trust_remote_code=t_spec.trust_remote_code,
                                  device=where)
        if discard and rank == 0:  # --overwrite: only now that the data and models have loaded, so a bad file discards nothing
            for d in trained:
                shutil.rmtree(d.parent if d.parent != out else d)
        result = run_phases(model, tok, records, settings, out, teacher=t_model, teacher_tokenizer=t_tok, resume=resume,
                            evaluator=evaluator, task=task)
        baseline = None
        if cfg.sft_baseline:  # the same student without the teacher, in OUT/sft-baseline
            del model, t_model
            baseline = train_sft_baseline(lambda: load_student(s_spec, task_spec, device=where, seed=cfg.seed,
                                                               calibration=records)[0],
                                          tok, records, settings, out, resume=resume, evaluator=evaluator, task=task)
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        fail(str(e).strip('"'))
    finally:
        from stratos.distill.parallel import Parallel

        Parallel.shutdown()
    m = result.final_metrics
    if rank == 0:  # a model card in the folder, with what this command knows of the model (no eval of its own)
        import json

        from stratos.report.card import data_source, write_baseline_card, write_distill_card

        source = data_source(data, task_spec.name if task_spec is not None else None,
                             rationales=bool(s and s.synth.rationales))
        card_facts = dict(max_new_tokens=eval_tokens, source=source, spec=s,
                          plan=json.loads(plan.read_text()) if plan else None, teacher=t_spec, student=s_spec,
                          device=rt.describe())
        write_distill_card(result, settings=settings, metrics_path=out / "metrics.jsonl", **card_facts)
        if baseline is not None:
            write_baseline_card(baseline, settings=settings, out_dir=out, **card_facts)
    best = (f", best eval accuracy {m['best_eval_accuracy']:.1%} at step {m['best_step']}"
            if m.get("best_step") is not None and m.get("best_eval_accuracy") is not None else "")
    say(
        f"[green]done[/green] {result.steps} steps, loss {m.get('loss', float('nan')):.4f}, "
        f"{result.tokens_per_second:.0f} tok/s{best}; student saved to {result.model_dir} (with a model card, "
        "README.md)",
        highlight=False,
    )
    if cfg.sft_baseline:
        say(f"SFT baseline: {baseline.steps} steps; saved to {baseline.model_dir} (with a model card)" if baseline is not None else
            "SFT baseline: none trained: no phase learns from the teacher, so the student is its own SFT baseline",
            highlight=False)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out[1:] if out and out[0] == "distill" else out


def _torchrun(nproc: int, args: list[str]) -> int:
    """Start ``nproc`` processes of ``stratos ARGS`` on this machine with torchrun (torch.distributed.run);
    their exit code. Several machines: run torchrun yourself on each (docs/distributed.md)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "stratos.cli", *args]
    console.print(f"  starting {nproc} processes: torchrun --standalone --nproc-per-node={nproc} -m stratos.cli "
                  + " ".join(args), highlight=False)
    return subprocess.run(cmd).returncode


def _distill_settings(cfg: Any, spec: Any, plan: Any, t_spec: Any, s_spec: Any, records: list[dict]) -> Any:
    """`stratos distill`'s settings, by the pipeline's rule: with a plan, exactly what `stratos run`
    trains (``runner.settings_of``); without one, the spec's (or the options') distill section alone,
    the teacher-student match found as the planner finds it (``stratos.plan.matching.match``)."""
    from stratos.distill.recipe import resolve

    if plan is not None:
        from stratos.runner import settings_of

        return settings_of(spec.model_copy(update={"distill": cfg}), plan)
    mode = "logit"
    if t_spec is not None:
        from stratos.plan.matching import match
        from stratos.plan.shapes import model_shape

        t_shape, s_shape = model_shape(t_spec), model_shape(s_spec)
        mode = match(t_shape, s_shape).mode
        if mode == "text" and not t_shape.api:
            # Two white-box models with different tokenizers: distil across them (stratos.distill.crosstok), as
            # asked; `stratos plan` is what measures whether enough of the teacher's mass maps to choose it.
            mode = "cross"
    return resolve(cfg, match=mode, topk_data=any("topk" in r for r in records))


@app.command()
def synth(
    spec: Optional[Path] = typer.Argument(None, help="Pipeline spec; its task, first teacher and synth section are used."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Teacher: hub id, folder, alias, or API model name."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint (makes the teacher an API one)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the API key."),
    task: Optional[str] = typer.Option(None, "--task", help="Task name, e.g. arithmetic, mahjong:waits."),
    option: list[str] = typer.Option([], "--option", "-O", help="Task option KEY=VALUE (repeatable)."),
    n: Optional[int] = typer.Option(None, "--n", "-n", help="Teacher samples per prompt."),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="Train prompts sent to the teacher (default: the task's train_size)."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation limit per sample."),
    reverse_synthesis: Optional[int] = typer.Option(None, help="Oracle-answered examples to add."),
    knowledge_injection: Optional[bool] = typer.Option(None, "--knowledge-injection/--no-knowledge-injection",
                                                       help="Rules in the teacher's prompt plus the rules corpus."),
    top_logprobs: Optional[int] = typer.Option(None, help="Store the teacher's top-k log-probs (top-k KD)."),
    few_shot: Optional[int] = typer.Option(None, "--few-shot", help="Worked examples before every teacher prompt; "
                                           "the student's records keep the plain question (context distillation)."),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify",
                                          help="Keep only samples the task's verifier accepts (default), or every one."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Most to spend on API requests, in $."),
    out: Path = typer.Option(Path("runs/synth"), "--out", "-o", help="Output folder: data.jsonl, stats.json, requests/."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Make training data: teacher samples kept by the task's verifier, plus oracle and corpus data. Rerun to resume."""
    import yaml

    from stratos.spec import checked, parse_spec

    if spec is not None:
        data = _spec_or_fail(spec).model_dump(mode="json", exclude_unset=True)
    else:
        if not (teacher and task):
            fail("pass a spec, or --teacher and --task")
        data = {"students": [{"model": "smollm2-135m-instruct"}]}  # unused by synth (never loaded); the spec needs one
    if teacher:
        t = {"model": teacher}
        if base_url:
            t.update(backend="openai", base_url=base_url, api_key_env=api_key_env)
        data["teachers"] = [t]
    if task:
        opts = {}
        for item in option:
            key, eq, value = item.partition("=")
            if not eq:
                fail(f"--option {item!r}: expected KEY=VALUE")
            opts[key] = yaml.safe_load(value)
        data["task"] = {**data.get("task", {}), "name": task, "options": opts}
    data["synth"] = {**data.get("synth", {}), **_overrides(
        samples_per_prompt=n, prompts=prompts, temperature=temperature, max_new_tokens=max_new_tokens,
        reverse_synthesis=reverse_synthesis, knowledge_injection=knowledge_injection, top_logprobs=top_logprobs,
        verify=verify, budget_usd=budget, few_shot=few_shot)}
    if device is not None:
        data["device"] = device
    s = checked(parse_spec(data, source=str(spec or "command line")), source=str(spec or "command line"))
    from stratos.io import DataError
    from stratos.synth import SynthError, run_synth
    from stratos.teachers import TeacherError

    try:
        res = run_synth(s, out)
    except (SynthError, TeacherError, DataError, KeyError, ValueError) as e:
        fail(str(e).strip('"'))
    console.print(f"[green]done[/green] {res.rows} rows in {res.data_path}; statistics in {res.stats_path}", highlight=False)


@app.command("eval")
def eval_cmd(
    spec: Optional[Path] = typer.Argument(None, help="Pipeline spec; its task and eval sections give the defaults."),
    model: str = typer.Option(..., "--model", "-m", help="Model: hub id, folder, .gguf or alias."),
    task: Optional[str] = typer.Option(None, "--task", help="Task, e.g. mahjong:waits, arithmetic (default: the spec's)."),
    n: Optional[int] = typer.Option(None, "--n", help="Eval examples (default: spec eval.n or task.eval_size, else 200)."),
    option: list[str] = typer.Option([], "--option", "-O", help="Task option KEY=VALUE (YAML value), repeatable."),
    rules: bool = typer.Option(False, "--rules", help="Put the task's rules in the prompt (knowledge injection)."),
    few_shot: int = typer.Option(0, "--few-shot", min=0, help="Worked examples before every question, as "
                                 "synth.few_shot shows the teacher (with a spec: the same examples)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per generation batch."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation limit per answer."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the eval split."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every prediction to this JSONL file."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary metrics to this JSON file."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Evaluate a model on a task: accuracy with a 95% CI, per-type breakdown, latency and tokens/s."""

    from stratos.evaluate import evaluate, result_table
    from stratos.io import DataError, write_json
    from stratos.models import load
    from stratos.spec import EvalSpec
    from stratos.tasks import task_from_spec

    from stratos.runtime import resolve_device

    task_spec, eval_spec, s = None, EvalSpec(), None
    if spec is not None:
        s = _spec_or_fail(spec)
        task_spec, eval_spec = s.task, s.eval
    where = resolve_device(_device(device, s))
    task_spec, options = _task_and_options(task_spec, task, option, "no task: pass --task or a spec")
    count = n or (s.eval_questions if s is not None else 200)
    try:
        t = task_from_spec(task_spec.model_copy(update={"options": options}))
        examples = t.examples("eval", count, seed=task_spec.seed if seed is None else seed)
        context = []
        if few_shot:
            from stratos.synth import spec_context, worked_context, worked_examples

            # The examples synth shows the teacher: none of the spec's synth prompts (without a spec, none excluded).
            context = (spec_context(s, t, few_shot, rules=rules) if s is not None else
                       worked_context(t, worked_examples(t, few_shot, task_spec.seed, []), rules=rules))
        m, tok = load(model, device=where)
        result = evaluate(m, tok, t, examples, batch_size=batch_size or eval_spec.batch_size,
                          max_new_tokens=max_new_tokens or eval_spec.max_new_tokens, rules=rules,
                          predictions_path=out, progress=True, context=context)
    except (KeyError, DataError, FileNotFoundError, ValueError) as e:
        fail(str(e).strip('"'))
    shown = " (rules in prompt)" if rules else ""
    shown += f" ({few_shot} worked examples before each question)" if few_shot else ""
    Console().print(result_table(result, title=f"{model} on {task_spec.name}{shown}"))
    if json_out:
        write_json(json_out, {"model": model, "task": task_spec.name, "rules": rules, "few_shot": few_shot,
                              **result.to_dict()})
    if out:
        console.print(f"predictions written to {out}", highlight=False)


@app.command()
def compress(
    spec: Optional[Path] = typer.Argument(None, help="Pipeline spec; its task, distill, eval and compress sections give the defaults."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder, hub id or alias (default: the spec's first student)."),
    out: Path = typer.Option(Path("runs/compress"), "--out", "-o", help="Output folder: one model folder per step, compress_report.json."),
    task: Optional[str] = typer.Option(None, "--task", help="Task for calibration, recovery and eval data (default: the spec's)."),
    option: list[str] = typer.Option([], "--option", "-O", help="Task option KEY=VALUE (YAML value), repeatable."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Training JSONL for calibration and recovery (default: the task's train split)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Recover from this model instead of the unpruned one."),
    prune: Optional[float] = typer.Option(None, "--prune", help="Fraction of parameters to remove."),
    target_params: Optional[int] = typer.Option(None, "--target-params", help="Parameters to keep (instead of --prune)."),
    method: Optional[str] = typer.Option(None, "--method", help="Structured pruning: depth or width."),
    width_axes: Optional[str] = typer.Option(None, "--width-axes", help="Comma list of mlp, heads, hidden."),
    recovery_steps: Optional[int] = typer.Option(None, "--recovery-steps", help="KD steps from the unpruned model."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", help="none, wanda or 2:4."),
    quantize: Optional[str] = typer.Option(None, "--quantize", "-q", help="none, bf16, int8, int4 or int8-dynamic (torchao)."),
    export: Optional[str] = typer.Option(None, "--export", help="Comma list of gguf, onnx, gptq, awq."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="Eval examples per step (0: no accuracy)."),
    speed_tokens: Optional[int] = typer.Option(None, "--speed-tokens", help="Tokens generated at batch 1 to time each step."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Prune (depth or width) with KD recovery, sparsify, quantize and export a model; one report row per step."""
    from pydantic import ValidationError

    from stratos.io import DataError
    from stratos.spec import CompressSpec, Spec, StudentSpec, TeacherSpec, format_validation_error

    s = _spec_or_fail(spec) if spec is not None else None
    model = model or (s.students[0].model if s else None)
    if model is None:
        fail("no model: pass --model or a spec")
    task_spec = s.task if s else None
    task_spec, options = _task_and_options(
        task_spec, task, option, "no task: pass --task or a spec (calibration, recovery and eval data come from it)")
    base = s.compress if s else CompressSpec()
    try:
        cs = CompressSpec.model_validate({
            **base.model_dump(), "enabled": True,
            **({"prune_ratio": None} if target_params is not None else {}),
            **({"target_params": None} if prune is not None else {}),
            **_overrides(prune_ratio=prune, target_params=target_params, prune=method, recovery_steps=recovery_steps,
                         sparsity=sparsity, quantize=quantize, eval_size=eval_size, speed_tokens=speed_tokens,
                         width_axes=width_axes.split(",") if width_axes else None,
                         export=export.split(",") if export else None),
        })
        full = (s or Spec(task=task_spec, teachers=[TeacherSpec(model=model)], students=[StudentSpec(model=model)]))
        full = full.model_copy(update={"compress": cs, "task": task_spec.model_copy(update={"options": options}),
                                       "device": _device(device, full)})
    except ValidationError as e:
        fail(format_validation_error(e))
    from stratos.compress import run_compress
    from stratos.distill import load_records
    from stratos.models import resolve

    try:
        records = load_records(data) if data else None
        folders = [resolve(m)[1] if m else None for m in (model, teacher)]
        if folders[0] is None or (teacher and folders[1] is None):
            fail("compress works on local model folders (or aliases, .gguf files): download the hub model first")
        res = run_compress(full, folders[0], out, records=records, teacher_dir=folders[1], progress=True)
    except (DataError, FileNotFoundError, ValueError) as e:
        fail(str(e).strip('"'))
    from stratos.compress import report_table

    Console().print(report_table(res.rows), highlight=False, soft_wrap=True)
    for e in res.exports:
        console.print(f"export {e['format']}: " + (f"[green]ok[/green] {e['path']}" if e["ok"] else f"[yellow]skipped[/yellow] {e['reason']}"),
                      highlight=False, soft_wrap=True)
    console.print(f"compressed model: {res.model_dir}; report: {res.report_path}", highlight=False)


# --------------------------------------------------------------------------- serving (stratos.serve)


def _serve_spec(spec: Optional[Path], **values):
    """The spec's serve section (or the defaults) with the given CLI options on top."""
    from pydantic import ValidationError

    from stratos.spec import ServeSpec, format_validation_error

    base = _spec_or_fail(spec).serve if spec is not None else ServeSpec()
    try:
        return ServeSpec.model_validate({**base.model_dump(), **_overrides(**values)})
    except ValidationError as e:
        fail(format_validation_error(e))


@app.command()
def serve(
    model: str = typer.Argument(..., help="Model: hub id, folder (also quantized ones), .gguf or alias."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Pipeline spec whose serve section gives the defaults."),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1; others need an API key)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    backend: Optional[str] = typer.Option(None, help="builtin, vllm or auto (vLLM when usable)."),
    api_key_env: Optional[str] = typer.Option(None, help="Environment variable holding the API key (default STRATOS_API_KEY)."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the folder name)."),
    dtype: Optional[str] = typer.Option(None, help="auto, float32, bfloat16 or float16."),
    max_batch_size: Optional[int] = typer.Option(None, help="Sequences decoded together per forward pass."),
    max_queue: Optional[int] = typer.Option(None, help="Waiting requests beyond this get 503 + Retry-After."),
    max_tokens: Optional[int] = typer.Option(None, help="Largest max_tokens a request may ask for."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest prompt in tokens (default: the context)."),
    max_request_bytes: Optional[int] = typer.Option(None, help="Largest request body in bytes."),
    request_timeout: Optional[float] = typer.Option(None, help="Seconds before an unfinished request gets 504."),
    batch_wait_ms: Optional[float] = typer.Option(None, help="How long a wave waits for concurrent requests."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Serve a model behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models, /health)."""
    from stratos.serve import ServeError
    from stratos.serve import serve as run_serve

    cfg = _serve_spec(spec, host=host, port=port, backend=backend, api_key_env=api_key_env, model_name=model_name,
                      dtype=dtype, max_batch_size=max_batch_size, max_queue=max_queue, max_tokens=max_tokens,
                      max_prompt_tokens=max_prompt_tokens, max_request_bytes=max_request_bytes,
                      request_timeout_s=request_timeout, batch_wait_ms=batch_wait_ms)
    try:
        run_serve(model, cfg, device=_device(device, spec))
    except (ServeError, FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))


@app.command()
def deploy(
    model: str = typer.Argument(..., help="Model folder to deploy (uploaded) or a hub id (downloaded on the server)."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="plan.json from `stratos plan`: its serving server."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Pipeline spec whose serve.deploy section gives defaults."),
    accelerator: Optional[str] = typer.Option(None, help="GPU, e.g. H100, A100-80GB, L4 (catalog names work too)."),
    count: Optional[int] = typer.Option(None, help="GPUs (vLLM tensor-parallel size)."),
    cloud: Optional[str] = typer.Option(None, help="Fix the cloud: aws, gcp, azure, lambda, runpod..."),
    region: Optional[str] = typer.Option(None, help="Fix the region (needs --cloud)."),
    spot: Optional[bool] = typer.Option(None, "--spot/--on-demand", help="Spot instances or on-demand."),
    port: Optional[int] = typer.Option(None, help="Port vLLM listens on (default 8000)."),
    api_key_env: Optional[str] = typer.Option(None, help="Secret holding the server's API key: the recipe reads it "
                                              "and --launch passes it (default: the spec's serve.api_key_env, "
                                              "STRATOS_API_KEY)."),
    out: Path = typer.Option(Path("deploy"), "--out", "-o", help="Folder for sky-serve.yaml and serve.sh."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the recipes; write and launch nothing."),
    do_launch: bool = typer.Option(False, "--launch", help="Run `sky launch` on the task (needs SkyPilot set up)."),
    train_nodes: Optional[int] = typer.Option(None, "--train-nodes", min=1, help="Also write the recipe that trains "
                                              "the student on this many nodes (sky-distill.yaml, distill.sh; torchrun "
                                              "across them); needs --spec and --data, uses --plan's training server."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --train-nodes: the training JSONL (a run's "
                                        "synth/data.jsonl)."),
) -> None:
    """Emit the cloud launch recipe for the student: a SkyPilot task YAML and a plain shell script (vLLM);
    with --train-nodes, also the multi-node training recipe beside it."""
    from pydantic import ValidationError

    from stratos.serve import ServeError, deploy_recipe, read_plan_target, validate_skypilot_yaml
    from stratos.serve.deploy import launch, launch_line, skypilot_accelerator, skypilot_installed
    from stratos.spec import DeployTarget, format_validation_error

    cfg = _serve_spec(spec, port=port, api_key_env=api_key_env)
    values = cfg.deploy.model_dump()
    try:
        if plan is not None:
            values.update(read_plan_target(plan))
        values.update(_overrides(accelerator=skypilot_accelerator(accelerator) if accelerator else None, count=count,
                                 cloud=cloud.lower() if cloud else None, region=region, spot=spot))
        target = DeployTarget.model_validate(values)
        recipe = deploy_recipe(model, target, port=cfg.port, served_model_name=cfg.model_name,
                               api_key_env=cfg.api_key_env)
        if skypilot_installed():
            validate_skypilot_yaml(recipe.yaml)
    except ValidationError as e:
        fail(format_validation_error(e))
    except ServeError as e:
        fail(str(e))
    training = _training_recipe(train_nodes, spec, data, plan, values, out) if train_nodes else None
    for note in recipe.notes + (training.notes if training else []):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if dry_run:
        print(f"# ---- sky-serve.yaml ({launch_line(recipe.names[0], target, cfg.api_key_env)})")
        print(recipe.yaml)
        print("# ---- serve.sh")
        print(recipe.shell)
        if training:
            print(f"# ---- sky-distill.yaml (sky launch -c {training.target.name}-distill sky-distill.yaml)")
            print(training.yaml)
            print("# ---- distill.sh")
            print(training.shell)
        return
    task_path, sh_path = recipe.write(out)
    console.print(f"[green]wrote[/green] {task_path} and {sh_path}", highlight=False)
    if training:
        t_path, t_sh = training.write(out)
        console.print(f"[green]wrote[/green] {t_path} and {t_sh}: train on {train_nodes} node(s) with "
                      f"`sky launch -c {training.target.name}-distill {t_path}`", highlight=False)
    if do_launch:
        try:
            code = launch(task_path, target, cfg.api_key_env)
        except ServeError as e:
            fail(str(e))
        raise typer.Exit(code)
    console.print(f"launch with: {launch_line(task_path, target, cfg.api_key_env)}", highlight=False)


def _training_recipe(nodes: int, spec: Path | None, data: Path | None, plan: Path | None, serve_values: dict,
                     out: Path) -> Any:
    """`stratos deploy --train-nodes`: the multi-node distill recipe, on the plan's training server when a
    plan is given, else on the serving target's accelerators."""
    from pydantic import ValidationError

    from stratos.plan.planner import Plan
    from stratos.serve.deploy import distill_recipe, server_target
    from stratos.spec import DeployTarget, format_validation_error

    if spec is None or data is None:
        fail("--train-nodes needs --spec (the pipeline spec) and --data (the training JSONL, e.g. RUN/synth/data.jsonl)")
    if not data.is_file():
        fail(f"--data {data}: no such file")
    s = _spec_or_fail(spec)
    values = dict(serve_values)
    if plan is not None:
        from dataclasses import asdict

        try:
            p = Plan.from_json(plan)
        except (OSError, ValueError) as e:
            fail(f"{plan}: {e}")
        values.update(server_target(asdict(p.training_server), s.plan.spot))
    values["name"] = f"stratos-{s.name}".lower()[:60]
    try:
        target = DeployTarget.model_validate(values)
    except ValidationError as e:
        fail(format_validation_error(e))
    return distill_recipe(s, target, num_nodes=nodes, data=data, plan=plan, folder=out)


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Pipeline spec (YAML): task, constraints, teachers, students, plan section."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<spec name>/plan)."),
    objective: Optional[str] = typer.Option(None, help="balanced, accuracy-first or cost-first (default: the spec's)."),
    pilot: Optional[bool] = typer.Option(None, "--pilot/--no-pilot", help="Short real pilot distillations for student accuracy."),
    limit: int = typer.Option(15, help="Pareto rows to print."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Probe the teachers, model every stage's cost on every server, and pick a Pareto-optimal plan (writes plan.json)."""
    from pydantic import ValidationError

    from stratos.io import DataError
    from stratos.plan import NoFeasiblePlan, make_plan
    from stratos.plan.catalog import CatalogError
    from stratos.plan.render import pareto_table, stages_table
    from stratos.spec import format_validation_error

    s = _spec_or_fail(spec)
    try:
        if objective is not None:
            s.plan.objective = objective
        if pilot is not None:
            s.plan.pilot = pilot
        s.device = _device(device, s)
    except ValidationError as e:
        fail(format_validation_error(e))
    out = out or Path("runs") / s.name / "plan"
    try:
        result, _ = make_plan(s, out, progress=True)
    except NoFeasiblePlan as e:
        fail(str(e).splitlines(), code=1)
    except (CatalogError, DataError, KeyError, FileNotFoundError, ValueError) as e:
        fail(str(e).strip('"'))
    view = Console(width=max(120, Console().width))  # numbers are never cut to fit a narrow terminal
    view.print(pareto_table(result, limit=limit))
    view.print(stages_table(result))
    view.print(f"[bold]strategy:[/bold] {result.strategy.kind}, {result.strategy.data_size} examples x "
               f"{result.strategy.epochs:g} epochs; [bold]training:[/bold] {result.settings.summary()}", highlight=False)
    for line in result.reasons:
        view.print(f"  - {line}", highlight=False)
    console.print(f"[green]wrote[/green] {out / 'plan.json'}, {out / 'plan.png'}, {out / 'candidates.csv'}", highlight=False)


@app.command()
def servers(
    spec: Optional[Path] = typer.Argument(None, help="Pipeline spec: its plan.catalog, catalog_mode and local price apply."),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="Your catalog CSV (added to the shipped one)."),
    replace: bool = typer.Option(False, "--replace", help="Use only --catalog rows (plus the local machine)."),
    provider: Optional[str] = typer.Option(None, help="Only this provider (aws, gcp, azure, lambda, runpod, coreweave, local)."),
    gpu: Optional[str] = typer.Option(None, help="Only GPUs whose model contains this, e.g. H100."),
    min_memory: Optional[float] = typer.Option(None, help="At least this much GPU memory in all, GB."),
    max_price: Optional[float] = typer.Option(None, help="At most this on-demand $/hour."),
    sort: str = typer.Option("price", help="Sort by: price, name, memory, tflops."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write the listed rows as a catalog CSV (a start for your own)."),
    sources: bool = typer.Option(False, "--sources", help="Show each row's interconnect and source."),
) -> None:
    """List the server catalog (datasheet figures and list prices, approximate) as a table, filtered."""
    from stratos.plan.calibration import load_calibration
    from stratos.plan.catalog import CatalogError, filter_servers, load_catalog, write_catalog
    from stratos.plan.render import servers_table

    mode, price = ("replace" if replace else "add"), 0.0
    if spec is not None:
        s = _spec_or_fail(spec)
        catalog = catalog or s.plan.catalog
        mode = "replace" if replace else s.plan.catalog_mode
        price = s.plan.local_price_per_hour
    keys = {"price": lambda r: r.on_demand_usd_hr, "name": lambda r: r.name,
            "memory": lambda r: -r.gpu_memory_gb * r.gpu_count, "tflops": lambda r: -r.bf16_tflops * r.gpu_count}
    if sort not in keys:
        fail(f"--sort {sort!r}: use one of {', '.join(keys)}")
    try:
        from stratos.runtime import resolve_device

        where = resolve_device(_device(None, s if spec is not None else None))
        rows = load_catalog(catalog, mode=mode, local_price=price, calibration=load_calibration(device=where),
                            device=where)
    except CatalogError as e:
        fail(str(e))
    rows = sorted(filter_servers(rows, provider=provider, gpu=gpu, min_memory_gb=min_memory, max_price=max_price),
                  key=keys[sort])
    if not rows:
        fail("no server matches the filters", code=1)
    Console(width=max(100, Console().width)).print(servers_table(rows, sources=sources))  # never cut numbers
    if csv_out:
        write_catalog(csv_out, rows)
        console.print(f"[green]wrote[/green] {csv_out}", highlight=False)


@app.command()
def profile(
    quick: bool = typer.Option(False, "--quick", help="One model size and shorter timings (~5 s instead of ~20 s)."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Measure this machine's device (matmul FLOP/s, memory bandwidth, train/forward/decode steps) and calibrate the cost model."""
    from rich.table import Table

    from stratos.plan.calibration import calibration_path, run_profile
    from stratos.runtime import resolve_device

    where = resolve_device(_device(device))
    r = run_profile(quick=quick, progress=True, device=where)
    e = r["efficiency"]
    view = Console()
    view.print(f"{r['machine']}, {r['threads']} threads, {r['dtype']}: peak {r['peak_flops'] / 1e9:,.1f} GFLOP/s, "
               f"bandwidth {r['bandwidth'] / 1e9:,.1f} GB/s; efficiency train {e['train']:.2f}, forward "
               f"{e['forward']:.2f}, decode {e['decode']:.2f} (+{1e3 * e['decode_layer_s']:.2f} ms per layer and step), "
               f"n_half {e['n_half']:,.0f} params", highlight=False)
    table = Table(title="cost model before this calibration: predicted vs measured")
    for col in ("stage", "params", "predicted s", "measured s", "error"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for c in r["checks"]:
        table.add_row(c["stage"], f"{c['params'] / 1e6:.1f}M", f"{c['predicted_s']:.4f}", f"{c['measured_s']:.4f}",
                      f"{c['error']:+.0%}")
    view.print(table)
    console.print(f"[green]wrote[/green] {calibration_path(where)}", highlight=False)


@app.command("bench-serve")
def bench_serve_cmd(
    url: str = typer.Argument(..., help="Server root or its /v1, e.g. http://127.0.0.1:8000."),
    clients: int = typer.Option(32, help="Concurrent clients."),
    requests: int = typer.Option(1000, help="Requests in all."),
    max_tokens: int = typer.Option(64, help="Tokens generated per request."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt (repeatable; default: a few built-in ones)."),
    model: Optional[str] = typer.Option(None, help="Model id (default: the server's first)."),
    api_key_env: str = typer.Option("STRATOS_API_KEY", help="Environment variable holding the API key."),
    usd_per_hour: Optional[float] = typer.Option(None, help="Server price, to report $ per million output tokens."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result to this JSON file."),
) -> None:
    """Load-test an OpenAI-compatible server: throughput, p50/p95/p99 latency, time to first token, errors."""
    import os

    import httpx
    from rich.table import Table

    from stratos.io import write_json
    from stratos.serve import bench_serve

    kwargs = {"prompts": prompt} if prompt else {}
    try:
        r = bench_serve(url, clients, requests, max_tokens=max_tokens, api_key=os.environ.get(api_key_env) or None,
                        model=model, progress=True, **kwargs)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        fail(f"{url}: {e}")
    table = Table(title=f"{r.model} at {r.url}: {r.clients} clients, {r.requests} requests")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("ok / errors", f"{r.ok} / {sum(r.errors.values())} {r.errors or ''}"),
            ("requests/s", f"{r.requests_per_s:.2f}"), ("output tokens/s", f"{r.output_tokens_per_s:.1f}"),
            ("tokens/s per request", f"{r.per_request_tokens_per_s:.1f}")]
    for name, d in (("latency ms", r.latency_ms), ("TTFT ms", r.ttft_ms)):
        rows.append((name, " / ".join(f"{k} {d[k]:.0f}" for k in ("p50", "p95", "p99"))))
    if usd_per_hour is not None:
        rows.append(("$ per million output tokens", f"{r.usd_per_million_tokens(usd_per_hour):.3f}"))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    if json_out:
        write_json(json_out, r.to_dict() | ({"usd_per_million_tokens": r.usd_per_million_tokens(usd_per_hour)}
                                           if usd_per_hour is not None else {}))


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Pipeline spec (YAML)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/NAME-TIMESTAMP)."),
    from_: Optional[str] = typer.Option(None, "--from", help="Start at this stage (rerunning it)."),
    only: Optional[str] = typer.Option(None, "--only", help="Run just this stage."),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage."),
    new: bool = typer.Option(False, "--new", help="Start a new run directory instead of continuing the latest."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    device: Optional[str] = DEVICE_OPTION,
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes that train the student in the distill stage "
                              "(torchrun; DDP or FSDP2, distill.parallel). See docs/distributed.md."),
) -> None:
    """Run the whole pipeline: plan, synth, distill, compress, deploy, eval, report.

    Without --run-dir it continues the latest runs/NAME-* directory: rerun the same command after
    an interruption to resume, or after editing the spec to rerun only the stages it affects."""
    from stratos.runner import default_run_dir
    from stratos.runner import run as run_pipeline

    s = _spec_or_fail(spec)
    s.device = _device(device, s)
    target = run_dir or default_run_dir(s, new=new)
    console.print(f"run directory: {target}", highlight=False)
    # A RunError (TrainElsewhere included) is printed by the command group, with its exit code.
    manifest = run_pipeline(s, target, from_=from_, only=only, until=until, spec_text=spec.read_text(),
                            progress=progress, nproc=nproc)
    report = manifest.data["stages"].get("report", {}).get("artifacts", {}).get("report_path")
    console.print(f"[green]run complete[/green] {target}" + (f"; report: {target / report}" if report else ""),
                  highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `stratos run`.")) -> None:
    """Rebuild report.html of a run from what its stages wrote."""
    from stratos.report import build_report

    try:
        path = build_report(run_dir)
    except FileNotFoundError as e:
        fail(str(e))
    console.print(f"report: {path}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    """The ``stratos`` entry point (``argv`` for running it in-process, e.g. in tests)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    # torchao's CPU wheel warns at import about CUDA-only kernels it cannot load: noise on every command.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        app(args=argv, prog_name="stratos")
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)


if __name__ == "__main__":
    main()
