"""Fixed-choice baselines: LoRA on one group of module types, at the rank a budget affords.

``method=lora_qv`` (q and v: the original LoRA choice and peft's default), ``lora_attn`` (every
attention projection) and ``lora_mlp`` (every MLP matrix); each backbone family names its groups
(families.py: ``peft_default``, ``attention``, ``mlp``; peft's default is q, v, or the fused qkv).
They answer "does a search beat a choice anybody would make by hand?" at the same count: the
budget's target is ``budget`` of LoRA at ``method.reference_rank`` on all candidates (under
``match=lora_rN``: LoRA rN's count), and the rank is the one whose adapter on the group comes
closest to it (ties to the lower rank). Its budget is always in parameters; ``results.json``
records the target and the achieved count (``budget_count``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from diffora_lab import budget as budgets
from diffora_lab import families
from diffora_lab.adapters import apply_mask
from diffora_lab.backbones import Candidate
from diffora_lab.budget import Budget
from diffora_lab.dam import Mask
from diffora_lab.methods.lora import Lora, layer_grid
from diffora_lab.methods.registry import Built, register_method

log = logging.getLogger(__name__)


def closest_rank(target: float, size: int) -> int:
    """The rank r >= 1 whose r * ``size`` is closest to ``target`` (ties: the lower)."""
    ideal = target / size
    options = sorted({max(1, math.floor(ideal)), max(1, math.ceil(ideal))})
    return min(options, key=lambda r: (abs(r * size - target), r))


class FixedChoice(Lora):
    """LoRA on the candidates of one module group (``group``), its rank set by the budget."""

    group: ClassVar[str] = ""
    uses_budget = True

    def kept(self, cfg: DictConfig, candidates: Sequence[Candidate]) -> list[bool]:
        """One flag per candidate: whether its type is in the group."""
        setting = f"method={self.name}: backbone={cfg.backbone.name}: "
        family = families.family_for(str(cfg.backbone.get("family") or ""), setting=setting)
        try:
            types = families.group_types(family, self.group, list(cfg.backbone.module_types))
        except ValueError as error:
            raise ValueError(f"{setting}{error} Choose another fixed choice.") from None
        return [c.module_type in types for c in candidates]

    def budget(self, cfg: DictConfig, candidates: Sequence[Candidate]) -> Budget:
        reference = int(cfg.method.get("reference_rank") or 8)
        return budgets.for_run(cfg, candidates, reference_rank=reference, unit="params")

    def run_rank(self, cfg: DictConfig, candidates: Sequence[Candidate]) -> int:
        if not cfg.method.get("rank_from_budget", True):
            return int(cfg.rank)
        target = self.budget(cfg, candidates).target
        flags = self.kept(cfg, candidates)
        size = sum(c.d_in + c.d_out for c, keep in zip(candidates, flags) if keep)
        rank = closest_rank(target, size)
        log.info(
            "%s: rank %d on %d of %d candidates: %d adapter params for a target of %.0f",
            self.name,
            rank,
            sum(flags),
            len(candidates),
            rank * size,
            target,
        )
        return rank

    def build(self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
        model = self.attach(cfg, backbone, candidates)
        flags = self.kept(cfg, candidates)
        module_types = list(cfg.backbone.module_types)
        mask = Mask.of(
            torch.tensor(flags),
            torch.tensor(flags, dtype=torch.float32).view(layer_grid(candidates, module_types)),
            [c.name for c in candidates],
            module_types,
            self.budget(cfg, candidates),
            step=0,
            backbone=cfg.backbone.name,
            source="fixed",
        )
        apply_mask(model, candidates, mask.kept)
        return Built(model, None, mask)


@register_method
class LoraQV(FixedChoice):
    """``method=lora_qv``: LoRA on peft's default for the family (q and v; phi3: the fused qkv)."""

    name = "lora_qv"
    group = "peft_default"


@register_method
class LoraAttention(FixedChoice):
    """``method=lora_attn``: LoRA on every attention projection."""

    name = "lora_attn"
    group = "attention"


@register_method
class LoraMLP(FixedChoice):
    """``method=lora_mlp``: LoRA on every MLP (FFN) matrix."""

    name = "lora_mlp"
    group = "mlp"
