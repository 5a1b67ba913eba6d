"""The warnings Stratos cannot fix, in one place, each with the reason it is filtered.

Everything else is a bug to fix: ``tests/test_warnings.py`` runs a tiny spec end to end with
warnings turned into errors (in every process of the run: the server and worker processes too)
and fails on any warning not listed here, and on any warning logged by transformers (its
deprecations, e.g. of ``past_key_values``, are log records, not Python warnings).

Each entry applies only where it is expected (``scope``): ``"onnx-export"`` entries only inside
``torch.onnx.export`` (``stratos.compress.export``); ``"import"`` entries everywhere (third-party
packages that warn when imported). This module imports nothing heavy: a test's ``sitecustomize``
imports it in every process.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    category: str  # dotted path of the warning class, resolved when the filter is applied
    message: str  # regex matched at the start of the message (as ``warnings.filterwarnings`` does)
    module: str  # regex matched against the module that warns
    scope: str  # "onnx-export" or "import" (see the module docstring)
    reason: str


KNOWN_WARNINGS: list[KnownWarning] = [
    KnownWarning(
        "builtins.DeprecationWarning", r"You are using the legacy TorchScript-based ONNX export", r"stratos\.compress\.export",
        "onnx-export",
        "we call torch.onnx.export(dynamo=False) on purpose: the torch.export-based exporter needs onnxscript, which is "
        "not a dependency (docs/compress.md, Exports)."),
    KnownWarning(
        "builtins.DeprecationWarning", r"The feature will be removed", r"torch\.onnx\..*",
        "onnx-export", "raised inside torch's TorchScript exporter itself on every export; same reason as above."),
    KnownWarning(
        "torch.jit.TracerWarning", r"Converting a tensor to a Python boolean might cause the trace to be incorrect",
        r"transformers\..*", "onnx-export",
        "transformers' mask and SDPA code branch on tensor values, which tracing records as constants; the export is "
        "checked against PyTorch with onnxruntime on an input of another length (max_abs_diff_vs_torch)."),
    KnownWarning(
        "builtins.UserWarning", r"Exporting aten::index operator of advanced indexing", r"torch\.onnx\..*",
        "onnx-export",
        "torch's note on how it lowers advanced indexing (transformers' code, not ours); the exported graph is checked "
        "against PyTorch with onnxruntime."),
    # No "import" entries: under `python -W error`, stratos.cli and the packages a run imports (torch 2.13,
    # transformers 5.24, torchao 0.18, peft, accelerate, uvicorn, starlette, openai, onnx, onnxruntime, gguf)
    # import without a warning here (2026-12-02). torchao's and torch's import-time *log* lines are not warnings:
    # stratos sets those loggers to ERROR (stratos.models, stratos.cli).
]


def _category(dotted: str) -> type[Warning]:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def filter_known(scope: str) -> None:
    """Ignore the known warnings of ``scope`` (on top of the current filters)."""
    for w in KNOWN_WARNINGS:
        if w.scope == scope:
            warnings.filterwarnings("ignore", message=w.message, category=_category(w.category), module=w.module)


@contextlib.contextmanager
def known(scope: str) -> Iterator[None]:
    """Inside the block, ignore the known warnings of ``scope``; every other warning still shows
    (or raises, under ``-W error``)."""
    with warnings.catch_warnings():
        filter_known(scope)
        yield
