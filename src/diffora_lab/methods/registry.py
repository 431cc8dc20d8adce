"""The method protocol and its registry: one class per ``method=``, registered once under its name.

A method says what it trains and how it attaches to the backbone (:meth:`Method.build`), whether
it searches, how its rank is matched to a LoRA reference, what it adds to every weight step and to
checkpoints, what it reports and what it exports. Everything outside ``methods/`` asks the method
object (found by :func:`get_method` from ``method.name`` in ``conf/method/*.yaml``) and never
compares a method's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig
from torch import nn

from diffora_lab.backbones import Candidate
from diffora_lab.budget import Budget, target_rank_of
from diffora_lab.dam import DAM, Mask
from diffora_lab.export import export_adapter


@dataclass
class Built:
    """A method's model and the DAM objects that come with it."""

    model: nn.Module
    dam: DAM | None
    mask: Mask | None


class Method:
    """One fine-tuning method in the shared harness (subclass, set the class facts, register).

    Class attributes (facts the harness reads):
        name: The ``method.name`` that selects it.
        searches: Runs the DAM search, then the discretization (see :meth:`search_enabled`).
        adapts_candidates: Puts its adapters on the DAM's candidate modules (gates and masks
            apply to them).
        uses_budget: ``budget`` changes what it trains (which candidates, or its rank); its
            :meth:`budget` says how.
        exports_adapter: Its model is a peft model, written as an ``adapter/`` folder; a method
            without one is scored from its checkpoint.
    """

    name: ClassVar[str] = ""
    searches: ClassVar[bool] = False
    adapts_candidates: ClassVar[bool] = False
    uses_budget: ClassVar[bool] = False
    exports_adapter: ClassVar[bool] = False

    def validate(self, cfg: DictConfig) -> None:
        """Checks this method's own settings (``method.*``); raises ``ValueError`` with the fix.

        Runs before any weights load, so it must stay cheap.
        """

    def search_enabled(self, cfg: DictConfig) -> bool:
        """Whether this run searches (a saved mask, for instance, skips the search)."""
        return self.searches

    def matched_rank(
        self,
        rank: int,
        target_rank: int,
        candidates: Sequence[Candidate],
        budget: float,
        tolerance: float,
    ) -> int:
        """The rank under ``match=lora_rN`` (``target_rank`` = N); default: ``rank`` unused."""
        return rank

    def run_rank(self, cfg: DictConfig, candidates: Sequence[Candidate]) -> int:
        """The rank this run uses: ``rank``, or :meth:`matched_rank` under ``match=lora_rN``."""
        target_rank = target_rank_of(cfg)
        if target_rank is None:
            return int(cfg.rank)
        tolerance = float(cfg.match.get("tolerance", 0.05))
        return self.matched_rank(
            int(cfg.rank), target_rank, candidates, float(cfg.budget), tolerance
        )

    def budget(self, cfg: DictConfig, candidates: Sequence[Candidate]) -> Budget | None:
        """The run's budget over its candidates (budget.py), or None if it has none.

        Called once the rank is resolved (``cfg.rank`` is the run's rank).
        """
        return None

    def build(self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
        """Applies the method to a freshly loaded backbone: marks or adds what trains."""
        raise NotImplementedError

    def after_weight_step(self, model: nn.Module, step: int) -> None:
        """Runs after every weight-optimizer step, before ``zero_grad`` (gradients readable)."""

    def checkpoint_state(self, model: nn.Module) -> Any:
        """State outside the model's state dict that a resumed run needs (plain values)."""
        return None

    def load_checkpoint_state(self, state: Any) -> None:
        """Takes :meth:`checkpoint_state`'s value back; may defer its use to the next step."""

    def results(self, model: nn.Module, candidates: list[Candidate]) -> dict[str, Any]:
        """Entries this method adds to ``results.json``."""
        return {}

    def export(self, model: nn.Module, folder: Path, base_model: str | None = None) -> Path | None:
        """Writes what a user takes away (a peft adapter folder), or None.

        ``base_model`` is what the adapter config names as its base (see
        :func:`diffora_lab.backbones.model_reference`).
        """
        if not self.exports_adapter:
            return None
        return export_adapter(model, folder, base_model=base_model)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: adds a :class:`Method` to the table under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name: set the class attribute `name`.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """The registered names, sorted (what ``method=`` accepts)."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``.

    Raises:
        ValueError: An unknown name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[str(name)]
    except KeyError:
        raise ValueError(
            f"method={name!r}: unknown method; choose one of {method_names()} (conf/method/*.yaml)."
        ) from None


def method_for(cfg: DictConfig) -> Method:
    """A fresh instance of the run's method (``cfg.method.name``)."""
    return get_method(cfg.method.name)()
