"""Speed-up settings that leave the method alone: regional compilation and the AdamW kernel.

Each is off by default (a run with the defaults computes exactly what it always did) and acts on
every method, with DDP and with resume. Their effect is measured in ``bench/speedups.py``.

* ``train.compile=true`` compiles each backbone layer (``backbone.layer_pattern``) with
  ``torch.compile`` in place (:meth:`torch.nn.Module.compile`): the layers share one compiled
  graph, compile time stays short, and parameter names, state dicts and checkpoints are those of
  the eager model, so compiled and eager runs resume from each other's checkpoints.
* ``train.optimizer=foreach|fused`` picks AdamW's multi-tensor or fused kernel over the
  per-parameter loop (``default``: torch's own choice for the device).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

OPTIMIZER_IMPLS = ("default", "foreach", "fused")
# Distinct graphs one compiled layer may need: weight/architecture steps (gate in the scaling or
# on lora_A), train/eval, before/after discretization, a few padded lengths with bucketing.
RECOMPILE_LIMIT = 64


def adamw_options(impl: str) -> dict[str, Any]:
    """Keyword arguments of ``torch.optim.AdamW`` for ``train.optimizer``."""
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"train.optimizer={impl!r}: choose one of {list(OPTIMIZER_IMPLS)}.")
    return {} if impl == "default" else {impl: True}


def layer_modules(model: nn.Module, layer_pattern: str) -> list[nn.Module]:
    """The backbone's layer modules: the ones ``layer_pattern`` (minus its trailing dot) names.

    Works on the bare transformers model and inside a peft wrapper (any name prefix).
    """
    stem = layer_pattern[:-2] if layer_pattern.endswith(r"\.") else layer_pattern
    regex = re.compile(r"(?:.*\.)?" + stem)
    return [module for name, module in model.named_modules() if regex.fullmatch(name)]


def compile_layers(
    model: nn.Module, layer_pattern: str, backend: str = "inductor", mode: str | None = None
) -> int:
    """Compiles each layer of ``model`` in place (regional compilation); returns how many.

    Each run compiles as if it were alone in its process: dynamo's caches are cleared first. All
    layers of a family share one ``forward`` code object, so the code an earlier run in the same
    process compiled for it (a Hydra sweep's earlier job, in-process) would be guarded against
    this run's shapes, fail, and make dynamo recompile for dynamic shapes: slower to compile
    (a tiny model's 16 steps took twice as long) and not the code a lone run gets.

    Args:
        model: The backbone, bare or wrapped by peft.
        layer_pattern: ``backbone.layer_pattern``.
        backend: ``torch.compile`` backend (``train.compile_backend``); ``aot_eager`` traces
            and differentiates the graph without generating code (quick checks).
        mode: ``torch.compile`` mode (``train.compile_mode``), e.g. ``reduce-overhead`` for
            CUDA graphs on a GPU; None for the default.

    Raises:
        ValueError: ``backbone.layer_pattern`` names no module.
    """
    layers = layer_modules(model, layer_pattern)
    if not layers:
        raise ValueError(
            f"train.compile=true: backbone.layer_pattern={layer_pattern!r} names no module of "
            "this backbone; fix the pattern or set train.compile=false."
        )
    torch._dynamo.reset()
    config = torch._dynamo.config
    # torch < 2.7 calls the recompile limit cache_size_limit.
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for layer in layers:
        layer.compile(backend=backend, mode=mode)
    log.info("train.compile: %d layers compiled (%s, mode %s)", len(layers), backend, mode)
    return len(layers)
