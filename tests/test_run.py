"""`stratos run` end to end on a tiny spec: every stage for real (tiny Llamas, the real server, the
real `openai` client), a run killed mid-distill and resumed to the same model, and a changed spec
rerunning only the stages it affects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stratos.plan.calibration import student_key
from stratos.models.tiny import build_tokenizer, save_model, tiny_llama
from stratos.report import build_report
from stratos.runner import STAGE_NAMES, RunError, run, select_stages
from stratos.spec import load_spec
from tests.conftest import expected_device, kill_when

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    """A spec over two tiny local Llamas sharing a byte-level tokenizer, on 2-digit arithmetic."""
    base = tmp_path_factory.mktemp("run-models")
    tok = build_tokenizer(vocab_size=260)
    # A longer context than the student's: the teacher reads two worked examples and the rules (synth.few_shot).
    teacher = save_model(tiny_llama(tok, hidden_size=64, num_hidden_layers=2, seed=1, max_position_embeddings=1024), tok,
                         base / "teacher")
    student = save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=1, seed=2), tok, base / "student")
    spec = {
        "name": "tiny",
        "task": {"name": "arithmetic", "options": {"digits": 2}, "train_size": 48, "eval_size": 12},
        "constraints": {"budget_usd": 5},
        "teachers": [{"model": str(teacher), "name": "tiny-teacher"}],
        "students": [{"model": str(student), "name": "tiny-student"}],
        "plan": {"servers": ["local"], "probe_size": 6, "probe_rules": False, "probe_max_new_tokens": 8},
        "synth": {"samples_per_prompt": 1, "max_new_tokens": 8, "prompts": 8, "reverse_synthesis": 48, "few_shot": 2},
        "distill": {"algorithm": "kd", "loss": "fkl", "kd_ratio": 0.5, "max_steps": 24, "save_steps": 4, "per_device_train_batch_size": 8,
                    "learning_rate": 1e-3, "max_length": 64, "report_to": []},
        "compress": {"enabled": True, "prune_ratio": 0.25, "prune": "width", "eval_size": 0, "speed_tokens": 4},
        "eval": {"n": 12, "max_new_tokens": 8, "bench_clients": 2, "bench_requests": 4},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(spec: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "stratos.cli", "run", str(spec), "--run-dir", str(run_dir), "--no-progress"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "STRATOS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_stage_selection_flags():
    assert select_stages(None, None, None) == STAGE_NAMES
    assert select_stages("distill", None, "eval") == ["distill", "compress", "deploy", "eval"]
    assert select_stages(None, "report", None) == ["report"]
    with pytest.raises(RunError, match="--from 'train': not a stage"):
        select_stages("train", None, None)


def test_pipeline_killed_mid_distill_resumes_to_the_same_result(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    env = _env(tmp_path)

    # The reference: one uninterrupted run.
    full = tmp_path / "full"
    manifest = run(load_spec(tiny_spec), full, progress=False, spec_text=tiny_spec.read_text()).data
    assert all(manifest["stages"][s]["status"] == "done" for s in STAGE_NAMES)
    # device: auto (the spec's default): every stage records where it computed, the same device.
    assert {manifest["stages"][s]["device"].partition(":")[0] for s in STAGE_NAMES} == {expected_device()}

    # The same spec in a subprocess, SIGKILLed once distill has written a checkpoint.
    killed = tmp_path / "killed"
    ckpts = killed / "distill" / "checkpoints"
    kill_when(_cli(tiny_spec, killed), env, lambda: any(p.name >= "step-0000008" for p in ckpts.glob("step-*")))
    before = _manifest(killed)["stages"]
    assert before["distill"]["status"] == "running" and before["synth"]["status"] == "done"
    synth_ended = before["synth"]["ended"]

    # The same command again: finished stages are skipped, distill resumes from its checkpoint.
    done = subprocess.run(_cli(tiny_spec, killed), env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    after = _manifest(killed)["stages"]
    assert all(after[s]["status"] == "done" for s in STAGE_NAMES)
    assert after["synth"]["ended"] == synth_ended  # not rerun
    result = json.loads((killed / "distill" / "result.json").read_text())
    assert result["resumed_from"] >= 8 and result["steps"] == 24
    log = (killed / "run.log").read_text()
    assert "distill: resuming from its checkpoint" in log and "synth" in log

    a = load_file(str(full / manifest["stages"]["distill"]["artifacts"]["model"] / "model.safetensors"))
    b = load_file(str(killed / after["distill"]["artifacts"]["model"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k

    # The compress stage pruned the distilled student, the pruned model is what was deployed and evaluated,
    # and the resumed run pruned exactly as the uninterrupted one.
    deployed_dir = killed / after["compress"]["artifacts"]["model"]
    assert deployed_dir.name == "pruned" and after["deploy"]["artifacts"]["model"] == after["compress"]["artifacts"]["model"]
    pruned = load_file(str(deployed_dir / "model.safetensors"))
    assert sum(t.numel() for t in pruned.values()) < 0.9 * sum(t.numel() for t in b.values())
    ref = load_file(str(full / manifest["stages"]["compress"]["artifacts"]["model"] / "model.safetensors"))
    assert ref.keys() == pruned.keys() and all(ref[k].shape == pruned[k].shape for k in ref)
    for k in ref:
        assert torch.allclose(ref[k], pruned[k], rtol=1e-4, atol=1e-5), k

    # Every stage's artifacts are there and the report renders what they hold.
    results = json.loads((killed / "eval" / "results.json").read_text())
    roles = [r["role"] for r in results["rows"]]
    assert roles[:3] == ["teacher (zero-shot)", "teacher (rules in prompt)", "teacher (2 worked examples and the rules)"]
    assert roles[-1] == "deployed student"
    deployed = results["rows"][-1]
    assert deployed["n"] == 12 and deployed["latency_ms"]["p50"] > 0
    # No eval question among the training records (checked against what synth wrote), and the report says so.
    synth_rows = len((killed / "synth" / "data.jsonl").read_text().splitlines())
    assert results["leakage"]["found"] == 0 and results["leakage"]["training_records"] == synth_rows
    assert results["bench"]["requests"] == 4 and not results["bench"]["errors"]
    # The load test sends the eval questions as a chat request carries them: in the deployed model's chat template.
    from stratos.models import load_tokenizer
    from stratos.tasks import messages, task_from_spec

    spec = load_spec(tiny_spec)
    task = task_from_spec(spec.task)
    d_tok = load_tokenizer(deployed_dir)
    asked = [d_tok.apply_chat_template(messages(task, ex), add_generation_prompt=True, tokenize=True)["input_ids"]
             for ex in task.examples("eval", spec.eval_questions, seed=spec.task.seed)[:16]]
    assert results["bench"]["prompt_tokens"] == sum(len(asked[i % len(asked)]) for i in range(4))
    # The teacher as synth asked it (synth.few_shot 2; the plan put the rules in): the same worked examples and
    # rules before each eval question.
    from stratos.evaluate import evaluate
    from stratos.models import load
    from stratos.synth import spec_context

    teacher, t_tok = load(spec.teachers[0].model)
    shown = evaluate(teacher, t_tok, task, task.examples("eval", 12, seed=spec.task.seed), max_new_tokens=8,
                     context=spec_context(spec, task, 2, rules=True), rules=True)
    stats = json.loads((killed / "synth" / "stats.json").read_text())
    assert stats["worked_examples"] == spec_context(spec, task, 2, rules=True)  # eval asks with synth's own
    row = results["rows"][2]
    assert (row["accuracy"], row["n"], row["few_shot"]) == (shown.accuracy, 12, 2)
    html = (killed / "report.html").read_text()
    assert ("Asked as synth asked it for the training data (2 worked examples and the rules before each question), the "
            f"teacher answers <b>{shown.accuracy:.1%}</b> of 12.") in html
    # Each example prediction shows the task's reference answer beside what the model parsed.
    wrong = next(json.loads(x) for x in (killed / "eval" / "predictions-deployed.jsonl").read_text().splitlines()
                 if not json.loads(x)["correct"])
    assert f"<td>{wrong['parsed']}</td><td>{wrong['answer']}</td>" in html
    for needle in ("Results", "deployed student", "Plan", "Training", "Stages: predicted vs measured",
                   "No eval question appears in the training data: 12 questions checked",
                   "Example predictions", "data:image/png;base64,"):
        assert needle in html, needle
    assert (killed / "deploy" / "sky-serve.yaml").is_file() and (killed / "deploy" / "serve.sh").is_file()
    # Each exported model folder carries a model card with what was measured of it.
    card = (deployed_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "# tiny: deployed student" in card
    assert f"| deployed student | {deployed['accuracy']:.1%}" in card and "## Limits" in card
    assert ("Asked as synth asked it for the training data (2 worked examples and the rules before each question), the "
            "teacher answers "
            f"{shown.accuracy:.1%}") in card
    assert "# tiny: student" in (killed / after["distill"]["artifacts"]["model"] / "README.md").read_text()
    # The planner learns from what it measured: the killed run's plan came after the full run's eval, which
    # recorded its predicted and measured accuracy; the same prediction corrected by that error is the
    # accuracy the full run measured.
    first = json.loads((full / "eval" / "results.json").read_text())["rows"][-1]
    records = [json.loads(x) for x in (full / "eval" / "plan-measurements.jsonl").read_text().splitlines()]
    acc_rec = next(r for r in records if r.get("kind") == "accuracy")
    assert acc_rec["measured"] == first["accuracy"]
    lat_rec = next(r for r in records if r.get("stage") == "latency")
    # The plan predicted the p50 of the eval's load test (its clients, max_new_tokens tokens each): like for like.
    assert lat_rec["measured_s"] == first["latency_ms"]["p50"] and lat_rec["basis"] == "eval load test"
    second = json.loads((killed / "plan" / "plan.json").read_text())["predicted"]
    # The next plan of the same spec on this machine multiplies the same prediction by that ratio: it predicts
    # the p50 the first run measured.
    assert second["latency_ms"] == pytest.approx(lat_rec["measured_s"])
    assert "corrected by" in second["accuracy_reason"] and "1 earlier run(s)" in second["accuracy_reason"]
    assert second["accuracy"] == pytest.approx(min(1.0, max(0.0, acc_rec["predicted"] + acc_rec["error"])))
    # The killed run records its error against the prior, not against the corrected prediction: else the next
    # plan's correction would be the median of +e and ~0, however far off the prior stays.
    assert second["accuracy"] - second["accuracy_correction"] == pytest.approx(acc_rec["predicted"])
    again = [json.loads(x) for x in (killed / "eval" / "plan-measurements.jsonl").read_text().splitlines()]
    assert next(r for r in again if r.get("kind") == "accuracy")["predicted"] == pytest.approx(acc_rec["predicted"])

    # The spec's one constraint (budget_usd 5) judged from what was measured: met, and shown first.
    assert [v["constraint"] for v in results["verdicts"]] == ["budget_usd"] and results["verdicts"][0]["met"]
    assert html.index("Constraints") < html.index("Results") and "meets all 1 of the spec" in html

    # The same run asked for 50% accuracy, which this tiny student cannot reach, with no retry allowed
    # (max_attempts 1; the retry is test_a_missed_accuracy_retries_with_the_plans_next_candidate's): the eval
    # judges it missed, the report says so, and `stratos run` exits 3 with one line saying by how much.
    strict = tmp_path / "strict.yaml"
    strict.write_text(tiny_spec.read_text().replace("budget_usd: 5", "budget_usd: 5\n  min_accuracy: 0.5\n  max_attempts: 1"))
    assert "min_accuracy: 0.5" in strict.read_text()
    assert deployed["accuracy"] < 0.5
    missed = subprocess.run(_cli(strict, killed) + ["--from", "eval"], env=env, capture_output=True, text=True,
                            timeout=240)
    assert missed.returncode == 3, missed.stdout + missed.stderr
    line = next(x for x in missed.stderr.splitlines() if "misses the spec's constraints" in x)
    assert f"min_accuracy 50.0%: missed, {100 * (0.5 - deployed['accuracy']):.1f} points short" in line
    assert "no retry: constraints.max_attempts (1) reached" in line and "budget_usd" not in line.split("; no retry")[0]
    html = (killed / "report.html").read_text()
    assert "misses 1 of the spec's 2 constraint(s)" in html and "points short" in html
    assert "No retry: constraints.max_attempts (1) reached." in html
    if shutil.which("chromium") or shutil.which("chromium-browser"):  # a real browser renders it
        shot = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(killed / "report.html")],
                              capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0, shot.stdout + shot.stderr
        assert (killed / "report.png").is_file()


def test_a_changed_spec_reruns_only_the_stages_it_affects(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "r"
    first = run(load_spec(tiny_spec), run_dir, progress=False).data
    ended = {s: first["stages"][s]["ended"] for s in STAGE_NAMES}
    time.sleep(1.1)  # timestamps have one-second resolution

    data = yaml.safe_load(tiny_spec.read_text())
    data["distill"]["learning_rate"] = 2e-3
    data["distill"]["sft_baseline"] = True
    data["eval"]["rules_n"] = 0  # no row for the teacher with the rules in its prompt
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    second = run(load_spec(changed), run_dir, progress=False).data
    rerun = [s for s in STAGE_NAMES if second["stages"][s]["ended"] != ended[s]]
    assert rerun == ["distill", "compress", "deploy", "eval", "report"]

    # distill.sft_baseline: the same student trained by SFT alone, the same steps, scored on the same questions.
    baseline = second["stages"]["distill"]["artifacts"]["sft_baseline"]
    b_result = json.loads((run_dir / "distill" / "sft-baseline" / "result.json").read_text())
    assert baseline["steps"] == b_result["steps"] == 24 and baseline["training"].startswith("sft (loss ce, 24 steps)")
    assert [p["algorithm"] for p in b_result["settings"]["phases"]] == ["sft"] and b_result["signal"] == {}
    kd = load_file(str(run_dir / "distill" / "model" / "model.safetensors"))
    sft = load_file(str(run_dir / baseline["model"] / "model.safetensors"))
    assert kd.keys() == sft.keys() and any(not torch.equal(kd[k], sft[k]) for k in kd)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert [r["role"] for r in results["rows"]][:4] == ["teacher (zero-shot)", "teacher (2 worked examples and the rules)",
                                                        "student", "SFT baseline"]
    right = {role: [json.loads(x)["correct"] for x in (run_dir / "eval" / f"predictions-{role}.jsonl").open()]
             for role in ("student", "SFT-baseline")}
    gain = results["teacher_gain"]
    assert gain["only_a"] == sum(a and not b for a, b in zip(right["student"], right["SFT-baseline"]))
    assert gain["only_b"] == sum(b and not a for a, b in zip(right["student"], right["SFT-baseline"]))
    assert gain["n"] == 12 and gain["student"].startswith("kd (loss fkl, kd_ratio 0.5")
    assert "What the teacher adds" in (run_dir / "report.html").read_text()
    assert "- What the teacher adds: The student, trained with kd" in (run_dir / "distill" / "model" / "README.md").read_text()
    # The baseline's folder has its own card: its training, its measured row, the teacher in its data only.
    b_card = (run_dir / baseline["model"] / "README.md").read_text()
    b_row = next(r for r in results["rows"] if r["role"] == "SFT baseline")
    assert b_card.startswith("---\nlibrary_name: transformers") and "It is the **SFT baseline**" in b_card
    assert f"| SFT baseline | {b_row['accuracy']:.1%} [{b_row['ci_low']:.1%}" in b_card
    assert "in the data only (what synth kept of its answers); its signal was not used in training" in b_card
    assert f"- Training: sft (loss ce, kd_ratio 0); {b_result['steps']} optimizer steps, teacher signal none." in b_card
    assert "- What the teacher adds: The student, trained with kd" in b_card

    # Unchanged: nothing reruns. --only report rebuilds just the report.
    third = run(load_spec(changed), run_dir, progress=False).data
    assert all(third["stages"][s]["ended"] == second["stages"][s]["ended"] for s in STAGE_NAMES)
    time.sleep(1.1)
    fourth = run(load_spec(changed), run_dir, only="report", progress=False).data
    assert fourth["stages"]["report"]["ended"] != third["stages"]["report"]["ended"]
    assert fourth["stages"]["distill"]["ended"] == third["stages"]["distill"]["ended"]
    assert build_report(run_dir).read_text().count("<h2>") >= 6


def test_a_missed_accuracy_retries_with_the_plans_next_candidate(tiny_spec, tmp_path, monkeypatch):
    """The plan picks the faster of two students (accuracy weighs nothing); it misses min_accuracy, so the
    retry pins the front's other student, whose predicted accuracy was higher. The first attempt's
    measurement is that of another student, so it does not correct this one's prediction."""
    from stratos.verdicts import ConstraintsMissed

    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    tok = build_tokenizer(vocab_size=260)
    bigger = save_model(tiny_llama(tok, hidden_size=48, num_hidden_layers=2, seed=3), tok, tmp_path / "bigger")
    data = yaml.safe_load(tiny_spec.read_text())
    data["students"].append({"model": str(bigger), "name": "bigger-student"})
    data["constraints"] = {"min_accuracy": 0.5}
    data["plan"]["weights"] = {"accuracy": 0.0, "latency": 1.0, "train_time": 1.0, "cost": 1.0}
    data["distill"]["max_steps"] = 8
    data["compress"] = {"enabled": False}
    spec = tmp_path / "two.yaml"
    spec.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "r"
    with pytest.raises(ConstraintsMissed, match="after 2 attempts: min_accuracy 50.0%: missed"):
        run(load_spec(spec), run_dir, progress=False)
    m = _manifest(run_dir)
    first, second = m["attempts"]
    assert first["candidate"][1] == "tiny-student" and second["action"] == "next candidate"
    assert second["overrides"] == {"plan.candidate": {"teacher": "tiny-teacher", "student": "bigger-student",
                                                      "serving_server": "local"}}
    assert second["candidate"][1] == "bigger-student"
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    assert plan["student"]["name"] == "bigger-student" and plan["counts"]["total"] == 1
    first_plan = json.loads((run_dir / "attempts" / "1" / "plan" / "plan.json").read_text())
    assert "corrected by" not in plan["predicted"]["accuracy_reason"] + first_plan["predicted"]["accuracy_reason"]
    records = [json.loads(x) for x in (run_dir / "attempts" / "1" / "eval" / "plan-measurements.jsonl").open()]
    assert [r["student"] for r in records if r.get("kind") == "accuracy"] == [
        student_key(load_spec(spec).students[0])]  # the tiny student's miss, recorded as its own
    assert (run_dir / "attempts" / "1" / "plan" / "plan.json").is_file()  # the first plan, kept
    assert sorted(p.name for p in (run_dir / "attempts" / "1").iterdir()) == [
        "deploy", "distill", "eval", "plan", "stages.json", "synth"]  # the first attempt's folders (compress is off)
    assert first["result"]["accuracy"] == json.loads((run_dir / "attempts" / "1" / "eval" / "results.json")
                                                     .read_text())["rows"][-1]["accuracy"]
    assert second["next"] == "no retry: constraints.max_attempts (2) reached"
    html = (run_dir / "report.html").read_text()
    assert "<h3>Attempts</h3>" in html and "<b>next candidate</b>: the plan&#x27;s next candidate" in html
    assert "No retry: constraints.max_attempts (2) reached." in html and "misses 1 of the spec's 1 constraint" in html
    # The retry's plan reused the first one's teacher probe (cached outside the plan folder).
    assert "probes.json" in {p.name for p in (run_dir / "cache").iterdir()}
    assert not (run_dir / "plan" / "probes.json").exists()


def _write_spec(path: Path, **extra) -> Path:
    data = {"name": "fp", "task": {"name": "jsonl", "path": "data.jsonl", "scorer": "myscorer:score"},
            "teachers": [{"model": "teacher"}], "students": [{"model": "smollm2-135m-instruct"}],
            "plan": {"catalog": "servers.csv"}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_hashes_cover_the_contents_of_the_files_a_spec_names(tmp_path, monkeypatch):
    """An edited data file, scorer module, catalog or local model reruns the run from the plan on;
    an eval-only setting reruns only eval and the report; nothing else changes any hash."""
    from stratos.plan.catalog import shipped_catalog, write_catalog
    from stratos.runner import inputs_hashes

    tok = build_tokenizer(vocab_size=260)
    save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=1), tok, tmp_path / "teacher")
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(20)))
    (tmp_path / "myscorer.py").write_text("def score(pred, ans):\n    return pred.strip() == str(ans)\n")
    write_catalog(tmp_path / "servers.csv", shipped_catalog()[:3])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    spec_path = _write_spec(tmp_path / "s.yaml")
    base = inputs_hashes(load_spec(spec_path))
    assert inputs_hashes(load_spec(spec_path)) == base  # deterministic

    def changed_stages() -> list[str]:
        now = inputs_hashes(load_spec(spec_path))
        return [s for s in STAGE_NAMES if now[s] != base[s]]

    edits = [
        (tmp_path / "data.jsonl", lambda p: p.write_text(p.read_text().replace('"1+1="', '"1 + 1 ="'))),
        (tmp_path / "myscorer.py", lambda p: p.write_text(p.read_text().replace("strip()", "strip().lower()"))),
        (tmp_path / "servers.csv", lambda p: p.write_text(p.read_text() + p.read_text().splitlines()[1].replace(
            p.read_text().splitlines()[1].split(",")[0], "my-box", 1) + "\n")),
        (tmp_path / "teacher" / "config.json", lambda p: p.write_text(p.read_text().replace('"rms_norm_eps": 1e-06',
                                                                                           '"rms_norm_eps": 1e-05'))),
    ]
    for path, edit in edits:
        original = path.read_bytes()
        edit(path)
        assert path.read_bytes() != original, path
        assert changed_stages() == STAGE_NAMES, path
        path.write_bytes(original)
        assert changed_stages() == [], path

    _write_spec(spec_path, eval={"n": 7, "bench_requests": 3})
    assert changed_stages() == ["eval", "report"]
    _write_spec(spec_path, eval={"max_new_tokens": 7})  # the plan's probes generate with it
    assert changed_stages() == STAGE_NAMES


def test_a_run_continues_only_its_own_directory(tmp_path, monkeypatch):
    from stratos.runner import default_run_dir
    from stratos.spec import Spec

    monkeypatch.chdir(tmp_path)

    def spec(name: str) -> Spec:
        return Spec.model_validate({"name": name, "task": {"name": "arithmetic"}, "teachers": [{"model": "t"}],
                                    "students": [{"model": "s"}]})

    for name in ("mahjong-demo-20261126-101010", "mahjong-20261125-090909", "mahjong-x", "mahjong-20261127-1"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "manifest.json").write_text('{"stages": {}}')
    assert default_run_dir(spec("mahjong")) == Path("runs/mahjong-20261125-090909")
    assert default_run_dir(spec("mahjong-demo")) == Path("runs/mahjong-demo-20261126-101010")
    fresh = default_run_dir(spec("other"))
    assert fresh.parent == Path("runs") and fresh.name.startswith("other-") and not fresh.exists()

    # A directory that holds another spec's run is refused, before anything is written to it.
    (tmp_path / "runs" / "mahjong-20261125-090909" / "manifest.json").write_text('{"name": "mahjong", "stages": {}}')
    before = sorted(p.name for p in (tmp_path / "runs" / "mahjong-20261125-090909").iterdir())
    with pytest.raises(RunError, match="holds the run of spec 'mahjong', not 'mahjong-demo'"):
        run(spec("mahjong-demo"), tmp_path / "runs" / "mahjong-20261125-090909", progress=False)
    assert sorted(p.name for p in (tmp_path / "runs" / "mahjong-20261125-090909").iterdir()) == before
