"""One teacher client for every stage: the plan's probe, synth and the eval ask a teacher through
``stratos.teachers`` and share one request cache. Real parts only: ``stratos serve`` behind a
fault-injecting HTTP proxy (which counts what reaches the endpoint), the real ``openai`` client."""

from __future__ import annotations

import json

import pytest

from stratos.evaluate import evaluate
from stratos.io import read_jsonl
from stratos.plan.probe import probe_teacher
from stratos.spec import TeacherSpec
from stratos.synth import run_synth
from stratos.tasks import messages
from stratos.teachers import (
    Budget,
    GenParams,
    OpenAITeacher,
    Price,
    RequestCache,
    TeacherError,
    endpoint,
    generate_fn,
    make_teacher,
)
from synth_helpers import CoinTask, FaultProxy, api, coin_spec


def test_probe_synth_and_eval_share_one_request_cache(tiny_served, tmp_path):
    server, _ = tiny_served
    cache = tmp_path / "requests"  # the run's one cache (the runner's RUN/requests)
    task = CoinTask()
    examples = task.examples("eval", 4, seed=1)
    # Every fault is retried: each costs exactly one more request to the endpoint, nothing else.
    proxy = FaultProxy(server.url, first=["429", "500", "malformed"], retry_after="0")
    try:
        spec = coin_spec(api(proxy.url + "/v1", server.model, max_concurrency=4), train_size=4, reverse_synthesis=1)
        t_spec = spec.teachers[0]

        # 1. The plan's probe: zero-shot and with the rules, 4 + 4 greedy requests, built on the cache.
        probe = probe_teacher(t_spec, task, examples, rules=True, max_new_tokens=4, cache_dir=cache)
        assert [f for _, f in proxy.log[:3]] == ["429", "500", "malformed"]
        assert proxy.requests == 8 + 3 and len(RequestCache(cache)) == 8
        assert probe.n == 4 and probe.accuracy_rules is not None and probe.latency_s > 0 and probe.tokens_per_s > 0

        # 2. Synth into its own folder, its requests (n=2, sampled) into the same cache.
        synth = run_synth(spec, tmp_path / "synth", requests_dir=cache, progress=False)
        assert synth.stats["usage"]["requests"] == 4 and proxy.requests == 8 + 3 + 4
        assert len(RequestCache(cache)) == 12 and not (tmp_path / "synth" / "requests").exists()

        # 3. The eval of the same questions: every answer is the probe's, from the cache; no HTTP request.
        client = make_teacher(t_spec, cache_dir=cache)
        res = evaluate(None, None, task, examples, max_new_tokens=4, generate_fn=generate_fn(client))
        assert proxy.requests == 8 + 3 + 4
        assert client.usage.requests == 0 and client.usage.cached == 4
        assert res.accuracy == probe.accuracy and res.mean_latency_s == probe.latency_s  # measured by the probe
        # Two more questions: only those two reach the endpoint.
        more = make_teacher(t_spec, cache_dir=cache)
        evaluate(None, None, task, task.examples("eval", 6, seed=1), max_new_tokens=4, generate_fn=generate_fn(more))
        assert more.usage.requests == 2 and more.usage.cached == 4 and proxy.requests == 8 + 3 + 4 + 2
    finally:
        proxy.close()
    assert len(RequestCache(cache)) == 8 + 4 + 2

    # The cache holds the answers of all three: a teacher that can reach no server answers every
    # request of the probe, the synth stage and the eval from it.
    unreachable = t_spec.model_copy(update={"base_url": "http://127.0.0.1:9/v1", "max_retries": 0})
    offline = make_teacher(unreachable, cache_dir=cache)
    greedy = generate_fn(offline)
    for rules in (False, True):
        greedy([messages(task, ex, rules=rules) for ex in examples], max_new_tokens=4, batch_size=4)
    greedy([messages(task, ex) for ex in task.examples("eval", 6, seed=1)], max_new_tokens=4, batch_size=6)
    cfg = spec.synth
    sampled = offline.generate([task.prompt(ex) for ex in task.examples("train", 4, seed=spec.task.seed)],
                               GenParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                                         max_tokens=cfg.max_new_tokens, stop=tuple(cfg.stop), seed=spec.seed,
                                         top_logprobs=cfg.top_logprobs))
    assert offline.usage.requests == 0 and offline.usage.cached == 4 + 4 + 6 + 4
    kept = {(r["prompt"], r["response"]) for r in read_jsonl(synth.data_path) if r["source"] == "teacher"}
    replayed = {(task.prompt(ex), s.text) for ex, got in zip(task.examples("train", 4, seed=spec.task.seed), sampled)
                for s in got}
    assert kept and kept <= replayed  # synth's rows are the cached samples the verifier accepted


def test_a_replayed_answer_keeps_its_measured_latency(tiny_served, tmp_path):
    server, _ = tiny_served
    task = CoinTask()
    examples = task.examples("eval", 6, seed=2)
    t_spec = TeacherSpec(model=server.model, backend="openai", base_url=server.base_url)
    first = make_teacher(t_spec, cache_dir=tmp_path)
    sent = evaluate(None, None, task, examples, max_new_tokens=4, generate_fn=generate_fn(first))
    again = make_teacher(t_spec, cache_dir=tmp_path)
    replay = evaluate(None, None, task, examples, max_new_tokens=4, generate_fn=generate_fn(again))
    assert first.usage.requests == 6 and again.usage.requests == 0 and again.usage.cached == 6
    assert sent.mean_latency_s > 0 and replay.mean_latency_s == sent.mean_latency_s
    assert replay.tokens_per_s == sent.tokens_per_s > 0 and replay.accuracy == sent.accuracy
    # The mean of the request latencies stored with the answers; tokens per second per stream.
    stored = [json.loads(p.read_text()) for p in tmp_path.glob("*/*.json")]
    latencies = [e["samples"][0]["latency_s"] for e in stored]
    assert len(latencies) == 6 and sent.mean_latency_s == pytest.approx(sum(latencies) / 6)
    assert sent.tokens_per_s == pytest.approx(sent.generated_tokens / sum(latencies))
    assert sent.generated_tokens == sum(e["completion_tokens"] for e in stored) > 0


def test_an_endpoint_is_asked_every_time_with_its_own_key(tiny_served, monkeypatch):
    """The deployed student's endpoint: no cache (the eval measures the server), the key given."""
    server, _ = tiny_served
    task = CoinTask()
    examples = task.examples("eval", 3, seed=3)
    monkeypatch.delenv("STRATOS_TEST_NO_KEY", raising=False)
    proxy = FaultProxy(server.url)
    try:
        student = endpoint(proxy.url + "/v1", server.model, api_key="secret-key", concurrency=3, timeout_s=60)
        fn = generate_fn(student)
        a = evaluate(None, None, task, examples, max_new_tokens=4, generate_fn=fn)
        b = evaluate(None, None, task, examples, max_new_tokens=4, generate_fn=fn)
    finally:
        proxy.close()
    assert proxy.requests == 6 and student.usage.cached == 0
    assert proxy.auth == ["Bearer secret-key"] * 6
    assert a.accuracy == b.accuracy and a.mean_latency_s > 0 and b.mean_latency_s > 0
    # An explicit key: the spec's key variable is not read (unset here, which would be an error).
    spec = TeacherSpec(model="m", backend="openai", base_url=proxy.url + "/v1", api_key_env="STRATOS_TEST_NO_KEY")
    OpenAITeacher(spec, api_key="k")
    with pytest.raises(TeacherError, match="STRATOS_TEST_NO_KEY"):
        OpenAITeacher(spec)


def test_generate_fn_over_a_local_teacher_and_a_spent_budget(tiny_served, tmp_path):
    server, path = tiny_served
    task = CoinTask()
    examples = task.examples("eval", 3, seed=4)
    local = make_teacher(TeacherSpec(model=str(path), batch_size=3), cache_dir=tmp_path, device="cpu")
    gens = generate_fn(local)([messages(task, ex) for ex in examples], max_new_tokens=1, batch_size=3)
    assert next(local.model_and_tokenizer[0].parameters()).device.type == "cpu"
    assert [g.finish_reason for g in gens] == ["length"] * 3 and all(g.latency_s is None for g in gens)
    res = evaluate(None, None, task, examples, max_new_tokens=1, generate_fn=generate_fn(local))
    assert local.usage.cached == 3 and res.truncated == 3  # no latency measured: wall time per example
    # A teacher whose budget stops it before an answer is an error, not a silent empty answer.
    broke = make_teacher(TeacherSpec(model=server.model, backend="openai", base_url=server.base_url),
                         price=Price(1e6, 1e6), budget=Budget(0.0))
    with pytest.raises(TeacherError, match="budget"):
        generate_fn(broke)(["1+1="], max_new_tokens=2, batch_size=1)
