"""The Differential Adaptation Matrix (DAM): gates, their relaxation, and the discrete mask.

METHOD.md, "Objects" and "Phase 2": one learnable logit theta per candidate module, arranged as
layers x module types; relaxed gates gamma = sigmoid(theta / tau) (or a row softmax); at the end of
the search the gates become a binary, frozen mask under the budget (``budget.py`` owns which
modules a budget keeps).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from diffora_lab.budget import UNITS, Budget, in_modules, keep_in_order, num_kept

__all__ = ["DAM", "Mask", "budget_sigmoid", "cubic_count", "gate_entropy", "num_kept"]

RELAXATIONS = ("sigmoid", "softmax_row", "topk")


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest scores; ties go to the earlier module (row-major order).

    The budget rule (:func:`~diffora_lab.budget.keep_in_order`) with one unit per module.
    """
    return keep_in_order(scores, [1] * scores.numel(), float(k))


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy (nats) of the gates: high while undecided, 0 once saturated.

    A 0-dim tensor on the gates' device (reading it as a float waits for the GPU).
    """
    g = gates.detach().float().clamp(1e-6, 1 - 1e-6)
    return -(g * g.log() + (1 - g) * (1 - g).log()).mean()


def budget_sigmoid(
    scaled: torch.Tensor, k: float, active: torch.Tensor | None = None, rounds: int = 4
) -> torch.Tensor:
    """Sigmoid gates shifted by one threshold so that they sum to ``k`` (a soft top-k).

    gamma_i = sigmoid(x_i - mu) with mu chosen so that sum(gamma) = k: the relaxation meets the
    budget by construction, so the gates compete (raising one lowers the others) instead of all
    drifting towards 1 together. mu is located without autograd by ``rounds`` refinements of a
    64-point grid, all on the tensors' device (no host sync); one Newton step through autograd
    then gives it the implicit gradient d mu / d x_i = g'_i / sum(g') and removes what is left of
    the grid's error.

    Args:
        scaled: Logits divided by the temperature, any shape.
        k: Target sum, 0 < k <= the number of active entries.
        active: Boolean mask of the entries that take part (others get gate 0); all by default.
        rounds: Grid refinements (4 resolve mu to ~1e-5 of the logits' range before Newton).
    """
    flat = scaled.flatten()
    on = torch.ones_like(flat, dtype=torch.bool) if active is None else active.flatten()
    with torch.no_grad():
        x = flat.detach().double()
        lo = torch.where(on, x, torch.full_like(x, float("inf"))).min() - 20.0
        hi = torch.where(on, x, torch.full_like(x, float("-inf"))).max() + 20.0
        points = torch.linspace(0.0, 1.0, 64, dtype=x.dtype, device=x.device)
        for _ in range(rounds):
            mus = lo + (hi - lo) * points  # increasing: sums decrease along the grid
            sums = (torch.sigmoid(x[None, :] - mus[:, None]) * on).sum(dim=1)
            # The last grid point whose sum is still >= k brackets the threshold from below.
            below = (sums >= k).sum().clamp(1, 63) - 1
            lo, hi = mus[below], mus[below + 1]
        mu0 = (0.5 * (lo + hi)).to(flat.dtype)
    gates0 = torch.sigmoid(flat - mu0) * on
    slope = (gates0 * (1 - gates0)).sum().detach().clamp_min(1e-12)
    mu = mu0 + (gates0.sum() - k) / slope  # the implicit threshold's value and gradient
    return (torch.sigmoid(flat - mu) * on).view_as(scaled)


def cubic_count(step: int, n: float, k: float, start: int, end: int) -> float:
    """The count still active at ``step`` under progressive discretization.

    AdaLoRA's cubic budget schedule: all n until ``start``, then k + floor((n - k) (1 - t)^3)
    with t the progress from ``start`` to ``end``, then k. n and k are in the budget's unit
    (modules, or adapter parameters). The count only falls, quickly at first, so late cuts
    remove modules whose gates have already decayed.
    """
    if step <= start:
        return n
    if step >= end:
        return k
    progress = (step - start) / max(1, end - start)
    return k + math.floor((n - k) * (1.0 - progress) ** 3)


class DAM(nn.Module):
    """Learnable gate logits over a layers x module-types grid.

    The logits are a registered ``nn.Parameter``: they are in the state dict, move with
    ``.to()``, and DDP reduces their gradients like any other parameter.

    Args:
        layers: Number of transformer layers (rows).
        module_types: Module type names (columns), in config order.
        relaxation: ``"sigmoid"`` (independent gates, one global ranking), ``"softmax_row"``
            (the types of a layer compete) or ``"topk"`` (sigmoid gates whose sum is held at
            ``k`` by a shared threshold: :func:`budget_sigmoid`).
        init: Initial logit value for every entry.
        k: Modules the discretization is expected to keep (the target sum of ``topk`` gates;
            the budget's expected count, budget.py).

    The buffer ``active`` marks modules not yet removed by progressive discretization
    (:meth:`restrict`, :meth:`prune_to`); removed modules have gate 0 from then on.
    """

    def __init__(
        self,
        layers: int,
        module_types: list[str],
        relaxation: str = "sigmoid",
        init: float = 0.0,
        k: float | None = None,
    ) -> None:
        super().__init__()
        if relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation={relaxation!r} must be one of {RELAXATIONS}.")
        self.module_types = list(module_types)
        self.relaxation = relaxation
        self.logits = nn.Parameter(torch.full((layers, len(module_types)), float(init)))
        self.k = layers * len(module_types) if k is None else float(k)
        # In the state dict (so a resumed search knows what was pruned), not trained.
        self.register_buffer("active", torch.ones(layers, len(module_types), dtype=torch.bool))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.logits.shape)

    def gates(self, tau: float = 1.0) -> torch.Tensor:
        """Relaxed gates gamma in [0, 1], shape (layers, types); 0 for pruned modules."""
        scaled = self.logits / tau
        if self.relaxation == "sigmoid":
            gates = torch.sigmoid(scaled)
        elif self.relaxation == "topk":
            # Pruned entries are out of the competition: the k are shared by the rest.
            gates = budget_sigmoid(scaled, self.k, self.active)
        else:
            # Pruned types leave the row's softmax; a row with none left is all zero.
            scaled = scaled.masked_fill(~self.active, float("-inf"))
            gates = torch.nan_to_num(torch.softmax(scaled, dim=-1), nan=0.0)
        return gates * self.active

    @property
    def num_active(self) -> int:
        return int(self.active.sum())

    @torch.no_grad()
    def prune_to(self, count: int, tau: float = 1.0) -> list[int]:
        """Progressive discretization: keeps the ``count`` largest gates active, drops the rest.

        Ties go to the earlier module, as in :func:`top_k_mask`. Returns the flat indices of the
        modules removed by this call (none when ``count`` >= the active count).
        """
        if count >= self.num_active:
            return []
        gates = self.gates(tau).detach().flatten().float().cpu()
        keep = keep_in_order(gates, [1] * gates.numel(), float(count), self.active.flatten())
        return self.restrict(keep)

    @torch.no_grad()
    def restrict(self, keep: torch.Tensor) -> list[int]:
        """Removes every active module outside ``keep`` (any shape, one flag per module).

        Returns the flat indices of the modules removed by this call; removed modules never
        come back (``keep`` is intersected with the active set).
        """
        active = self.active.flatten().cpu()
        keep = keep.flatten().cpu().bool() & active
        removed = (active & ~keep).nonzero().flatten().tolist()
        if removed:
            self.active.copy_(keep.view(self.active.shape).to(self.active.device))
        return removed


# The keys a mask.json must have (the rest default; masks written before the budget unit existed
# are in modules).
MASK_FIELDS = ("modules", "gates", "kept", "budget", "k", "step", "shape", "module_types")


@dataclass
class Mask:
    """The discrete DAM: which candidate modules keep their adapter (written as ``mask.json``).

    Attributes:
        modules: Full paths of all candidate modules, row-major over (layer, type).
        gates: Gate values the mask was taken from (same order).
        kept: One flag per module.
        budget: The selection ratio rho.
        k: Number of kept modules.
        step: Training step at which the mask was frozen.
        shape: (layers, module types) of the DAM.
        module_types: Column names of the DAM.
        backbone: Backbone name, so a mask is not applied to another model by mistake.
        source: ``search``, ``random``, ``all``, ``fixed`` or ``file``.
        unit: The budget's unit (``params`` or ``modules``, budget.py).
        target: The budget's target count in ``unit`` (None: not recorded).
        sizes: Each module's cost in ``unit`` (adapter parameters at the search's rank; None: not
            recorded), so that what ``kept`` holds can be checked against ``target``.
    """

    modules: list[str]
    gates: list[float]
    kept: list[bool]
    budget: float
    k: int
    step: int
    shape: tuple[int, int]
    module_types: list[str]
    backbone: str = ""
    source: str = "search"
    extra: dict = field(default_factory=dict)
    unit: str = "modules"
    target: float | None = None
    sizes: list[int] | None = None

    @property
    def kept_modules(self) -> list[str]:
        return [m for m, keep in zip(self.modules, self.kept) if keep]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(self.kept, dtype=torch.bool).view(self.shape)

    def counts_by_type(self) -> dict[str, int]:
        grid = self.as_tensor()
        return {t: int(grid[:, j].sum()) for j, t in enumerate(self.module_types)}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = asdict(self)
        payload["shape"] = list(self.shape)
        payload["kept_modules"] = self.kept_modules
        path.write_text(json.dumps(payload, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        path = Path(path)
        where = f"dam.mask_path={str(path)!r}"
        if not path.is_file():
            raise ValueError(f"{where} does not exist.")
        fix = "point it at a run's dam/mask.json."
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{where} is not a mask.json (empty or not JSON: {error}); {fix}"
            ) from None
        missing = [name for name in MASK_FIELDS if not isinstance(data, dict) or name not in data]
        if missing:
            raise ValueError(f"{where} is not a mask.json (missing {missing}); {fix}")
        data.pop("kept_modules", None)
        data["shape"] = tuple(data["shape"])
        known = {f.name for f in fields(cls)}
        mask = cls(**{key: value for key, value in data.items() if key in known})
        mask.check(where)
        return mask

    def check(self, where: str) -> None:
        """Entries agree with each other and keep at least one module.

        Raises:
            ValueError: Naming ``where`` (the setting the mask came from).
        """
        n = len(self.modules)
        rows, cols = self.shape if len(self.shape) == 2 else (0, 0)
        counts = {"modules": n, "gates": len(self.gates), "kept": len(self.kept)}
        if len(set(counts.values())) != 1 or rows * cols != n:
            raise ValueError(
                f"{where}: the mask's entries disagree ({counts}, shape {list(self.shape)}); "
                "use an unedited dam/mask.json."
            )
        if self.unit not in UNITS:
            raise ValueError(f"{where}: unknown budget unit {self.unit!r}; use one of {UNITS}.")
        kept = sum(bool(flag) for flag in self.kept)
        if kept == 0:
            raise ValueError(f"{where} keeps no module; use a mask with at least one kept.")
        if kept != self.k:
            raise ValueError(
                f"{where}: k={self.k} but {kept} modules are kept; use an unedited dam/mask.json."
            )

    @classmethod
    def from_scores(
        cls,
        scores: torch.Tensor,
        modules: list[str],
        module_types: list[str],
        budget: Budget | float,
        step: int,
        backbone: str = "",
        source: str = "search",
    ) -> Mask:
        """Keeps what ``budget`` keeps of the modules in score order (:func:`keep_in_order`).

        A float ``budget`` is the paper's: k = max(1, round(budget * n)) modules.
        """
        if not isinstance(budget, Budget):
            budget = in_modules(float(budget), scores.numel())
        return cls.of(
            budget.keep(scores), scores, modules, module_types, budget, step, backbone, source
        )

    @classmethod
    def of(
        cls,
        kept: torch.Tensor,
        scores: torch.Tensor,
        modules: list[str],
        module_types: list[str],
        budget: Budget,
        step: int,
        backbone: str = "",
        source: str = "search",
    ) -> Mask:
        """The mask keeping ``kept`` (one flag per module), recorded with its budget."""
        flags = [bool(k) for k in kept.flatten().tolist()]
        return cls(
            modules=list(modules),
            gates=[float(g) for g in scores.detach().flatten().cpu()],
            kept=flags,
            budget=float(budget.fraction),
            k=sum(flags),
            step=int(step),
            shape=tuple(scores.shape),
            module_types=list(module_types),
            backbone=backbone,
            source=source,
            unit=budget.unit,
            target=float(budget.target),
            sizes=[int(size) for size in budget.sizes],
        )
