"""The OpenAI-compatible server as users meet it: a real `stratos serve` subprocess, the official client.

A tiny random Llama is enough: every generated token is checked against the same model run
directly (teacher forcing), which catches mixed-up rows, wrong padding or positions and a
broken KV cache, whatever the text looks like.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from stratos.serve import bench_serve, running_server
from stratos.serve.server import stop_process

PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (13, 4), (7, 70), (22, 9), (5, 55), (31, 8), (2, 40), (9, 9)]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from stratos.models.tiny import save_model, tiny_llama

    return save_model(tiny_llama(tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def direct(model_dir):
    from stratos.models import load

    model, tok = load(model_dir)
    return model.eval(), tok


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, args=["--max-batch-size", "32", "--max-tokens", "64"]) as s:
        yield s


def token_ids(logprobs_tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


def check_against_model(direct, prompt_ids: list[int], tokens: list[int], logprobs: list[float], greedy: bool):
    """Each served token's logprob is the model's own, and greedy tokens are the model's argmax."""
    model, _ = direct
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1].float()
    ref = torch.log_softmax(logits, -1)
    got = ref.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(got, torch.tensor(logprobs), atol=1e-3), (got, logprobs)
    if greedy:  # ties within float noise may pick either token
        assert torch.all(ref.max(-1).values - got < 1e-4)


def completion(server, **kw) -> dict:
    r = httpx.post(server.base_url + "/completions", json={"model": server.model, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- the official client


def test_models_and_health(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"
    assert [m.id for m in server.client().models.list()] == ["tiny"]


def test_completion_greedy_is_the_models_own(server, direct):
    _, tok = direct
    r = server.client().completions.create(
        model=server.model, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=3,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    c = r.choices[0]
    ids = token_ids(c.logprobs.tokens)
    prompt_ids = tok(PROMPTS[0])["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(ids) == 12
    assert c.finish_reason == "length" and c.text == tok.decode(ids, skip_special_tokens=True)
    check_against_model(direct, prompt_ids, ids, c.logprobs.token_logprobs, greedy=True)
    for chosen, top in zip(c.logprobs.tokens, c.logprobs.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == chosen  # greedy picks the top-1


def test_chat_applies_the_template_and_reports_logprobs(server, direct):
    _, tok = direct
    messages = [{"role": "system", "content": "You add."}, {"role": "user", "content": "2+2="}]
    r = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=2,
                                                extra_body={"return_tokens_as_token_ids": True})
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt_ids, add_special_tokens=False)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    check_against_model(direct, prompt_ids, token_ids([e.token for e in content]), [e.logprob for e in content], True)
    assert r.choices[0].message.role == "assistant"


def test_streaming_gives_the_same_text(server):
    client = server.client()
    kw = dict(model=server.model, max_tokens=10, temperature=0.9, seed=7)
    full = client.completions.create(prompt=PROMPTS[1], **kw)
    chunks = list(client.completions.create(prompt=PROMPTS[1], stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason

    msgs = [{"role": "user", "content": "hello"}]
    full = client.chat.completions.create(messages=msgs, **kw)
    stream = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == full.choices[0].message.content


def test_n_choices_and_seed(server):
    client = server.client()
    kw = dict(model=server.model, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3, seed=42,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) > 1  # the choices are different samples
    assert a.usage.completion_tokens == 24
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}], n=2,
                                          max_tokens=4, seed=1)
    assert len(chat.choices) == 2


def test_stop_strings_end_the_text(server):
    free = completion(server, prompt=PROMPTS[3], max_tokens=20, temperature=0, ignore_eos=True)["choices"][0]["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop.strip(), free
    stopped = completion(server, prompt=PROMPTS[3], max_tokens=20, temperature=0, stop=[stop], ignore_eos=True)
    assert stopped["choices"][0]["text"] == free[: free.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"model": "tiny", "prompt": "hi", "n": 0}, 400, "n"),
        ({"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "1+1= " * 400}, 400, "prompt"),
        ({"model": "tiny", "prompt": [10**9]}, 400, "prompt"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ],
)
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.base_url + "/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    assert "Traceback" not in r.text


def test_bad_chat_requests_and_malformed_bodies(server):
    url = server.base_url + "/chat/completions"
    cases = [
        (httpx.post(url, json={"model": "tiny", "messages": []}), 400),
        (httpx.post(url, json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}), 400),
        (httpx.post(url, json={"model": "tiny", "messages": "hi"}), 400),
        (httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400),
        (httpx.post(url, json=["a list"]), 400),
        (httpx.post(url, content=b"x" * 1_000_001), 413),
        (httpx.get(url), 405),
        (httpx.get(server.base_url + "/nowhere"), 404),
    ]
    for r, status in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert r.json()["error"]["message"] and "Traceback" not in r.text
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------- concurrency


def test_32_concurrent_clients_are_batched_and_correct(server, direct):
    _, tok = direct
    client = server.client(max_retries=0)
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(32)]

    def ask(p: str):
        r = client.completions.create(model=server.model, prompt=p, max_tokens=10, temperature=0, logprobs=0,
                                      extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        return p, r

    ask(prompts[0])  # warm-up
    before = httpx.get(server.url + "/health").json()
    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, prompts))
    after = httpx.get(server.url + "/health").json()
    waves, rows = after["waves"] - before["waves"], after["rows_served"] - before["rows_served"]

    for p, r in results:  # every answer is its own prompt's greedy continuation
        c = r.choices[0]
        check_against_model(direct, tok(p)["input_ids"], token_ids(c.logprobs.tokens), c.logprobs.token_logprobs, True)
    # Batched: the 32 requests went through at least 4 rows a wave on average (one at a time would take 32 waves).
    # How much faster that is, is a benchmark's business (benchmarks/serve_bench.py), not a timed assertion here.
    assert rows == 32 and waves <= 8, (waves, rows)


def test_bench_serve_measures_the_server(server):
    r = bench_serve(server.url, clients=8, requests=24, max_tokens=8, prompts=PROMPTS)
    assert r.ok == 24 and r.errors == {}
    assert r.output_tokens == 24 * 8 and r.model == "tiny"
    assert 0 < r.ttft_ms["p50"] <= r.latency_ms["p50"] <= r.latency_ms["p95"] <= r.latency_ms["p99"]
    assert r.output_tokens_per_s > 0 and r.usd_per_million_tokens(3.6) == pytest.approx(1000 / r.output_tokens_per_s)
    assert json.loads(json.dumps(r.to_dict()))["requests"] == 24


# --------------------------------------------------------------------------- keys, overload, shutdown


@pytest.fixture(scope="module")
def small_server(model_dir):
    """One sequence at a time and one waiting request: easy to overload; a key is required."""
    with running_server(model_dir, api_key="sk-test-123",
                        args=["--max-batch-size", "1", "--max-queue", "1", "--max-tokens", "400"]) as s:
        yield s


def test_api_key_is_required_when_set(small_server):
    url = small_server.base_url + "/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer sk-test-124"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Basic sk-test-123"}).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer sk-test-123"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=small_server.base_url, api_key="wrong").models.list()
    assert small_server.client().models.list().data[0].id == "tiny"


def test_full_queue_answers_503_with_retry_after(small_server):
    headers = {"Authorization": "Bearer sk-test-123"}
    body = {"model": "tiny", "prompt": "1+1=", "max_tokens": 50, "ignore_eos": True}

    def post(_):
        return httpx.post(small_server.base_url + "/completions", json=body, headers=headers, timeout=120)

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    codes = sorted(r.status_code for r in answers)
    assert 503 in codes and 200 in codes, codes
    assert set(codes) <= {200, 503}
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "overloaded"
    assert all(r.json()["usage"]["completion_tokens"] == 50 for r in answers if r.status_code == 200)


def test_sigterm_finishes_in_flight_requests(small_server):
    """Runs last on small_server: it shuts that server down."""
    s, result = small_server, {}

    def long_request():
        result["r"] = httpx.post(s.base_url + "/completions", timeout=120, headers={"Authorization": "Bearer sk-test-123"},
                                 json={"model": "tiny", "prompt": "1+1=", "max_tokens": 60, "ignore_eos": True})

    waves = httpx.get(s.url + "/health").json()["waves"]
    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while httpx.get(s.url + "/health").json()["waves"] == waves and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until the request is being decoded
    code = stop_process(s.process)
    t.join()
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status says "ended by SIGTERM".
    assert code in (0, -signal.SIGTERM), s.log_tail()
    assert "Finished server process" in s.log_tail()
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 60


def test_public_bind_without_key_is_refused(model_dir):
    env = {k: v for k, v in __import__("os").environ.items() if k != "STRATOS_API_KEY"}
    p = subprocess.run([sys.executable, "-m", "stratos.cli", "serve", str(model_dir), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2
    assert "API key" in p.stderr and "STRATOS_API_KEY" in p.stderr


# --------------------------------------------------------------------------- lm-eval through the server


def test_lm_eval_local_completions_runs_a_task_through_the_server(server, tmp_path):
    """lm-eval's own `local-completions` model evaluates a small local task against our endpoint."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps({"question": p, "answer": str(eval(p[:-1]))}) + "\n" for p in PROMPTS))
    (tmp_path / "stratos_add.yaml").write_text(
        "task: stratos_add\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={server.model},base_url={server.base_url}/completions,tokenizer_backend=None,"
                   "tokenized_requests=False,num_concurrent=4",
        tasks=["stratos_add"], task_manager=TaskManager(include_path=str(tmp_path)),
    )
    samples = res["samples"]["stratos_add"]
    assert len(samples) == len(PROMPTS) and "exact_match,none" in res["results"]["stratos_add"]
    for s in samples:  # lm-eval saw exactly what the server answers for that prompt
        direct = completion(server, prompt=s["doc"]["question"], max_tokens=8, temperature=0,
                            stop=["\n"])["choices"][0]["text"]
        assert s["resps"][0][0] == direct
