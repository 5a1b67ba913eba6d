"""Time, money and memory of each stage on each server, from FLOPs and bytes moved.

A transformer with N parameters spends about 2N FLOPs per token in a forward pass and 6N per
token trained (forward + backward). Decoding one token also reads every weight and the KV cache
from memory, so at small batch it is bound by bandwidth, not compute. Each estimate is the larger
of the compute time and the memory time, divided by an efficiency factor: the fraction of the
datasheet peak real code reaches. Small models reach less, because kernel launches and Python
cost the same whatever the size: modelled as a fixed overhead worth ``n_half`` parameters per
token, so the effective efficiency is ``eff * N / (N + n_half)`` and time stays monotone in N. A
decoding step also pays a fixed time per layer (``decode_layer_s``), so that a deep narrow model (a
pruned one) is not predicted as fast as a shallow one of its size.

The factors default to typical values (GPU training reaches ~40% of peak on large models) and are
calibrated on the local machine by ``stratos profile``; measured stage times recorded by runs
correct them further (see :mod:`stratos.plan.calibration`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from stratos.plan.catalog import Server

# Mixed-precision Adam: bf16 weights (2) + bf16 grads (2) + fp32 master, m, v (12) = 16 bytes/param.
TRAIN_BYTES_PER_PARAM = 16.0
# Activations kept for backward, per token per layer per hidden unit (Korthikanti et al. 2022, ~34
# bytes at 16-bit without recomputation, attention scores excluded as flash/SDPA kernels don't keep them).
ACT_BYTES_PER_TOKEN_LAYER_HIDDEN = 34.0
USABLE_MEMORY = 0.9  # framework, allocator and CUDA context take the rest
API_CONCURRENCY = 8  # parallel requests assumed to an API teacher
# The runner's stage holding each cost item: measurements it records under its own stage names
# correct these items too (an item's own records win).
RUNNER_STAGE = {"generation": "synth", "signal": "distill", "rollouts": "distill", "training": "distill",
                "recovery": "compress"}


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know of a model; read from its config, no weights loaded."""

    name: str
    params: float
    hidden: int = 0
    layers: int = 0
    vocab: int = 0
    kv_dim: int = 0  # key/value heads x head size: KV cache per token per layer is 2 * kv_dim values
    tokenizer: str | None = None  # identity (hash of the vocabulary), None when unknown
    api: bool = False  # reachable only through an API: no weights, no hidden states
    bytes_per_param: float = 2.0  # weights as served/held for inference (bf16)
    pretrained: bool = True  # a student whose training starts from trained weights (not init: random)

    def kv_bytes_per_token(self, dtype_bytes: float = 2.0) -> float:
        return 2 * self.layers * self.kv_dim * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peak that real code reaches on a server."""

    train: float = 0.40  # of peak FLOP/s in training
    forward: float = 0.50  # of peak FLOP/s in prefill / teacher forward passes
    decode: float = 0.60  # of peak bandwidth when decoding
    n_half: float = 3e8  # parameters at which a model reaches half of the above
    # Seconds each decoder layer adds to a decoding step whatever its width: eager PyTorch's per-layer work
    # (Python, kernel launches), which a deep narrow model pays in full. Measured by `stratos profile`.
    decode_layer_s: float = 0.0
    source: str = "default (typical GPU figures)"

    def scaled(self, kind: str, params: float) -> float:
        """The effective efficiency of a model of ``params`` parameters."""
        return getattr(self, kind) * params / (params + self.n_half)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


GPU_DEFAULT = Efficiency()
# A CPU without calibration: PyTorch reaches a fair share of matmul peak once a model is a few
# million parameters; the peak itself is a guess until `stratos profile` measures it.
CPU_DEFAULT = Efficiency(train=0.5, forward=0.6, decode=0.5, n_half=2e6, source="default (CPU guess)")


# --------------------------------------------------------------------------- memory


def inference_bytes(m: ModelShape, *, batch: int = 1, context: int = 512) -> float:
    """Weights plus KV cache plus 10% for activations and workspace."""
    return 1.1 * (m.params * m.bytes_per_param + batch * context * m.kv_bytes_per_token())


def train_bytes(m: ModelShape, *, batch: int = 8, seq: int = 512) -> float:
    """Weights, gradients, optimizer state and activations of full training."""
    states = m.params * TRAIN_BYTES_PER_PARAM
    acts = ACT_BYTES_PER_TOKEN_LAYER_HIDDEN * batch * seq * max(1, m.hidden) * max(1, m.layers)
    return states + acts


def gpus_needed(nbytes: float, server: Server) -> int | None:
    """GPUs of ``server`` that hold ``nbytes`` when sharded evenly; None when even all of them can't."""
    per = server.gpu_memory_gb * 1e9 * USABLE_MEMORY
    n = max(1, math.ceil(nbytes / per))
    return n if n <= server.gpu_count else None


# --------------------------------------------------------------------------- time


def _flops(server: Server, gpus: int | None = None) -> float:
    return server.bf16_tflops * 1e12 * (gpus or server.gpu_count)


def _bw(server: Server, gpus: int | None = None) -> float:
    return server.mem_bw_tbs * 1e12 * (gpus or server.gpu_count)


def recomputed_fraction(m: ModelShape) -> float:
    """The share of a training step's 6N FLOPs per token whose forward part gradient checkpointing runs
    again: the decoder layers' (each layer's forward is recomputed in its backward), not the output
    head's (2 x vocab x hidden per token). So checkpointing costs 1 + this / 3 times the compute."""
    head = m.vocab * m.hidden
    return min(1.0, max(0.0, 1 - head / m.params)) if head and m.params else 1.0


def forward_seconds(m: ModelShape, tokens: float, server: Server, eff: Efficiency, gpus: int | None = None) -> float:
    """Forward passes over ``tokens`` tokens (teacher signal, prefill)."""
    return 2 * (m.params + eff.n_half) * tokens / (_flops(server, gpus) * eff.forward)


def train_seconds(m: ModelShape, tokens: float, server: Server, eff: Efficiency, gpus: int | None = None) -> float:
    """Training on ``tokens`` tokens (all epochs counted in ``tokens``)."""
    return 6 * (m.params + eff.n_half) * tokens / (_flops(server, gpus) * eff.train)


def decode_step_seconds(m: ModelShape, batch: int, context: float, server: Server, eff: Efficiency,
                        gpus: int | None = None) -> float:
    """One decoding step of ``batch`` sequences: compute-bound or bandwidth-bound, whichever is slower, plus
    each layer's fixed cost (``Efficiency.decode_layer_s``)."""
    compute = 2 * (m.params + eff.n_half) * batch / (_flops(server, gpus) * eff.forward)
    moved = (m.params + eff.n_half) * m.bytes_per_param + batch * context * m.kv_bytes_per_token()
    memory = moved / (_bw(server, gpus) * eff.decode)
    return max(compute, memory) + m.layers * eff.decode_layer_s


def generate_seconds(m: ModelShape, sequences: float, prompt_tokens: float, new_tokens: float, server: Server,
                     eff: Efficiency, *, batch: int = 32, gpus: int | None = None) -> float:
    """Batched generation: prefill of every prompt, then ``new_tokens`` decoding steps per batch."""
    if sequences <= 0:
        return 0.0
    prefill = forward_seconds(m, sequences * prompt_tokens, server, eff, gpus)
    batches = math.ceil(sequences / batch)
    step = decode_step_seconds(m, min(batch, int(sequences)), prompt_tokens + new_tokens / 2, server, eff, gpus)
    return prefill + batches * new_tokens * step


def request_latency_s(m: ModelShape, prompt_tokens: float, new_tokens: float, server: Server, eff: Efficiency,
                      gpus: int | None = None, *, clients: int = 1) -> float:
    """Latency of one request while ``clients`` clients keep a request each in flight (1: served alone), as a
    server with continuous batching runs them: over its life a request waits for its own prefill and, on
    average, one of each other client's (each starts its next request about once in that time), and decodes
    ``new_tokens`` steps of a batch of ``clients`` sequences."""
    return generate_seconds(m, clients, prompt_tokens, new_tokens, server, eff, batch=clients, gpus=gpus)


# --------------------------------------------------------------------------- stages


@dataclass
class Workload:
    """How much work a plan implies; set by the strategy, measured from the task."""

    prompt_tokens: float  # per example
    answer_tokens: float  # per example (reference or teacher response)
    train_examples: int
    epochs: float
    teacher_sequences: int  # teacher generations (0 when the data comes from an oracle)
    signal: str  # 'logit' (hidden states), 'topk' (API log-probs, free with generation), 'text' (none)
    extra_sft_tokens: float = 0.0  # knowledge-injection corpus, trained once before KD
    signal_passes: float = 1.0  # teacher forward passes over the data: 1 when cached, every epoch when online
    rollout_sequences: float = 0.0  # completions the student samples while training (on-policy KD)
    rollout_tokens: float = 0.0  # at most this many tokens each (max_completion_length)
    train_sequences: float = 1.0  # sequences trained per example and epoch (grpo: a group of samples each)
    recomputed_share: float = 0.0  # of the trained tokens, the share under gradient checkpointing (a 2nd forward)
    teacher_workers: int = 0  # distill.teacher_workers: the signal computed in worker processes
    recovery_tokens: float = 0.0  # compression recovery
    serve_hours: float = 1.0
    batch: int = 8
    seq: int = 512
    teacher_prompt_tokens: float = 0.0  # per teacher generation, the rules included when they are in its prompt (0: prompt_tokens)
    oracle_examples: int = 0  # reverse-synthesised questions the task's oracle answers (synth)
    oracle_seconds: float = 0.0  # per oracle question, as measured on the planning machine

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageCost:
    stage: str
    server: str
    seconds: float
    usd: float
    note: str = ""


@dataclass
class ApiPricing:
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    latency_s: float = 1.0  # per request, measured by the probe


@dataclass
class Feasibility:
    ok: bool
    reason: str = ""
    teacher_gpus: int | None = None
    train_gpus: int | None = None
    serve_gpus: int | None = None


def check_memory(teacher: ModelShape, student: ModelShape, work: Workload, train: Server, serve: Server,
                 needs_teacher_weights: bool) -> Feasibility:
    """Does the teacher fit the training server (for generation and signal), does the student train
    there, and does the student serve on the serving server? Names what does not fit."""
    t_gpus = None
    if needs_teacher_weights and not teacher.api:
        need = inference_bytes(teacher, batch=32, context=work.seq)
        t_gpus = gpus_needed(need, train)
        if t_gpus is None:
            return Feasibility(False, f"teacher {teacher.name} needs {need / 1e9:.1f} GB for inference; "
                                      f"{train.name} has {train.memory_bytes / 1e9:.0f} GB")
    need = train_bytes(student, batch=work.batch, seq=work.seq)
    s_gpus = gpus_needed(need, train)
    if s_gpus is None:
        return Feasibility(False, f"student {student.name} needs {need / 1e9:.1f} GB to train; "
                                  f"{train.name} has {train.memory_bytes / 1e9:.0f} GB")
    need = inference_bytes(student, batch=1, context=work.seq)
    v_gpus = gpus_needed(need, serve)
    if v_gpus is None:
        return Feasibility(False, f"student {student.name} needs {need / 1e9:.1f} GB to serve; "
                                  f"{serve.name} has {serve.memory_bytes / 1e9:.0f} GB")
    return Feasibility(True, "", t_gpus, s_gpus, v_gpus)


def stage_costs(
    teacher: ModelShape,
    student: ModelShape,
    work: Workload,
    train: Server,
    serve: Server,
    eff_train: Efficiency,
    eff_serve: Efficiency,
    *,
    spot: bool = False,
    api: ApiPricing | None = None,
    correction: dict[str, float] | None = None,
) -> list[StageCost]:
    """Seconds and dollars of each stage. Teacher work runs on the training server (rented once);
    serving is priced for ``work.serve_hours`` on the serving server. ``correction`` multiplies a
    stage's predicted time by the measured/predicted ratio recorded on earlier runs."""
    corr = correction or {}
    price_t = train.price(spot) / 3600
    out: list[StageCost] = []

    def add(stage: str, server: Server, seconds: float, usd: float | None = None, note: str = "",
            measured: float = 0.0) -> None:
        """``measured``: seconds measured here already (the oracle's), added after the correction."""
        seconds = seconds * corr.get(stage, corr.get(RUNNER_STAGE.get(stage, ""), 1.0)) + measured
        out.append(StageCost(stage, server.name, seconds, seconds * server.price(spot) / 3600 if usd is None else usd, note))

    seq_tokens = work.prompt_tokens + work.answer_tokens
    # The oracle's questions (reverse synthesis) are made by the task's own code, on the CPU of the machine
    # that runs synth: priced at the rate measured while planning, whatever the server's accelerator.
    oracle_secs = work.oracle_examples * work.oracle_seconds
    oracle_note = (f" + {work.oracle_examples:,} oracle questions ({1e3 * work.oracle_seconds:.1f} ms each, measured)"
                   if oracle_secs else "")
    t_prompt = work.teacher_prompt_tokens or work.prompt_tokens
    if work.teacher_sequences:
        if teacher.api:
            p = api or ApiPricing()
            usd = work.teacher_sequences * (t_prompt * p.input_usd_per_mtok + work.answer_tokens * p.output_usd_per_mtok) / 1e6
            secs = work.teacher_sequences * p.latency_s / API_CONCURRENCY
            add("generation", train, secs, usd + (secs + oracle_secs) * price_t,
                "API tokens x price; latency from the probe" + oracle_note, measured=oracle_secs)
        else:
            secs = generate_seconds(teacher, work.teacher_sequences, t_prompt, work.answer_tokens, train, eff_train)
            add("generation", train, secs, measured=oracle_secs,
                note=f"{work.teacher_sequences} teacher generations of {t_prompt:,.0f}-token prompts" + oracle_note)
    else:
        add("generation", train, 0.0, note="data from the task's oracle: no teacher generation" + oracle_note,
            measured=oracle_secs)
    if work.signal == "logit" and not teacher.api:
        secs = forward_seconds(teacher, work.train_examples * seq_tokens * work.signal_passes, train, eff_train)
        note = ("teacher hidden states, computed once and cached" if work.signal_passes <= 1
                else f"teacher hidden states, computed in the loop ({work.signal_passes:g} passes over the data)")
        if work.teacher_workers:  # the pool's gain depends on the devices it is given, which this does not model
            note += (f"; by {work.teacher_workers} teacher worker(s), priced as one device's work and not overlapped "
                     "with the training: an upper bound where they have devices of their own")
        add("signal", train, secs, note=note)
    else:
        add("signal", train, 0.0, note="top-k log-probs come with generation" if work.signal == "topk" else "text only")
    if work.rollout_sequences:
        secs = generate_seconds(student, round(work.rollout_sequences), work.prompt_tokens, work.rollout_tokens, train,
                                eff_train, batch=work.batch)
        add("rollouts", train, secs, note=f"{work.rollout_sequences:,.0f} student samples of at most "
                                          f"{work.rollout_tokens:g} tokens (on-policy KD): an upper bound")
    tokens = work.train_examples * seq_tokens * work.epochs * work.train_sequences + work.extra_sft_tokens
    recompute = 1 + work.recomputed_share * recomputed_fraction(student) / 3
    add("training", train, train_seconds(student, tokens, train, eff_train) * recompute,
        note=f"{tokens:,.0f} tokens trained" + (f", {work.recomputed_share:.0%} of them with gradient checkpointing "
                                               f"(the layers' forward again: +{recompute - 1:.0%} compute)"
                                               if work.recomputed_share else "")
        + (f"; on all {train.gpu_count} GPUs at {train.gpu_count}x one GPU's speed (linear scaling: an upper bound, "
           "the gradients' all-reduce not counted)" if train.gpu_count > 1 else ""))
    if work.recovery_tokens:
        add("recovery", train, train_seconds(student, work.recovery_tokens, train, eff_train), note="compression recovery")
    add("serving", serve, work.serve_hours * 3600, note=f"{work.serve_hours:g} h trial deployment")
    return out


@dataclass(frozen=True)
class LoadTest:
    """The load under which the eval judges ``max_latency_ms`` (``eval.bench_clients`` concurrent clients, each
    request asking for exactly ``eval.max_new_tokens`` tokens): what the plan predicts latency for."""

    clients: int = 1
    new_tokens: float | None = None  # None: the task's answer length

    def _who(self) -> str:
        return f"{self.clients} concurrent clients" if self.clients > 1 else "one client"

    def words(self, prompt_tokens: float, answer_tokens: float) -> str:
        """The load in the plan's reason, with the request's length."""
        new = self.new_tokens if self.new_tokens is not None else answer_tokens
        return f"{self._who()}, each request {prompt_tokens:.0f} prompt + {new:.0f} new tokens"

    def label(self) -> str:
        """The load beside a predicted figure (plan.json's ``predicted.latency_load``, the report, ``stratos plan``)."""
        return f"{self._who()}, " + (f"{self.new_tokens:g} new tokens each" if self.new_tokens is not None
                                     else "an answer each")


def serve_latency_ms(student: ModelShape, work: Workload, serve: Server, eff: Efficiency,
                     correction: float = 1.0, load: LoadTest = LoadTest()) -> float:
    """The p50 request latency of ``load`` on ``serve``, in ms, times ``correction`` (learnt from earlier evals)."""
    need = inference_bytes(student, batch=load.clients, context=work.seq)
    gpus = gpus_needed(need, serve) or serve.gpu_count
    new = load.new_tokens if load.new_tokens is not None else work.answer_tokens
    return 1000 * correction * request_latency_s(student, work.prompt_tokens, new, serve, eff, gpus,
                                                 clients=load.clients)


def with_params(m: ModelShape, params: float) -> ModelShape:
    """The same model at another size (for monotonicity checks and what-ifs)."""
    return replace(m, params=params)


__all__ = [
    "ApiPricing", "CPU_DEFAULT", "Efficiency", "Feasibility", "GPU_DEFAULT", "ModelShape", "StageCost", "Workload",
    "check_memory", "decode_step_seconds", "forward_seconds", "generate_seconds", "gpus_needed", "inference_bytes",
    "LoadTest", "recomputed_fraction", "request_latency_s", "serve_latency_ms", "stage_costs", "train_bytes", "train_seconds",
    "with_params",
]
