"""``search=progressive`` (ours, the default): modules leave during the search.

The count still active (in the budget's unit: adapter parameters or modules) follows AdaLoRA's
cubic schedule (:func:`diffora_lab.dam.cubic_count`): everything until ``search.prune_start``
(default: the end of the gate warm-up), then falling to the budget's target at
``search.prune_end`` (a share of the search). Whenever the schedule falls below what is active,
the budget rule (budget.py) keeps the active modules in gate order up to the scheduled count and
the rest leave (gate 0 from then on). The cut at the end applies the same rule at the target, so
it keeps exactly the active set: it removes nothing the model still uses.

A budget sweep (``dam.sweep_budgets``, or a Hydra multirun over ``budget``) shares one search:
the schedule falls to the sweep's smallest target, and the run of a larger budget ends its
search at the first step where the schedule has passed its target (pruned to exactly that
target). Removing towards a larger target and then a smaller one keeps what removing towards the
smaller one keeps (the rule keeps a prefix of the gate order), so the search of the smallest
budget is the one it would make alone, and every larger budget's state lies on its way: the
search cache keeps one snapshot per budget (:meth:`Progressive.snapshot_budgets`).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from diffora_lab.budget import Budget
from diffora_lab.dam import DAM, cubic_count
from diffora_lab.searches.registry import SearchVariant, register_search


@register_search
class Progressive(SearchVariant):
    name = "progressive"
    preset = "default"
    relaxation = "sigmoid"
    budget_dependent = True

    def __init__(self, options, settings, budget: Budget, sweep=()) -> None:
        super().__init__(options, settings, budget, sweep)
        start = self.options.get("prune_start")
        self.start = int(settings.warmup_steps if start is None else start)
        share = float(self.options.get("prune_end", 0.75))
        self.end = max(self.start + 1, round(share * int(settings.steps)))
        # The schedule ends at the smallest target of the sweep (this run's alone: its own).
        self.floor = min((budget, *self.sweep), key=lambda b: b.target)
        self._smallest = min(budget.sizes)
        self._active_total: float | None = None  # host copy: no device read to rule out a cut
        self._applied: float | None = None  # the last target the rule cut the active set to

    @classmethod
    def validate(cls, options: DictConfig, settings: Any) -> None:
        end = options.get("prune_end")
        if isinstance(end, bool) or not isinstance(end, (int, float)) or not 0.0 < end <= 1.0:
            raise ValueError(
                f"search.prune_end={end!r}: the share of the search after which only the "
                "budget's modules remain: (0, 1]."
            )
        start = options.get("prune_start")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
            raise ValueError(f"search.prune_start={start!r}: a step (>= 0), or null.")
        warmup = int(settings.warmup_steps)
        if start is not None and not warmup <= start < int(settings.steps):
            # Before the gate warm-up ends the gate gradients are 0 (B = 0): removal would keep
            # the first modules by index; at or after the search's end nothing would be removed.
            raise ValueError(
                f"search.prune_start={start!r}: removal must start after the gate warm-up and "
                f"within the {settings.steps}-step search; use {warmup} <= search.prune_start < "
                f"{settings.steps} (null: at the warm-up's end)."
            )

    @classmethod
    def key_budget(cls, cfg: DictConfig) -> dict[str, Any]:
        budgets = [float(cfg.budget), *(float(b) for b in cfg.dam.get("sweep_budgets") or [])]
        return {"unit": str(cfg.get("budget_unit") or "params"), "budget": min(budgets)}

    # ------------------------------------------------------------------ the schedule

    def scheduled(self, step: int) -> float:
        """The count the schedule leaves active after ``step`` (in the budget's unit)."""
        return cubic_count(step, self.budget.total, self.floor.target, self.start, self.end)

    def cut_step_of(self, budget: Budget) -> int:
        """Where the search of ``budget`` ends: the search's end for the sweep's smallest
        budget, else the first step at which the schedule has passed its target."""
        if budget.target <= self.floor.target:
            return int(self.settings.steps)
        for step in range(self.start + 1, self.end + 1):
            if self.scheduled(step) <= budget.target:
                return step
        return self.end

    @property
    def cut_step(self) -> int:
        return self.cut_step_of(self.budget)

    def snapshot_budgets(self, step: int) -> list[Budget | None]:
        passing = {}
        for budget in (self.budget, *self.sweep):
            if budget.target >= self.budget.target and self.cut_step_of(budget) == step:
                passing[budget.target] = budget
        return [passing[t] for t in sorted(passing, reverse=True)]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "prune_start": self.start,
            "prune_end": self.end,
            "schedule_target": self.floor.target,
            "sweep_budgets": [b.fraction for b in self.sweep],
        }

    # ------------------------------------------------------------------ the hooks

    def scores(self, dam: DAM, gates: torch.Tensor | float) -> torch.Tensor:
        """What orders the modules for removal: the gates (at temperature ``gates`` when a
        float); the lowest leave first."""
        return dam.gates(gates).detach() if isinstance(gates, float) else gates

    def _prune(self, dam: DAM, target: float, gates: torch.Tensor | float) -> list[int]:
        """Cuts the active set to ``target`` by the rule, unless it was cut to it already.

        The rule runs only when the target falls below the last one applied: re-running it at
        the same target with gates in another order could remove more (the kept set is a
        prefix of the order), and the cut at the end must keep what is active.
        """
        if self._applied is not None and target >= self._applied:
            return []
        self._applied = float(target)
        if self._active_total is None:
            self._active_total = float(self.budget.count(dam.active.cpu()))
        # The rule removes something only if the active count exceeds the target by more than
        # half the removed module (budget.keep_in_order): otherwise skip reading the gates.
        if self._active_total - self._smallest / 2 <= target:
            return []
        keep = self.budget.keep(self.scores(dam, gates), target, eligible=dam.active)
        removed = dam.restrict(keep)
        self._active_total = float(self.budget.count(keep))
        return removed

    def restrict(self, dam: DAM, budget: Budget | None, tau: float) -> None:
        if budget is not None:
            self._prune(dam, budget.target, float(tau))

    def after_step(self, dam: DAM, step: int, tau: float) -> list[int]:
        return self._prune(dam, self.scheduled(step), float(tau))

    def catch_up(self, dam: DAM, step: int, tau: float) -> None:
        self._active_total = None  # the DAM may come from a checkpoint
        target = self.budget.target if step >= self.cut_step else self.scheduled(step)
        self._prune(dam, target, float(tau))

    def cut(self, dam: DAM, gates: torch.Tensor) -> torch.Tensor:
        # The active set, once at the target (a no-op unless the search ended before the
        # schedule did): the cut removes nothing still in use.
        self._prune(dam, self.budget.target, gates)
        return dam.active.detach().cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self._applied}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._applied = None if not state else state.get("applied")
        self._active_total = None
