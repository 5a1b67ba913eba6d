"""Planner logic on given numbers: Pareto front, constraints, cost model, memory, matching, strategy, catalog."""

from __future__ import annotations

import json

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratos.plan import NoFeasiblePlan, Plan, PlanInputs, TaskProfile, TeacherProbe, build_plan, load_catalog
from stratos.plan.catalog import CatalogError, Server, filter_servers, read_catalog, shipped_catalog, write_catalog
from stratos.plan.costmodel import (
    GPU_DEFAULT,
    ApiPricing,
    ModelShape,
    Workload,
    check_memory,
    request_latency_s,
    stage_costs,
    train_seconds,
    with_params,
)
from stratos.plan.matching import match
from stratos.plan.pareto import dominates, pareto_front
from stratos.plan.planner import PLAN_VERSION
from stratos.plan.strategy import SpecValues, apply_spec, choose_strategy, samples_for
from stratos.spec import OBJECTIVE_PRESETS

# A Llama-3-8B-like teacher and 1B / 135M students (shapes as in their configs).
T8B = ModelShape("teacher-8b", 8.0e9, 4096, 32, 128256, 1024, "tok-llama3")
S1B = ModelShape("student-1b", 1.24e9, 2048, 16, 128256, 512, "tok-llama3")
S135 = ModelShape("student-135m", 1.35e8, 576, 30, 49152, 192, "tok-smol")
T70B = ModelShape("teacher-70b", 70.6e9, 8192, 80, 128256, 1024, "tok-llama3")
API = ModelShape("api-teacher", 0.0, api=True)
TASK = TaskProfile("mahjong:waits", prompt_tokens=120, answer_tokens=12, rationale_tokens=80, reasoning_steps=4,
                   verifier=True, oracle=True, train_size=1000)


def server(name="gpu", gpu="H100-SXM", count=1, mem=80.0, tflops=989.0, bw=3.35, price=3.0) -> Server:
    return Server(name, "test", "here", gpu, count, mem, tflops, bw, "-", price, None, "test", "2025-01")


def probe(name, acc, rules=None, latency=0.5):
    return TeacherProbe(name, 50, acc, rules, latency, seconds=10.0, source="given")


def inputs(**kw) -> PlanInputs:
    base = dict(teachers=[T8B], students=[S1B, S135], probes={"teacher-8b": probe("teacher-8b", 0.8, 0.85)}, task=TASK,
                servers=[server("big", price=4.0), server("small", gpu="L4", mem=24, tflops=121, bw=0.3, price=0.8)],
                efficiency={})
    base.update(kw)
    return PlanInputs(**base)


# --------------------------------------------------------------------------- Pareto front


def brute_force_front(points):
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4).flatmap(
    lambda d: st.lists(st.tuples(*[st.integers(0, 6)] * d), min_size=0, max_size=40)))
def test_pareto_front_equals_brute_force(points):
    # Small integer ranges force ties and duplicate points, where front algorithms usually slip.
    assert pareto_front(points) == brute_force_front(points)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e3), st.floats(0, 1e3), st.floats(-1, 0)), min_size=1, max_size=60))
def test_pareto_front_on_real_valued_points(points):
    front = pareto_front(points)
    assert front == brute_force_front(points)
    assert front  # a non-empty set always has a non-dominated point


# --------------------------------------------------------------------------- cost model


@settings(max_examples=100, deadline=None)
@given(st.floats(1e6, 1e11), st.floats(1.01, 10), st.floats(1e3, 1e9), st.floats(1.01, 10))
def test_cost_model_monotone_in_size_and_tokens(params, grow, tokens, more):
    h100 = server()
    m = with_params(S1B, params)
    assert train_seconds(with_params(m, params * grow), tokens, h100, GPU_DEFAULT) > train_seconds(m, tokens, h100, GPU_DEFAULT)
    assert train_seconds(m, tokens * more, h100, GPU_DEFAULT) > train_seconds(m, tokens, h100, GPU_DEFAULT)
    big = with_params(m, params * grow)
    assert request_latency_s(big, 100, 10, h100, GPU_DEFAULT) > request_latency_s(m, 100, 10, h100, GPU_DEFAULT)


def work(**kw) -> Workload:
    base = dict(prompt_tokens=120, answer_tokens=12, train_examples=2000, epochs=2, teacher_sequences=4000, signal="logit")
    base.update(kw)
    return Workload(**base)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 100), st.floats(1.01, 5))
def test_cost_monotone_in_price(price, factor):
    def total(p):
        return sum(s.usd for s in stage_costs(T8B, S1B, work(), server(price=p), server(price=p), GPU_DEFAULT, GPU_DEFAULT))

    assert total(price * factor) > total(price)


def test_training_on_several_gpus_says_it_assumes_linear_scaling():
    one = {s.stage: s for s in stage_costs(T8B, S1B, work(), server(), server(), GPU_DEFAULT, GPU_DEFAULT)}["training"]
    eight = {s.stage: s for s in stage_costs(T8B, S1B, work(), server(count=8), server(), GPU_DEFAULT,
                                             GPU_DEFAULT)}["training"]
    assert eight.seconds == pytest.approx(one.seconds / 8)
    assert "on all 8 GPUs at 8x one GPU's speed (linear scaling: an upper bound" in eight.note
    assert "GPUs" not in one.note


def test_recorded_corrections_scale_stage_times():
    plain = {s.stage: s.seconds for s in stage_costs(T8B, S1B, work(), server(), server(), GPU_DEFAULT, GPU_DEFAULT)}
    fixed = {s.stage: s.seconds for s in stage_costs(T8B, S1B, work(), server(), server(), GPU_DEFAULT, GPU_DEFAULT,
                                                     correction={"training": 2.0, "distill": 3.0, "synth": 0.5})}
    assert fixed["training"] == pytest.approx(2 * plain["training"])  # its own record wins
    assert fixed["signal"] == pytest.approx(3 * plain["signal"])  # the runner's 'distill' records
    assert fixed["generation"] == pytest.approx(0.5 * plain["generation"])


def test_generation_prices_the_rules_in_the_teacher_prompt_and_the_oracles_questions():
    """The synth stage's time: teacher generations of the prompts it really sends (the rules before each
    question when the strategy puts them there), plus the reverse-synthesised questions the task's oracle
    makes, at the per-question time measured while planning; an API teacher's input tokens count the rules."""
    def gen(api=None, teacher=T8B, price=3.0, **kw):
        return {s.stage: s for s in stage_costs(teacher, S1B, work(**kw), server(price=price), server(price=price),
                                                GPU_DEFAULT, GPU_DEFAULT, api=api)}["generation"]

    plain, ruled = gen(), gen(teacher_prompt_tokens=1200)
    assert ruled.seconds > plain.seconds and "of 1,200-token prompts" in ruled.note
    both = gen(teacher_prompt_tokens=1200, oracle_examples=8000, oracle_seconds=0.002)
    assert both.seconds == pytest.approx(ruled.seconds + 16.0)
    assert "+ 8,000 oracle questions (2.0 ms each, measured)" in both.note
    oracle_only = gen(teacher_sequences=0, oracle_examples=8000, oracle_seconds=0.002)
    assert oracle_only.seconds == pytest.approx(16.0) and oracle_only.note.startswith("data from the task's oracle")
    # A correction learnt from earlier runs scales the predicted teacher work, not the oracle's measured time.
    corrected = {s.stage: s for s in stage_costs(T8B, S1B, work(teacher_prompt_tokens=1200, oracle_examples=8000,
                                                                oracle_seconds=0.002), server(), server(), GPU_DEFAULT,
                                                 GPU_DEFAULT, correction={"generation": 2.0})}["generation"]
    assert corrected.seconds == pytest.approx(2 * ruled.seconds + 16.0)
    paid = gen(api=ApiPricing(1.0, 4.0, 1.0), teacher=API, price=0.0, teacher_sequences=1000,
               teacher_prompt_tokens=1200, signal="topk")
    assert paid.usd == pytest.approx(1000 * (1200 * 1.0 + 12 * 4.0) / 1e6, rel=1e-3)


def test_the_workload_sends_the_rules_only_when_the_strategy_puts_them_in_the_prompt():
    from stratos.plan.planner import workload_for

    task = TaskProfile("mahjong:waits", prompt_tokens=120, answer_tokens=12, rationale_tokens=80, reasoning_steps=4,
                       verifier=True, oracle=True, train_size=1000, teacher_prompt_tokens=100, rules_prompt_tokens=1000,
                       oracle_seconds=0.001)
    m = match(T8B, S1B)
    weak = choose_strategy(probe("t", 0.05, 0.30), task, m)  # rules help: they go in the teacher's prompt
    strong = choose_strategy(probe("t", 0.80, 0.81), task, m)
    assert weak.rules_in_prompt and not strong.rules_in_prompt
    inputs = PlanInputs(teachers=[T8B], students=[S1B], probes={}, task=task, servers=[server()], efficiency={})
    for strat, tokens in ((weak, 1000), (strong, 100)):
        w = workload_for(strat, m, task, inputs)
        assert w.teacher_prompt_tokens == tokens and w.oracle_seconds == 0.001
        assert w.oracle_examples == strat.reverse_synthesis


def test_api_teacher_cost_is_tokens_times_price():
    w = work(teacher_sequences=1000, signal="topk")
    free = stage_costs(API, S1B, w, server(price=0), server(price=0), GPU_DEFAULT, GPU_DEFAULT, api=ApiPricing(0, 0, 1.0))
    paid = stage_costs(API, S1B, w, server(price=0), server(price=0), GPU_DEFAULT, GPU_DEFAULT, api=ApiPricing(1.0, 4.0, 1.0))
    gen = {s.stage: s for s in paid}["generation"]
    assert gen.usd == pytest.approx(1000 * (120 * 1.0 + 12 * 4.0) / 1e6)
    assert {s.stage: s for s in free}["generation"].usd == 0
    assert gen.seconds == pytest.approx(1000 * 1.0 / 8)  # measured latency, 8 requests in flight


def test_memory_refuses_a_teacher_that_cannot_fit():
    l4 = server("l4", gpu="L4", mem=24, tflops=121, bw=0.3)
    verdict = check_memory(T70B, S135, work(), l4, l4, needs_teacher_weights=True)
    assert not verdict.ok and "teacher teacher-70b needs" in verdict.reason and "l4 has 24 GB" in verdict.reason
    # The same teacher fits on eight 80 GB GPUs, sharded over at least two of them.
    eight = server("8x", count=8)
    ok = check_memory(T70B, S135, work(), eight, eight, needs_teacher_weights=True)
    assert ok.ok and 2 <= ok.teacher_gpus <= 8
    # Text-only plans with an oracle don't need the teacher's weights on the training server at all.
    assert check_memory(T70B, S135, work(), l4, l4, needs_teacher_weights=False).ok


def test_plan_never_trains_where_the_teacher_does_not_fit():
    p = inputs(teachers=[T70B], probes={"teacher-70b": probe("teacher-70b", 0.9)},
               servers=[server("8x", count=8, price=30.0), server("l4", gpu="L4", mem=24, tflops=121, bw=0.3, price=0.8)])
    plan, cands = build_plan(p)
    assert plan.training_server.name == "8x"
    assert all("memory" in c.violations for c in cands if c.training_server == "l4")


# --------------------------------------------------------------------------- constraints


def test_feasible_candidates_meet_every_constraint():
    p = inputs(min_accuracy=0.6, max_latency_ms=100, budget_usd=5.0)
    plan, cands = build_plan(p)
    for c in cands:
        ok = c.accuracy >= 0.6 and c.latency_ms <= 100 and c.cost_usd <= 5.0 and "memory" not in c.violations
        assert c.feasible == ok
    assert plan.predicted["accuracy"] >= 0.6 and plan.predicted["cost_usd"] <= 5.0
    assert all(r["violations"] == {} for r in plan.pareto)


def test_the_plan_predicts_latency_for_the_load_the_eval_judges_it_under():
    from stratos.plan.costmodel import LoadTest, decode_step_seconds, forward_seconds

    h100 = server()
    # With clients concurrent, a request waits for every client's prefill once and decodes its tokens in a
    # batch of that many sequences; one client is the request served alone.
    alone = request_latency_s(S135, 50, 64, h100, GPU_DEFAULT)
    under_load = request_latency_s(S135, 50, 64, h100, GPU_DEFAULT, clients=4)
    assert under_load == pytest.approx(forward_seconds(S135, 4 * 50, h100, GPU_DEFAULT)
                                       + 64 * decode_step_seconds(S135, 4, 50 + 32, h100, GPU_DEFAULT))
    assert alone < under_load
    load = LoadTest(clients=4, new_tokens=64)
    plan_alone, _ = build_plan(inputs())  # the default: one client, the task's answer length
    plan, cands = build_plan(inputs(load=load))
    assert plan.predicted["latency_load"] == {"clients": 4, "new_tokens": 64}
    assert plan.predicted["latency_ms"] > plan_alone.predicted["latency_ms"]
    assert any(f"the p50 of the eval's load test that max_latency_ms is judged on (4 concurrent clients, each "
               f"request {TASK.prompt_tokens:.0f} prompt + 64 new tokens)" in r for r in plan.reasons)
    # The constraint is checked against that load: a limit between the two predictions rules out what a
    # prediction for one request alone would have let through.
    one = dict(students=[S135], servers=[h100])
    alone_ms, load_ms = (build_plan(inputs(**one, load=x))[0].predicted["latency_ms"] for x in (LoadTest(), load))
    assert alone_ms < load_ms
    limit = (alone_ms + load_ms) / 2
    assert build_plan(inputs(**one, max_latency_ms=limit))[0].predicted["latency_ms"] == alone_ms
    with pytest.raises(NoFeasiblePlan, match="max_latency_ms"):
        build_plan(inputs(**one, load=load, max_latency_ms=limit))
    from stratos.plan.render import pareto_table

    assert "predicted for the eval's load test (4 concurrent clients, 64 new tokens each)" in pareto_table(plan).caption


def test_binding_constraint_is_named_when_nothing_is_left():
    with pytest.raises(NoFeasiblePlan) as err:
        build_plan(inputs(budget_usd=0.01))
    assert err.value.binding == ["budget_usd"]
    msg = str(err.value)
    assert "binding: budget_usd" in msg and "budget_usd $0.01: cheapest $" in msg

    with pytest.raises(NoFeasiblePlan) as err:
        build_plan(inputs(min_accuracy=0.99))
    assert err.value.binding == ["min_accuracy"]
    assert "best predicted" in str(err.value)

    # Two constraints each fatal on their own: neither relaxed alone leaves a plan.
    with pytest.raises(NoFeasiblePlan) as err:
        build_plan(inputs(min_accuracy=0.99, budget_usd=0.01))
    assert err.value.binding == [] and "no single constraint" in str(err.value)


def test_objective_presets_move_the_choice():
    picks = {}
    for name, w in OBJECTIVE_PRESETS.items():
        # No serving trial in the cost, so the bigger student's longer training shows in it.
        plan, _ = build_plan(inputs(weights=w.model_dump(), objective=name, serve_hours=0.0))
        picks[name] = plan.predicted
    assert picks["accuracy-first"]["accuracy"] >= picks["cost-first"]["accuracy"]
    assert picks["cost-first"]["cost_usd"] <= picks["accuracy-first"]["cost_usd"]
    assert picks["accuracy-first"]["accuracy"] > picks["cost-first"]["accuracy"]  # 1B vs 135M student


def test_plan_candidate_pins_the_pair_and_serving_server():
    free, _ = build_plan(inputs(weights=OBJECTIVE_PRESETS["accuracy-first"].model_dump(), serve_hours=0.0))
    assert free.student["name"] == "student-1b"
    # A retry on a miss pins the next candidate: only that pair (and server) is planned.
    pinned, cands = build_plan(inputs(weights=OBJECTIVE_PRESETS["accuracy-first"].model_dump(), serve_hours=0.0,
                                      pin=("teacher-8b", "student-135m", "small")))
    assert (pinned.student["name"], pinned.serving_server.name) == ("student-135m", "small")
    assert {(c.student, c.serving_server) for c in cands} == {("student-135m", "small")}
    assert pinned.reasons[0] == ("plan.candidate pins teacher teacher-8b and student student-135m, served on small: "
                                 "the other pairs were not considered")
    # Pinned, a pair is planned even where it is predicted to miss a constraint (a retry's pair, whose
    # prediction the first attempt's measurement corrected); the reasons say so. Memory stays hard.
    strict, _ = build_plan(inputs(min_accuracy=0.99, pin=("teacher-8b", "student-135m", "small")))
    assert strict.student["name"] == "student-135m" and "planned although predicted to miss min_accuracy" in strict.reasons[0]
    with pytest.raises(NoFeasiblePlan):
        build_plan(inputs(min_accuracy=0.99))
    with pytest.raises(ValueError, match=r"plan.candidate.student 'student-7b': not one of the plan's students "
                                         r"\(student-1b, student-135m\)"):
        build_plan(inputs(pin=("teacher-8b", "student-7b", None)))


def test_chosen_plan_is_on_the_front_and_roundtrips(tmp_path):
    plan, cands = build_plan(inputs())
    chosen = plan.pareto[0]
    assert chosen["on_front"]
    front = [c for c in cands if c.on_front]
    assert len(front) == plan.counts["front"] == len(plan.pareto)
    plan.to_json(tmp_path / "plan.json")
    back = Plan.from_json(tmp_path / "plan.json")
    assert back == plan
    data = json.loads((tmp_path / "plan.json").read_text())
    for key in ("teacher", "student", "training_server", "serving_server", "strategy", "predicted", "pareto", "reasons"):
        assert data[key]
    assert data["strategy"]["kind"] in ("alignment", "injection")
    assert {"loss", "kd_ratio", "on_policy", "rules_in_prompt", "reverse_synthesis", "data_size", "epochs"} <= set(data["strategy"])
    assert {s["stage"] for s in data["stages"]} >= {"probe", "generation", "signal", "training", "serving"}
    assert data["settings"]["phases"] and data["settings"]["signal"] in ("hidden", "topk", "none")
    with pytest.raises(ValueError, match="not a Stratos plan"):
        Plan.from_json(f'{{"version": {PLAN_VERSION}}}')
    with pytest.raises(ValueError, match="re-run `stratos plan`"):
        Plan.from_json('{"version": 1}')


def test_deploy_reads_the_serving_server_from_plan_json(tmp_path):
    from stratos.serve import read_plan_target

    plan, _ = build_plan(inputs(servers=[server("h100", price=3.0)]))
    plan.to_json(tmp_path / "plan.json")
    target = read_plan_target(tmp_path / "plan.json")
    assert target["count"] == 1 and "H100" in target["accelerator"]


# --------------------------------------------------------------------------- matching and strategy


def test_matching_modes():
    assert match(T8B, S1B).mode == "logit"
    assert match(T8B, S135).mode == "text"
    m = match(API, S135)
    assert m.mode == "topk" and m.capacity_ratio > 100 and any("unknown" in r for r in m.reasons)


def test_incompetent_teacher_gets_injection_competent_gets_alignment():
    m = match(T8B, S1B)
    weak = choose_strategy(probe("teacher-8b", 0.02, 0.04), TASK, m)
    assert weak.kind == "injection"
    assert weak.rules_in_prompt and weak.knowledge_injection and weak.reverse_synthesis > 0 and not weak.teacher_generates
    assert any("not competent" in r for r in weak.reasons)
    strong = choose_strategy(probe("teacher-8b", 0.92, 0.93), TASK, m)
    assert strong.kind == "alignment"
    assert strong.teacher_generates and strong.reverse_synthesis == 0
    assert strong.kd_ratio == 0.5  # the verifier's answers keep half the weight, however sure the teacher
    assert not strong.rules_in_prompt  # rules gave only +1%
    # Rules that help the teacher a lot go into its prompts.
    assert choose_strategy(probe("teacher-8b", 0.55, 0.8), TASK, m).rules_in_prompt


def test_strategy_settings_follow_the_pair_and_task():
    # Large capacity gap -> mode-seeking reverse KL; text-only pairs -> plain CE on teacher text.
    shared = S135.__class__(**{**S135.to_dict(), "tokenizer": "tok-llama3"})
    assert choose_strategy(probe("t", 0.9), TASK, match(T70B, shared)).loss == "rkl"
    # ... unless the student starts from random weights: then forward KL, and the reason says why.
    scratch = choose_strategy(probe("t", 0.9), TASK, match(T70B, replace(shared, pretrained=False)))
    assert scratch.loss == "fkl" and any("random weights" in r for r in scratch.reasons)
    assert choose_strategy(probe("t", 0.9), TASK, match(T8B, S1B)).loss == "fkl"
    text = choose_strategy(probe("t", 0.9), TASK, match(T8B, S135))
    assert text.loss == "ce" and text.kd_ratio == 0.0
    # No oracle (a fixed JSONL file): no reverse synthesis, data capped by the file.
    fixed = TaskProfile("jsonl", 50, 5, 5, 0, True, False, 300)
    s = choose_strategy(probe("t", 0.1), fixed, match(T8B, S1B))
    assert s.kind == "injection" and s.reverse_synthesis == 0 and s.teacher_generates and s.data_size == 300
    # An API teacher gives log-probs only with its own generations: top-k KD for alignment, SFT for injection.
    assert choose_strategy(probe("t", 0.9), TASK, match(API, S1B)).loss == "rkl"
    api_weak = choose_strategy(probe("t", 0.1), TASK, match(API, S1B))
    assert api_weak.kind == "injection" and api_weak.loss == "ce" and api_weak.kd_ratio == 0
    # On-policy only for white-box pairs on long, multi-step answers.
    long_task = TaskProfile("proofs", 100, 200, 300, 8, True, True, 1000)
    assert choose_strategy(probe("t", 0.9), long_task, match(T8B, S1B)).on_policy
    assert not choose_strategy(probe("t", 0.9), long_task, match(T8B, S135)).on_policy


def test_samples_per_prompt_cover_95_percent():
    for acc in (0.05, 0.2, 0.5, 0.7, 0.9):
        k = samples_for(acc)
        assert 1 - (1 - acc) ** k >= 0.95 or k == 8
        assert k == 1 or 1 - (1 - acc) ** (k - 1) < 0.95


# --------------------------------------------------------------------------- the spec's own values


def stage_seconds(plan) -> dict[str, float]:
    return {s.stage: s.seconds for s in plan.stages}


def one_pair(**kw) -> PlanInputs:
    """One teacher, one student, one server: the same candidate with and without the spec's values."""
    return inputs(students=[S1B], servers=[server("big", price=4.0)], **kw)


def test_spec_values_resize_the_workload_and_cut_the_predictions():
    # A fixed question file (no oracle), 480 train questions, a weak teacher: the plan would send all 480
    # to the teacher with many samples each. The spec says 32 prompts x 2 samples, the 480 reference
    # answers as reverse synthesis, 2 epochs (as in examples/my-data.yaml).
    fixed = TaskProfile("jsonl", 60, 6, 6, 0, True, False, 480)
    weak = {"teacher-8b": probe("teacher-8b", 0.05)}
    own, _ = build_plan(one_pair(task=fixed, probes=weak))
    assert own.strategy.teacher_generates and own.strategy.prompts == 480
    assert own.workload.teacher_sequences == 480 * own.strategy.samples_per_prompt > 64
    values = SpecValues(prompts=32, samples_per_prompt=2, reverse_synthesis=480, epochs=2.0)
    plan, _ = build_plan(one_pair(task=fixed, probes=weak, spec_values=values))
    st, w = plan.strategy, plan.workload
    assert (st.prompts, st.samples_per_prompt, st.reverse_synthesis, st.epochs) == (32, 2, 480, 2.0)
    assert w.teacher_sequences == 32 * 2
    assert w.train_examples == st.data_size == 480  # both draws come from the file's 480 questions
    assert w.epochs == 2.0 < own.workload.epochs
    mine, theirs = stage_seconds(plan), stage_seconds(own)
    assert mine["generation"] < theirs["generation"] / 10
    assert mine["training"] < theirs["training"]
    assert plan.predicted["train_hours"] < own.predicted["train_hours"]
    said = next(r for r in plan.reasons if r.startswith("from the spec"))
    assert "synth.prompts 32 (plan: 480)" in said and "distill.num_train_epochs 2" in said
    assert "= 480 examples x 2 epochs" in said

    # A generated task (oracle): the plan's reverse synthesis and epochs give way to the spec's.
    own, _ = build_plan(one_pair(probes=weak))
    assert own.strategy.kind == "injection" and not own.strategy.teacher_generates
    values = SpecValues(reverse_synthesis=own.strategy.reverse_synthesis // 4, epochs=1.0)
    plan, _ = build_plan(one_pair(probes=weak, spec_values=values))
    assert plan.workload.train_examples == own.strategy.reverse_synthesis // 4 and plan.workload.epochs == 1.0
    assert plan.workload.teacher_sequences == 0
    # The plan's own lines for what the spec replaced say so where they stand; the others are unmarked.
    mark = "[the plan's own choice; the spec's value replaces it, below]"
    marked = [r for r in plan.reasons if r.endswith(mark)]
    assert [r.removesuffix(" " + mark).split(":")[0] for r in marked] == [f"{own.strategy.reverse_synthesis} reverse-synthesised examples "
                                                  "(answer first, question derived, checked by the oracle)",
                                                  f"{own.strategy.data_size} examples x {own.strategy.epochs:g} epochs"]
    assert not any(r.endswith(mark) for r in own.reasons)
    assert sum(r.startswith("kd_ratio") and r.endswith(mark) for r in plan.reasons) == 0
    assert stage_seconds(plan)["training"] < stage_seconds(own)["training"] / 4

    # Prompts written for a plan that had no teacher generations: now the teacher generates, and the
    # oracle data stays.
    plan, _ = build_plan(one_pair(probes=weak, spec_values=SpecValues(prompts=100, samples_per_prompt=3)))
    assert plan.strategy.teacher_generates and plan.workload.teacher_sequences == 300
    assert plan.workload.train_examples == 100 + own.strategy.reverse_synthesis
    assert stage_seconds(plan)["generation"] > 0 == stage_seconds(own)["generation"]


def test_unverified_teacher_data_written_in_the_spec_changes_what_the_plan_says_and_sizes():
    """With synth.verify false every teacher sample is kept: the plan's lines about verified answers are marked
    as replaced, and the data is sized as prompts x samples, not one verified answer per prompt."""
    competent = {"teacher-8b": probe("teacher-8b", 0.7)}
    own, _ = build_plan(one_pair(probes=competent))
    assert own.strategy.kind == "alignment" and own.strategy.verify
    verified = [r for r in own.reasons if "verified answers" in r or "kept only when the verifier" in r]
    assert len(verified) >= 2
    plan, _ = build_plan(one_pair(probes=competent, spec_values=SpecValues(verify=False, samples_per_prompt=4)))
    st = plan.strategy
    assert not st.verify and st.data_size == 4 * st.prompts == 4 * own.strategy.prompts
    mark = "[the plan's own choice; the spec's value replaces it, below]"
    assert all(r + " " + mark in plan.reasons for r in verified)
    said = next(r for r in plan.reasons if r.startswith("from the spec"))
    assert "synth.verify false (plan: true)" in said and "x 4 sample(s), every distinct one kept" in said
    assert f"= at most {st.data_size} examples x" in said and "identical samples once" in said
    assert st.kd_ratio == own.strategy.kd_ratio == 0.5  # a teacher at 70%: KD balanced with CE, checked or not
    # A reliable teacher (85%): kd_ratio 0.5 on verified answers, 0.9 where every sample is kept unchecked, and
    # the plan says why; a kd_ratio the spec writes wins over both.
    reliable = {"teacher-8b": probe("teacher-8b", 0.85)}
    own, _ = build_plan(one_pair(probes=reliable))
    plan, _ = build_plan(one_pair(probes=reliable, spec_values=SpecValues(verify=False)))
    assert (own.strategy.kd_ratio, plan.strategy.kd_ratio, plan.strategy.teacher_accuracy) == (0.5, 0.9, 0.85)
    assert next(r for r in plan.reasons if r.startswith("kd_ratio 0.5: ")).endswith(mark)
    said = next(r for r in plan.reasons if r.startswith("from the spec"))
    assert ("synth.verify false (plan: true), so kd_ratio 0.9 (plan: 0.5), the rule for answers no verifier "
            "checks, for a teacher at 85%") in said
    assert build_plan(one_pair(probes=reliable, spec_values=SpecValues(verify=False, kd_ratio=0.3)))[0].strategy.kd_ratio == 0.3
    # Other data: accuracy records of runs on verified answers do not correct this plan, even at one sample per
    # prompt and the same kd_ratio, where the data's size and the loss are the same.
    from stratos.plan.calibration import recipe_key

    one = build_plan(one_pair(probes=reliable, spec_values=SpecValues(verify=False, kd_ratio=0.5,
                                                                      samples_per_prompt=1)))[0].strategy
    checked = build_plan(one_pair(probes=reliable, spec_values=SpecValues(samples_per_prompt=1)))[0].strategy
    assert (one.data_size, one.kd_ratio) == (checked.data_size, checked.kd_ratio)
    assert recipe_key(one, "t") == recipe_key(checked, "t") + ", every sample kept unchecked"


def test_the_plan_puts_worked_examples_in_the_teachers_prompts_where_the_probe_shows_they_help():
    """plan.probe_few_shot: the probe asks the teacher a third time with worked examples. Where they lift it by
    RULES_HELP or more the plan puts them in synth's teacher prompts, and sizes the samples, sets kd_ratio and
    predicts from the teacher so asked; where they do not, it says so and asks as before."""
    plain = {"teacher-8b": probe("teacher-8b", 0.65)}
    helped = {"teacher-8b": replace(probe("teacher-8b", 0.65), shots=4, accuracy_shots=0.85)}
    flat = {"teacher-8b": replace(probe("teacher-8b", 0.65), shots=4, accuracy_shots=0.67)}
    own, _ = build_plan(one_pair(probes=plain))
    plan, _ = build_plan(one_pair(probes=helped))
    st = plan.strategy
    assert own.strategy.few_shot == 0 and st.few_shot == 4 and st.kind == own.strategy.kind == "alignment"
    assert "teacher teacher-8b probe: 65% zero-shot, 85% with 4 worked example(s) before each question (n=50)" \
        in plan.reasons
    said = next(r for r in plan.reasons if r.startswith("worked examples: "))
    assert said.startswith("worked examples: 4 before each teacher prompt (synth.few_shot), which raise its probe "
                           "accuracy from 65% to 85%")
    # Sized, weighted and predicted from the teacher as synth will ask it: 85%, not the zero-shot 65%.
    assert (st.samples_per_prompt, own.strategy.samples_per_prompt) == (samples_for(0.85), samples_for(0.65)) == (2, 3)
    assert (st.kd_ratio, own.strategy.kd_ratio) == (0.5, 0.5)  # verified answers keep half the weight on CE
    # Without a verifier the teacher's answers are the data as they come: a reliable one (85%) gets KD's weight.
    unchecked = replace(TASK, verifier=False)
    assert build_plan(one_pair(probes=helped, task=unchecked))[0].strategy.kd_ratio == 0.9
    assert build_plan(one_pair(probes=plain, task=unchecked))[0].strategy.kd_ratio == 0.5
    assert "prior: ceiling 85% (teacher probe)" in plan.predicted["accuracy_reason"]
    assert plan.predicted["accuracy"] > own.predicted["accuracy"]
    # ... and synth pays for the examples: longer teacher prompts than the plan without them.
    assert plan.workload.teacher_prompt_tokens > own.workload.teacher_prompt_tokens
    from stratos.plan.calibration import recipe_key

    assert recipe_key(st, "t").endswith(", the teacher shown 4 worked examples") and "(kd_ratio 0.5)" in recipe_key(st, "t")
    # Examples that do not help: none in the prompts, and the line says by how much they moved it.
    plan, _ = build_plan(one_pair(probes=flat))
    assert plan.strategy.few_shot == 0 and plan.strategy.samples_per_prompt == 3
    assert ("worked examples: none in the teacher's prompts; 4 of them changed its probe accuracy by +2 points, "
            "short of the 5 that would pay for their tokens") in plan.reasons
    # What the spec writes wins, and the plan's line says it was replaced.
    plan, _ = build_plan(one_pair(probes=helped, spec_values=SpecValues(few_shot=0)))
    assert plan.strategy.few_shot == 0
    assert next(r for r in plan.reasons if r.startswith("worked examples: ")).endswith(
        "[the plan's own choice; the spec's value replaces it, below]")
    assert "synth.few_shot 0 (plan: 4)" in next(r for r in plan.reasons if r.startswith("from the spec"))
    # A teacher that does not generate (injection with an oracle) is shown no examples, however they helped.
    weak = {"teacher-8b": replace(probe("teacher-8b", 0.1), shots=4, accuracy_shots=0.3)}
    plan, _ = build_plan(one_pair(probes=weak))
    assert plan.strategy.kind == "injection" and plan.strategy.few_shot == 0
    assert not any(r.startswith("worked examples: ") for r in plan.reasons)


def test_worked_examples_for_the_teacher_are_said_where_the_teacher_signal_is():
    """synth.few_shot: the teacher answers with worked examples the student never sees, and KD reads it with them:
    the plan says so in its teacher-signal line (the probe asked without them)."""
    competent = {"teacher-8b": probe("teacher-8b", 0.7)}
    own, _ = build_plan(one_pair(probes=competent))
    assert own.strategy.few_shot == 0 and not any("context distillation" in r for r in own.reasons)
    plan, _ = build_plan(one_pair(probes=competent, spec_values=SpecValues(few_shot=4)))
    assert plan.strategy.few_shot == 4
    # The teacher reads them: its prompts are priced five questions and four worked answers long.
    w, t = plan.workload, TASK
    assert w.teacher_prompt_tokens == pytest.approx(5 * (t.teacher_prompt_tokens or t.prompt_tokens)
                                                    + 4 * t.rationale_tokens)
    assert stage_seconds(plan)["generation"] > stage_seconds(own)["generation"]
    assert "synth.few_shot 4 (plan: 0)" in next(r for r in plan.reasons if r.startswith("from the spec"))
    signal = next(r for r in plan.reasons if r.startswith("teacher signal: its last hidden states"))
    assert "the teacher reads 4 worked example(s) (synth.few_shot) before each question" in signal
    assert "(context distillation)" in signal
    # Other data: accuracy records of runs without the examples do not correct this plan, nor its those.
    from stratos.plan.calibration import recipe_key

    assert recipe_key(plan.strategy, "t") == recipe_key(own.strategy, "t") + ", the teacher shown 4 worked examples"
    assert recipe_key(own.strategy, "t").startswith(f"{own.strategy.data_size} examples x 3 epochs, loss fkl (kd_ratio 0.5)")


def test_a_spec_that_writes_nothing_leaves_the_plan_as_it_was():
    from stratos.spec import parse_spec

    spec = parse_spec({"task": {"name": "arithmetic"}, "teachers": [{"model": "t"}], "students": [{"model": "s"}],
                       "distill": {"learning_rate": 1e-3}, "synth": {"temperature": 0.5}})
    values = SpecValues.from_spec(spec)
    assert values.written() == []
    for acc in (0.05, 0.9):
        s = choose_strategy(probe("teacher-8b", acc), TASK, match(T8B, S1B))
        assert apply_spec(s, values, TASK) == s
    plain, _ = build_plan(one_pair())
    again, _ = build_plan(one_pair(spec_values=values))
    assert (again.strategy, again.workload, again.stages) == (plain.strategy, plain.workload, plain.stages)


def test_spec_values_are_read_from_the_spec_and_reapplied_from_the_plans_own():
    from stratos.spec import parse_spec

    spec = parse_spec({"task": {"name": "arithmetic", "train_size": 300}, "teachers": [{"model": "t"}],
                       "students": [{"model": "s"}], "synth": {"prompts": 40, "reverse_synthesis": 200},
                       "distill": {"loss": "ce", "max_steps": 50, "per_device_train_batch_size": 4,
                                   "gradient_accumulation_steps": 2}})
    v = SpecValues.from_spec(spec)
    assert (v.prompts, v.reverse_synthesis, v.loss, v.loss_needs_teacher, v.max_steps, v.train_batch) == \
        (40, 200, "ce", False, 50, 8)
    assert v.samples_per_prompt is None and v.epochs is None and v.kd_ratio is None  # defaults, not written
    strong = choose_strategy(probe("teacher-8b", 0.9), TASK, match(T8B, S1B))
    s = apply_spec(strong, v, TASK)
    assert s.loss == "ce" and s.kd_ratio == strong.kd_ratio and s.data_size == 40 + 200
    assert s.epochs == pytest.approx(50 * 8 / 240)  # max_steps x batch over the examples
    assert apply_spec(s, v, TASK) == s  # applying twice changes nothing
    assert apply_spec(s, SpecValues(), TASK) == strong  # values taken out of the spec: the plan's own again
    # loss ce needs no teacher: a white-box pair's plan then prices no teacher signal.
    plan, _ = build_plan(one_pair(spec_values=v))
    assert plan.workload.signal == "text" and stage_seconds(plan)["signal"] == 0
    assert stage_seconds(build_plan(one_pair())[0])["signal"] > 0


def test_runner_runs_what_the_plan_predicted(tmp_path):
    from stratos.runner import _effective, _strategy, settings_of
    from stratos.spec import parse_spec

    def spec(**sections):
        return parse_spec({"task": {"name": "arithmetic", "train_size": 1000}, "teachers": [{"model": "t"}],
                           "students": [{"model": "s"}], **sections})

    def epochs(settings):
        return sum(p.config["num_train_epochs"] for p in settings.phases)

    weak = {"teacher-8b": probe("teacher-8b", 0.05)}
    written = spec(synth={"reverse_synthesis": 700}, distill={"num_train_epochs": 1.5, "kd_ratio": 0.2})
    plan, _ = build_plan(one_pair(probes=weak, spec_values=SpecValues.from_spec(written), distill=written.distill))
    plan.to_json(tmp_path / "plan.json")
    plan = Plan.from_json(tmp_path / "plan.json")  # as the runner reads it
    eff = _effective(written, plan)
    assert eff.synth.reverse_synthesis == 700 and eff.synth.knowledge_injection == plan.strategy.knowledge_injection
    assert _strategy(written, plan) == plan.strategy
    settings = settings_of(written, plan)
    assert settings == plan.settings  # what the run trains is what plan.json says
    # Knowledge injection: SFT first, then KD at the written ratio; the written epochs are the total.
    assert [p.algorithm for p in settings.phases] == ["sft", "kd"]
    assert settings.phases[0].config["loss"] == "ce" and settings.phases[1].config["kd_ratio"] == 0.2
    assert epochs(settings) == pytest.approx(1.5) and settings.needs_teacher_model
    # The spec changed after planning (the plan stage does not rerun for synth/distill): the runner
    # follows the spec now, and takes the plan's own values where it no longer writes any.
    plain = spec()
    own = choose_strategy(weak["teacher-8b"], TASK, match(T8B, S1B))
    now = settings_of(plain, plan)
    assert _effective(plain, plan).synth.reverse_synthesis == own.reverse_synthesis
    assert epochs(now) == pytest.approx(own.epochs) and now.phases[-1].config["kd_ratio"] == own.kd_ratio


# --------------------------------------------------------------------------- catalog


def test_shipped_catalog_rows_have_source_and_date():
    rows = shipped_catalog()
    assert len(rows) >= 20 and len({r.provider for r in rows}) >= 5
    for r in rows:
        assert r.source and r.date and r.on_demand_usd_hr > 0 and r.bf16_tflops > 0
    h100 = next(r for r in rows if r.gpu == "H100-SXM")
    assert (h100.bf16_tflops, h100.mem_bw_tbs, h100.gpu_memory_gb) == (989, 3.35, 80)


def test_user_catalog_adds_or_replaces_and_local_is_always_there(tmp_path):
    own = [server("my-box", price=1.5), server("aws-g6.xlarge", gpu="L4", mem=24, tflops=121, bw=0.3, price=0.5)]
    write_catalog(tmp_path / "mine.csv", own)
    added = load_catalog(tmp_path / "mine.csv", local_price=0.25)
    names = [s.name for s in added]
    assert names[0] == "local" and added[0].on_demand_usd_hr == 0.25
    assert "my-box" in names and len(names) == len(shipped_catalog()) + 2
    assert next(s for s in added if s.name == "aws-g6.xlarge").on_demand_usd_hr == 0.5  # the user's row wins
    replaced = load_catalog(tmp_path / "mine.csv", mode="replace")
    assert [s.name for s in replaced] == ["local", "my-box", "aws-g6.xlarge"]
    assert [s.name for s in filter_servers(added, gpu="l4", max_price=0.6)] == ["aws-g6.xlarge"]


def test_bad_catalog_names_file_line_and_column(tmp_path):
    write_catalog(tmp_path / "c.csv", [server("a"), server("b")])
    lines = (tmp_path / "c.csv").read_text().splitlines()
    lines[2] = lines[2].replace(",989.0,", ",fast,")
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CatalogError, match=r"c\.csv:3: column 'bf16_tflops': 'fast' is not a number"):
        read_catalog(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("name,provider,gpu,gpu_count,gpu_memory_gb,bf16_tflops,mem_bw_tbs,on_demand_usd_hr,colour\n"
                                   "x,p,g,1,1,1,1,1,red\n")
    with pytest.raises(CatalogError, match=r"d\.csv:2: unknown column\(s\) colour"):
        read_catalog(tmp_path / "d.csv")


def test_the_plan_prices_rollouts_and_the_teacher_in_the_loop():
    """gkd: the student's samples (lmbda of the trained sequences) and the teacher's passes every epoch
    (online) are predicted; grpo: a group of num_generations samples per prompt, all trained."""
    from stratos.spec import DistillSpec

    kd, _ = build_plan(one_pair(distill=DistillSpec(algorithm="kd", teacher_signal="cached")))
    gkd, _ = build_plan(one_pair(distill=DistillSpec(algorithm="gkd", lmbda=0.5, max_completion_length=64)))
    assert gkd.settings.phases[0].algorithm == "gkd" and gkd.settings.on_policy
    w = gkd.workload
    assert w.rollout_sequences == pytest.approx(0.5 * w.epochs * w.train_examples) and w.rollout_tokens == 64
    assert w.signal_passes == pytest.approx(w.epochs) and kd.workload.signal_passes == 1.0
    mine, theirs = stage_seconds(gkd), stage_seconds(kd)
    assert mine["rollouts"] > 0 and "rollouts" not in theirs
    assert mine["signal"] == pytest.approx(theirs["signal"] * w.epochs, rel=1e-6)

    grpo, _ = build_plan(one_pair(distill=DistillSpec(algorithm="grpo", num_generations=4)))
    g = grpo.workload
    assert g.rollout_sequences == pytest.approx(4 * g.epochs * g.train_examples) and g.train_sequences == 4.0
    assert stage_seconds(grpo)["training"] > 3 * stage_seconds(kd)["training"]

    # distill.sft_baseline trains the student twice (the second time without the teacher): twice the
    # training, the same teacher signal; gkd's baseline samples nothing.
    twice, _ = build_plan(one_pair(distill=DistillSpec(algorithm="kd", teacher_signal="cached", sft_baseline=True)))
    assert twice.workload.train_sequences == 2.0 and kd.workload.train_sequences == 1.0
    assert stage_seconds(twice)["training"] == pytest.approx(2 * theirs["training"], rel=1e-6)
    assert stage_seconds(twice)["signal"] == pytest.approx(theirs["signal"], rel=1e-6)
    g2, _ = build_plan(one_pair(distill=DistillSpec(algorithm="gkd", lmbda=0.5, max_completion_length=64,
                                                    sft_baseline=True)))
    assert g2.workload.rollout_sequences == pytest.approx(w.rollout_sequences)


def test_the_plan_prices_the_forward_pass_gradient_checkpointing_repeats():
    """distill.gradient_checkpointing recomputes each decoder layer's forward in the backward: 2 more FLOPs
    per layer parameter and token on top of 6 per parameter (the output head's are not recomputed), on the
    training it applies to, and the stage's note says so."""
    from stratos.plan.costmodel import recomputed_fraction
    from stratos.spec import DistillSpec

    plain, _ = build_plan(one_pair(distill=DistillSpec(algorithm="kd", teacher_signal="cached")))
    ckpt, _ = build_plan(one_pair(distill=DistillSpec(algorithm="kd", teacher_signal="cached",
                                                      gradient_checkpointing=True)))
    assert plain.workload.recomputed_share == 0.0 and ckpt.workload.recomputed_share == 1.0
    student = S1B  # one_pair's student: Llama 3.2 1B's shape, whose output head is about a fifth of its parameters
    layers = 1 - student.vocab * student.hidden / student.params
    assert 0 < layers < 1 and recomputed_fraction(student) == pytest.approx(layers)
    assert stage_seconds(ckpt)["training"] == pytest.approx(stage_seconds(plain)["training"] * (1 + layers / 3),
                                                            rel=1e-6)
    assert stage_seconds(ckpt)["signal"] == pytest.approx(stage_seconds(plain)["signal"], rel=1e-6)
    note = next(s.note for s in ckpt.stages if s.stage == "training")
    assert f"100% of them with gradient checkpointing (the layers' forward again: +{layers / 3:.0%} compute)" in note
    assert "checkpointing" not in next(s.note for s in plain.stages if s.stage == "training")


def test_the_plan_says_how_it_prices_teacher_workers():
    """distill.teacher_workers: the same teacher work, now in worker processes (split among them and
    overlapped with the training where they have devices of their own, which the cost model does not
    know): the plan prices it as before and its note says so."""
    from stratos.spec import DistillSpec

    plain, _ = build_plan(one_pair(distill=DistillSpec(algorithm="kd", teacher_signal="online")))
    pooled, _ = build_plan(one_pair(distill=DistillSpec(algorithm="kd", teacher_signal="online", teacher_workers=2)))
    assert plain.workload.teacher_workers == 0 and pooled.workload.teacher_workers == 2
    assert stage_seconds(pooled) == pytest.approx(stage_seconds(plain), rel=1e-9)
    note = next(s.note for s in pooled.stages if s.stage == "signal")
    assert "by 2 teacher worker(s), priced as one device's work and not overlapped with the training" in note
    assert "worker" not in next(s.note for s in plain.stages if s.stage == "signal")


def test_the_plan_adds_rl_when_the_student_answers_sometimes_and_misses_the_target():
    """A final RL phase against the verifier where it pays: the student's predicted accuracy misses
    min_accuracy and is in the band where most groups of samples get differing rewards. opd for a
    white-box pair with a competent teacher, grpo otherwise; priced as rollouts; never over the spec."""
    from stratos.plan.strategy import mixed_group_share
    from stratos.spec import DistillSpec

    simple = TaskProfile("sums", 40, 4, 4, 1, True, True, 1000)  # short answers: off-policy KD before RL

    def plan_with(acc, min_accuracy, **kw):
        p, _ = build_plan(one_pair(student_accuracy={(0, 0): (acc, "pilot", "given")}, min_accuracy=min_accuracy,
                                   **{"task": simple, **kw}))
        return p

    rl = plan_with(0.4, 0.6)
    algos = [ph.algorithm for ph in rl.settings.phases]
    assert algos[-1] == "opd" and len(algos) == 2  # alignment: kd, then opd (the teacher is competent, white-box)
    assert "answer 40% correctly, short of min_accuracy 60%" in rl.settings.phases[-1].reason
    assert f"{mixed_group_share(0.4, 4):.0%} of its groups of 4 samples" in rl.settings.phases[-1].reason
    assert rl.settings.phases[-1].config["num_train_epochs"] == pytest.approx(0.2 * rl.strategy.epochs)
    assert stage_seconds(rl)["rollouts"] > 0
    pass_at_4 = 1 - 0.6**4
    assert rl.predicted["accuracy"] == pytest.approx(0.4 + 0.5 * (pass_at_4 - 0.4))  # the prior with RL

    met = plan_with(0.4, 0.3)  # the prediction meets the target: no RL spent
    assert [ph.algorithm for ph in met.settings.phases] == ["kd"] and "rollouts" not in stage_seconds(met)
    from stratos.plan.planner import decide_pairs

    tied = decide_pairs(one_pair(student_accuracy={(0, 0): (0.01, "pilot", "given")}, min_accuracy=0.6, task=simple))
    assert [ph.algorithm for ph in tied[0].settings.phases] == ["kd"]  # its groups would all tie: no RL
    assert [ph.algorithm for ph in plan_with(0.4, None).settings.phases] == ["kd"]  # no target
    no_verifier = TaskProfile("free-text", 60, 6, 6, 0, False, False, 500)
    free = decide_pairs(one_pair(student_accuracy={(0, 0): (0.4, "pilot", "given")}, min_accuracy=0.6,
                                 task=no_verifier))
    assert [ph.algorithm for ph in free[0].settings.phases] == ["kd"]  # nothing to reward with
    # Injection from the oracle's answers: more SFT beat RL in the same minutes (Mahjong), so no RL phase,
    # and the plan says why; injection from the teacher's verified answers (no oracle): sft, kd, grpo.
    weak = {"teacher-8b": probe("teacher-8b", 0.05)}
    oracle = decide_pairs(one_pair(student_accuracy={(0, 0): (0.4, "pilot", "given")}, min_accuracy=0.6,
                                   task=simple, probes=weak))[0]
    assert [ph.algorithm for ph in oracle.settings.phases] == ["sft", "kd"] and not oracle.strategy.rl
    assert oracle.accuracy == pytest.approx(0.4)  # and no RL gain predicted
    assert any(r.startswith("no RL phase, though the student is predicted to answer 40%, short of min_accuracy 60%: "
                            f"{oracle.strategy.reverse_synthesis} of its") for r in oracle.strategy.reasons)
    assert not any(r.startswith("no RL phase") for r in rl.strategy.reasons)
    no_oracle = TaskProfile("sums", 40, 4, 4, 1, True, False, 1000)
    taught = plan_with(0.4, 0.6, probes=weak, task=no_oracle)
    assert not taught.strategy.reverse_synthesis and taught.strategy.teacher_generates
    assert [ph.algorithm for ph in taught.settings.phases] == ["sft", "kd", "grpo"]
    written = decide_pairs(one_pair(student_accuracy={(0, 0): (0.4, "pilot", "given")}, min_accuracy=0.6,
                                    task=simple, distill=DistillSpec(algorithm="kd")))
    assert [ph.algorithm for ph in written[0].settings.phases] == ["kd"]  # what the spec names wins
    assert written[0].accuracy == 0.4 and not written[0].strategy.rl  # and no RL gain is predicted for it


def test_shipped_accuracy_records_correct_a_fresh_install_for_the_same_task_student_and_recipe(tmp_path, monkeypatch):
    """The demo's runs measured by the authors ship with Stratos: a plan on a machine with no records of its own
    corrects the demo student's prior by them, and only that task, student and recipe's (the demo as written: a
    user who cuts its data gets no correction learnt on 8,000 examples); the machine's own runs join them."""
    import statistics
    from pathlib import Path as P

    from stratos.plan.calibration import (accuracy_corrections, accuracy_records, read_measurements, recipe_key,
                                          record_accuracy, shipped_measurements, student_key, task_key)
    from stratos.spec import load_spec

    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))  # no records of this machine's
    shipped = shipped_measurements()
    assert shipped and all(r["kind"] == "accuracy" and r["shipped"] and r["run"].startswith("stratos:")
                           for r in shipped)
    assert all(r["error"] == pytest.approx(r["measured"] - r["predicted"]) for r in shipped)
    demo = load_spec(P(__file__).resolve().parent.parent / "examples" / "mahjong.yaml")
    task, student = task_key(demo.task), student_key(demo.students[0])
    # The demo's recipe as the plan makes it: the teacher (5% on the probe) is not competent, so injection, with
    # the spec's values applied (8 teacher prompts + 8,000 reverse-synthesised, 3 epochs, loss ce).
    profile = TaskProfile(task, 300, 60, 0, 1, verifier=True, oracle=True, train_size=demo.task.train_size)
    strategy = apply_spec(choose_strategy(probe("smollm2-135m", 0.05), profile, match(T8B, S135)),
                          SpecValues.from_spec(demo), profile)
    recipe = recipe_key(strategy, demo.teachers[0].model)
    assert recipe == "8008 examples x 3 epochs, loss ce, teacher smollm2-135m-instruct"
    mine = [r for r in shipped if r["task"] == task and r["student"] == student and r["recipe"] == recipe]
    assert len(mine) >= 2  # the README's fresh-clone runs: every one ships
    records = accuracy_records(task, student, shipped + read_measurements())
    err, measured, runs, from_shipped = accuracy_corrections(records, recipe)["prior"]
    assert (runs, from_shipped) == (len(mine), len(mine))
    assert err == pytest.approx(statistics.median(r["error"] for r in mine)) and err > 0  # the prior was low
    assert measured == pytest.approx(statistics.median(r["measured"] for r in mine))
    assert accuracy_records(task + " other options", student, shipped) == []
    smaller = apply_spec(strategy, replace(SpecValues.from_spec(demo), reverse_synthesis=800), profile)
    assert accuracy_corrections(records, recipe_key(smaller, demo.teachers[0].model)) == {}
    # This machine's own run of the same task, student and recipe counts beside them.
    record_accuracy(task, "prior", 0.5, 0.5 + err + 0.5, run="here", student=student, recipe=recipe)
    records = accuracy_records(task, student, shipped + read_measurements())
    err2, measured2, runs2, shipped2 = accuracy_corrections(records, recipe)["prior"]
    assert (runs2, shipped2) == (runs + 1, from_shipped) and err2 > err and measured2 > measured


def test_the_plan_corrects_its_predictions_by_what_earlier_runs_measured():
    from stratos.plan.calibration import (LATENCY_BASIS, accuracy_corrections, accuracy_records, corrections,
                                         machine_id, recipe_key, student_key)
    from stratos.plan.planner import decide_pairs
    from stratos.spec import StudentSpec

    me = student_key(StudentSpec(model="m", init="random", config_overrides={"num_hidden_layers": 6}))
    other = student_key(StudentSpec(model="m", init="random", config_overrides={"num_hidden_layers": 4}))
    assert me != other and me == student_key(StudentSpec(name="renamed", model="m", init="random",
                                                         config_overrides={"num_hidden_layers": 6}))
    # The recipe each student of inputs() is planned with (the teacher's model: its name, no model id given).
    recipes = {pd.student_index: recipe_key(pd.strategy, "teacher-8b") for pd in decide_pairs(inputs())}
    assert recipes == {0: "1000 examples x 3 epochs, loss fkl (kd_ratio 0.5), teacher teacher-8b",  # the same tokenizer: KD
                       1: "1000 examples x 3 epochs, loss ce, teacher teacher-8b"}  # another: its answers' text
    recipe = recipes[0]

    def rec(task, error, run, student=me, recipe=recipe):
        return {"kind": "accuracy", "task": task, "student": student, "recipe": recipe, "method": "prior",
                "predicted": 0.8, "measured": 0.8 + error, "error": error, "run": run}

    records = [  # two runs of the task with this student and recipe (one eval rerun: its last record counts);
        rec("t", -0.3, "a"), rec("t", -0.4, "b"), rec("t", -0.2, "a"),  # another task's run, another student's,
        rec("u", 0.8, "c"), rec("t", 0.5, "d", other), rec("t", 0.7, "f", me, "80 examples x 3 epochs, loss ce"),
        {k: v for k, v in rec("t", 0.6, "e").items() if k != "student"},  # another recipe's, and one written
        {k: v for k, v in rec("t", 0.6, "g").items() if k != "recipe"},  # before students, or recipes, were
        {"stage": "latency", "server": "small", "predicted_s": 10.0, "measured_s": 30.0, "ratio": 3.0,  # recorded
         "basis": LATENCY_BASIS},
    ]  # none of those five counts
    mine = accuracy_records("t", me, records)
    corr = accuracy_corrections(mine, recipe)
    assert corrections("small", records) == {"latency": 3.0}  # accuracy records are not stage times
    # A latency record written before plans predicted the eval's load (its prediction was for one request
    # alone, of the answer's length) sets the p50 under load over another quantity: it corrects nothing.
    assert corrections("small", [{k: v for k, v in records[-1].items() if k != "basis"}]) == {}
    # The runner writes the basis only where the eval ran the load the plan predicted for: not for an old
    # plan, nor after eval.bench_clients was edited (which reruns the eval alone).
    from stratos.plan.calibration import latency_basis

    predicted = {"latency_ms": 300.0, "latency_load": {"clients": 4, "new_tokens": 64}}
    assert latency_basis(predicted, 4, 64) == LATENCY_BASIS
    assert latency_basis(predicted, 8, 64) is None and latency_basis({"latency_ms": 82.0}, 4, 64) is None
    # A stage time measured on another machine (a cache shared over a network drive) corrects nothing here;
    # one of this machine's does.
    timed = {"stage": "latency", "server": "small", "predicted_s": 10.0, "measured_s": 20.0, "ratio": 2.0,
             "basis": LATENCY_BASIS}
    assert corrections("small", [{**timed, "machine": "Another CPU, 64 cores"}]) == {}
    assert corrections("small", [{**timed, "machine": machine_id()}]) == {"latency": 2.0}
    assert corr["prior"][2] == 2 and corr["prior"][0] == pytest.approx(-0.3)  # median of -0.4 and -0.2
    assert corr["prior"][1] == pytest.approx(0.5)  # measured 0.4 and 0.6
    assert accuracy_corrections(accuracy_records("t", other, records), recipe)["prior"] == \
        (pytest.approx(0.5), pytest.approx(1.3), 1, 0)
    plain, plain_cands = build_plan(inputs())
    # Each student's own runs: the same errors, recorded for the recipe it is planned with.
    theirs = [{**r, "recipe": recipes[1]} for r in mine if r.get("recipe") == recipe]
    learnt, learnt_cands = build_plan(inputs(accuracy_records={0: mine, 1: theirs},
                                             corrections={"small": {"latency": 3.0}}))
    # A prior is replaced by what those runs measured (the median of 0.4 and 0.6), whatever the prior said.
    assert learnt.predicted["accuracy"] == pytest.approx(0.5)
    for a, b in zip(plain_cands, learnt_cands):  # the same candidates, in the same order
        assert b.accuracy == pytest.approx(0.5) and a.accuracy != pytest.approx(0.5)
        assert b.latency_ms == pytest.approx(a.latency_ms * (3.0 if a.serving_server == "small" else 1.0))
    assert {c.serving_server for c in plain_cands} == {"big", "small"}
    prior = next(a.accuracy for a in plain_cands if a.student == learnt.student["name"])  # the chosen pair's
    assert learnt.predicted["accuracy_correction"] == pytest.approx(0.5 - prior)
    assert f"corrected by {100 * (0.5 - prior):+.1f} points to 50.0%, the median accuracy of " \
           f"this student trained the same way ({recipes[learnt.student['index']]}) on this task in 2 earlier run(s)" \
           in learnt.predicted["accuracy_reason"]
    # A pilot's prediction is corrected by its median error instead: it measured this plan's own student.
    piloted = {(0, si): (0.7, "pilot", "pilot: 70%") for si in (0, 1)}
    pilot_recs = [{**r, "method": "pilot"} for r in mine]
    pd = next(p for p in decide_pairs(inputs(student_accuracy=piloted, accuracy_records={0: pilot_recs}))
              if p.student_index == 0)
    assert pd.accuracy == pytest.approx(0.7 - 0.3) and "the median error of this task's pilot predictions" in \
        pd.accuracy_reason
    assert not any("median of measured over predicted p50" in r for r in plain.reasons)
    served_on_gpu, _ = build_plan(inputs(corrections={s.name: {"latency": 3.0} for s in inputs().servers}))
    assert any("x3.00: the median of measured over predicted p50 in earlier evals" in r for r in served_on_gpu.reasons)


def test_cross_tokenizer_kd_needs_the_teacher_to_beat_the_students_pilot():
    """A pair whose teacher's probability maps well distils logits across tokenizers only when the teacher
    (0.85 at its best on the probe) beats the student's pilot; without a pilot the reasons say it was not
    checked; a mapping too poor gives text whatever the pilot."""
    from stratos.plan.planner import decide_pairs

    mapping = {(0, 0): {"mapped_mass": 0.8, "vocab_overlap": 0.3, "positions": 64}}

    def decided(**kw):
        (pd,) = decide_pairs(inputs(students=[S135], servers=[server("big", price=4.0)], **{"mappings": mapping, **kw}))
        return pd

    below = decided(student_accuracy={(0, 0): (0.5, "pilot", "given")})
    assert below.match.mode == "cross" and below.settings.phases[0].needs_teacher  # KD (gkd: the task is complex)
    assert "beats the student's pilot (50% predicted)" in below.match.reasons[1]
    above = decided(student_accuracy={(0, 0): (0.9, "pilot", "given")})
    assert above.match.mode == "text" and not any(p.needs_teacher for p in above.settings.phases)
    assert "does not beat the student's pilot (90% predicted" in above.match.reasons[1]
    assert (above.accuracy, below.accuracy) == (pytest.approx(0.9), pytest.approx(0.5))  # the pilots' predictions
    unchecked = decided()
    assert unchecked.match.mode == "cross" and "not checked" in unchecked.match.reasons[1]
    poor = decided(mappings={(0, 0): {**mapping[(0, 0)], "mapped_mass": 0.2}},
                   student_accuracy={(0, 0): (0.5, "pilot", "given")})
    assert poor.match.mode == "text" and not any("pilot" in r for r in poor.match.reasons)
