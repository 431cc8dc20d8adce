"""``method=random_mask``: DiffoRA's k and rank on candidates drawn at random (seeded).

The control for the search: if a random choice of k modules does as well, the search did not
matter. Its rank is matched like DiffoRA's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from diffora_lab.adapters import apply_mask
from diffora_lab.backbones import Candidate
from diffora_lab.dam import Mask, num_kept
from diffora_lab.matching import masked_rank
from diffora_lab.methods.lora import Lora, layer_grid
from diffora_lab.methods.registry import Built, register_method


def random_mask(
    candidates: list[Candidate], module_types: list[str], budget: float, seed: int, backbone: str
) -> Mask:
    """k = max(1, round(budget * n)) candidates drawn uniformly at random (seeded)."""
    scores = torch.rand(len(candidates), generator=torch.Generator().manual_seed(seed))
    return Mask.from_scores(
        scores.view(layer_grid(candidates, module_types)),
        [c.name for c in candidates],
        module_types,
        budget,
        step=0,
        backbone=backbone,
        source="random",
    )


class MaskedLora(Lora):
    """LoRA on k of the n candidates: the rank is matched on the expected kept parameters."""

    uses_budget = True

    def matched_rank(
        self,
        rank: int,
        target_rank: int,
        candidates: Sequence[Candidate],
        budget: float,
        tolerance: float,
    ) -> int:
        return masked_rank(self.name, candidates, budget, target_rank, tolerance)


@register_method
class RandomMask(MaskedLora):
    """``method=random_mask``: a seeded random k-subset keeps its adapters."""

    name = "random_mask"

    def build(self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
        model = self.attach(cfg, backbone, candidates)
        num_kept(float(cfg.budget), len(candidates))
        mask = random_mask(
            candidates,
            list(cfg.backbone.module_types),
            float(cfg.budget),
            int(cfg.seed),
            cfg.backbone.name,
        )
        apply_mask(model, candidates, mask.kept)
        return Built(model, None, mask)
