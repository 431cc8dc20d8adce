"""``search=budget_penalty`` (ours): the paper's gates plus a pull towards the budget.

``search.weight * (mean gate - share)^2`` is added to the architecture loss, the mean weighted
by each module's size in the budget's unit and ``share`` the budget's target over all candidates
(the budget itself under ``budget_unit=modules``). Without it the gates drift towards 1 together
(the search loss prefers more adaptation) and the cut removes adapters still in use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffora_lab.searches.registry import SearchVariant, register_search


@register_search
class BudgetPenalty(SearchVariant):
    name = "budget_penalty"
    preset = "budget_penalty"
    relaxation = "sigmoid"
    budget_dependent = True

    @classmethod
    def validate(cls, options, settings) -> None:
        weight = options.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(
                f"search.weight={weight!r}: the budget penalty's weight must be a number >= 0 "
                "(0 is the paper's search)."
            )

    def penalty(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        weight = float(self.options.get("weight", 1.0))
        if weight <= 0:
            return None
        sizes = torch.tensor(self.budget.sizes, dtype=torch.float32)
        share = self.budget.share

        def term(gates: torch.Tensor) -> torch.Tensor:
            size = sizes.to(gates.device).view(gates.shape)
            mean = (gates * size).sum() / size.sum()
            return weight * (mean - share) ** 2

        return term
