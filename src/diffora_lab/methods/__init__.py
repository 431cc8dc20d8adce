"""Methods (``method=``): one class per method, one file each, found by name in one table.

All methods share the harness (data, schedule, step budget, logging, ``results.json``); each file
here says what its method trains and everything the harness asks of it (the protocol is
:class:`~diffora_lab.methods.registry.Method`):

- ``diffora``: LoRA on every candidate, gated by a DAM that is searched, then discretized
  (``dam.mask_path=FILE``: LoRA on a saved mask's modules, no search);
- ``lora``: LoRA on every candidate, no gates; ``random_mask``: LoRA on a seeded random choice
  of candidates under DiffoRA's budget and rank; ``lora_qv`` / ``lora_attn`` / ``lora_mlp``: LoRA
  on a fixed group of module types at the rank that matches the budget;
- ``adalora``: peft's AdaLoRA on every candidate;
- ``full``: every parameter trains; ``bitfit``: biases and the head train.

A new method is a new file here with a ``@register_method`` class (and a
``conf/method/<name>.yaml``); every module in this folder is imported, so nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from omegaconf import DictConfig
from torch import nn

from diffora_lab.backbones import Candidate
from diffora_lab.methods.diffora import check_mask_fits
from diffora_lab.methods.registry import (
    Built,
    Method,
    get_method,
    method_for,
    method_names,
    register_method,
)

__all__ = [
    "Built",
    "Method",
    "build",
    "check_mask_fits",
    "get_method",
    "method_for",
    "method_names",
    "register_method",
    "resolve_rank",
]

# Every module in this folder registers its method on import: a new file is a new method.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build(
    cfg: DictConfig,
    backbone: nn.Module,
    candidates: list[Candidate],
    method: Method | None = None,
) -> Built:
    """Applies the configured method (or ``method``, an instance of it) to a fresh backbone."""
    return (method or method_for(cfg)).build(cfg, backbone, candidates)


def resolve_rank(cfg: DictConfig, candidates: Sequence[Candidate]) -> int:
    """The rank this run uses (``Method.run_rank``): ``cfg.rank``, the method's matched rank
    under ``match=lora_rN``, or (fixed-choice baselines) the rank that matches the budget.

    Raises:
        ValueError: A bad ``match.target_rank`` or ``budget``, or an unknown method.
    """
    return method_for(cfg).run_rank(cfg, candidates)
