"""The budget: how much of the candidate modules a selecting method keeps, and which ones.

METHOD.md, "Budgets and fair comparison". ``budget`` (rho) is a fraction; ``budget_unit`` says of
what:

- ``params`` (the default): of the LoRA adapter parameters of all n candidates at the run's rank,
  r * sum_i (d_in_i + d_out_i). Each module costs its own r (d_in + d_out), so the budget holds
  for any mix of sizes (FFN matrices 4x an attention projection; grouped-query attention, where
  k and v are smaller than q). Under ``match=lora_rN`` the target is LoRA rN's count on all
  candidates, exactly.
- ``modules``: the paper's count, k = max(1, round(rho * n)) modules whatever their size.

The rule (:func:`keep_in_order`) is the one place that decides which modules a budget keeps
given scores: the final cut of a search, every removal of the progressive search and the random
mask call it. Modules are taken in decreasing score order (ties: the earlier module, row-major
over (layer, type)); each is kept while the running total plus half of its own size does not
exceed the target, i.e. while keeping it brings the total at least as close to the target as
stopping there (a tie keeps it, as k rounds halves up); the first module that fails stops the
cut, so the kept set is a prefix of the order. The first module is always kept. The achieved
count therefore lies within half a module of the target: target - s_next / 2 < achieved <=
target + s_last / 2 (s_next the first module left out, s_last the last one kept), unless one
module alone is more than twice the target. With a size of 1 per module (the modules unit) the
rule keeps exactly k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from diffora_lab.backbones import Candidate

UNITS = ("params", "modules")


def num_kept(budget: float, n: int) -> int:
    """k = max(1, round(budget * n)), rounding halves up (so 0.5 * 5 keeps 3)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget} must be in (0, 1]: the fraction of modules kept.")
    return max(1, min(n, math.floor(budget * n + 0.5)))


def random_scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One seeded uniform score per module: a random order for the budget rule. The random
    mask and the random-order search draw it alike, so at one seed they keep the same modules."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def keep_in_order(
    scores: torch.Tensor,
    sizes: Sequence[float],
    target: float,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """The budget rule: modules in decreasing score order while each stays within the target.

    Args:
        scores: One score per module, any shape (flattened row-major).
        sizes: Each module's cost in the budget's unit, in the same (flattened) order.
        target: The count to reach, in that unit.
        eligible: Boolean mask of the modules that may be kept (default: all); the others are
            never kept (modules the progressive search has already removed).

    Returns:
        A boolean tensor of the scores' shape (on the CPU): the kept modules.
    """
    flat = scores.detach().flatten().float().cpu()
    if len(sizes) != flat.numel():
        raise ValueError(f"{flat.numel()} scores for {len(sizes)} module sizes")
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    if eligible is not None:
        allowed = eligible.detach().flatten().cpu().tolist()
        order = [i for i in order if allowed[i]]
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    total = 0.0
    for index in order:
        size = float(sizes[index])
        if total > 0 and 2 * total + size > 2 * target:  # its midpoint lies past the target
            break
        kept[index] = True
        total += size
    return kept.view(scores.shape)


@dataclass(frozen=True)
class Budget:
    """A run's budget resolved against its candidate modules.

    Attributes:
        unit: ``params`` or ``modules``.
        fraction: The configured ``budget`` (rho).
        target: The count to reach, in ``unit`` (adapter parameters, or modules).
        sizes: Each candidate's cost in ``unit``, in candidate order (row-major DAM order).
        params: Each candidate's adapter parameters at the run's rank (what is reported).
        tolerance: What "within one module" of the target allows (None: :attr:`largest`). A
            budget counted at another rank than the run's (a fixed choice's reference rank)
            measures it in a module at that rank: its own rank would make the tolerance grow and
            shrink with the rank it picked.
    """

    unit: str
    fraction: float
    target: float
    sizes: tuple[int, ...]
    params: tuple[int, ...]
    tolerance: int | None = None

    @property
    def total(self) -> int:
        """The count of all candidates together, in ``unit``."""
        return sum(self.sizes)

    @property
    def largest(self) -> int:
        """The largest module's cost in ``unit``: the cut's granularity, and "one module" unless
        the budget is counted at another rank (:attr:`one_module`)."""
        return max(self.sizes)

    @property
    def one_module(self) -> int:
        """The tolerance of "within one module": :attr:`tolerance`, else :attr:`largest`."""
        return self.largest if self.tolerance is None else self.tolerance

    @property
    def share(self) -> float:
        """target / total: the share of the candidates (by size) the budget keeps."""
        return self.target / self.total

    @property
    def expected_count(self) -> float:
        """Modules kept if each had the mean size: target / (total / n)."""
        return self.target * len(self.sizes) / self.total

    def keep(
        self,
        scores: torch.Tensor,
        target: float | None = None,
        eligible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:func:`keep_in_order` with this budget's sizes (and its target unless given)."""
        chosen = self.target if target is None else target
        return keep_in_order(scores, self.sizes, chosen, eligible)

    def count(self, kept: Sequence[bool] | torch.Tensor) -> int:
        """The count of the kept modules in ``unit``."""
        flags = kept.flatten().tolist() if isinstance(kept, torch.Tensor) else list(kept)
        return sum(size for size, keep in zip(self.sizes, flags) if keep)

    def summary(self, kept: Sequence[bool]) -> dict[str, Any]:
        """What ``results.json`` records under ``budget_count``: target against achieved."""
        achieved = self.count(kept)
        return {
            "unit": self.unit,
            "budget": self.fraction,
            "target": self.target,
            "achieved": achieved,
            "largest_module": self.largest,
            "tolerance": self.one_module,
            "within_one_module": abs(achieved - self.target) <= self.one_module,
            "achieved_params": sum(p for p, keep in zip(self.params, kept) if keep),
        }


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(
            f"budget_unit={unit!r}: choose one of {list(UNITS)} (params: a fraction of LoRA's "
            "adapter parameters on all candidates; modules: the paper's share of modules)."
        )
    return unit


def target_rank_of(cfg: DictConfig) -> int | None:
    """The configured reference rank (``match.target_rank``), or None without matching."""
    match = cfg.get("match")
    if match is None or match.get("target_rank") is None:
        return None
    return int(match.target_rank)


def for_run(
    cfg: DictConfig,
    candidates: Sequence[Candidate],
    reference_rank: int | None = None,
    unit: str | None = None,
) -> Budget:
    """The run's budget over its candidates, at its (resolved) rank ``cfg.rank``.

    Args:
        cfg: The run config (``budget``, ``budget_unit``, ``rank``, ``match``).
        candidates: All candidate modules.
        reference_rank: The rank at which ``budget=1`` means LoRA on all candidates (default:
            the run's rank; fixed-choice baselines give their own).
        unit: Overrides ``budget_unit``.

    Raises:
        ValueError: No candidates, a budget outside (0, 1] or an unknown unit.
    """
    if not candidates:
        raise ValueError("a budget needs at least one candidate module.")
    unit = check_unit(str(unit or cfg.get("budget_unit") or "params"))
    fraction = float(cfg.budget)
    n = len(candidates)
    rank = int(cfg.rank)
    params = tuple(c.lora_params(rank) for c in candidates)
    if unit == "modules":
        return Budget(unit, fraction, float(num_kept(fraction, n)), (1,) * n, params)
    num_kept(fraction, n)  # the range check, with its message
    matched = target_rank_of(cfg)
    if matched is not None:
        target = sum(c.lora_params(matched) for c in candidates)
    else:
        reference = rank if reference_rank is None else int(reference_rank)
        target = fraction * sum(c.lora_params(reference) for c in candidates)
    tolerance = None
    if reference_rank is not None:  # a fixed choice: one module at the rank the target is at
        counted_at = int(reference_rank) if matched is None else matched
        tolerance = max(c.lora_params(counted_at) for c in candidates)
    return Budget(unit, fraction, float(target), params, params, tolerance)


def in_modules(fraction: float, n: int) -> Budget:
    """The paper's budget over ``n`` modules of unknown size: keeps k = round(fraction * n)."""
    return Budget("modules", float(fraction), float(num_kept(fraction, n)), (1,) * n, (0,) * n)
