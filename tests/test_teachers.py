"""Teachers against the real server (``stratos serve``) spoken to by the real ``openai`` client."""

from __future__ import annotations

import random

import pytest

from stratos.spec import TeacherSpec
from stratos.teachers import Budget, GenParams, HFTeacher, Price, TeacherError, make_teacher
from stratos.teachers.api import backoff_s, retry_after_s
from synth_helpers import FaultProxy


def api_teacher(url: str, model: str, **kw) -> TeacherSpec:
    return TeacherSpec(model=model, backend="openai", base_url=url, **kw)


def test_openai_teacher_samples_top_logprobs_and_cache(tiny_served, tiny_tokenizer, tmp_path):
    server, _ = tiny_served
    spec = api_teacher(server.base_url, server.model, logprobs_as_token_ids=True)
    params = GenParams(n=2, temperature=1.0, top_p=1.0, max_tokens=6, seed=3, top_logprobs=4)
    prompts = ["1+2=", [{"role": "user", "content": "30+4="}]]
    teacher = make_teacher(spec, cache_dir=tmp_path / "cache")
    out = teacher.generate(prompts, params)
    assert [len(x) for x in out] == [2, 2]
    for s in out[0] + out[1]:
        assert len(s.tokens) == len(s.top) == s.completion_tokens > 0
        ids = [int(t.removeprefix("token_id:")) for t in s.tokens]
        eos = tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode([i for i in ids if i != eos], skip_special_tokens=True) == s.text
        for pos in s.top:
            lps = [lp for _, lp in pos]
            assert len(pos) == 4 and lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
    assert teacher.usage.requests == 2 and teacher.usage.prompt_tokens > 0
    assert teacher.usage.completion_tokens == sum(s.completion_tokens for x in out for s in x)

    again = make_teacher(spec, cache_dir=tmp_path / "cache")
    assert again.generate(prompts, params) == out
    assert again.usage.requests == 0 and again.usage.cached == 2
    # A different request (another seed) is not served from the cache.
    other = make_teacher(spec, cache_dir=tmp_path / "cache")
    other.generate(prompts[:1], GenParams(**{**vars(params), "seed": 4}))
    assert other.usage.requests == 1


def test_retries_through_faults_give_the_same_answers(tiny_served, tmp_path):
    server, _ = tiny_served
    params = GenParams(n=2, temperature=1.0, max_tokens=4, seed=1)
    prompts = [f"{i}+{i}=" for i in range(4)]
    direct = make_teacher(api_teacher(server.base_url, server.model)).generate(prompts, params)

    proxy = FaultProxy(server.url, first=["429", "500", "hang", "malformed"], retry_after="1", hang_s=8.0)
    try:
        # The timeout leaves room for a loaded CPU; only the proxy's hang should pass it.
        spec = api_teacher(proxy.url + "/v1", server.model, timeout_s=4.0, max_concurrency=1)
        teacher = make_teacher(spec, cache_dir=tmp_path / "c")
        teacher.backoff_base_s = 0.01
        assert teacher.generate(prompts, params) == direct  # seeded requests: retries change nothing
    finally:
        proxy.close()
    errors = teacher.usage.errors
    assert {"http_429", "http_500", "timeout", "bad_reply"} <= errors.keys()
    assert teacher.usage.retries == sum(errors.values()) and teacher.usage.requests == len(prompts) + teacher.usage.retries
    (t429, f429), (t_next, _) = proxy.log[0], proxy.log[1]
    assert f429 == "429" and t_next - t429 >= 1.0  # Retry-After honoured (the backoff alone is ~0.01 s)


def test_client_errors_fail_at_once(tiny_served):
    server, _ = tiny_served
    teacher = make_teacher(api_teacher(server.base_url, "no-such-model"))
    with pytest.raises(TeacherError, match="HTTP 404"):
        teacher.generate(["1+1="], GenParams(max_tokens=2))
    assert teacher.usage.requests == 1


def test_api_key_variable_must_be_set(monkeypatch):
    monkeypatch.delenv("STRATOS_TEST_NO_KEY", raising=False)
    with pytest.raises(TeacherError, match="STRATOS_TEST_NO_KEY"):
        make_teacher(api_teacher("http://127.0.0.1:9/v1", "m", api_key_env="STRATOS_TEST_NO_KEY"))


def test_budget_reserves_worst_case():
    b = Budget(1.0)
    assert b.reserve(0.6) and not b.reserve(0.5)  # 0.6 in flight + 0.5 could cross 1.0
    b.settle(0.6, 0.2)
    assert b.spent == pytest.approx(0.2) and b.reserve(0.5)
    assert Price(2.0, 10.0).cost(1_000_000, 100_000) == pytest.approx(3.0)


def test_backoff_honours_retry_after_and_jitters():
    rng = random.Random(0)
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert retry_after_s({}) is None
    delays = [backoff_s(3, None, base=0.5, cap=30, rng=rng) for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays) and len(set(delays)) == 50
    assert all(backoff_s(0, 1.5, base=0.5, cap=30, rng=rng) >= 1.5 for _ in range(10))


def test_hf_teacher_caches_and_never_loads_for_a_cached_rerun(tiny_tokenizer, tmp_path):
    from stratos.models.tiny import tiny_llama

    model = tiny_llama(tiny_tokenizer)
    spec = TeacherSpec(model=str(tmp_path / "not-there"), batch_size=2)
    params = GenParams(n=2, temperature=1.0, max_tokens=4, seed=0)
    prompts = ["1+2=", "3+4=", "5+6="]
    first = HFTeacher(spec, cache_dir=tmp_path / "c", model_and_tokenizer=(model, tiny_tokenizer))
    out = first.generate(prompts, params)
    assert [len(x) for x in out] == [2, 2, 2] and first.usage.requests == 2  # two batches of <= 2 prompts
    # No model given and its path does not exist: any uncached prompt would fail to load it.
    again = HFTeacher(spec, cache_dir=tmp_path / "c")
    assert again.generate(prompts, params) == out and again.usage.cached == 3
    with pytest.raises(TeacherError, match="white-box"):
        again.generate(prompts, GenParams(top_logprobs=2))


def test_hf_teacher_refuses_prompts_past_its_context(tiny_tokenizer, tmp_path):
    """Worked examples (synth.few_shot) lengthen a teacher's prompts: one that, with the tokens to generate,
    runs past the model's context is refused with the lengths, before any generation; one that fits answers."""
    from stratos.models.generate import encode_prompt
    from stratos.models.tiny import tiny_llama

    model = tiny_llama(tiny_tokenizer, max_position_embeddings=64)
    spec = TeacherSpec(model=str(tmp_path / "not-there"))
    teacher = HFTeacher(spec, cache_dir=tmp_path / "c", model_and_tokenizer=(model, tiny_tokenizer))
    worked = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}] * 8
    long = [*worked, {"role": "user", "content": "3+4="}]
    n = len(encode_prompt(tiny_tokenizer, long))
    assert n + 4 > 64
    with pytest.raises(TeacherError, match=f"a prompt of {n} tokens plus 4 to generate runs past its context of 64 "
                                           "tokens; lower synth.few_shot"):
        teacher.generate([long], GenParams(max_tokens=4))
    assert teacher.usage.requests == 0 and not list((tmp_path / "c").rglob("*.json"))
    assert [len(x) for x in teacher.generate([long[-3:]], GenParams(max_tokens=4))] == [1]


def test_hf_teacher_cache_is_keyed_by_the_weights_not_the_path(tiny_tokenizer, tmp_path):
    """A teacher folder retrained in place is a new teacher: nothing is answered from the old cache."""
    from stratos.models.tiny import save_model, tiny_llama

    path = save_model(tiny_llama(tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "teacher")
    spec = TeacherSpec(model=str(path), batch_size=2)
    params = GenParams(n=1, temperature=0.0, max_tokens=4, seed=0)
    prompts = ["1+2=", "3+4="]
    HFTeacher(spec, cache_dir=tmp_path / "c").generate(prompts, params)
    same = HFTeacher(spec, cache_dir=tmp_path / "c")
    same.generate(prompts, params)
    assert same.usage.cached == 2
    save_model(tiny_llama(tiny_tokenizer, seed=2), tiny_tokenizer, path)  # retrained in place
    retrained = HFTeacher(spec, cache_dir=tmp_path / "c")
    retrained.generate(prompts, params)
    assert retrained.usage.cached == 0 and retrained.usage.requests == 1


def test_vllm_backend_is_skipped_cleanly_without_vllm():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(TeacherError, match="vllm"):
        make_teacher(TeacherSpec(model="m", backend="vllm"))
