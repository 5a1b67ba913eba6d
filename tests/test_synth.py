"""The synth stage against the real server: rejection sampling, faults, resume, budget, top-k KD, CLI."""

from __future__ import annotations

import json

import pytest

from stratos.io import read_jsonl
from stratos.synth import SynthError, run_synth
from synth_helpers import CoinTask, FaultProxy, api, coin_spec


def test_faults_give_exactly_the_clean_rows_and_a_rerun_sends_nothing(tiny_served, tmp_path):
    server, _ = tiny_served
    clean = run_synth(coin_spec(api(server.base_url, server.model)), tmp_path / "clean", progress=False)
    # The client's timeout must be well above an honest answer's time even on a loaded machine: the proxy
    # keeps forwarding a request the client gave up on, so a too-tight timeout snowballs into a queue of
    # abandoned requests and every retry times out too.
    proxy = FaultProxy(server.url, first=["hang", "429", "malformed", "500"], rate=0.25, seed=7, retry_after="1",
                       hang_s=12.0)
    try:
        # Retries well past the default: with a fault rate of 1 in 4 drawn in arrival order, a run of seven
        # faults on one request is rare but not impossible on a loaded machine; the test is about the rows.
        spec = coin_spec(api(proxy.url + "/v1", server.model, timeout_s=7.0, max_concurrency=4, max_retries=12))
        faulty = run_synth(spec, tmp_path / "faulty", progress=False)
        sent = proxy.requests
        again = run_synth(spec, tmp_path / "faulty", progress=False)
        assert proxy.requests == sent  # the rerun asked the endpoint nothing
    finally:
        proxy.close()
    rows = read_jsonl(faulty.data_path)
    assert rows == read_jsonl(clean.data_path) == read_jsonl(again.data_path)
    assert faulty.rows == len(rows) > 0
    # Verified, distinct, with provenance; every accepted sample of every prompt is there once.
    task = CoinTask()
    assert all(task.score(None, r["response"]).correct and r["source"] == "teacher" for r in rows)
    assert len({(r["prompt"], r["response"].strip()) for r in rows}) == len(rows)
    stats = faulty.stats  # (the file now holds the rerun's)
    assert stats["prompts"] == 8 and set(stats["by_type"]) == {"even", "odd"}
    assert {"hang", "429", "malformed", "500", "ok"} <= {f for _, f in proxy.log}
    assert stats["usage"]["retries"] >= 4 and stats["usage"]["requests"] == 8 + stats["usage"]["retries"]
    by_type = stats["by_type"]
    assert sum(c["kept"] for c in by_type.values()) + stats["duplicates_dropped"] == sum(c["correct"] for c in by_type.values())
    assert again.stats["usage"]["requests"] == 0
    assert again.stats["usage"]["cached"] == 8


def test_unverified_synth_keeps_every_distinct_sample_and_grades_it(tiny_served, tmp_path):
    server, _ = tiny_served
    cache = tmp_path / "requests"
    verified = run_synth(coin_spec(api(server.base_url, server.model)), tmp_path / "v", requests_dir=cache,
                         progress=False)
    spec = coin_spec(api(server.base_url, server.model), verify=False)
    unverified = run_synth(spec, tmp_path / "u", requests_dir=cache, progress=False)
    assert unverified.stats["usage"]["requests"] == 0  # the same samples, from the shared cache
    rows, kept = read_jsonl(unverified.data_path), read_jsonl(verified.data_path)
    task = CoinTask()
    wrong = [r for r in rows if not task.score(None, r["response"]).correct]
    # The verified rows are the unverified ones the verifier accepts, in the same order; the rest are kept
    # too, each graded (score 0) and counted in the statistics as the verified run counts them.
    assert [r for r in rows if r not in wrong] == kept
    assert wrong and all(r["score"] == 0.0 for r in wrong)
    assert unverified.stats["by_type"] == verified.stats["by_type"] | {
        t: {**c, "kept": c["kept"] + sum(r["type"] == t for r in wrong)} for t, c in verified.stats["by_type"].items()}
    assert not unverified.stats["verified"] and verified.stats["verified"]
    # The report says what was kept: the verifier's share, not "kept by the verifier", when every answer was kept.
    from stratos.report import _data_tables

    html = _data_tables(unverified.stats, unverified.stats_path, tmp_path)
    assert "every answer kept: synth.verify false" in html and "kept by the verifier" not in html
    assert "kept by the verifier" in _data_tables(verified.stats, verified.stats_path, tmp_path)


def test_budget_stops_before_the_request_that_could_cross_it(tiny_served, tmp_path):
    server, _ = tiny_served
    # $1000 per million output tokens: a request's worst case is 2 samples x 4 tokens = $0.008.
    prices = {server.model: {"input_usd_per_mtok": 0.0, "output_usd_per_mtok": 1000.0}}
    spec = coin_spec(api(server.base_url, server.model, max_concurrency=1), budget=0.02, prices=prices,
                     reverse_synthesis=1)  # one oracle row, so the stage has data whatever the verifier rejects
    u = run_synth(spec, tmp_path, progress=False).stats["usage"]
    worst = 2 * 4 * 1000.0 / 1e6
    assert u["budget_stopped"]
    assert u["cost_usd"] <= 0.02 and u["cost_usd"] + worst > 0.02  # stopped only when the next one could cross
    assert 2 <= u["requests"] < 8
    assert u["cost_usd"] == pytest.approx(u["completion_tokens"] * 1000.0 / 1e6)
    # A rerun with the same budget pays nothing more and sends nothing.
    again = run_synth(spec, tmp_path, progress=False).stats["usage"]
    assert again["requests"] == 0 and again["cost_usd"] == pytest.approx(u["cost_usd"]) and again["cost_usd_now"] == 0


def test_api_budget_needs_a_price(tmp_path):
    spec = coin_spec(api("http://127.0.0.1:9/v1", "m"), budget=1.0)
    with pytest.raises(SynthError, match="plan.api_prices.m"):
        run_synth(spec, tmp_path, progress=False)


def test_topk_kd_from_the_server_lowers_divergence(tiny_served, tiny_tokenizer, tmp_path):
    from stratos.distill import distill, kl_to_teacher
    from stratos.models import load
    from stratos.models.tiny import tiny_llama
    from stratos.spec import DistillSpec

    server, path = tiny_served
    spec = coin_spec(api(server.base_url, server.model, logprobs_as_token_ids=True), train_size=10,
                     top_logprobs=20, max_new_tokens=8)
    res = run_synth(spec, tmp_path / "synth", progress=False)
    records = read_jsonl(res.data_path)
    assert all(len(r["topk"]["top"]) == len(r["topk"]["tokens"]) and len(r["topk"]["top"][0]) == 20 for r in records)
    teacher = load(path, with_tokenizer=False)

    def train(signal: str, loss: str):
        student = tiny_llama(tiny_tokenizer, seed=1)
        before = kl_to_teacher(student, teacher, tiny_tokenizer, records)
        cfg = DistillSpec(loss=loss, teacher_signal=signal, max_steps=30, learning_rate=3e-3, warmup_ratio=0.0,
                          per_device_train_batch_size=8, report_to=[], bf16=False, save_steps=1000)
        result = distill(student, tiny_tokenizer, records, cfg, tmp_path / loss, progress=False)
        return before, kl_to_teacher(student, teacher, tiny_tokenizer, records), result

    before, after, result = train("topk", "fkl")
    sig = result.signal
    assert sig["mode"] == "topk" and sig["k"] == 20 and sig["with_topk"] == len(records) and sig["misaligned"] == 0
    assert sig["topk_positions"] > 0.5 * sig["positions"]
    assert after < 0.95 * before, (before, after)
    # SFT on the same samples learns the tokens, not the distribution: it ends further from the teacher.
    _, after_sft, _ = train("cached", "ce")
    assert after < after_sft, (after, after_sft)


def test_oracle_rows_corpus_and_rules_in_the_teacher_prompt(tiny_served, tmp_path):
    server, _ = tiny_served
    spec = coin_spec(api(server.base_url, server.model), train_size=4, reverse_synthesis=3, knowledge_injection=True)
    res = run_synth(spec, tmp_path, progress=False)
    rows = read_jsonl(res.data_path)
    sources = [r["source"] for r in rows]
    assert sources.count("oracle") == 3 and sources.count("corpus") == 1
    assert sources == sorted(sources, key=["teacher", "oracle", "corpus"].index)
    assert res.stats["rules_in_teacher_prompt"] and res.stats["rows"]["total"] == len(rows)
    # The teacher saw the rules; the student's records hold the plain prompt it will be served with.
    cached = [json.loads(p.read_text()) for p in (tmp_path / "requests").glob("*/*.json")]
    assert len(cached) == 4
    assert all("Rules" not in r["prompt"] for r in rows if r["source"] != "corpus")
    # ... and KD will read the teacher as it answered: with the rules (context distillation).
    teacher_rows = [r for r in rows if r["source"] == "teacher"]
    assert teacher_rows and all(r["teacher_messages"] == [{"role": "user", "content": "Rules: say anything.\n"
                                                           + r["prompt"]}] for r in teacher_rows)
    assert all("teacher_messages" not in r for r in rows if r["source"] != "teacher")
    # A run that sends the teacher no prompt (oracle data only) shows it nothing, rules or not.
    from stratos.report.card import teacher_context

    assert teacher_context(res.stats).startswith("the task's rules before each question")
    assert teacher_context({**res.stats, "prompts": 0}) is None
    assert teacher_context({**res.stats, "rows": {**res.stats["rows"], "teacher": 0}}).endswith(
        "none of its answers was kept, so the training data holds none")


def test_few_shot_shows_the_teacher_worked_examples_the_student_never_sees(tiny_served, tmp_path):
    server, _ = tiny_served
    plain = run_synth(coin_spec(api(server.base_url, server.model), train_size=5), tmp_path / "plain", progress=False)
    res = run_synth(coin_spec(api(server.base_url, server.model), train_size=5, few_shot=2), tmp_path / "shots",
                    progress=False)
    assert res.stats["few_shot"] == 2 and plain.stats["few_shot"] == 0
    rows, plain_rows = read_jsonl(res.data_path), read_jsonl(plain.data_path)
    # The same questions as without worked examples; the examples are a draw of their own (seed 2) without them.
    assert {r["prompt"] for r in rows} <= {f"Toss {i} with seed 0" for i in range(5)}
    assert {r["id"] for r in plain_rows} | {r["id"] for r in rows} <= {f"train-0-{i}" for i in range(5)}
    shots = [{"role": "user", "content": "Toss 0 with seed 2"}, {"role": "assistant", "content": "0"},
             {"role": "user", "content": "Toss 1 with seed 2"}, {"role": "assistant", "content": "0"}]
    assert rows and all(r["teacher_messages"] == [*shots, {"role": "user", "content": r["prompt"]}] for r in rows)
    assert all("teacher_messages" not in r for r in plain_rows)
    # What the API was sent: the server counted the worked examples' tokens in every prompt.
    sent = {k: sorted(json.loads(p.read_text())["prompt_tokens"] for p in (tmp_path / k / "requests").glob("*/*.json"))
            for k in ("plain", "shots")}
    assert len(sent["shots"]) == 5 and all(a > b + 10 for a, b in zip(sent["shots"], sent["plain"])), sent


def test_cli_flags_form_with_a_local_teacher(tiny_served, tmp_path):
    from typer.testing import CliRunner

    from stratos.cli import app

    _, path = tiny_served
    out = tmp_path / "o"
    args = ["synth", "--teacher", str(path), "--task", "arithmetic", "-O", "digits=1", "--n", "2", "--prompts", "4",
            "--max-new-tokens", "3", "--reverse-synthesis", "5", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts"] == 4 and stats["usage"]["requests"] == 1 and stats["rows"]["oracle"] == 5
    r = CliRunner().invoke(app, args)  # resumed from the cache: the model is not even loaded
    assert r.exit_code == 0 and json.loads((out / "stats.json").read_text())["usage"]["cached"] == 4
    assert json.loads((out / "stats.json").read_text())["verified"]
    r = CliRunner().invoke(app, args + ["--no-verify"])  # the same samples, every one kept
    stats = json.loads((out / "stats.json").read_text())
    assert r.exit_code == 0 and not stats["verified"] and stats["usage"]["cached"] == 4
    kept, correct = (sum(c[k] for c in stats["by_type"].values()) for k in ("kept", "correct"))
    assert stats["rows"]["teacher"] == kept >= correct
    bad = CliRunner().invoke(app, ["synth", "--teacher", str(path), "--task", "arithmetic", "--n", "0"])
    assert bad.exit_code == 2 and "synth.samples_per_prompt" in bad.output


def test_sigkilled_synth_resumes_without_redoing_finished_requests(tiny_served, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    _, path = tiny_served
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "task": {"name": "arithmetic", "options": {"digits": 1}, "train_size": 12, "eval_size": 2},
        "teachers": [{"model": str(path), "batch_size": 1}],
        "students": [{"model": str(path)}],
        "synth": {"samples_per_prompt": 2, "max_new_tokens": 8, "reverse_synthesis": 2},
    }))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "stratos.cli", "synth", str(spec_path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("requests/*/*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in out.glob("requests/*/*.json")}
    assert 3 <= len(done) < 12, "kill the run while it works"
    assert not (out / "data.jsonl").exists()

    from stratos.spec import load_spec

    res = run_synth(load_spec(spec_path), out, progress=False)
    assert res.stats["usage"]["cached"] == len(done)  # finished requests were not asked again
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert len(list(out.glob("requests/*/*.json"))) == 12 and res.stats["prompts"] == 12


def test_topk_buckets_are_distributions_and_full_k_is_exact_kd():
    import torch

    from stratos.distill.losses import forward_kl
    from stratos.distill.topk import topk_log_probs

    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(5, 12, generator=g) * 3, torch.randn(5, 12, generator=g) * 3
    t_logp = t_logits.double().log_softmax(-1).float()
    top = t_logp.topk(4, dim=-1)
    ids = top.indices.clone()
    ids[0, 3] = -1  # a token the student's vocabulary lacks: its mass joins the remainder
    s, t = topk_log_probs(s_logits, ids, top.values)
    assert torch.allclose(s.exp().sum(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(t.exp().sum(-1), torch.ones(5), atol=1e-5)
    # Student remainder = its mass outside the (valid) top-k tokens, exactly.
    q = s_logits.softmax(-1)
    assert torch.allclose(s[1, -1].exp(), 1 - q[1, ids[1]].sum(), atol=1e-5)
    assert torch.allclose(s[0, -1].exp(), 1 - q[0, ids[0, :3]].sum(), atol=1e-5)
    # With k = V - 1 the remainder bucket is the one token left: top-k KD is exactly full-vocabulary KD.
    full = t_logp.topk(11, dim=-1)
    s_all, t_all = topk_log_probs(s_logits, full.indices, full.values)
    exact = forward_kl(s_logits.log_softmax(-1), t_logp)
    assert torch.allclose(forward_kl(s_all, t_all), exact, atol=1e-4)


def test_worked_examples_are_train_questions_the_prompts_do_not_ask():
    from stratos.synth import worked_examples
    from stratos.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(digits=2, b=1, eval_fraction=0.4)  # 100 questions, about 60 of them train
    prompts = task.examples("train", 28, seed=0)
    shots = worked_examples(task, 4, 0, prompts)
    evals = {ex.question for ex in task.examples("eval", 15, seed=0)}
    assert len({ex.question for ex in shots}) == 4
    assert not {ex.question for ex in shots} & ({ex.question for ex in prompts} | evals)
    assert worked_examples(task, 0, 0, prompts) == []
