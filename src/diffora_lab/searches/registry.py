"""The search-variant protocol and its registry: one class per ``search=``, registered by name.

A variant is everything that distinguishes one DAM search from another beyond the shared
settings (``dam.*``: length, split, temperature, gate optimizer, architecture gradient). It
declares, as class facts:

- ``relaxation``: how the gates are relaxed (:meth:`diffora_lab.dam.DAM.gates`);
- ``budget_dependent``: whether the state at the end of its search depends on the budget; the
  search cache key reads :meth:`SearchVariant.key_budget`, which follows from it;
- ``supports_ddp``: whether it runs with ``trainer.devices > 1``;
- ``preset``: how ``results.json`` names the method with it (``diffora_<preset>``; ``default``
  for the default search);

and owns its hooks, called by :class:`~diffora_lab.callbacks.Discretization` and the training
module: :meth:`~SearchVariant.after_step` (its in-search pruning), :meth:`~SearchVariant.catch_up`
(the same on a resumed state), :meth:`~SearchVariant.penalty` (a term of the architecture loss),
:meth:`~SearchVariant.cut` (the kept modules), :attr:`~SearchVariant.cut_step` and
:meth:`~SearchVariant.snapshot_budgets` (the states the search cache keeps),
:meth:`~SearchVariant.describe` (``results.json``'s ``search_variant``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf

from diffora_lab.budget import Budget
from diffora_lab.dam import DAM


class SearchVariant:
    """The paper's search: a cut at the end by the budget rule; subclass and register others.

    Args:
        options: The variant's own settings (the ``search:`` node, ``name`` included).
        settings: The shared search settings (:class:`~diffora_lab.config.SearchSettings`).
        budget: The run's budget over its candidates (budget.py).
        sweep: The budgets of the sweep this run belongs to (``dam.sweep_budgets``), if any.
    """

    name: ClassVar[str] = ""
    preset: ClassVar[str] = ""
    relaxation: ClassVar[str] = "sigmoid"
    budget_dependent: ClassVar[bool] = True
    supports_ddp: ClassVar[bool] = True

    def __init__(
        self,
        options: Mapping[str, Any],
        settings: Any,
        budget: Budget,
        sweep: Sequence[Budget] = (),
    ) -> None:
        self.options = dict(options)
        self.settings = settings
        self.budget = budget
        self.sweep = tuple(sweep)

    # ------------------------------------------------------------------ declarations

    @classmethod
    def validate(cls, options: DictConfig, settings: Any) -> None:
        """Checks the variant's own settings (``search.*``); raises ``ValueError`` with the fix."""

    @classmethod
    def key_budget(cls, cfg: DictConfig) -> dict[str, Any] | None:
        """What of the budget the end state of this search depends on (None: nothing).

        The search cache key (search_cache.py) holds this instead of the budget settings, so
        budget-free searches are shared by every budget of a sweep.
        """
        if not cls.budget_dependent:
            return None
        return {"unit": str(cfg.get("budget_unit") or "params"), "budget": float(cfg.budget)}

    @property
    def cut_step(self) -> int:
        """The step after which this run discretizes."""
        return int(self.settings.steps)

    @property
    def own_snapshot(self) -> Budget | None:
        """The budget of this run's own snapshot (None: a budget-free search, any budget)."""
        return self.budget if self.budget_dependent else None

    def snapshot_budgets(self, step: int) -> list[Budget | None]:
        """Budgets whose end-of-search state this run holds after ``step`` (None: any budget).

        The search cache keeps one snapshot per budget, written in this order, with
        :meth:`restrict` applied before each.
        """
        return [self.own_snapshot] if step == self.cut_step else []

    def describe(self) -> dict[str, Any]:
        """``results.json``'s ``search_variant``."""
        return {
            **self.options,
            "name": self.name,
            "relaxation": self.relaxation,
            "budget_dependent": self.budget_dependent,
            "cut_step": self.cut_step,
            "tau": [float(self.settings.tau_start), float(self.settings.tau_end)],
            "arch_grad": str(self.settings.arch_grad),
        }

    # ------------------------------------------------------------------ hooks

    def restrict(self, dam: DAM, budget: Budget | None, tau: float) -> None:
        """Brings the DAM to the state of ``budget``'s snapshot (nothing to do here)."""

    def after_step(self, dam: DAM, step: int, tau: float) -> list[int]:
        """Called after every search step; returns the flat indices of modules it removed."""
        return []

    def catch_up(self, dam: DAM, step: int, tau: float) -> None:
        """Applies to a resumed DAM what :meth:`after_step` had left to do at ``step``."""

    def penalty(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A term added to the architecture loss, as a function of the gates (None: none)."""
        return None

    def cut(self, dam: DAM, gates: torch.Tensor) -> torch.Tensor:
        """The kept modules at discretization: the budget rule on the final gates."""
        return self.budget.keep(gates)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the variant's own state (plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Takes :meth:`state_dict`'s value back (None: a checkpoint without it)."""


_REGISTRY: dict[str, type[SearchVariant]] = {}


def register_search(cls: type[SearchVariant]) -> type[SearchVariant]:
    """Class decorator: adds a :class:`SearchVariant` to the table under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name: set the class attribute `name`.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"search variant {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def search_names() -> list[str]:
    """The registered names, sorted (what ``search=`` accepts)."""
    return sorted(_REGISTRY)


def get_search(name: str) -> type[SearchVariant]:
    """The variant class registered under ``name``.

    Raises:
        ValueError: An unknown name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[str(name)]
    except KeyError:
        raise ValueError(
            f"search={name!r}: unknown search variant; choose one of {search_names()} "
            "(conf/search/*.yaml)."
        ) from None


def search_options(cfg: DictConfig) -> dict[str, Any]:
    """The run's ``search:`` node as a plain dict (empty when the config has none)."""
    node = cfg.get("search")
    if node is None:
        return {"name": "faithful"}
    return OmegaConf.to_container(node, resolve=True)


def search_for(cfg: DictConfig) -> type[SearchVariant]:
    """The class of the run's variant (``search.name``)."""
    return get_search(search_options(cfg)["name"])
