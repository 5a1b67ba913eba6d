"""The Teacher protocol, what a teacher returns, and the pieces every backend shares.

A teacher answers ``generate(prompts, params)`` with ``n`` samples per prompt. Each sample is
text plus, where the backend can give them, the sampled token ids and the top-k log-probs of
every generated token (the signal for top-k KD from API teachers), and the measured latency of
the request that produced it. Every backend keeps a :class:`RequestCache` on disk keyed by the
request itself, so a rerun or a run resumed after a crash never pays for (or recomputes) a request
twice, and a :class:`Usage` with tokens and cost.

:func:`generate_fn` turns any teacher into the evaluator's seam (greedy, one answer per prompt),
so the plan's probes and the eval stage ask a teacher through the same client, cache and retries
as synthesis.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stratos.errors import UserError
from stratos.io import atomic_write_text, sha256_text

Prompt = str | list[dict[str, str]]


class TeacherError(UserError):
    """A teacher that cannot answer (bad endpoint, auth, unsupported option); retrying will not help."""


@dataclass(frozen=True)
class GenParams:
    """How to sample; part of every request's cache key."""

    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    top_logprobs: int = 0  # 0: no log-probs


@dataclass
class Sample:
    text: str
    finish_reason: str = "stop"
    completion_tokens: int = 0
    # Top-k KD signal, one entry per generated token: the sampled token and its top-k alternatives.
    # A token is "token_id:N" when the server gives ids, else "bytes:HEX" (exact) or its text.
    tokens: list[str] | None = None
    top: list[list[tuple[str, float]]] | None = None
    # Seconds the request that produced this sample took (its successful attempt; None where the backend
    # does not measure one). Stored in the cache with the answer, so a replayed answer keeps it. A
    # measurement, not part of the answer: two samples with the same content are equal whatever it is.
    latency_s: float | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        top = d.get("top")
        return cls(d["text"], d.get("finish_reason", "stop"), d.get("completion_tokens", 0), d.get("tokens"),
                   None if top is None else [[(t, float(lp)) for t, lp in pos] for pos in top], d.get("latency_s"))


@dataclass
class Usage:
    """What a teacher has consumed: requests made now, answers taken from the cache, tokens, money."""

    requests: int = 0  # HTTP requests / generate calls actually sent (retries included)
    retries: int = 0
    cached: int = 0  # prompts answered from the request cache
    prompt_tokens: int = 0  # over every answer used, cached or not
    completion_tokens: int = 0
    cost_usd: float = 0.0  # over every answer used, cached or not (what the data cost)
    cost_usd_now: float = 0.0  # paid by this run
    errors: dict[str, int] = field(default_factory=dict)  # retried failures by kind
    budget_stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Price:
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_usd_per_mtok + completion_tokens * self.output_usd_per_mtok) / 1e6


class Budget:
    """A spending cap shared by concurrent requests.

    A request reserves its worst case (prompt estimate plus ``n * max_tokens`` output) before it
    is sent and settles to its real cost after; a request whose worst case would take the total
    past the limit is never sent. So the stage stops *before* the request that could cross it.
    """

    def __init__(self, limit_usd: float | None, spent_usd: float = 0.0):
        self.limit = limit_usd
        self.spent = spent_usd
        self.reserved = 0.0
        self._lock = threading.Lock()

    def reserve(self, worst_usd: float) -> bool:
        with self._lock:
            if self.limit is not None and self.spent + self.reserved + worst_usd > self.limit + 1e-12:
                return False
            self.reserved += worst_usd
            return True

    def settle(self, worst_usd: float, actual_usd: float) -> None:
        with self._lock:
            self.reserved -= worst_usd
            self.spent += actual_usd


class RequestCache:
    """Finished requests on disk, one small JSON file per request, named by the hash of the request.

    Files are written atomically, so a process killed at any moment leaves every finished request
    readable and no half-written one.
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return sha256_text(request)[:32]

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        if self.root is None:
            return None
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.root is not None:
            atomic_write_text(self._path(key), json.dumps(value, ensure_ascii=False))

    def __len__(self) -> int:
        return 0 if self.root is None or not self.root.is_dir() else sum(1 for _ in self.root.glob("*/*.json"))


def api_key_from_env(env_name: str | None) -> str:
    if env_name is None:
        return os.environ.get("OPENAI_API_KEY", "") or "none"
    value = os.environ.get(env_name)
    if not value:
        raise TeacherError(f"the API key variable {env_name} (teachers[].api_key_env) is not set")
    return value


class Teacher(Protocol):
    """What every backend provides. ``generate`` returns ``out[i]``: the samples of prompt ``i``
    (fewer than ``params.n``, or none, only when the budget stopped it)."""

    label: str
    usage: Usage

    def generate(self, prompts: Sequence[Prompt], params: GenParams, *, progress: bool = False) -> list[list[Sample]]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- the registry

TeacherFactory = Callable[..., Teacher]
TEACHERS: dict[str, TeacherFactory] = {}


def register_teacher(backend: str) -> Callable[[TeacherFactory], TeacherFactory]:
    """Register a backend: ``@register_teacher("mine") def make(spec, *, cache_dir, price, budget, device) -> Teacher``
    (``device``: the torch device string a local model runs on, None for the default; remote backends ignore it)."""

    def deco(factory: TeacherFactory) -> TeacherFactory:
        TEACHERS[backend] = factory
        return factory

    return deco


def make_teacher(spec: Any, *, cache_dir: str | Path | None = None, price: Price | None = None,
                 budget: Budget | None = None, device: str | None = None) -> Teacher:
    """The teacher a ``TeacherSpec`` describes. ``device`` (a torch device string) is where a local
    (``hf``) teacher loads its model; API and vLLM teachers ignore it."""
    if spec.backend not in TEACHERS:
        raise TeacherError(f"unknown teacher backend {spec.backend!r}; registered: {', '.join(sorted(TEACHERS))}")
    return TEACHERS[spec.backend](spec, cache_dir=cache_dir, price=price or Price(), budget=budget or Budget(None),
                                  device=device)


def generate_fn(teacher: Teacher, *, progress: bool = False) -> Callable[..., list[Any]]:
    """The evaluator's seam (``stratos.evaluate.GenerateFn``) over a teacher:
    ``fn(prompts, *, max_new_tokens, batch_size) -> list[Generation]``.

    Greedy (temperature 0, top_p 1, n 1, seed 0) through ``teacher.generate``, so its request cache
    answers a request asked before (by a probe, by an earlier eval) and its retries and budget apply.
    ``batch_size`` is not used: the teacher batches (or keeps requests in flight) as its spec says.
    Each ``Generation`` carries the sample's ``latency_s``; ``finish_reason`` 'length' stays
    'length', anything else is 'stop'."""

    def fn(prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int) -> list[Any]:
        from stratos.models.generate import Generation

        params = GenParams(n=1, temperature=0.0, top_p=1.0, max_tokens=max_new_tokens, seed=0)
        out = teacher.generate(list(prompts), params, progress=progress)
        gens = []
        for samples in out:
            if not samples:  # only a budget stops a teacher without an error
                raise TeacherError(f"teacher {teacher.label} stopped (budget reached) before answering every prompt")
            s = samples[0]
            gens.append(Generation(s.text, s.completion_tokens, "length" if s.finish_reason == "length" else "stop",
                                   latency_s=s.latency_s))
        return gens

    return fn


def endpoint(base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 8, timeout_s: float = 120.0,
             cache_dir: str | Path | None = None, role: str = "teacher") -> Teacher:
    """An ``openai``-backend teacher for any OpenAI-compatible endpoint (``base_url`` as OpenAI clients
    take it, e.g. ``http://host:port/v1``), e.g. a deployed student: ``api_key`` is the key itself
    (no environment variable is read); ``cache_dir=None`` asks the server every time (to measure it).
    ``role`` names it on progress bars (``deployed student``, not ``teacher``, for the eval's)."""
    from stratos.spec import TeacherSpec
    from stratos.teachers.api import OpenAITeacher

    spec = TeacherSpec(model=model, backend="openai", base_url=base_url, max_concurrency=concurrency,
                       timeout_s=timeout_s)
    teacher = OpenAITeacher(spec, cache_dir=cache_dir, api_key=api_key)
    teacher.role = role
    return teacher


def messages_of(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_token_bound(msgs: list[dict[str, str]]) -> int:
    """An upper bound on a chat prompt's tokens without its tokenizer: byte-level tokenizers never
    use more tokens than bytes; the template adds a few per message."""
    return sum(len(m.get("content", "").encode()) + 8 for m in msgs) + 8
