"""The ``openai`` backend: any OpenAI-compatible endpoint through the official ``openai`` client.

Requests run concurrently (at most ``max_concurrency`` in flight) on one asyncio loop. A failed
request (429, 5xx, timeout, connection error, a reply that is not the JSON it should be) is
retried with exponential backoff and full jitter, waiting at least what the server's Retry-After
asks; a 4xx other than 408/409/429 is the caller's mistake and fails at once. Each finished
request goes to the disk cache before anything else happens, so a crash loses only requests in
flight, and a rerun sends only what the cache does not hold. Each successful request's latency is
measured and stored with its samples (``Sample.latency_s``), so a replayed answer keeps it.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from stratos.progress import progress_bar
from stratos.teachers.base import (
    Budget,
    GenParams,
    Price,
    Prompt,
    RequestCache,
    Sample,
    TeacherError,
    Usage,
    api_key_from_env,
    messages_of,
    prompt_token_bound,
    register_teacher,
)

log = logging.getLogger("stratos.teachers")

RETRY_STATUS = {408, 409, 429}
MAX_RETRY_AFTER_S = 300.0


class BadReply(Exception):
    """A 200 answer that is not a usable chat completion."""


def prompt_seed(seed: int, msgs: list[dict[str, str]]) -> int:
    """A per-prompt seed: the same prompt gets the same samples whatever order or batch it runs in."""
    digest = hashlib.sha256(json.dumps([seed, msgs], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


def retry_after_s(headers: Any) -> float | None:
    """Seconds a server asked us to wait: ``retry-after-ms``, or ``retry-after`` in seconds or as a date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def backoff_s(attempt: int, retry_after: float | None, *, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff (spreads clients that failed together), never shorter than Retry-After."""
    delay = rng.uniform(0.0, min(cap, base * 2**attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def _token_repr(entry: Any) -> str:
    tok = entry.token
    if isinstance(tok, str) and tok.startswith("token_id:"):
        return tok
    raw = getattr(entry, "bytes", None)
    if raw is not None:
        return "bytes:" + bytes(raw).hex()
    return tok


class OpenAITeacher:
    """An OpenAI-compatible chat endpoint as a teacher."""

    backoff_base_s = 0.5
    backoff_cap_s = 30.0
    role = "teacher"  # on progress bars; stratos.teachers.endpoint names a deployed student so

    def __init__(self, spec: Any, *, cache_dir: Any = None, price: Price | None = None, budget: Budget | None = None,
                 api_key: str | None = None):
        """``api_key``: the key itself (e.g. a deployed student's); without it the key comes from
        ``spec.api_key_env``."""
        if not spec.base_url:
            raise TeacherError("backend 'openai' needs base_url")
        self.spec = spec
        self.label = spec.label
        self.cache = RequestCache(cache_dir)
        self.price = price or Price()
        self.budget = budget or Budget(None)
        self.usage = Usage()
        self._api_key = api_key if api_key is not None else api_key_from_env(spec.api_key_env)
        self._rng = random.Random()

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ requests

    def request(self, prompt: Prompt, params: GenParams) -> dict[str, Any]:
        """The request body (also the cache key): everything that decides the answer."""
        msgs = messages_of(prompt)
        req: dict[str, Any] = {
            "model": self.spec.model, "messages": msgs, "n": params.n, "temperature": params.temperature,
            "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": prompt_seed(params.seed, msgs),
        }
        if params.stop:
            req["stop"] = list(params.stop)
        if params.top_logprobs:
            req["logprobs"] = True
            req["top_logprobs"] = params.top_logprobs
            if self.spec.logprobs_as_token_ids:
                req["extra_body"] = {"return_tokens_as_token_ids": True}
        return req

    def _parse(self, resp: Any, params: GenParams) -> tuple[list[Sample], int, int]:
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or len(choices) != params.n:
            raise BadReply(f"expected {params.n} choices, got {type(choices).__name__}")
        samples: list[Sample | None] = [None] * params.n
        for ch in choices:
            msg = getattr(ch, "message", None)
            text = getattr(msg, "content", None)
            if not isinstance(text, str) or not isinstance(ch.index, int) or not 0 <= ch.index < params.n:
                raise BadReply("a choice without text or a valid index")
            s = Sample(text, ch.finish_reason or "stop")
            if params.top_logprobs:
                content = getattr(getattr(ch, "logprobs", None), "content", None)
                if content is None:
                    raise BadReply("logprobs were asked for but the reply has none")
                s.tokens = [_token_repr(e) for e in content]
                s.top = [[(_token_repr(a), float(a.logprob)) for a in (e.top_logprobs or [])] for e in content]
            samples[ch.index] = s
        usage = getattr(resp, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        for s in samples:
            assert s is not None
            # Per sample: its log-prob tokens, else (one sample) the request's completion tokens.
            s.completion_tokens = len(s.tokens) if s.tokens is not None else completion if params.n == 1 else 0
        if usage is None:
            completion = sum(s.completion_tokens for s in samples if s)
        return [s for s in samples if s is not None], prompt_tokens, completion

    async def _send(self, client: Any, req: dict[str, Any], params: GenParams) -> tuple[list[Sample], int, int]:
        import openai

        for attempt in range(self.spec.max_retries + 1):
            self.usage.requests += 1
            wait_hint, last = None, ""
            try:
                t0 = time.perf_counter()
                resp = await client.chat.completions.create(**req)
                latency = time.perf_counter() - t0
                samples, p_tok, c_tok = self._parse(resp, params)
                for s in samples:
                    s.latency_s = latency
                return samples, p_tok, c_tok
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    raise TeacherError(f"teacher {self.label}: HTTP {e.status_code}: {e.message}") from None
                kind, wait_hint = f"http_{e.status_code}", retry_after_s(e.response.headers)
            except openai.APITimeoutError:
                kind = "timeout"
            except openai.APIConnectionError:
                kind = "connection"
            except (BadReply, openai.APIResponseValidationError, json.JSONDecodeError, ValueError, TypeError,
                    AttributeError) as e:
                kind, last = "bad_reply", str(e)
            self.usage.errors[kind] = self.usage.errors.get(kind, 0) + 1
            last = f"{kind}: {last}" if last else kind
            if attempt == self.spec.max_retries:
                break
            self.usage.retries += 1
            delay = backoff_s(attempt, wait_hint, base=self.backoff_base_s, cap=self.backoff_cap_s, rng=self._rng)
            log.debug("teacher %s: %s; retry %d in %.2fs", self.label, kind, attempt + 1, delay)
            await asyncio.sleep(delay)
        raise TeacherError(f"teacher {self.label}: request failed after {self.spec.max_retries} retries ({last}); "
                           "finished requests are cached: rerun to resume")

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Prompt], params: GenParams, *, progress: bool = False) -> list[list[Sample]]:
        out: list[list[Sample]] = [[] for _ in prompts]
        reqs = [self.request(p, params) for p in prompts]
        keys = [RequestCache.key({"backend": "openai", **r}) for r in reqs]
        todo = []
        for i, key in enumerate(keys):  # the cache first: what was paid for counts against the budget
            hit = self.cache.get(key)
            if hit is None:
                todo.append(i)
                continue
            out[i] = [Sample.from_dict(s) for s in hit["samples"]]
            self._account(hit["prompt_tokens"], hit["completion_tokens"], hit["cost_usd"], cached=True)
            self.budget.spent += hit["cost_usd"]
        if todo:
            asyncio.run(self._run(todo, reqs, keys, params, out, progress, len(prompts) - len(todo)))
        return out

    def _account(self, prompt_tokens: int, completion: int, cost: float, *, cached: bool) -> None:
        u = self.usage
        u.prompt_tokens += prompt_tokens
        u.completion_tokens += completion
        u.cost_usd += cost
        if cached:
            u.cached += 1
        else:
            u.cost_usd_now += cost

    async def _run(self, todo: list[int], reqs: list[dict[str, Any]], keys: list[str], params: GenParams,
                   out: list[list[Sample]], progress: bool, done: int) -> None:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=self.spec.base_url, api_key=self._api_key, timeout=self.spec.timeout_s,
                             max_retries=0)  # retries are ours: counted, jittered, Retry-After honoured
        sem = asyncio.Semaphore(self.spec.max_concurrency)
        stopped = asyncio.Event()

        async def one(i: int, bar: Any) -> None:
            async with sem:
                if stopped.is_set():
                    return
                req = reqs[i]
                worst = self.price.cost(prompt_token_bound(req["messages"]), params.n * params.max_tokens)
                if not self.budget.reserve(worst):
                    stopped.set()
                    self.usage.budget_stopped = True
                    return
                paid = 0.0
                try:
                    samples, p_tok, c_tok = await self._send(client, req, params)
                    paid = self.price.cost(p_tok, c_tok)
                finally:
                    self.budget.settle(worst, paid)
                self.cache.put(keys[i], {"samples": [s.to_dict() for s in samples], "prompt_tokens": p_tok,
                                         "completion_tokens": c_tok, "cost_usd": paid})
                self._account(p_tok, c_tok, paid, cached=False)
                out[i] = samples
                bar.advance(1)

        try:
            with progress_bar(f"{self.role} {self.label}", total=len(reqs), enabled=progress) as bar:
                bar.advance(done)
                tasks = [asyncio.create_task(one(i, bar)) for i in todo]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise
        finally:
            await client.close()


@register_teacher("openai")
def make_openai(spec: Any, *, device: str | None = None, **kw: Any) -> OpenAITeacher:
    return OpenAITeacher(spec, **kw)  # the model runs behind the endpoint: no device here
