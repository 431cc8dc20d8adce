"""The Differential Adaptation Matrix (DAM): gates, their relaxation, and the discrete mask.

METHOD.md, "Objects" and "Phase 2": one learnable logit theta per candidate module, arranged as
layers x module types; relaxed gates gamma = sigmoid(theta / tau) (or a row softmax); at the end of
the search the top-k gates become a binary, frozen mask.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

RELAXATIONS = ("sigmoid", "softmax_row")


def num_kept(budget: float, n: int) -> int:
    """k = max(1, round(budget * n)), rounding halves up (so 0.5 * 5 keeps 3)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget} must be in (0, 1]: the fraction of modules kept.")
    return max(1, min(n, math.floor(budget * n + 0.5)))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest scores; ties go to the earlier module (row-major order)."""
    flat = scores.detach().flatten().float().cpu()
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(scores.shape)


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy (nats) of the gates: high while undecided, 0 once saturated.

    A 0-dim tensor on the gates' device (reading it as a float waits for the GPU).
    """
    g = gates.detach().float().clamp(1e-6, 1 - 1e-6)
    return -(g * g.log() + (1 - g) * (1 - g).log()).mean()


class DAM(nn.Module):
    """Learnable gate logits over a layers x module-types grid.

    The logits are a registered ``nn.Parameter``: they are in the state dict, move with
    ``.to()``, and DDP reduces their gradients like any other parameter.

    Args:
        layers: Number of transformer layers (rows).
        module_types: Module type names (columns), in config order.
        relaxation: ``"sigmoid"`` (independent gates, one global ranking) or ``"softmax_row"``
            (the types of a layer compete).
        init: Initial logit value for every entry.
    """

    def __init__(
        self,
        layers: int,
        module_types: list[str],
        relaxation: str = "sigmoid",
        init: float = 0.0,
    ) -> None:
        super().__init__()
        if relaxation not in RELAXATIONS:
            raise ValueError(f"dam.relaxation={relaxation!r} must be one of {RELAXATIONS}.")
        self.module_types = list(module_types)
        self.relaxation = relaxation
        self.logits = nn.Parameter(torch.full((layers, len(module_types)), float(init)))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.logits.shape)

    def gates(self, tau: float = 1.0) -> torch.Tensor:
        """Relaxed gates gamma in [0, 1], shape (layers, types)."""
        scaled = self.logits / tau
        if self.relaxation == "sigmoid":
            return torch.sigmoid(scaled)
        return torch.softmax(scaled, dim=-1)


# The keys a mask.json must have (the rest default).
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
        source: ``search``, ``random``, ``all`` or ``file``.
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
        budget: float,
        step: int,
        backbone: str = "",
        source: str = "search",
    ) -> Mask:
        """Keeps the top ``k = max(1, round(budget * n))`` modules by score."""
        k = num_kept(budget, scores.numel())
        kept = top_k_mask(scores, k).flatten().tolist()
        return cls(
            modules=list(modules),
            gates=[float(g) for g in scores.detach().flatten().cpu()],
            kept=kept,
            budget=float(budget),
            k=k,
            step=int(step),
            shape=tuple(scores.shape),
            module_types=list(module_types),
            backbone=backbone,
            source=source,
        )
