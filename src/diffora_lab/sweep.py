"""The budgets of the sweep a run belongs to: one progressive search can serve all of them.

``dam.sweep_budgets=[0.25,0.5,0.75]`` names them; left null, a run started by a Hydra multirun
reads them from the sweep itself: the sweeper's ``params`` (``hydra/sweeper=budget_sweep``) and
the command line of the multirun (``-m budget=0.25,0.5,0.75``, saved by Hydra's basic sweeper in
``<sweep dir>/multirun.yaml`` before the first job starts). A sweep over a continuous range (the
Optuna sweeper) has no list: each run then searches for its own budget.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def hydra_sweep_budgets() -> list[float] | None:
    """The budgets a Hydra multirun sweeps over, or None (not a multirun, no list of budgets)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    lines = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
    saved = Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml"
    if saved.is_file():
        lines += list(OmegaConf.load(saved).hydra.overrides.task)
    budgets = None
    for override in OverridesParser.create().parse_overrides(lines):
        if override.key_or_group != "budget" or not override.is_sweep_override():
            continue
        try:
            budgets = sorted({float(value) for value in override.sweep_iterator()})
        except Exception:  # an interval (Optuna): no list of budgets to share a search over
            budgets = None
    return budgets


def resolve_sweep_budgets(cfg: DictConfig) -> list[float] | None:
    """``dam.sweep_budgets`` if set, else the budgets of the Hydra multirun this run is in."""
    given = cfg.dam.get("sweep_budgets")
    if given is not None:
        return [float(b) for b in given]
    found = hydra_sweep_budgets()
    if found is not None:
        log.info("budget sweep %s: one search serves every budget of it", found)
    return found
