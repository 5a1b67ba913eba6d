"""Structured pruning of Llama / Qwen2 / Mistral-family causal LMs, ranked on calibration data.

    imp = importance(model, batches)                 # one calibration pass, all scores at once
    plan = plan_width(model, imp, target_params=...)  # or plan_depth(...)
    small = apply_plan(model, plan)                   # an ordinary model of the same class, smaller config

Scores (higher = more important):
- layer: block influence, mean over tokens of 1 - cos(layer input, layer output) (ShortGPT);
  a layer that leaves the residual stream unchanged scores 0.
- MLP channel j: mean over tokens of |a_j| * ||W_down[:, j]||, the exact norm of what the channel
  adds to the residual stream.
- attention head h: mean over tokens of ||W_o[:, h] a_h||, likewise exact per head.
- hidden channel: RMS of the normalised residual stream (the inputs of every RMSNorm's consumer),
  as in Minitron.

The result is applied by slicing a state dict into a model built from a smaller config, so the
saved folder loads with plain ``AutoModelForCausalLM.from_pretrained`` (and vLLM): every layer
gets the same width, as HF configs require; which channels/heads survive differs per layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stratos.models.arch import backbone

SUPPORTED = {"llama", "qwen2", "qwen3", "mistral"}

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask


def check_supported(model: Any) -> None:
    """Raise ValueError unless ``model`` (or a config) is of a family structured pruning handles."""
    cfg = getattr(model, "config", model)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"structured pruning supports {sorted(SUPPORTED)} models, not {kind!r}")
    if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
        raise ValueError("structured pruning of mixture-of-experts models is not supported")


def calibration_batches(tokenizer: Any, records: Sequence[dict[str, Any]], n: int, *, max_length: int = 256,
                        batch_size: int = 8) -> list[Batch]:
    """The first ``n`` training records, tokenised as the trainer does (prompt + response)."""
    from stratos.distill.data import collate, encode

    from stratos.io import DataError

    examples, stats = encode(list(records)[:n], tokenizer, max_length)
    if not examples:
        raise DataError(f"compress: no calibration example among the first {n} training records "
                        f"(compress.calibration_samples): {stats.summary()}; raise distill.max_length "
                        f"({max_length}) or compress.calibration_samples, or check the data")
    out = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        b = collate(chunk, list(range(len(chunk))), tokenizer.pad_token_id)
        out.append((b.input_ids, b.attention_mask))
    return out


@dataclass
class Importance:
    layers: torch.Tensor  # [L]
    mlp: list[torch.Tensor]  # per layer [intermediate]
    heads: list[torch.Tensor]  # per layer [num_attention_heads]
    hidden: torch.Tensor  # [hidden]
    tokens: int


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def importance(model: Any, batches: Sequence[Batch], *, progress: bool = False) -> Importance:
    """All scores from one pass over ``batches`` (padding excluded)."""
    from stratos.progress import progress_bar

    check_supported(model)
    cfg = model.config
    stack = backbone(model)
    nh, hd = cfg.num_attention_heads, _head_dim(cfg)
    L = len(stack.layers)
    bi = torch.zeros(L, dtype=torch.float64)
    mlp = [torch.zeros(cfg.intermediate_size, dtype=torch.float64) for _ in range(L)]
    heads = [torch.zeros(nh, dtype=torch.float64) for _ in range(L)]
    hidden_sq = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    state: dict[str, Any] = {"mask": None, "tokens": 0}
    hooks = []

    def sel(x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [N, D] of real tokens
        return x[state["mask"]].double()

    for i, layer in enumerate(stack.layers):
        def layer_hook(mod, args, kwargs, out, i=i):
            x_in = sel(_first(args) if args else kwargs["hidden_states"])
            x_out = sel(_first(out))
            bi[i] += (1 - nn.functional.cosine_similarity(x_in, x_out, dim=-1)).sum()

        def down_hook(mod, args, i=i):
            a = sel(args[0]).abs().sum(0)
            mlp[i] += a * mod.weight.double().norm(dim=0)

        def o_hook(mod, args, i=i):
            a = sel(args[0]).view(-1, nh, hd)
            w = mod.weight.double().view(mod.weight.shape[0], nh, hd)
            for s in range(0, a.shape[0], 256):  # [n, heads, hidden] in chunks: exact per-head contributions
                heads[i] += torch.einsum("nhd,ohd->nho", a[s:s + 256], w).norm(dim=-1).sum(0)

        def norm_hook(mod, args, out):
            hidden_sq.add_((sel(_first(out)) ** 2).sum(0))

        hooks += [
            layer.register_forward_hook(layer_hook, with_kwargs=True),
            layer.mlp.down_proj.register_forward_pre_hook(down_hook),
            layer.self_attn.o_proj.register_forward_pre_hook(o_hook),
            layer.input_layernorm.register_forward_hook(norm_hook),
            layer.post_attention_layernorm.register_forward_hook(norm_hook),
        ]
    hooks.append(stack.norm.register_forward_hook(norm_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with progress_bar("calibration", len(batches), enabled=progress) as bar:
            for ids, mask in batches:
                state["mask"] = mask.bool().to(device)
                state["tokens"] += int(mask.sum())
                stack(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                bar.advance()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = max(1, state["tokens"])
    return Importance(
        layers=(bi / n).float(),
        mlp=[(m / n).float() for m in mlp],
        heads=[(h / n).float() for h in heads],
        hidden=(hidden_sq / (n * (2 * L + 1))).sqrt().float(),
        tokens=state["tokens"],
    )


# --------------------------------------------------------------------------- plans


@dataclass
class PrunePlan:
    """What survives: kept layers (old indices, in order) and, per kept layer, kept channels and heads."""

    layers: list[int]
    mlp: list[torch.Tensor] | None = None  # per kept layer, sorted channel indices
    heads: list[torch.Tensor] | None = None  # per kept layer, sorted query-head indices
    kv_heads: list[torch.Tensor] | None = None  # per kept layer, sorted key/value-head (group) indices
    hidden: torch.Tensor | None = None  # sorted hidden-channel indices
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "layers": len(self.layers),
            "intermediate_size": int(self.mlp[0].numel()) if self.mlp else None,
            "num_attention_heads": int(self.heads[0].numel()) if self.heads else None,
            "num_key_value_heads": int(self.kv_heads[0].numel()) if self.kv_heads else None,
            "hidden_size": int(self.hidden.numel()) if self.hidden is not None else None,
            **self.notes,
        }


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def count_params(model_or_config: Any) -> int:
    """Parameters of a model, or of the model a config describes (built on the meta device, no memory).
    Tied weights count once, as on disk."""
    if isinstance(model_or_config, nn.Module):
        return sum(p.numel() for p in model_or_config.parameters())
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(model_or_config)
    return sum(p.numel() for p in m.parameters())


def target_from(model: Any, *, prune_ratio: float | None = None, target_params: int | None = None) -> int:
    total = count_params(model)
    if target_params is not None:
        if target_params >= total:
            raise ValueError(f"target_params {target_params:,} is not below the model's {total:,} parameters")
        return int(target_params)
    if prune_ratio is None:
        raise ValueError("give prune_ratio or target_params")
    return int(total * (1 - prune_ratio))


def smaller_config(config: Any, *, layers: Sequence[int] | None = None, intermediate: int | None = None,
                   heads: int | None = None, kv_heads: int | None = None, hidden: int | None = None) -> Any:
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.head_dim = _head_dim(config)  # explicit: hidden/heads no longer gives it
    if layers is not None:
        cfg.num_hidden_layers = len(layers)
        if getattr(config, "layer_types", None):
            cfg.layer_types = [config.layer_types[i] for i in layers]
    if intermediate is not None:
        cfg.intermediate_size = int(intermediate)
    if heads is not None:
        cfg.num_attention_heads = int(heads)
    if kv_heads is not None:
        cfg.num_key_value_heads = int(kv_heads)
    if hidden is not None:
        cfg.hidden_size = int(hidden)
    return cfg


def depth_layers(config: Any, target_params: int) -> int:
    """How many layers depth pruning keeps: the most that fit ``target_params``."""
    for keep in range(config.num_hidden_layers, 0, -1):
        if count_params(smaller_config(config, layers=list(range(keep)))) <= target_params:
            return keep
    raise ValueError(f"even one layer exceeds the target of {target_params:,} parameters (embeddings alone?)")


def plan_depth(model: Any, imp: Importance, target_params: int) -> PrunePlan:
    """Drop the least influential layers until the model has at most ``target_params``."""
    L = model.config.num_hidden_layers
    keep = depth_layers(model.config, target_params)
    order = torch.argsort(imp.layers, descending=True).tolist()  # most important first
    kept = sorted(order[:keep])
    return PrunePlan(layers=kept, notes={"dropped_layers": sorted(set(range(L)) - set(kept))})


def _width_dims(cfg: Any, f: float, axes: Sequence[str]) -> dict[str, int]:
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    qpg = nh // nkv
    dims = {"intermediate": cfg.intermediate_size, "heads": nh, "kv_heads": nkv, "hidden": cfg.hidden_size}
    if "mlp" in axes:
        dims["intermediate"] = max(8, int(round(f * cfg.intermediate_size / 8)) * 8)  # multiples of 8 stay fast
    if "heads" in axes:
        if qpg > 1:  # GQA: keep every group, fewer query heads in each
            dims["heads"] = nkv * max(1, round(f * qpg))
        else:  # MHA (or one head per group): drop whole groups
            dims["kv_heads"] = dims["heads"] = max(1, round(f * nkv))
    if "hidden" in axes:
        dims["hidden"] = max(8, int(round(f * cfg.hidden_size / 8)) * 8)
    return dims


def width_dims(cfg: Any, target_params: int, axes: Sequence[str] = ("mlp", "heads")) -> dict[str, int]:
    """The sizes width pruning narrows every layer to: one shared factor over ``axes`` (mlp, heads,
    hidden), the largest that meets ``target_params``."""
    unknown = set(axes) - {"mlp", "heads", "hidden"}
    if unknown or not axes:
        raise ValueError(f"width_axes must be a non-empty subset of mlp, heads, hidden; got {list(axes)}")

    def at(step: int) -> dict[str, int]:
        return _width_dims(cfg, step / 100, axes)

    def fits(d: dict[str, int]) -> bool:
        return count_params(smaller_config(cfg, intermediate=d["intermediate"], heads=d["heads"],
                                           kv_heads=d["kv_heads"], hidden=d["hidden"])) <= target_params

    # Every size grows with the factor, so the parameters do: bisect for the largest step that fits (each
    # test builds a model on the meta device; a scan of all 100 costs seconds on a large config).
    lo, hi = 0, 101  # fits(at(lo)) holds (step 0 standing in for "none"), fits(at(hi)) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(at(mid)) else (lo, mid)
    # Below it every step fits; the first shape transformers accepts (save_pretrained refuses a hidden
    # size that is not a multiple of the query heads, head_dim or not).
    dims = next((d for d in map(at, range(lo, 0, -1)) if d["hidden"] % d["heads"] == 0), None)
    if dims is None:
        raise ValueError(f"width pruning over {list(axes)} cannot reach {target_params:,} parameters; add axes or use depth")
    return dims


def plan_width(model: Any, imp: Importance, target_params: int, axes: Sequence[str] = ("mlp", "heads")) -> PrunePlan:
    """Narrow every layer to ``width_dims``; within each layer keep the most important channels and heads."""
    return plan_from_dims(model, imp, **width_dims(model.config, target_params, axes))


def pruned_config(config: Any, target_params: int, method: str = "width", axes: Sequence[str] = ("mlp", "heads")) -> Any:
    """The config ``prune`` would give a model of ``config`` (its shape; which layers, channels and heads
    survive depends on the calibration data): sizes and costs known before any weight is loaded."""
    check_supported(config)
    if method == "depth":
        return smaller_config(config, layers=list(range(depth_layers(config, target_params))))
    if method == "width":
        d = width_dims(config, target_params, axes)
        return smaller_config(config, intermediate=d["intermediate"], heads=d["heads"], kv_heads=d["kv_heads"],
                              hidden=d["hidden"])
    raise ValueError(f"prune method must be 'depth' or 'width', not {method!r}")


def plan_from_dims(model: Any, imp: Importance, *, intermediate: int, heads: int, kv_heads: int, hidden: int) -> PrunePlan:
    """Keep the top-scoring channels/heads of every layer at the given sizes."""
    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    qpg = nh // nkv
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot be shared by {kv_heads} key/value heads")
    top = lambda s, k: torch.sort(torch.argsort(s, descending=True)[:k]).values  # noqa: E731
    mlp_keep, head_keep, kv_keep = [], [], []
    for i in range(cfg.num_hidden_layers):
        mlp_keep.append(top(imp.mlp[i], intermediate))
        hs = imp.heads[i].view(nkv, qpg)
        if kv_heads < nkv:  # drop whole groups (their query heads go too)
            if heads // kv_heads != qpg:
                raise ValueError("drop whole key/value groups or query heads within groups, not both")
            groups = top(hs.sum(1), kv_heads)
            q = torch.cat([g * qpg + torch.arange(qpg) for g in groups.tolist()])
        else:
            groups = torch.arange(nkv)
            per = heads // nkv
            q = torch.cat([g * qpg + top(hs[g], per) for g in range(nkv)])
        head_keep.append(q)
        kv_keep.append(groups)
    hid = top(imp.hidden, hidden) if hidden < cfg.hidden_size else None
    return PrunePlan(layers=list(range(cfg.num_hidden_layers)), mlp=mlp_keep, heads=head_keep, kv_heads=kv_keep, hidden=hid)


# --------------------------------------------------------------------------- applying a plan

_LAYER_KEY = re.compile(r"^(?P<pre>.*\.layers\.)(?P<i>\d+)\.(?P<rest>.+)$")


def _rows(idx: torch.Tensor, hd: int) -> torch.Tensor:
    return (idx[:, None] * hd + torch.arange(hd)).reshape(-1)


@torch.no_grad()
def apply_plan(model: Any, plan: PrunePlan) -> Any:
    """A new model of the same class with a smaller config and the surviving weights."""
    from transformers import AutoModelForCausalLM

    check_supported(model)
    cfg = model.config
    hd = _head_dim(cfg)
    new_cfg = smaller_config(
        cfg, layers=plan.layers,
        intermediate=plan.mlp[0].numel() if plan.mlp else None,
        heads=plan.heads[0].numel() if plan.heads else None,
        kv_heads=plan.kv_heads[0].numel() if plan.kv_heads else None,
        hidden=plan.hidden.numel() if plan.hidden is not None else None,
    )
    H = plan.hidden

    def cols(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(-1, idx)

    def rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(0, idx)

    new_of_old = {old: new for new, old in enumerate(plan.layers)}
    sd: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:  # embeddings, final norm, lm_head: only the hidden axis changes
            if key.endswith("embed_tokens.weight") or key.endswith("lm_head.weight"):
                sd[key] = cols(t, H)
            elif key.endswith("norm.weight"):
                sd[key] = rows(t, H)
            else:
                sd[key] = t
            continue
        old = int(m["i"])
        if old not in new_of_old:
            continue
        j = plan.layers.index(old)
        rest = m["rest"]
        mlp = plan.mlp[j] if plan.mlp else None
        q = _rows(plan.heads[j], hd) if plan.heads else None
        kv = _rows(plan.kv_heads[j], hd) if plan.kv_heads else None
        if rest.startswith("mlp.gate_proj.") or rest.startswith("mlp.up_proj."):
            t = rows(t, mlp)
            t = cols(t, H) if rest.endswith("weight") else t
        elif rest == "mlp.down_proj.weight":
            t = rows(cols(t, mlp), H)
        elif rest.startswith("self_attn.q_proj."):
            t = rows(t, q)
            t = cols(t, H) if rest.endswith("weight") else t
        elif rest.startswith("self_attn.k_proj.") or rest.startswith("self_attn.v_proj."):
            t = rows(t, kv)
            t = cols(t, H) if rest.endswith("weight") else t
        elif rest == "self_attn.o_proj.weight":
            t = rows(cols(t, q), H)
        elif rest == "self_attn.o_proj.bias":
            t = rows(t, H)
        elif rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            t = rows(t, H)
        elif rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            pass  # per head_dim, unchanged
        else:
            raise ValueError(f"apply_plan: no rule for weight {key!r} of {cfg.model_type}")
        sd[f"{m['pre']}{new_of_old[old]}.{rest}"] = t.clone()
    dtype = next(model.parameters()).dtype
    new = AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not new_cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"apply_plan: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if new_cfg.tie_word_embeddings:
        new.tie_weights()
    new.generation_config = model.generation_config
    return new.to(next(model.parameters()).device)


def prune(model: Any, batches: Sequence[Batch], *, method: str = "width", prune_ratio: float | None = None,
          target_params: int | None = None, axes: Sequence[str] = ("mlp", "heads"),
          progress: bool = False) -> tuple[Any, PrunePlan]:
    """Rank on ``batches`` and prune ``model`` to the target: ``method`` 'depth' or 'width'."""
    target = target_from(model, prune_ratio=prune_ratio, target_params=target_params)
    imp = importance(model, batches, progress=progress)
    if method == "depth":
        plan = plan_depth(model, imp, target)
    elif method == "width":
        plan = plan_width(model, imp, target, axes)
    else:
        raise ValueError(f"prune method must be 'depth' or 'width', not {method!r}")
    plan.notes.update(target_params=target, calibration_tokens=imp.tokens,
                      layer_importance=[round(float(x), 5) for x in imp.layers])
    return apply_plan(model, plan), plan


# --------------------------------------------------------------------------- unstructured sparsity


@torch.no_grad()
def wanda(model: Any, batches: Sequence[Batch], *, ratio: float = 0.5, pattern: str = "unstructured") -> dict[str, float]:
    """Wanda (Sun et al. 2023): zero the weights with the smallest |W_ij| * ||x_j|| in each output row,
    ``ratio`` of them (unstructured) or 2 of every 4 inputs (pattern '2:4'). Only decoder linears;
    one calibration pass on the dense model rather than the paper's layer-by-layer pass.

    The weights stay dense tensors with zeros: on CPU this saves memory only once stored sparse,
    and no time. Returns the fraction of zeroed weights."""
    if pattern not in ("unstructured", "2:4"):
        raise ValueError(f"sparsity pattern must be 'unstructured' or '2:4', not {pattern!r}")
    stack = backbone(model)
    linears = {n: m for n, m in stack.layers.named_modules() if isinstance(m, nn.Linear)}
    sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    state: dict[str, Any] = {}

    def hook(name):
        def fn(mod, args):
            sq[name] += (args[0][state["mask"]].double() ** 2).sum(0)
        return fn

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    device = next(model.parameters()).device
    try:
        for ids, mask in batches:
            state["mask"] = mask.bool().to(device)
            stack(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    zeroed = total = 0
    for name, lin in linears.items():
        w = lin.weight
        score = w.abs().double() * sq[name].sqrt()[None, :]
        if pattern == "2:4":
            if w.shape[1] % 4:
                continue
            g = score.view(w.shape[0], -1, 4)
            drop = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, dim=-1, largest=False).indices, True)
            drop = drop.view_as(w)
        else:
            k = int(math.floor(w.shape[1] * ratio))
            drop = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
        w[drop] = 0
        zeroed += int(drop.sum())
        total += w.numel()
    return {"sparsity": zeroed / max(1, total), "pattern": pattern}
