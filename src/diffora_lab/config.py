"""Typed settings read from the Hydra config, each checked where it is defined.

:class:`OptimSettings` and :class:`SearchSettings` check their own values when they are built
(``__post_init__``), the method checks ``method.*`` (``Method.validate``), the search variant
registry checks ``dam.order``; :func:`validate` builds them all once, plus the checks that need
the file system, so every user-facing mistake becomes a ``ValueError`` that names the setting and
the fix before a model or a dataset loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffora_lab.architect import get_architect
from diffora_lab.dam import RELAXATIONS
from diffora_lab.methods import get_method, method_for


def _fail(setting: str, value: Any, fix: str) -> None:
    raise ValueError(f"{setting}={value!r}: {fix}")


@dataclass(frozen=True)
class OptimSettings:
    """Weight optimizer (AdamW) and step budget (``train.*``); checked at construction."""

    max_steps: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    accumulate: int

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            _fail("train.max_steps", self.max_steps, "must be >= 1.")
        if self.accumulate < 1:
            _fail("train.accumulate", self.accumulate, "must be >= 1.")
        if self.lr <= 0:
            _fail("train.lr", self.lr, "the learning rate must be > 0.")

    def lr_at(self, step: int) -> float:
        """Linear warmup then linear decay to zero: a pure function of the step."""
        warmup = max(1, round(self.warmup_ratio * self.max_steps))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        remaining = max(1, self.max_steps - warmup)
        return self.lr * max(0.0, (self.max_steps - step) / remaining)


@dataclass(frozen=True)
class SearchSettings:
    """The DAM search (METHOD.md, Phases 1-2); checked at construction when ``enabled``.

    ``budget`` is checked always: it sets k for every method that keeps k of n candidates.
    """

    enabled: bool
    steps: int
    warmup_steps: int
    arch_lr: float
    arch_betas: tuple[float, float]
    arch_weight_decay: float
    tau_start: float
    tau_end: float
    relaxation: str
    order: str
    budget: float
    budget_penalty: float
    progressive: bool
    prune_start: int
    prune_end: int
    fold_gates: bool
    weight_sharing: bool
    merge_search_split: bool
    split: float

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            _fail(
                "budget", self.budget, "must be in (0, 1]: the fraction of candidate modules kept."
            )
        if not self.enabled:
            return
        if not 0.0 < self.split < 1.0:
            _fail(
                "dam.search_split", self.split, "the fraction of train held out for search: (0, 1)."
            )
        if self.tau_start <= 0 or self.tau_end <= 0:
            _fail("dam.tau", self.tau_start, "temperatures (dam.tau, dam.tau_end) must be > 0.")
        if self.relaxation not in RELAXATIONS:
            _fail("dam.relaxation", self.relaxation, f"choose one of {list(RELAXATIONS)}.")
        get_architect(self.order)  # dam.order names a registered search variant
        if self.budget_penalty < 0:
            _fail("dam.budget_penalty", self.budget_penalty, "must be >= 0 (0 disables it).")
        if self.arch_lr <= 0:
            _fail("dam.arch_lr", self.arch_lr, "the gate learning rate must be > 0.")
        if not 0 <= self.warmup_steps < self.steps:
            _fail(
                "dam.warmup_steps",
                self.warmup_steps,
                f"weight-only steps must leave architecture steps in the {self.steps}-step "
                "search; use 0 <= dam.warmup_steps < the search length.",
            )

    def tau_at(self, step: int) -> float:
        """Temperature annealed linearly from ``tau_start`` to ``tau_end`` over the search."""
        if self.steps <= 1:
            return self.tau_end
        frac = min(1.0, step / (self.steps - 1))
        return self.tau_start + frac * (self.tau_end - self.tau_start)


def _number(cfg: DictConfig, key: str, kind: type) -> Any:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, f"must be a number ({kind.__name__}).")
    if kind is int and float(value) != int(value):
        _fail(key, value, "must be a whole number.")
    return kind(value)


def optim_settings(cfg: DictConfig) -> OptimSettings:
    """The ``train.*`` settings, typed and checked."""
    return OptimSettings(
        max_steps=_number(cfg, "train.max_steps", int),
        lr=_number(cfg, "train.lr", float),
        weight_decay=float(cfg.train.weight_decay),
        warmup_ratio=float(cfg.train.warmup_ratio),
        grad_clip=float(cfg.train.grad_clip or 0.0),
        accumulate=_number(cfg, "train.accumulate", int),
    )


def _search_steps(cfg: DictConfig, max_steps: int) -> int:
    if cfg.dam.get("search_steps") is not None:
        steps = _number(cfg, "dam.search_steps", int)
    else:
        ratio = _number(cfg, "dam.search_ratio", float)
        if not 0.0 < ratio < 1.0:
            _fail("dam.search_ratio", ratio, "the share of steps spent searching: (0, 1).")
        steps = max(1, round(ratio * max_steps))
    if not 1 <= steps < max_steps:
        _fail(
            "dam.search_steps",
            steps,
            f"the search must end before train.max_steps={max_steps} (and last >= 1 step); "
            "lower dam.search_steps / dam.search_ratio or raise train.max_steps.",
        )
    return steps


def _prune_window(cfg: DictConfig, warmup: int, steps: int) -> tuple[int, int]:
    """Progressive discretization's start and end steps (``dam.prune_start``/``prune_end``)."""
    prune_start = cfg.dam.get("prune_start")
    prune_start = warmup if prune_start is None else int(prune_start)
    ratio = float(cfg.dam.get("prune_end", 0.75))
    if not 0.0 < ratio <= 1.0:
        _fail(
            "dam.prune_end",
            ratio,
            "the share of the search after which only k modules remain: (0, 1].",
        )
    return prune_start, max(prune_start + 1, round(ratio * steps))


def search_settings(cfg: DictConfig) -> SearchSettings:
    """The ``dam.*`` settings (and ``budget``), typed and checked; disabled without a search."""
    enabled = method_for(cfg).search_enabled(cfg)
    max_steps = _number(cfg, "train.max_steps", int)
    steps = _search_steps(cfg, max_steps) if enabled else 0
    warmup = _number(cfg, "dam.warmup_steps", int)
    prune_start, prune_end = _prune_window(cfg, warmup, steps) if enabled else (warmup, warmup + 1)
    return SearchSettings(
        enabled=enabled,
        steps=steps,
        warmup_steps=warmup,
        arch_lr=_number(cfg, "dam.arch_lr", float),
        arch_betas=tuple(float(b) for b in cfg.dam.arch_betas),
        arch_weight_decay=float(cfg.dam.arch_weight_decay),
        tau_start=_number(cfg, "dam.tau", float),
        tau_end=_number(cfg, "dam.tau_end", float),
        relaxation=str(cfg.dam.relaxation),
        order=str(cfg.dam.order),
        budget=_number(cfg, "budget", float),
        budget_penalty=float(cfg.dam.get("budget_penalty", 0.0)),
        progressive=bool(cfg.dam.get("progressive", False)),
        prune_start=prune_start,
        prune_end=prune_end,
        fold_gates=bool(cfg.dam.fold_gates),
        weight_sharing=bool(cfg.dam.weight_sharing),
        merge_search_split=bool(cfg.dam.merge_search_split),
        split=_number(cfg, "dam.search_split", float),
    )


def validate(cfg: DictConfig) -> None:
    """Checks the composed config; raises ``ValueError`` naming the setting and the fix."""
    from diffora_lab.tasks import TASKS, check_data_dir

    if _number(cfg, "rank", int) < 1:
        _fail("rank", cfg.rank, "the LoRA rank must be an integer >= 1.")
    method = get_method(cfg.method.name)()  # unknown: ValueError listing the registered names
    if cfg.task.name not in TASKS:
        _fail("task", cfg.task.name, f"unknown task; choose one of {sorted(TASKS)}.")
    optim_settings(cfg)
    search_settings(cfg)
    if cfg.method.get("scaling") is not None:
        from diffora_lab.adapters import SCALINGS

        if cfg.method.scaling not in SCALINGS:
            _fail("method.scaling", cfg.method.scaling, f"choose one of {list(SCALINGS)}.")
        if _number(cfg, "method.scale", float) <= 0:
            _fail("method.scale", cfg.method.scale, "the LoRA update scale s must be > 0.")
    match = cfg.get("match")
    if match is not None and match.get("target_rank") is not None:
        if _number(cfg, "match.target_rank", int) < 1:
            _fail("match.target_rank", match.target_rank, "the reference LoRA rank must be >= 1.")
        if _number(cfg, "match.tolerance", float) <= 0:
            _fail("match.tolerance", match.tolerance, "a relative tolerance > 0, e.g. 0.05.")
    method.validate(cfg)
    data_dir = cfg.task.get("data_dir")
    if data_dir:
        check_data_dir(TASKS[cfg.task.name], Path(str(data_dir)).expanduser())
    mask_path = cfg.dam.get("mask_path")
    if mask_path and not Path(str(mask_path)).is_file():
        _fail("dam.mask_path", mask_path, "no such file; point it at a run's dam/mask.json.")
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last" and not Path(str(ckpt)).is_file():
        _fail("ckpt_path", ckpt, "no such checkpoint file; use a path or ckpt_path=last.")
