"""Teachers: one protocol, three backends, and a registry for your own.

    teacher = make_teacher(spec.teachers[0], cache_dir="run/synth/requests", price=Price(...), budget=Budget(5.0))
    samples = teacher.generate(prompts, GenParams(n=4, temperature=0.8, max_tokens=256))

- ``hf``: any model ``stratos.models.load`` takes, in this process (batched, KV cache, left padding);
- ``openai``: any OpenAI-compatible endpoint through the official client (async, bounded concurrency,
  retries with backoff and jitter honouring Retry-After, timeouts, cost tracking, top_logprobs);
- ``vllm``: vLLM's offline engine where the package is importable.

Every backend caches finished requests on disk, keyed by the request.
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
    make_teacher,
    register_teacher,
)
from stratos.teachers import api as _api  # noqa: F401  (registers the backends)
from stratos.teachers import local as _local  # noqa: F401
from stratos.teachers.api import OpenAITeacher
from stratos.teachers.local import HFTeacher, VLLMTeacher

__all__ = [
    "TEACHERS", "Budget", "GenParams", "HFTeacher", "OpenAITeacher", "Price", "RequestCache",
    "Sample", "Teacher", "TeacherError", "Usage", "VLLMTeacher", "make_teacher", "register_teacher",
]
