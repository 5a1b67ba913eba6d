"""Load testing any OpenAI-compatible server: throughput, latency percentiles, time to first token.

``bench_serve(url, clients=32, requests=1000)`` keeps ``clients`` streaming completion requests in
flight until ``requests`` have been sent. Each request is timed from send to the last byte
(latency) and to the first text chunk (TTFT); output tokens come from the server's usage
counts. The eval stage and the planner call it from Python; ``stratos bench-serve`` wraps it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_PROMPTS = (
    "Explain in one paragraph why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paperclip.",
    "What is 17 times 23? Show your steps.",
)


@dataclass
class BenchResult:
    url: str
    model: str
    clients: int
    requests: int
    ok: int
    errors: dict[str, int]  # HTTP status (or exception name) -> count
    duration_s: float
    requests_per_s: float
    output_tokens: int
    prompt_tokens: int
    output_tokens_per_s: float
    latency_ms: dict[str, float]  # mean, p50, p95, p99, max (successful requests)
    ttft_ms: dict[str, float]
    per_request_tokens_per_s: float  # mean decode speed one client sees
    samples: list[str] = field(default_factory=list, repr=False)  # a few generated texts, for a sanity look

    def usd_per_million_tokens(self, usd_per_hour: float) -> float:
        """What a million output tokens cost on a server of this hourly price, at the measured throughput."""
        if self.output_tokens_per_s <= 0:
            return math.inf
        return usd_per_hour / (self.output_tokens_per_s * 3600) * 1e6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    xs = sorted(values)

    def q(p: float) -> float:  # linear interpolation between closest ranks (numpy's default)
        pos = (len(xs) - 1) * p
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"mean": sum(xs) / len(xs), "p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "max": xs[-1]}


def bench_serve(
    url: str,
    clients: int = 32,
    requests: int = 1000,
    prompts: str | Sequence[str | list[int]] = DEFAULT_PROMPTS,
    max_tokens: int = 64,
    api_key: str | None = None,
    *,
    model: str | None = None,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    timeout_s: float = 300.0,
    progress: bool = False,
) -> BenchResult:
    """Run the load test against ``url`` (the server root or its ``/v1``) and return the measurements.

    ``prompts`` go round-robin to the requests, as text or as token ids (sent as the ``prompt`` of
    ``/v1/completions``, which both forms are). ``ignore_eos`` asks for exactly ``max_tokens`` tokens
    (vLLM and our server honour it) so runs compare; servers that do not know the field ignore it.
    """
    if clients < 1 or requests < 1:
        raise ValueError("clients and requests must be at least 1")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    base = url.rstrip("/").removesuffix("/v1")
    return asyncio.run(_bench(base, clients, requests, prompts, max_tokens, api_key, model, temperature, ignore_eos,
                              timeout_s, progress))


async def _bench(base: str, clients: int, n_requests: int, prompts: list[str | list[int]], max_tokens: int,
                 api_key: str | None, model: str | None, temperature: float, ignore_eos: bool, timeout_s: float,
                 progress: bool) -> BenchResult:
    import httpx

    from stratos.progress import progress_bar

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout_s) as http:
        if model is None:
            r = await http.get(base + "/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        latencies: list[float] = []
        ttfts: list[float] = []
        speeds: list[float] = []
        errors: Counter[str] = Counter()
        tokens = {"prompt": 0, "output": 0}
        samples: list[str] = []
        counter = iter(range(n_requests))

        async def one(i: int) -> None:
            body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
            if ignore_eos:
                body["ignore_eos"] = True
            start = time.perf_counter()
            first = None
            text, usage = [], None
            try:
                async with http.stream("POST", base + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        errors[str(r.status_code)] += 1
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            errors["stream-error"] += 1
                            return
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for c in chunk.get("choices") or []:
                            if c.get("text"):
                                first = first or time.perf_counter()
                                text.append(c["text"])
            except httpx.HTTPError as e:
                errors[type(e).__name__] += 1
                return
            end = time.perf_counter()
            latencies.append((end - start) * 1000)
            if first is not None:
                ttfts.append((first - start) * 1000)
            out = usage["completion_tokens"] if usage else len(text)  # one chunk per token without usage
            tokens["output"] += out
            tokens["prompt"] += usage["prompt_tokens"] if usage else 0
            if first is not None and out > 1 and end > first:
                speeds.append((out - 1) / (end - first))
            if len(samples) < 3:
                samples.append("".join(text))

        async def worker(bar) -> None:
            for i in counter:  # the shared iterator hands each request index to exactly one worker
                await one(i)
                bar.advance()

        with progress_bar(f"bench {clients} clients", n_requests, enabled=progress) as bar:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(bar) for _ in range(min(clients, n_requests))))
            duration = time.perf_counter() - t0
    ok = len(latencies)
    return BenchResult(
        url=base, model=model, clients=clients, requests=n_requests, ok=ok, errors=dict(errors),
        duration_s=duration, requests_per_s=ok / duration, output_tokens=tokens["output"],
        prompt_tokens=tokens["prompt"], output_tokens_per_s=tokens["output"] / duration,
        latency_ms=percentiles(latencies), ttft_ms=percentiles(ttfts),
        per_request_tokens_per_s=sum(speeds) / len(speeds) if speeds else math.nan, samples=samples,
    )
