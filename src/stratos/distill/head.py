"""A model's output head, detached from the model: hidden states in, exact logits out.

The teacher sends its last hidden states (d numbers per token) instead of logits (V per
token, V ~ 100 d). The student side keeps this frozen copy of the teacher's head and
recomputes the teacher's logits exactly, chunk by chunk, when the loss needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from stratos.io import atomic_save_tensors
from stratos.models.arch import backbone


class OutputHead(nn.Module):
    """``logits = softcap(scale * (h @ W.T + b))``: lm_head (or tied embeddings), bias, and the
    final logit scaling / soft-capping some architectures apply (Cohere, Granite, Gemma 2/3)."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        scale: float = 1.0,
        softcap: float | None = None,
        live: nn.Module | None = None,
    ):
        super().__init__()
        # ``live``: the student's own lm_head module, read at every call. FSDP2 swaps a module's parameters
        # between their shards and the gathered tensors, so a reference to the parameter taken once would
        # be stale; the module's attribute is always the current one (and so is ``parameters()``).
        self.live = live
        if live is None:
            self.register_parameter("_weight", weight if isinstance(weight, nn.Parameter)
                                    else nn.Parameter(weight, requires_grad=False))
            self.register_parameter("_bias", bias if bias is None or isinstance(bias, nn.Parameter)
                                    else nn.Parameter(bias, requires_grad=False))
        self.scale = float(scale)
        self.softcap = None if softcap is None else float(softcap)

    @property
    def weight(self) -> torch.Tensor:
        return self.live.weight if self.live is not None else self._weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.live, "bias", None) if self.live is not None else self._bias

    def _frozen_cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A frozen head's weights in autocast's dtype, cast once. Autocast would cast them on every
        call (it caches only trainable leaves), and for a 49k x 576 head that copy costs a good
        fraction of the matmul itself on a CPU."""
        key = (dtype, self.weight._version, None if self.bias is None else self.bias._version)
        cached = getattr(self, "_cast_cache", None)
        if cached is None or cached[0] != key:
            bias = None if self.bias is None else self.bias.detach().to(dtype)
            cached = self._cast_cache = (key, self.weight.detach().to(dtype), bias)
        return cached[1], cached[2]

    def hold_in(self, dtype: torch.dtype) -> "OutputHead":
        """Keep a frozen head's weights in ``dtype`` alone, in place: a teacher's head that only computes under
        autocast to ``dtype`` then holds that copy instead of its fp32 weights beside autocast's cast (bf16: a
        third of the memory; 113 MB less for SmolLM2's 49k x 576 head). Its logits under that autocast are
        bit-identical; without autocast it computes in ``dtype`` too. The student's live head is left alone."""
        if self.live is None and self._weight.dtype != dtype:
            self._weight.data = self._weight.data.to(dtype)
            if self._bias is not None:
                self._bias.data = self._bias.data.to(dtype)
            self._cast_cache = None
        return self

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 (the matmul itself runs in whatever precision autocast chooses)."""
        weight, bias = self.weight, self.bias
        device = hidden.device.type
        if not torch.is_autocast_enabled(device):
            hidden = hidden.to(weight.dtype)  # e.g. bf16 cached hidden states into an fp32 head
        elif not weight.requires_grad and weight.dtype != torch.get_autocast_dtype(device):
            weight, bias = self._frozen_cast(torch.get_autocast_dtype(device))
        rows = hidden.shape[0]
        padded = device == "cpu" and hidden.dim() == 2 and self.vocab_size >= PAD_VOCAB
        width = padded_rows(rows) if padded else rows
        if width != rows:  # zero rows first, dropped from the logits: see padded_rows
            hidden = F.pad(hidden, (0, 0, width - rows, 0))
        logits = F.linear(hidden, weight, bias)[width - rows:].float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @classmethod
    def from_model(cls, model: Any, *, frozen_copy: bool = True) -> "OutputHead":
        """The head of a Hugging Face causal LM.

        ``frozen_copy=True`` (teacher) copies the weights so the model itself can be freed;
        ``False`` (student) shares the live parameters so gradients flow into the model.
        """
        lm_head = model.get_output_embeddings()
        if lm_head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings; is it a causal LM?")
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        scale = 1.0
        if getattr(cfg, "logit_scale", None):  # Cohere multiplies
            scale *= float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None):  # Granite divides
            scale /= float(cfg.logits_scaling)
        softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
        if not frozen_copy:
            return cls(scale=scale, softcap=softcap, live=lm_head)
        bias = getattr(lm_head, "bias", None)
        return cls(lm_head.weight.detach().clone(), None if bias is None else bias.detach().clone(), scale=scale,
                   softcap=softcap)

    def save(self, path: str | Path) -> None:
        tensors = {"weight": self.weight.detach().contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias.detach().contiguous()
        meta = {"scale": repr(self.scale), "softcap": "" if self.softcap is None else repr(self.softcap)}
        atomic_save_tensors(tensors, path, metadata=meta)  # a cache's head: another run may be reading it

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> "OutputHead":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        t = load_file(str(path))
        return cls(
            t["weight"].to(dtype),
            t["bias"].to(dtype) if "bias" in t else None,
            scale=float(meta.get("scale", "1.0")),
            softcap=float(meta["softcap"]) if meta.get("softcap") else None,
        )


def last_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


# On CPU a block above glibc's largest mmap threshold (32 MiB) is mapped afresh, and page-faulted in, on
# every allocation; a chunk's [rows, V] fp32 matrices are kept under it (benchmarks/ctkd_throughput.py).
CPU_CHUNK_BYTES = 32 << 20
GPU_CHUNK_ROWS = 1024
# Heads this wide are chunked under 1024 rows on CPU, and their row counts padded (``padded_rows``); a
# narrower head (a task tokenizer's few hundred tokens) is cheap to build primitives for and runs unpadded.
PAD_VOCAB = CPU_CHUNK_BYTES // (4 * GPU_CHUNK_ROWS)


def chunk_rows(chunk_size: int | None, vocab: int, device: Any) -> int:
    """Rows of one chunk of logits: ``chunk_size`` when set; unset, 1024 on an accelerator and, on CPU, the
    largest power of two (16 to 1024) that keeps one [rows, vocab] fp32 matrix within ``CPU_CHUNK_BYTES``
    (a power of two, so the head runs a full chunk unpadded: ``padded_rows``)."""
    if chunk_size:
        return int(chunk_size)
    if getattr(device, "type", device) != "cpu":
        return GPU_CHUNK_ROWS
    fits = max(16, min(GPU_CHUNK_ROWS, CPU_CHUNK_BYTES // (4 * max(1, vocab))))
    return 1 << (fits.bit_length() - 1)


def padded_rows(rows: int) -> int:
    """The rows an output head of ``PAD_VOCAB`` tokens or more computes on CPU for ``rows`` rows of hidden
    states: the next power of two, at least 16 (up to 1024 rows; more run as they are).

    oneDNN keeps a primitive for each matmul shape a process runs (up to 1,024 of them, for the process's
    life), and an output head's primitives hold buffers of about the head's own size. Chunked KD ends each
    batch with a chunk of whatever rows remain, so over a run the heads met nearly every row count from 1 to
    the chunk's: on examples/alignment.yaml (V 49,152, bf16) training grew to 8.3 GB. Padded to a power
    of two, the heads meet at most 7 row counts (16 to 1024); the padding costs less than building a primitive per count
    (``benchmarks/head_shapes.py``)."""
    if rows == 0 or rows > GPU_CHUNK_ROWS:
        return rows
    return max(16, 1 << max(0, rows - 1).bit_length())


def token_logps(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """``log p(target)`` at each row of ``hidden`` [N, d], chunk by chunk, so the [N, V] log-softmax
    is never held at once (what policy-gradient losses need of the vocabulary)."""
    chunk_size = chunk_rows(chunk_size, head.vocab_size, hidden.device)
    return torch.cat([torch.log_softmax(head(hidden[i : i + chunk_size]), dim=-1)
                      .gather(-1, targets[i : i + chunk_size, None])[:, 0]
                      for i in range(0, len(targets), chunk_size)])


@torch.no_grad()
def batch_token_logps(model: Any, batch: Any, *, chunk_size: int | None, bf16: bool) -> torch.Tensor:
    """``log p(target)`` under ``model`` for every target token of ``batch`` (``target_mask`` order),
    without gradients and in the precision training uses: the sampling policy's and the reference's
    log-probabilities of RL's rollouts."""
    device = next(model.parameters()).device
    mask = batch.target_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            h = last_hidden(model, batch.input_ids.to(device), batch.attention_mask.to(device))[:, :-1][mask]
            head = OutputHead.from_model(model, frozen_copy=False)
            return token_logps(head, h, batch.targets.to(device), chunk_size).float()
    finally:
        model.train(was_training)
