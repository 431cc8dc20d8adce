"""``search=progressive_random`` (a control, not a method): the default search with the order of
removal drawn at random.

Everything the default search does happens here too: the gated adapters of every candidate train
during the search (weight sharing), the architecture steps update the gates, modules leave on
the same cubic schedule towards the same budget, the kept adapters go on from their search-phase
weights. Only *which* modules leave differs: a fixed random order (seeded by
``search.order_seed``, the run's seed by default) instead of the gates. DiffoRA against this
variant measures what the gates' choice is worth; ``method=random_mask`` against it measures what
the search phase's training of all adapters is worth (BENCHMARKS.md, "Decoder study").
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from diffora_lab.budget import random_scores
from diffora_lab.dam import DAM
from diffora_lab.searches.progressive import Progressive
from diffora_lab.searches.registry import register_search


@register_search
class ProgressiveRandom(Progressive):
    name = "progressive_random"
    preset = "random_order"

    @classmethod
    def validate(cls, options: DictConfig, settings: Any) -> None:
        super().validate(options, settings)
        seed = options.get("order_seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(
                f"search.order_seed={seed!r}: the seed of the random removal order, an "
                "integer >= 0 (default: the run's seed)."
            )

    def scores(self, dam: DAM, gates: torch.Tensor | float) -> torch.Tensor:
        """One fixed random score per module (the same at every call and after a resume: it
        depends on the seed only; the random mask's draw); the gates are not read."""
        return random_scores(dam.shape, int(self.options["order_seed"]))
