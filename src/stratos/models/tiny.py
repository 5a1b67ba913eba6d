"""Tiny models and tokenizers built offline, for fast tests and quick demos."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stratos.models import DEFAULT_CHAT_TEMPLATE, prepare_tokenizer

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ? What is the answer? Answer: question user assistant system",
    "123m456p789s11z manzu pinzu souzu honors wait tiles hand shanten",
]


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 512, added_tokens: Iterable[str] = (),
                    style: str = "bytelevel", chatml: bool = True, dummy_prefix: bool = True) -> Any:
    """Train a small BPE tokenizer on ``corpus`` and wrap it for transformers.

    ``style`` is how it spells text: ``bytelevel`` (GPT-2's byte alphabet, as SmolLM2, Llama 3 and Qwen)
    or ``sentencepiece`` ('▁' for a space prepended to the text, characters outside the learnt alphabet
    as ``<0xNN>`` byte-fallback tokens, as Llama 2 and Gemma; ``dummy_prefix=False``: no '▁' before the text, as
    Gemma, where Llama 2 has one). It has ChatML special tokens and
    template, ``<|im_end|>`` as EOS and ``<pad>`` as pad, so it behaves like the instruct tokenizers
    users bring; with ``chatml=False`` it is a base model's instead: no ChatML tokens, ``</s>`` as EOS and no
    template (``prepare_tokenizer`` gives it our ChatML fallback, whose turns it then writes as text).
    ``added_tokens`` (a domain's symbols, e.g. Mahjong tiles) are always kept whole.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus) + _DEFAULT_CORPUS
    specials = SPECIAL_TOKENS if chatml else ["<pad>", "</s>", "<unk>"]
    if style == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special, alphabet = specials, pre_tokenizers.ByteLevel.alphabet()
    elif style == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if dummy_prefix else "never")
        strip = [decoders.Strip(" ", 1, 0)] if dummy_prefix else []  # the prefix's space, not the text's
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
        special = specials + [f"<0x{b:02X}>" for b in range(256)]
        alphabet = sorted({c for t in texts for c in t if ord(c) < 128} | {"▁"})
    else:
        raise ValueError(f"style must be 'bytelevel' or 'sentencepiece', got {style!r}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>" if chatml else "</s>",
        bos_token="<|im_start|>" if chatml else None,
        unk_token="<unk>",
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE if chatml else None
    if added := list(added_tokens):
        fast.add_tokens(added)
    return prepare_tokenizer(fast)


def tiny_llama(
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 512,
    seed: int = 0,
    **config: Any,
) -> Any:
    """A randomly initialised Llama sized for tests (a few hundred thousand parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_model(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Save a model and tokenizer as an ordinary HF folder with safetensors weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
