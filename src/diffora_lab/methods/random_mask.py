"""``method=random_mask``: DiffoRA's budget and rank on candidates drawn at random (seeded).

The control for the search: if a random choice of modules does as well, the search did not
matter. The candidates are drawn in a random order and kept by the budget rule (budget.py) until
the budget's count, exactly as the search's cut keeps them in gate order; its rank is matched
like DiffoRA's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import DictConfig
from torch import nn

from diffora_lab import budget as budgets
from diffora_lab.adapters import apply_mask
from diffora_lab.backbones import Candidate
from diffora_lab.budget import Budget
from diffora_lab.dam import Mask
from diffora_lab.matching import masked_rank, params_rank
from diffora_lab.methods.lora import Lora, layer_grid
from diffora_lab.methods.registry import Built, register_method

log = logging.getLogger(__name__)


def random_mask(
    candidates: list[Candidate],
    module_types: list[str],
    budget: Budget | float,
    seed: int,
    backbone: str,
) -> Mask:
    """Candidates in a seeded random order, kept by the budget rule (a float: k of n modules)."""
    return Mask.from_scores(
        budgets.random_scores(layer_grid(candidates, module_types), seed),
        [c.name for c in candidates],
        module_types,
        budget,
        step=0,
        backbone=backbone,
        source="random",
    )


class MaskedLora(Lora):
    """LoRA on the candidates a budget keeps; the rank is matched on the budget's unit."""

    uses_budget = True

    def run_rank(self, cfg: DictConfig, candidates: Sequence[Candidate]) -> int:
        target_rank = budgets.target_rank_of(cfg)
        unit = budgets.check_unit(str(cfg.get("budget_unit") or "params"))
        if target_rank is None or unit == "modules":
            return super().run_rank(cfg, candidates)
        rank = params_rank(float(cfg.budget), target_rank)
        largest = max(c.lora_params(rank) for c in candidates)
        log.info(
            "match: %s budget %.3g at rank %d keeps LoRA r=%d's %d adapter params on all "
            "candidates, within half the largest module (%d)",
            self.name,
            float(cfg.budget),
            rank,
            target_rank,
            sum(c.lora_params(target_rank) for c in candidates),
            largest // 2,
        )
        return rank

    def matched_rank(
        self,
        rank: int,
        target_rank: int,
        candidates: Sequence[Candidate],
        budget: float,
        tolerance: float,
    ) -> int:
        return masked_rank(self.name, candidates, budget, target_rank, tolerance)

    def budget(self, cfg: DictConfig, candidates: Sequence[Candidate]) -> Budget:
        return budgets.for_run(cfg, candidates)


@register_method
class RandomMask(MaskedLora):
    """``method=random_mask``: a seeded random choice of candidates keeps its adapters."""

    name = "random_mask"

    def build(self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
        model = self.attach(cfg, backbone, candidates)
        mask = random_mask(
            candidates,
            list(cfg.backbone.module_types),
            self.budget(cfg, candidates),
            int(cfg.seed),
            cfg.backbone.name,
        )
        apply_mask(model, candidates, mask.kept)
        return Built(model, None, mask)
