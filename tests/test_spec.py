"""The spec: valid files load; every problem in a bad one is one clear line with its field path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stratos.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name: demo
task:
  name: arithmetic
  train_size: 100
teachers:
  - model: smollm2-135m-instruct
students:
  - model: smollm2-135m-instruct
    config_overrides: {num_hidden_layers: 4}
distill:
  loss: jsd
  loss_kwargs: {beta: 0.3}
  lora: {r: 8}
"""

BAD = """\
name: demo
task:
  name: arithmetic
  train_size: -5
teachers:
  - model: smollm2-135m-instruct
    backend: openai
students:
  - model: x
    colour: blue
distill:
  loss: nope
  learning_rate: fast
  kd_ratio: 1.5
"""


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "stratos.cli", *args], capture_output=True, text=True, env=env)


def test_good_spec_loads_with_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD)
    spec = load_spec(path)
    assert spec.distill.loss == "jsd" and spec.distill.lora.r == 8 and spec.distill.lora.alpha == 32
    assert spec.distill.teacher_signal == "cached"  # a default, from the one place defaults live
    assert spec.task.eval_size == 200
    res = run_cli("validate", str(path))
    assert res.returncode == 0, res.stderr


def test_every_problem_is_one_line_naming_field_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    problems = info.value.problems
    expected = {
        "line 4: task.train_size": "greater than 0",
        "line 6: teachers[0]": "base_url",
        "line 10: students[0].colour": "unknown key",
        "line 12: distill.loss": "unknown loss 'nope'",
        "line 13: distill.learning_rate": "valid number",
        "line 14: distill.kd_ratio": "less than or equal to 1",
    }
    assert len(problems) == len(expected), problems
    for prefix, reason in expected.items():
        assert any(p.startswith(prefix) and reason in p for p in problems), (prefix, problems)

    res = run_cli("validate", str(path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == len(expected)
    assert all(str(path) in x for x in lines)


@pytest.mark.parametrize("text,needle", [
    ("task: [unclosed", "invalid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("name: x\n", "task: required field is missing"),
])
def test_unusable_files(tmp_path, text, needle):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    res = run_cli("validate", str(path))
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr


def test_missing_file_is_a_clear_error(tmp_path):
    res = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "cannot read file" in res.stderr


def test_examples_and_benchmark_specs_in_the_repo_are_valid():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        load_spec(path)
    # A benchmark's spec may start from what another benchmark trains (runs/...): its fields are checked,
    # not that those files exist yet.
    benchmarks = sorted((ROOT / "benchmarks").glob("*.yaml"))
    assert len(benchmarks) >= 5
    for path in benchmarks:
        load_spec(path, check=False)


def test_relative_task_path_is_relative_to_the_spec(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "s.yaml"
    path.write_text("task: {name: jsonl, path: data.jsonl}\nteachers: [{model: a}]\nstudents: [{model: b}]\n")
    (tmp_path / "sub" / "data.jsonl").write_text('{"prompt": "2+2=", "answer": "4"}\n')
    assert load_spec(path).task.path == tmp_path / "sub" / "data.jsonl"


def test_relative_model_paths_are_relative_to_the_spec(tmp_path, monkeypatch):
    from stratos.models.tiny import build_tokenizer, save_model, tiny_llama

    tok = build_tokenizer(["1+1=2"], vocab_size=300)
    save_model(tiny_llama(tok), tok, tmp_path / "sub" / "models" / "tiny")
    path = tmp_path / "sub" / "s.yaml"
    path.write_text("task: {name: arithmetic}\nteachers: [{model: models/tiny}]\n"
                    "students: [{model: HuggingFaceTB/SmolLM2-135M-Instruct}, {model: smollm2-135m-instruct}]\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: the path must not depend on the working directory
    spec = load_spec(path)
    assert spec.teachers[0].model == str(tmp_path / "sub" / "models" / "tiny")
    assert spec.teachers[0].label == "models/tiny"  # reports show what the user wrote
    assert spec.students[0].model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # nothing on disk: a hub id
    assert spec.students[1].model == "smollm2-135m-instruct"  # an alias


def test_yaml_is_composed_once_however_many_errors(tmp_path, monkeypatch):
    """`validate` on a large spec with thousands of errors stays one pass over the file: every
    error's line comes from one composed document, not a re-parse per error."""
    import yaml

    calls = []
    real = yaml.compose
    monkeypatch.setattr(yaml, "compose", lambda *a, **k: calls.append(1) or real(*a, **k))
    bad = "".join(f"  - model: m\n    typo{i}: 1\n" for i in range(2000))
    path = tmp_path / "big.yaml"
    path.write_text(f"task: {{name: arithmetic}}\nteachers: [{{model: t}}]\nstudents:\n{bad}")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert len(info.value.problems) == 2000
    assert info.value.problems[-1].startswith(f"line {3 + 2 * 2000}: students[1999].typo1999: unknown key")
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["*", "../../x", "/abs", "a/b", "mahjong-*", "..", ".hidden", "x" * 65, "a b"])
def test_run_names_are_one_safe_path_component(tmp_path, name):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": name, "task": {"name": "arithmetic"}, "teachers": [{"model": "t"}],
                                    "students": [{"model": "s"}]}))
    with pytest.raises(SpecError, match="name: .* is not a run name"):
        load_spec(path)


def test_strict_types_and_finite_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("task: {name: arithmetic, train_size: true, options: {digits: .nan}}\n"
                    "teachers: [{model: t, trust_remote_code: 'yes'}]\n"
                    "students: [{model: s, config_overrides: {rope_theta: .inf}}]\n"
                    "distill: {learning_rate: .inf, loss_kwargs: {beta: .nan}}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    got = "\n".join(info.value.problems)
    for needle in ("line 1: task.train_size: Input should be a valid integer",
                   "line 1: task.options: digits must be a finite number",
                   "line 2: teachers[0].trust_remote_code: Input should be a valid boolean",
                   "line 3: students[0].config_overrides: rope_theta must be a finite number",
                   "line 4: distill.learning_rate: Input should be a finite number",
                   "line 4: distill.loss_kwargs.beta: Input should be a finite number"):
        assert needle in got, got
    assert len(info.value.problems) == 6
