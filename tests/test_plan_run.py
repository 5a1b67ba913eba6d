"""The planner for real: teacher probes through the evaluator, pilot distillations, calibration,
plan.json and plan.png, and the plan / servers / profile commands. Tiny models, arithmetic task."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stratos.plan import Plan, make_plan, probe_teacher
from stratos.plan.calibration import corrections, load_calibration, read_measurements, run_profile
from stratos.plan.catalog import local_server, shipped_catalog, write_catalog
from stratos.plan.matching import match
from stratos.plan.shapes import model_shape
from stratos.plan.strategy import choose_strategy
from stratos.spec import StudentSpec, TeacherSpec, load_spec
from stratos.tasks import get_task


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    # Calibration and measurement records go to the user's cache: keep the tests' out of it.
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """A teacher and a smaller student sharing one tokenizer, saved as ordinary HF folders."""
    from stratos.models.tiny import save_model, tiny_llama

    root = tmp_path_factory.mktemp("plan-models")
    teacher = save_model(tiny_llama(tiny_tokenizer, hidden_size=64, num_hidden_layers=2), tiny_tokenizer, root / "teacher")
    student = save_model(tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, seed=1), tiny_tokenizer, root / "student")
    return str(teacher), str(student)


def test_model_shape_reads_configs_without_weights(tiny_models):
    from stratos.models import load

    t_path, s_path = tiny_models
    t, s = model_shape(TeacherSpec(model=t_path)), model_shape(StudentSpec(model=s_path))
    model = load(t_path, with_tokenizer=False)
    assert t.params == sum(p.numel() for p in model.parameters())
    assert (t.hidden, t.layers, t.kv_dim) == (64, 2, 2 * 16)
    assert t.tokenizer == s.tokenizer and match(t, s).mode == "logit"
    assert model_shape(TeacherSpec(model="gpt-x", backend="openai", base_url="http://127.0.0.1:1/v1"),
                       api_params_b=70).params == 70e9


def test_real_probe_of_an_incompetent_teacher_gives_injection(tiny_models):
    t_path, s_path = tiny_models
    task = get_task("arithmetic", digits=2)
    examples = task.examples("eval", 10, seed=1)
    probe = probe_teacher(TeacherSpec(model=t_path), task, examples, batch_size=10, max_new_tokens=6)
    assert probe.n == 10 and probe.source == "measured"
    assert probe.accuracy_rules is not None and probe.latency_s > 0 and probe.seconds > 0
    assert probe.best <= 0.2  # an untrained model does not add numbers
    t, s = model_shape(TeacherSpec(model=t_path)), model_shape(StudentSpec(model=s_path))
    from stratos.plan.probe import profile_task

    profile = profile_task(task, train_size=200)
    assert profile.rules_prompt_tokens > profile.prompt_tokens and profile.oracle_seconds > 0  # what synth costs
    # A teacher's prompts in its own tokens (the tiny byte-level tokenizer: about one token per character).
    from stratos.models import load_tokenizer

    t_tok = load_tokenizer(t_path)
    by_teacher = profile_task(task, train_size=200, teacher_tokenizer=t_tok)
    ex = task.examples("train", 20, seed=0)
    assert by_teacher.teacher_prompt_tokens == pytest.approx(
        sum(len(t_tok(task.prompt(e), add_special_tokens=False)["input_ids"]) for e in ex) / 20)
    assert by_teacher.prompt_tokens == profile.prompt_tokens  # the student's count is unchanged
    strategy = choose_strategy(probe, profile, match(t, s))
    assert strategy.kind == "injection" and strategy.reverse_synthesis > 0


def test_api_teacher_is_probed_through_its_endpoint(tiny_models, tmp_path):
    """The same tiny teacher served behind the OpenAI-compatible API and probed as an API teacher
    answers exactly as when probed locally (greedy decoding), and its request latency is measured."""
    from stratos.models.generate import generate
    from stratos.serve import running_server
    from stratos.tasks import messages
    from stratos.teachers import Price, generate_fn, make_teacher

    t_path, _ = tiny_models
    task = get_task("arithmetic", digits=2)
    examples = task.examples("eval", 4, seed=3)
    local = probe_teacher(TeacherSpec(model=t_path), task, examples, rules=False, max_new_tokens=6)
    with running_server(t_path) as server:
        api = TeacherSpec(name="served", model=server.model, backend="openai", base_url=server.base_url)
        remote = probe_teacher(api, task, examples, rules=False, max_new_tokens=6, cache_dir=tmp_path / "requests",
                               price=Price(input_usd_per_mtok=2.0, output_usd_per_mtok=8.0))
        prompts = [messages(task, ex) for ex in examples]
        client = make_teacher(api, cache_dir=tmp_path / "requests")
        served = generate_fn(client)(prompts, max_new_tokens=6, batch_size=4)
        assert client.usage.cached == 4 and client.usage.requests == 0  # the probe's answers, from its cache
    # What the probe cost at its price, which the budget verdict counts: its tokens, priced.
    tokens_in = client.usage.prompt_tokens
    tokens_out = client.usage.completion_tokens
    assert remote.cost_usd == pytest.approx((tokens_in * 2.0 + tokens_out * 8.0) / 1e6) and remote.cost_usd > 0
    assert local.cost_usd == 0.0
    from stratos.models import load

    model, tok = load(t_path)
    direct = generate(model, tok, prompts, max_new_tokens=6)
    assert [g.text for g in served] == [g[0].text for g in direct]
    assert remote.n == local.n == 4 and remote.accuracy == local.accuracy
    assert remote.accuracy_rules is None and remote.latency_s > 0
    assert remote.latency_s == pytest.approx(sum(g.latency_s for g in served) / 4)  # the mean request latency


def write_spec(path, t_path, s_path, **plan_extra):
    write_catalog(path.parent / "mine.csv", [replace(shipped_catalog()[0], name="my-h100", on_demand_usd_hr=1.0)])
    spec = {
        "name": "tiny-plan",
        "task": {"name": "arithmetic", "options": {"digits": 2}, "train_size": 200, "eval_size": 20},
        "teachers": [{"name": "tiny-teacher", "model": t_path}],
        "students": [{"name": "tiny-student", "model": s_path}],
        "eval": {"max_new_tokens": 6, "batch_size": 8},
        "distill": {"max_length": 256, "per_device_train_batch_size": 8},
        "plan": {"probe_size": 4, "catalog": "mine.csv", "servers": ["local", "lambda-1x-a10", "my-h100"],
                 **plan_extra},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_probe_asks_the_teacher_as_synth_will(tiny_models, tmp_path):
    """A spec whose synth shows the teacher worked examples gets a probe with those same examples (a third
    run, stratos.synth.spec_context), and plan.probe_few_shot: 0 turns that run off; each is its own cache
    entry. The probe's prediction of its own time prices the longer prompts."""
    from stratos.evaluate import evaluate
    from stratos.models import load
    from stratos.synth import spec_context
    from stratos.tasks import task_from_spec

    t_path, s_path = tiny_models
    data = yaml.safe_load(write_spec(tmp_path / "spec.yaml", t_path, s_path, probe_rules=False).read_text())
    data["synth"] = {"few_shot": 2}
    (tmp_path / "shots.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(tmp_path / "shots.yaml")
    assert spec.probe_shots == 2
    plan, _ = make_plan(spec, tmp_path / "plan", progress=False, calibration={})
    (probe,) = plan.probes
    task = task_from_spec(spec.task)
    examples = task.examples("eval", spec.plan.probe_size, seed=spec.task.seed + 1)
    model, tok = load(t_path)
    shown = evaluate(model, tok, task, examples, context=spec_context(spec, task, 2), max_new_tokens=6)
    plain = evaluate(model, tok, task, examples, max_new_tokens=6)
    assert (probe.shots, probe.accuracy_shots, probe.accuracy) == (2, shown.accuracy, plain.accuracy)
    assert probe.accuracy_rules is None
    assert any(r.startswith(f"teacher tiny-teacher probe: {probe.words()}") for r in plan.reasons)
    assert "with 2 worked example(s) before each question (n=4)" in probe.words()
    # Two runs predicted (the second with two worked examples before each question): longer than the first alone.
    rec = next(r for r in read_measurements(tmp_path / "plan" / "plan-measurements.jsonl") if r["stage"] == "generation")
    profile = plan.task
    assert profile.probe_prompts(probe) == [profile.teacher_prompt(), profile.teacher_prompt(few_shot=2)]
    assert profile.teacher_prompt(few_shot=2) > 3 * profile.teacher_prompt() and rec["predicted_s"] > 0
    # probe_few_shot 0: no third run, and the cached probe with examples is not taken for it.
    data["plan"]["probe_few_shot"] = 0
    (tmp_path / "none.yaml").write_text(yaml.safe_dump(data))
    plan, _ = make_plan(load_spec(tmp_path / "none.yaml"), tmp_path / "plan", progress=False, calibration={})
    assert plan.probes[0].accuracy_shots is None and plan.probes[0].shots == 0
    assert len(json.loads((tmp_path / "plan" / "probes.json").read_text())) == 2


def test_make_plan_with_pilot_writes_everything(tiny_models, tmp_path, monkeypatch):
    t_path, s_path = tiny_models
    spec = load_spec(write_spec(tmp_path / "spec.yaml", t_path, s_path, pilot=True, pilot_steps=3))
    assert spec.plan.catalog == (tmp_path / "mine.csv").resolve()  # relative to the spec file
    out = tmp_path / "plan"
    plan, cands = make_plan(spec, out, progress=False, calibration={})
    assert plan.predicted["accuracy_method"] == "pilot" and "pilot:" in plan.predicted["accuracy_reason"]
    assert plan.strategy.kind == "injection"
    assert {c.training_server for c in cands} == {"local", "lambda-1x-a10", "my-h100"}  # filter + own catalog
    assert Plan.from_json(out / "plan.json") == plan
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "candidates.csv").read_text().count("\n") == len(cands) + 1
    # Predicted vs measured: the probe (generation) and the pilot (training) on this machine.
    recs = read_measurements(out / "plan-measurements.jsonl")
    assert {r["stage"] for r in recs} == {"generation", "training"}
    assert all(r["predicted_s"] > 0 and r["measured_s"] > 0 for r in recs)
    assert set(corrections("local")) == {"generation", "training"}
    # A second plan reuses the cached probe instead of measuring again.
    probes = json.loads((out / "probes.json").read_text())
    spec.plan.pilot = False
    recorded = corrections("local")
    again, corrected = make_plan(spec, out, progress=False, calibration={})
    assert [p.to_dict() for p in again.probes] == list(probes.values())
    assert again.predicted["accuracy_method"] == "prior"
    assert corrections("local") == recorded  # a plan from cached probes, without a pilot, measures nothing
    # Later plans apply the recorded corrections to the local machine's stage times: each local stage takes
    # the measured/predicted ratio times what the same plan predicts without any record.
    import stratos.plan.run

    monkeypatch.setattr(stratos.plan.run, "corrections", lambda server, records=None: {})
    (tmp_path / "plan-uncorrected").mkdir()
    (tmp_path / "plan-uncorrected" / "probes.json").write_text((out / "probes.json").read_text())  # same probes
    _, uncorrected = make_plan(spec, tmp_path / "plan-uncorrected", progress=False, calibration={})

    def local_stages(cands):
        c = next(c for c in cands if c.training_server == "local")
        return {st.stage: st.seconds for st in c.stages if st.server == "local"}

    with_records, without = local_stages(corrected), local_stages(uncorrected)
    assert recorded["training"] != 1.0 and without["training"] > 0
    assert with_records["training"] == pytest.approx(without["training"] * recorded["training"], rel=1e-9)


def test_a_pilot_trains_and_scores_the_student_on_the_prompt_it_is_served_with(tiny_models, tmp_path, monkeypatch):
    """With the rules in the teacher's prompts (knowledge_injection), the pilot's student still trains and is
    scored on the plain prompt, as the run's student is: the rules are the teacher's context, not the student's."""
    import stratos.distill
    import stratos.evaluate
    from stratos.plan.pilot import PILOT_POINTS

    t_path, s_path = tiny_models
    path = write_spec(tmp_path / "spec.yaml", t_path, s_path, pilot=True, pilot_steps=3)
    data = yaml.safe_load(path.read_text())
    data["synth"] = {"knowledge_injection": True}
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    trained, scored = [], []
    real_distill, real_evaluate = stratos.distill.distill, stratos.evaluate.evaluate

    def distill_spy(model, tok, records, *a, **kw):
        trained.extend(r["prompt"] for r in records)
        return real_distill(model, tok, records, *a, **kw)

    def evaluate_spy(model, tok, task, examples, **kw):
        if model is not None and model.config.hidden_size == 32:  # the student's (the probes score the teacher)
            scored.append(kw.get("rules", False))
        return real_evaluate(model, tok, task, examples, **kw)

    monkeypatch.setattr(stratos.distill, "distill", distill_spy)
    monkeypatch.setattr(stratos.evaluate, "evaluate", evaluate_spy)
    plan, _ = make_plan(spec, tmp_path / "plan", progress=False, calibration={})
    assert plan.strategy.rules_in_prompt and plan.predicted["accuracy_method"] == "pilot"
    task = get_task("arithmetic", digits=2)
    rules = task.describe()
    assert trained and not any(rules in p for p in trained)
    assert all(p.startswith("What is ") for p in trained)
    assert len(scored) == PILOT_POINTS and not any(scored)  # each pilot evaluation without the rules


def test_plan_command_and_binding_constraint(tiny_models, tmp_path):
    from stratos.cli import app

    t_path, s_path = tiny_models
    spec = write_spec(tmp_path / "spec.yaml", t_path, s_path)
    runner = CliRunner()
    r = runner.invoke(app, ["plan", str(spec), "--out", str(tmp_path / "p"), "--objective", "cost-first"])
    assert r.exit_code == 0, r.output
    assert "Pareto front" in r.output and "injection" in r.output
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["objective"] == "cost-first"
    data = yaml.safe_load(spec.read_text())
    data["constraints"] = {"min_accuracy": 0.99}
    spec.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["plan", str(spec), "--out", str(tmp_path / "p")])
    assert r.exit_code == 1
    assert "binding: min_accuracy" in r.output and "best predicted" in r.output


def test_servers_command_filters(tmp_path):
    from stratos.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["servers", "--gpu", "H100", "--csv", str(tmp_path / "h100.csv")])
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "h100.csv").read_text().splitlines()[1:]
    assert rows and all("H100" in row for row in rows)
    assert runner.invoke(app, ["servers", "--provider", "nowhere"]).exit_code == 1


def test_a_profile_taken_while_the_cpu_is_busy_says_so(caplog, tmp_path):
    """The calibration is measured once and reused by every later plan: measured while other work holds the
    cores, its speeds are low for good, so the profile measures how many cores other processes kept busy
    while it ran, warns, and, taken by a plan on its own (store_busy False), is not stored."""
    import os
    import subprocess
    import sys

    from stratos.plan.calibration import local_efficiency

    cores = os.cpu_count() or 1
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        with caplog.at_level("WARNING", logger="stratos.plan.calibration"):
            cal = run_profile(progress=False, sizes=[(64, 1)], seconds=0.02, device="cpu", out=tmp_path / "cal.json",
                              store_busy=False)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert cal["busy"] and cal["busy_cores"] >= 0.5 * cores
    assert "the CPU was busy while it was profiled" in caplog.text and "not stored" in caplog.text
    assert not (tmp_path / "cal.json").exists()
    assert local_efficiency(cal).source.endswith(f"while other work kept {cal['busy_cores']:.1f} cores busy: its "
                                                 "speeds are low")
    caplog.clear()
    # Quiet (this process alone; a lagging load average from earlier tests does not count): stored, no warning.
    with caplog.at_level("WARNING", logger="stratos.plan.calibration"):
        quiet = run_profile(progress=False, sizes=[(64, 1)], seconds=0.02, device="cpu", out=tmp_path / "cal.json",
                            store_busy=False)
    assert not quiet["busy"] and quiet["busy_cores"] < 0.5 * cores
    assert "busy" not in caplog.text and (tmp_path / "cal.json").exists()


def test_profile_calibrates_the_local_machine():
    # One small Llama and short timings: the test checks the wiring, `stratos profile` measures properly.
    cal = run_profile(progress=False, sizes=[(64, 1)], seconds=0.02)
    assert cal["peak_flops"] > 1e8 and cal["bandwidth"] > 1e8
    assert load_calibration() == json.loads(json.dumps(cal))
    assert {c["stage"] for c in cal["checks"]} == {"train", "forward", "decode"}
    assert {"profile-train", "profile-forward", "profile-decode"} <= set(corrections("local"))
    assert "busy_cores" in cal
    local = local_server(0.0, cal)
    assert local.bf16_tflops == pytest.approx(cal["peak_flops"] / 1e12) and local.source.startswith("stratos profile")
    # Processes that train together (stratos run --nproc): on a CPU they share the cores the calibration
    # measured, the same machine; on CUDA one GPU each, as many as there are.
    assert local_server(0.0, cal, device="cpu", processes=4).gpu_count == 1 == local.gpu_count
    if torch.cuda.is_available():
        assert local_server(0.0, cal, device="cuda", processes=2).gpu_count == min(2, torch.cuda.device_count())
    from stratos.plan.calibration import _shape, _small_llama, local_efficiency
    from stratos.plan.costmodel import CPU_DEFAULT, train_seconds

    # Each efficiency is the measured share of the peak, recomputed here from the stored timings: a step
    # needs 6 (train) or 2 (forward) FLOPs per parameter and token, plus the small-model overhead of n_half
    # parameters (one model size cannot fit n_half: the default stays); a decoding step moves the weights,
    # the KV cache of 80 tokens and the overhead through memory. Capped at 1 (a timing above the peak).
    m = cal["models"][0]
    eff, peak, params, tokens = cal["efficiency"], cal["peak_flops"], m["params"], m["tokens"]
    assert eff["n_half"] == CPU_DEFAULT.n_half
    assert eff["train"] == pytest.approx(min(1.0, 6 * (params + eff["n_half"]) * tokens / m["train_step_s"] / peak))
    assert eff["forward"] == pytest.approx(min(1.0, 2 * (params + eff["n_half"]) * tokens / m["forward_s"] / peak))
    # Decoding: the small model and a wide shallow one (decoding only) fit the bandwidth efficiency and the
    # per-layer cost; where the two points separate them, the cost model reproduces both measured steps.
    from stratos.plan.calibration import WIDE_DECODE
    from stratos.plan.costmodel import decode_step_seconds

    bpp = 2 if cal["dtype"] == "bfloat16" else 4
    assert 0 < eff["decode"] <= 1 and eff["decode_layer_s"] >= 0
    if eff["decode_layer_s"] > 0:
        for (hidden, layers), step in (((64, 1), m["decode_step_s"]), (WIDE_DECODE, cal["decode_only"][0]["decode_step_s"])):
            shape = _shape(_small_llama(hidden, layers), bpp)
            assert decode_step_seconds(shape, 1, 80, local, local_efficiency(cal)) == pytest.approx(step, rel=1e-6)
    # Calibrated on one model, the cost model reproduces that model's measured training step. When the
    # measured efficiency had to be capped at 100% of the measured peak (a timing faster than the
    # matmul peak, as happens on a busy or turbo-boosting machine), the model runs at the peak and so
    # predicts no faster than what was measured.
    predicted = train_seconds(_shape(_small_llama(64, 1), 2.0), m["tokens"], local, local_efficiency(cal))
    if cal["efficiency"]["train"] < 1.0:
        assert predicted == pytest.approx(m["train_step_s"], rel=1e-6)
    else:
        assert predicted >= m["train_step_s"]


def test_the_decoding_fit_separates_bandwidth_from_each_layers_fixed_cost():
    from stratos.plan.calibration import _fit_decode

    # Steps made by a known machine (a 0.4 share of the bandwidth, 0.5 ms per layer) are fitted back exactly.
    made = [(layers, s, layers * 5e-4 + s / 0.4) for layers, s in ((4, 2e-4), (6, 3e-4), (2, 2e-3), (30, 3e-3))]
    e, d = _fit_decode(made)
    assert e == pytest.approx(0.4) and d == pytest.approx(5e-4)
    # One point, or points the fit cannot explain with a cost per layer (deeper is faster), leave no per-layer
    # cost: the efficiency is then the mean share of the bandwidth, as before it was modelled.
    assert _fit_decode(made[:1]) == (pytest.approx(2e-4 / made[0][2]), 0.0)
    assert _fit_decode([(2, 1e-3, 4e-3), (8, 1e-3, 2e-3)])[1] == 0.0


def test_a_calibration_without_the_per_layer_decoding_cost_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path))
    from stratos.plan.calibration import calibration_path, machine_id

    old = {"machine_id": machine_id(), "peak_flops": 1e12, "bandwidth": 1e10,
           "efficiency": {"train": 0.3, "forward": 0.4, "decode": 0.2, "n_half": 2e6}}
    calibration_path().parent.mkdir(parents=True)
    calibration_path().write_text(json.dumps(old))
    assert load_calibration() == {}  # so the next plan profiles this machine again (a few seconds)
    old["efficiency"]["decode_layer_s"] = 5e-4
    calibration_path().write_text(json.dumps(old))
    assert load_calibration() == old


def test_a_plan_on_an_uncalibrated_machine_measures_it_first(tiny_models, tmp_path, monkeypatch):
    """No stored calibration: make_plan runs a quick profile, stores it, and plans with the measured
    factors instead of the CPU guesses; the next plan reuses the stored one."""
    from stratos.plan.calibration import calibration_path, machine_id

    from stratos.plan.calibration import OtherWork

    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(OtherWork, "cores", lambda self: 0.0)  # quiet, whatever else runs beside the tests
    t_path, s_path = tiny_models
    spec = load_spec(write_spec(tmp_path / "spec.yaml", t_path, s_path, servers=["local"]))
    assert load_calibration() == {}
    plan, _ = make_plan(spec, tmp_path / "plan", progress=False)
    cal = load_calibration()
    assert cal["peak_flops"] > 0 and cal["efficiency"]["train"] > 0
    assert plan.efficiency["local"]["source"].startswith("calibrated by stratos profile")
    stamp = calibration_path().stat().st_mtime_ns
    make_plan(spec, tmp_path / "plan", progress=False)
    assert calibration_path().stat().st_mtime_ns == stamp  # measured once, not at every plan
    # A cache shared with another machine (a home folder on a network drive): its calibration is not used
    # here; the plan measures this machine and stores it in its place.
    assert cal["machine_id"] == machine_id()
    calibration_path().write_text(json.dumps({**cal, "machine_id": "Another CPU, 64 cores", "peak_flops": 1.0}))
    assert load_calibration() == {}
    make_plan(spec, tmp_path / "plan", progress=False)
    again = load_calibration()
    assert again["machine_id"] == machine_id() and again["peak_flops"] > 1.0
