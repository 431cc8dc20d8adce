"""Search variants (``search=``): one class per variant, one file each, found by name.

``registry.py`` holds the protocol (:class:`SearchVariant`: what a variant declares and the
hooks it owns) and the table. A new variant is a new file here with a ``@register_search``
class and a ``conf/search/<name>.yaml``; every module in this folder is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, open_dict

from diffora_lab.budget import Budget
from diffora_lab.searches.registry import (
    SearchVariant,
    get_search,
    register_search,
    search_for,
    search_names,
    search_options,
)

__all__ = [
    "SearchVariant",
    "build",
    "for_run",
    "get_search",
    "register_search",
    "search_for",
    "search_names",
    "search_options",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build(cfg: DictConfig, settings, budget: Budget, sweep: Sequence[Budget] = ()) -> SearchVariant:
    """The run's search variant, bound to its settings, budget and sweep."""
    return search_for(cfg)(search_options(cfg), settings, budget, sweep)


def for_run(
    cfg: DictConfig, settings, budget_of: Callable[[DictConfig], Budget]
) -> SearchVariant | None:
    """The run's variant (None without a search), with its sweep's budgets.

    Args:
        cfg: The run config (``dam.sweep_budgets`` resolved).
        settings: The shared search settings.
        budget_of: The method's budget for a config (``Method.budget`` over the candidates).
    """
    if not settings.enabled:
        return None
    sweep = []
    for fraction in cfg.dam.get("sweep_budgets") or []:
        other = cfg.copy()
        with open_dict(other):
            other.budget = float(fraction)
        sweep.append(budget_of(other))
    return build(cfg, settings, budget_of(cfg), sweep)
