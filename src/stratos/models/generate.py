"""One batched generation helper for every caller: the evaluator, the hf teacher, synthesis.

Prompts are user-message strings or message lists, rendered with the tokenizer's chat template
(``chat=True``) or used as raw text. They are sorted by length so each batch pads little, run
left-padded through ``model.generate`` (KV cache), and returned in the caller's order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from stratos.models import template_stops
from stratos.progress import progress_bar

Prompt = str | list[dict[str, str]]
FinishReason = Literal["stop", "length"]


@dataclass
class Generation:
    text: str
    num_tokens: int  # generated tokens, including the EOS that ended the text if any
    finish_reason: FinishReason  # 'stop' (EOS or a stop string) or 'length' (max_new_tokens reached)
    # Seconds the request that produced it took, where one was measured (a teacher's request through
    # ``stratos.teachers.generate_fn``); None for a batch generated here. A measurement, not part of the output.
    latency_s: float | None = field(default=None, compare=False)


def render(tokenizer: Any, prompt: Prompt, *, chat: bool = True) -> str:
    """The text a prompt becomes: through the chat template (with the assistant turn opened) or as is."""
    if chat:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        return "\n".join(m["content"] for m in prompt) + "\n"
    return prompt


def encode_prompt(tokenizer: Any, prompt: Prompt, *, chat: bool = True) -> list[int]:
    """The token ids a prompt becomes (``render``'s text). Through the chat template no special tokens are
    added: the template writes those the model expects, and adding them again would double BOS."""
    return tokenizer(render(tokenizer, prompt, chat=chat), add_special_tokens=not chat)["input_ids"]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# At most this many rows (batch x new positions) go through a linear layer's transposed weight copy while
# decoding: measured on a 2-core Xeon (MKL, fp32), x @ W.T from W as stored ran 1.8-10x slower than from a
# contiguous copy of W.T at 8 to 32 rows, and level from 64 on (benchmarks/rollouts.py --layouts).
DECODE_ROWS = 32

# A weight this large (elements: a vocabulary head, SmolLM2's is 28M; a 1B model's MLP) decodes through
# oneDNN's fp32 matrix product instead (``torch._C._nn.mkldnn_linear`` on a oneDNN copy), where torch has it.
# On a 2-core AMD EPYC at 8 rows: SmolLM2's head 6.8 ms against MKL's 16.2 (as stored) and 17.4 (transposed
# copy); 8192 x 576 0.87 against 1.83; 2048 x 8192 3.2 against 6.3; 49152 x 256 4.8 against 5.9; but
# 49152 x 128 (6.3M) 3.1 against 2.7, and at SmolLM2's layers (under 1M) at best 10% faster, up to 4.5x
# slower at the smallest, its conversions costing about what it saves (benchmarks/rollouts.py --layouts).
# Fixed by size, not timed per run, so that a killed run resumes on the same kernels and samples the same tokens.
ONEDNN_MIN_WEIGHT = 1 << 22


@contextmanager
def decode_layout(model: Any, rows: int | None = None) -> Iterator[None]:
    """While open, every fp32 ``nn.Linear`` of ``model`` on the CPU computes inputs of at most ``DECODE_ROWS``
    rows (a decode step of a small batch) from a copy of its weight made for it: a contiguous copy of its
    transposed weight, which MKL multiplies far faster at a few rows than the weight as stored, or, for a
    weight of at least ``ONEDNN_MIN_WEIGHT`` elements (the vocabulary head) where torch has oneDNN, a oneDNN
    copy that oneDNN's product reads faster still. Larger inputs (a prefill, training) take the usual path.
    The same product summed in another order: results agree to float rounding, not bit for bit. ``rows``:
    the batch the caller will decode, if it knows it; above ``DECODE_ROWS`` nothing is done (no step would
    use the copies, and making them costs a pass over the weights).

    Left alone: other devices and dtypes, autocast, quantized (tensor-subclass) weights, subclasses of
    ``nn.Linear`` and layers whose ``forward`` someone already replaced. The copies take the size of those
    weights once more while the context is open (tied weights are copied once); when that would exceed an
    eighth of the machine's memory nothing is done. The weights must not change inside the context.
    ``STRATOS_DECODE_LAYOUT=0`` turns it off; ``STRATOS_DECODE_ONEDNN=0`` keeps the head on a transposed copy."""
    layers = [] if (rows is not None and rows > DECODE_ROWS) or os.environ.get("STRATOS_DECODE_LAYOUT") == "0" \
        else [m for m in model.modules() if _decodes_with_copy(m)]
    weights = {id(m.weight): m.weight for m in layers}
    if sum(w.numel() * w.element_size() for w in weights.values()) > _physical_memory() / 8:
        layers, weights = [], {}
    heads = _onednn_copies({key: w for key, w in weights.items() if w.numel() >= ONEDNN_MIN_WEIGHT})
    copies = _transposed_copies({key: w for key, w in weights.items() if key not in heads})
    for mod in layers:
        key = id(mod.weight)
        mod.forward = _onednn_forward(mod, heads[key]) if key in heads else _decode_forward(mod, copies[key])
    try:
        yield
    finally:
        for mod in layers:
            del mod.forward


def _decodes_with_copy(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return type(mod) is nn.Linear and "forward" not in vars(mod) and type(w) is nn.Parameter \
        and w.dtype == torch.float32 and w.device.type == "cpu"


def _transposed_copies(weights: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each weight's transpose, contiguous, all in one buffer: for a model of any size one block that glibc
    maps and unmaps whole (above 32 MiB it always does). Many separate blocks of a few MB would come from
    its heap and leave it to trim and fault back in on the next training step (measured: the gkd step's
    training part ran 16-29% slower that way)."""
    flat = torch.empty(sum(w.numel() for w in weights.values()), dtype=torch.float32)
    copies, at = {}, 0
    for key, w in weights.items():
        copies[key] = flat[at:at + w.numel()].view(w.shape[1], w.shape[0]).copy_(w.detach().t())
        at += w.numel()
    return copies


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform: assume 8 GiB
        return 8 << 30


def _onednn_copies(weights: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """oneDNN copies of ``weights``; none (they take transposed copies) where this torch cannot multiply
    by them (``_onednn_works``) or ``STRATOS_DECODE_ONEDNN=0``."""
    if not weights or os.environ.get("STRATOS_DECODE_ONEDNN") == "0" or not _onednn_works():
        return {}
    return {key: w.detach().to_mkldnn() for key, w in weights.items()}


@functools.cache
def _onednn_works() -> bool:
    """Whether this torch has oneDNN and its fp32 linear product runs (checked once, on a tiny weight)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch._C._nn.mkldnn_linear(torch.ones(1, 4).to_mkldnn(), torch.ones(2, 4).to_mkldnn()).to_dense()
    except (RuntimeError, AttributeError):
        return False
    return True


def _decodes_here(x: torch.Tensor) -> bool:
    """A decode step's input, to go through the copies: few rows, fp32, no autocast."""
    return x.numel() <= DECODE_ROWS * x.shape[-1] and not torch.is_autocast_enabled("cpu") and x.dtype == torch.float32


def _decode_forward(mod: nn.Linear, wt: torch.Tensor) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _decodes_here(x):
            return nn.functional.linear(x, mod.weight, mod.bias)
        y = x.matmul(wt)
        return y if mod.bias is None else y + mod.bias
    return forward


def _onednn_forward(mod: nn.Linear, wm: torch.Tensor) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _decodes_here(x) or (torch.is_grad_enabled() and x.requires_grad):
            return nn.functional.linear(x, mod.weight, mod.bias)
        y = torch._C._nn.mkldnn_linear(x.reshape(-1, x.shape[-1]).to_mkldnn(), wm).to_dense()
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if mod.bias is None else y + mod.bias
    return forward


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    stop: Sequence[str] | None = None,
    chat: bool = True,
    progress: bool = False,
) -> list[list[Generation]]:
    """Generate ``n`` completions per prompt; ``out[i]`` holds prompt i's completions.

    ``temperature=0`` is greedy decoding (then ``n`` copies would be identical, so use n=1).
    ``stop`` strings end a completion early; the stop string itself is not part of the text. Through the chat
    template, the template's own end of turn where it is text (``template_stops``) is one of them.
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    encoded = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    if chat and (ends := [s for s in template_stops(tokenizer) if s not in (stop or ())]):
        stop = [*(stop or ()), *ends]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        num_return_sequences=n,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        stop_strings=list(stop) if stop else None,
    )
    device = next(model.parameters()).device
    results: list[list[Generation]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    # A private RNG state: sampling is reproducible from `seed` and the caller's RNG is left alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            progress_bar("generating", len(prompts), enabled=progress) as bar, \
            decode_layout(model, rows=min(batch_size, len(prompts)) * n):
        torch.manual_seed(seed)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask = _left_pad([encoded[i] for i in idx], pad_id)
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                    tokenizer=tokenizer if stop else None,  # needed by stop_strings
                )
                new = out[:, ids.shape[1] :].tolist()
                for row, tokens in enumerate(new):
                    results[idx[row // n]].append(_finish(tokens, tokenizer, eos_ids, pad_id, stop or ()))
                bar.advance(len(idx))
        finally:
            model.train(was_training)
    return results


@torch.inference_mode()
def sample_ids(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, seed: int,
               pad_id: int, eos_ids: Sequence[int], ignore_eos: bool = False) -> list[list[int]]:
    """Sample one completion per tokenised prompt, as token ids: the rollouts of on-policy training.

    One batched decode loop of our own with the KV cache (``transformers.DynamicCache``): a prefill that
    keeps only the last position's logits, then one forward per token for the rows still running (a
    row that ends leaves the batch and the cache), sampled from the full distribution at
    ``temperature`` (no top-k or top-p cut) by inverse CDF, one uniform number per row, where
    ``torch.multinomial`` would draw one per vocabulary entry. Each completion ends at (and keeps) its
    first EOS, or runs to ``max_new_tokens`` with ``ignore_eos`` (benchmarks). Seeded by ``seed`` on a
    private generator: the same call gives the same tokens, and the caller's RNG is left alone. Decode steps
    run in ``decode_layout``. ``benchmarks/rollouts.py`` measures it against ``model.generate`` and a static
    cache."""
    from transformers import DynamicCache

    from stratos.models.arch import cache_arg

    if not prompts:
        return []
    device = next(model.parameters()).device
    ids, mask = _left_pad([list(p) for p in prompts], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same numbers wherever the model runs
    eos = torch.tensor(list(eos_ids) if not ignore_eos else [], dtype=torch.long, device=device)
    rows = list(range(len(prompts)))  # the caller's index of each row still running
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    with decode_layout(model, rows=len(prompts)):
        try:
            cache = DynamicCache()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **cache_arg(model, cache)).logits[:, -1]
            positions = positions[:, -1:]
            for t in range(max_new_tokens):
                nxt = _sample_rows(logits, temperature, gen)
                tokens = nxt.tolist()
                for r, tok in zip(rows, tokens):
                    out[r].append(tok)
                ended = torch.isin(nxt, eos)
                if t == max_new_tokens - 1 or bool(ended.all()):
                    break
                if bool(ended.any()):  # finished rows leave the batch and the cache
                    keep = (~ended).nonzero()[:, 0]
                    cache.batch_select_indices(keep)
                    rows = [rows[i] for i in keep.tolist()]
                    nxt, mask, positions = nxt[keep], mask[keep], positions[keep]
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                positions = positions + 1
                logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                               **cache_arg(model, cache)).logits[:, -1]
        finally:
            model.train(was_training)
    return out


def _sample_rows(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), by inverse CDF (float64 cumulative sums)."""
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
    u = torch.rand(len(logits), 1, generator=gen, dtype=torch.float64).to(logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u)[:, 0].clamp(max=logits.shape[-1] - 1)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model nor the tokenizer defines an EOS token; generation could not stop")
    return ids


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Left padding keeps every row's last prompt token at the same position, where generation starts.
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r) :] = 1
    return ids, mask


def _finish(tokens: list[int], tokenizer: Any, eos_ids: list[int], pad_id: int, stop: Sequence[str]) -> Generation:
    """Trim a generated row at its first EOS and decode it."""
    # Rows that ended on a stop string while others went on are filled with padding.
    while stop and tokens and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    body = tokens if end is None else tokens[:end]
    text = tokenizer.decode(body, skip_special_tokens=True)
    text, stopped = _cut_at_stop(text, stop)
    if end is not None:
        return Generation(text, end + 1, "stop")
    return Generation(text, len(tokens), "stop" if stopped else "length")
