"""Run configs saved by earlier versions, read in today's keys (for scoring old run folders).

Before the budget unit and the ``search=`` group, a run kept the paper's count of modules and
named its search with ``dam.*`` settings: ``dam.order`` (now ``dam.arch_grad``) and
``dam.relaxation`` / ``dam.progressive`` / ``dam.budget_penalty`` / ``dam.prune_*`` (now the
search variant, ``search.*``). :func:`upgrade` rewrites such a config; a current one is returned
as it is.
"""

from __future__ import annotations

import copy

from omegaconf import DictConfig, open_dict

OLD_DAM_KEYS = ("order", "relaxation", "progressive", "budget_penalty", "prune_start", "prune_end")


def old_search(dam: DictConfig) -> dict:
    """The search variant an old ``dam`` node described."""
    relaxation = dam.get("relaxation") or "sigmoid"
    if relaxation in ("topk", "softmax_row"):
        return {"name": relaxation}
    if dam.get("progressive"):
        end = dam.get("prune_end")
        return {"name": "progressive", "prune_start": dam.get("prune_start"), "prune_end": end}
    if float(dam.get("budget_penalty") or 0.0) > 0:
        return {"name": "budget_penalty", "weight": float(dam.budget_penalty)}
    return {"name": "faithful"}


def upgrade(cfg: DictConfig) -> DictConfig:
    """A saved run config in today's keys (a copy; unchanged if it is already current)."""
    if cfg.get("budget_unit") is not None and cfg.get("search") is not None:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.budget_unit = cfg.get("budget_unit") or "modules"  # what every earlier run kept
        dam = cfg.dam
        if cfg.get("search") is None:
            cfg.search = old_search(dam)
        dam.arch_grad = dam.get("arch_grad") or dam.get("order") or "first"
        dam.sweep_budgets = dam.get("sweep_budgets")
        for key in OLD_DAM_KEYS:
            dam[key] = None  # the old names are refused when set (renamed.RENAMED)
    return cfg
