"""Loading any causal LM Stratos works with, and the tokenizer care that goes with it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stratos.errors import ModelError
from stratos.models.hub import ALIASES, cache_dir, check_hub, model_identity, resolve

__all__ = ["ALIASES", "cache_dir", "model_identity", "load", "load_tokenizer", "prepare_tokenizer", "resolve",
           "DEFAULT_CHAT_TEMPLATE", "template_stops"]

# ChatML, used only when a tokenizer ships without a chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_END = "<|im_end|>"


def template_stops(tok: Any) -> tuple[str, ...]:
    """Strings that end a generated turn besides EOS: ``<|im_end|>`` when the tokenizer is on our ChatML
    fallback and that string is not one of its tokens. A base model prompted in ChatML (a GGUF without a
    template, such as Gemma 3 270M's) closes its turn by writing ``<|im_end|>`` as text, in several pieces,
    never its EOS token, and would otherwise run on to the length limit into an invented next turn."""
    if getattr(tok, "chat_template", None) == DEFAULT_CHAT_TEMPLATE and not has_token(tok, CHATML_END):
        return (CHATML_END,)
    return ()


def has_token(tok: Any, piece: str) -> bool:
    """Whether ``piece`` is one token of ``tok``'s vocabulary (added tokens included). A fast tokenizer answers
    from its backend without building ``get_vocab()``, which for a 262,144-token vocabulary takes ~140 ms."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.token_to_id(piece) is not None
    return piece in tok.get_vocab()


log = logging.getLogger("stratos.models")
_TOLD_NO_TEMPLATE: set[str] = set()  # said once per model location and process

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# transformers imports torchao (the compress stage's quantizer) on every load when it is installed;
# torchao then warns about each CUDA kernel library a CPU machine cannot load, and torch about its enums.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def prepare_tokenizer(tok: Any, padding_side: str = "right") -> Any:
    """Give a tokenizer what training and batched generation need.

    - an EOS token (the response's last target, so the student learns to stop);
    - a pad token distinct from nothing: EOS is reused when there is none, which is safe
      because padded positions are masked out of every loss;
    - a chat template (ChatML when the tokenizer has none);
    - the padding side: right for training, left for generation.
    """
    if tok.eos_token is None:
        for cand in ("<|im_end|>", "</s>", "<|endoftext|>", "<eos>"):
            if cand in tok.get_vocab():
                tok.eos_token = cand
                break
        else:
            raise ValueError("tokenizer has no EOS token and none of the usual ones is in its vocabulary")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.padding_side = padding_side
    return tok


def load_tokenizer(name: str | os.PathLike, *, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    from transformers import AutoTokenizer

    location, local = resolve(name, weights=False)
    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
        raise ModelError(f"{local or name}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if not getattr(tok, "chat_template", None) and str(location) not in _TOLD_NO_TEMPLATE:
        _TOLD_NO_TEMPLATE.add(str(location))
        log.warning("%s: its tokenizer has no chat template, so its prompts are written in ChatML "
                    "(<|im_start|>user ... <|im_end|>); a base model that never saw ChatML may answer poorly "
                    "in it (a GGUF of a base model often carries no template)%s", local or name,
                    "" if has_token(tok, CHATML_END) else
                    "; <|im_end|> is not one of its tokens, so generation also stops where it writes it as text")
    return prepare_tokenizer(tok, padding_side)


def _auto_dtype(location: str) -> torch.dtype:
    """float32 (what training wants), except for a folder the compress stage cast to half
    precision for deployment: its config.json says ``"stratos": {"dtype": "bfloat16"}``."""
    config = Path(location) / "config.json"
    if not config.is_file():
        return torch.float32
    wanted = (json.loads(config.read_text()).get("stratos") or {}).get("dtype")
    return _DTYPES.get(wanted, torch.float32)


def load(
    name: str | os.PathLike,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    config_overrides: dict[str, Any] | None = None,
    init: str = "pretrained",
    with_tokenizer: bool = True,
) -> Any:
    """Load a causal LM (and its tokenizer) from a hub id, a local folder, a .gguf file or an alias.

    Weights are read from safetensors only. ``dtype="auto"`` is float32, except for a folder the
    compress stage saved in bf16 for deployment (it stays bf16). ``config_overrides`` or ``init='random'`` build a
    fresh model from the (modified) config instead of loading weights: the usual way to get a
    small student that shares a teacher's tokenizer.

    Returns ``(model, tokenizer)``, or just the model when ``with_tokenizer`` is False.
    """
    location, local = resolve(name, weights=init != "random")
    if local is None:
        check_hub(location)
    torch_dtype = _auto_dtype(location) if dtype == "auto" else _DTYPES[dtype]
    overrides = dict(config_overrides or {})
    try:
        model = _build(location, torch_dtype, trust_remote_code, overrides, init)
    except OSError as e:
        if local is not None:
            raise ModelError(f"{local}: cannot load the model: {e}") from None
        raise ModelError(f"{name}: not a local folder or file, and the Hugging Face hub could not provide it "
                         f"({str(e).splitlines()[0]})") from None
    model.to(device)
    if not with_tokenizer:
        return model
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _build(location: str, torch_dtype: torch.dtype, trust_remote_code: bool, overrides: dict[str, Any], init: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if init == "random":
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ModelError(f"config_overrides: {type(config).__name__} has no field {key!r}")
            setattr(config, key, value)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    else:
        depth = overrides.pop("num_hidden_layers", None)
        if overrides:
            raise ModelError(
                f"config_overrides {sorted(overrides)} change the architecture of a pretrained model; "
                "set init: random to build a new model (only num_hidden_layers can shrink a pretrained one)"
            )
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        if depth is not None:  # a shallower student initialised from evenly spaced pretrained layers
            from stratos.models.arch import evenly_spaced, keep_layers

            keep_layers(model, evenly_spaced(model.config.num_hidden_layers, int(depth)))
    return model


def pruned_student(spec: Any, calibration: Sequence[dict[str, Any]] | None, *,
                   device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``init: pruned``: the pretrained ``spec.model`` pruned to ``spec.prune.keep`` of its parameters
    (``stratos.compress.prune``: layers, MLP channels, heads and hidden channels ranked by what they
    contribute on the first ``prune.calibration_samples`` of ``calibration``, the run's training
    records). Deterministic: the same records give the same student, so an SFT baseline or a resumed
    run starts from the one the run trained."""
    from stratos.compress.prune import calibration_batches, count_params, prune

    if not calibration:
        raise ValueError(f"student {spec.label}: init 'pruned' ranks the model's layers, channels and heads on "
                         "training records, and none were given")
    model, tok = load(spec.model, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, device=device)
    p = spec.prune
    batches = calibration_batches(tok, calibration, p.calibration_samples, max_length=1024)
    small, _ = prune(model, batches, method=p.method, target_params=int(count_params(model) * p.keep),
                     axes=p.width_axes)
    del model
    return small, tok


def task_tokenizer(task_spec: Any, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on the task's own text (its rules and train-split
    prompts and answers), with the task's domain symbols (``task.domain_tokens()``, e.g. the 34
    Mahjong tiles) as whole tokens. A from-scratch student on it is small (a few hundred rows of
    embeddings instead of ~50k) and sees a tile as one symbol instead of a digit and a letter.

    The BPE learns from the text as the student reads it: each prompt and answer inside the chat
    template's role lines (its special tokens are tokens of their own already), so the role words get
    merges of their own (on the demo's tokenizer ``assistant`` is one token, not seven). Each domain
    symbol is also a whole token with a space before it, as a space-separated question writes it
    (`` 4m``): on the Mahjong demo the two make a training row about a quarter shorter
    (``benchmarks/task_tokenizer.py``).

    Built once per task definition and vocabulary size, and cached, so every stage and process
    gets the same ids."""
    import shutil
    import tempfile

    from stratos.io import sha256_text
    from stratos.models.tiny import build_tokenizer
    from stratos.tasks import task_from_spec, to_records

    from stratos.io import fingerprint

    dumped = task_spec.model_dump(mode="json", exclude={"train_size", "eval_size"})
    data = fingerprint(task_spec.path) if task_spec.path is not None and Path(task_spec.path).is_file() else None
    path = cache_dir() / "tokenizers" / sha256_text("task-tokenizer-v4", dumped, data, vocab_size)[:16]
    if not (path / "tokenizer.json").is_file():
        task = task_from_spec(task_spec)
        examples = task.examples("train", min(task_spec.train_size, 2000), seed=task_spec.seed)
        # The ChatML template's text (build_tokenizer's) without its special tokens.
        texts = [task.describe()] + [f"user\n{r['prompt']}\nassistant\n{r['response']}"
                                     for r in to_records(task, examples, rationale=True)]
        domain = getattr(task, "domain_tokens", lambda: [])()
        tok = build_tokenizer(texts, vocab_size, added_tokens=[*domain, *(" " + d for d in domain)])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        tok.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(path))


def load_student(spec: Any, task_spec: Any = None, *, device: str | torch.device = "cpu", seed: int = 0,
                 calibration: Sequence[dict[str, Any]] | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a ``StudentSpec``: pretrained (possibly shallower), pruned from a
    pretrained model, or built from a config, on the model's tokenizer or on one trained on the task
    (``tokenizer: task``).

    New weights (``init: random``) are drawn from ``seed`` (the spec's ``distill.seed``), not from
    whatever the process's random state is by then: ``stratos run`` (after planning and synthesis in
    the same process) and ``stratos distill`` build the same student. ``init: pruned`` ranks what it
    keeps on ``calibration``, the training records (their first ``prune.calibration_samples``)."""
    if spec.init == "pruned":
        return pruned_student(spec, calibration, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.tokenizer == "task":
            if task_spec is None:
                raise ValueError(f"student {spec.label}: tokenizer 'task' needs the task spec")
            tok = task_tokenizer(task_spec, spec.tokenizer_vocab_size)
            ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                   "bos_token_id": tok.bos_token_id}
            model = load(spec.model, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, device=device,
                         config_overrides={**spec.config_overrides, **ids}, init="random", with_tokenizer=False)
            return model, tok
        return load(spec.model, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, device=device,
                    config_overrides=spec.config_overrides, init=spec.init)
