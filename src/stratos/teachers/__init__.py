"""Teachers: one protocol, three backends, a registry for your own, and the one way every stage
reaches a teacher by generation.

    teacher = make_teacher(spec.teachers[0], cache_dir="RUN/requests", price=Price(...), budget=Budget(5.0))
    samples = teacher.generate(prompts, GenParams(n=4, temperature=0.8, max_tokens=256))
    res = evaluate(None, None, task, examples, generate_fn=generate_fn(teacher))   # greedy, through the cache
    student = endpoint("http://host:8000/v1", "student", api_key=key)             # any OpenAI-compatible server

- ``hf``: any model ``stratos.models.load`` takes, in this process (batched, KV cache, left padding);
- ``openai``: any OpenAI-compatible endpoint through the official client (async, bounded concurrency,
  retries with backoff and jitter honouring Retry-After, timeouts, cost tracking, top_logprobs);
- ``vllm``: vLLM's offline engine where the package is importable.

Every backend caches finished requests on disk, keyed by the request. Synthesis, the plan's probes
of API teachers and the eval stage all use this one client (``OpenAITeacher`` for an endpoint)
with its request cache, retries and budget; a run keeps one cache (``RUN/requests``) for all of
them, so a request the probe asked is not asked again by the eval. ``generate_fn(teacher)`` is the
evaluator's seam over any teacher, and ``endpoint(...)`` an ``openai`` teacher for an arbitrary
endpoint (the deployed student).
"""

from stratos.teachers.base import (
    TEACHERS,
    Budget,
    GenParams,
    Price,
    RequestCache,
    Sample,
    Teacher,
    TeacherError,
    Usage,
    endpoint,
    generate_fn,
    make_teacher,
    register_teacher,
)
from stratos.teachers import api as _api  # noqa: F401  (registers the backends)
from stratos.teachers import local as _local  # noqa: F401
from stratos.teachers.api import OpenAITeacher
from stratos.teachers.local import HFTeacher, VLLMTeacher

__all__ = [
    "TEACHERS", "Budget", "GenParams", "HFTeacher", "OpenAITeacher", "Price", "RequestCache",
    "Sample", "Teacher", "TeacherError", "Usage", "VLLMTeacher", "endpoint", "generate_fn", "make_teacher",
    "register_teacher",
]
