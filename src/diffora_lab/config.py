"""Typed settings read from the Hydra config, checked before anything expensive starts.

Every user-facing mistake (a budget outside (0, 1], a rank below 1, an unknown name, a missing data
folder) becomes a ``ValueError`` that names the setting and the fix, raised by :func:`validate`
before a model or a dataset loads. The typed settings check their own values when built
(:class:`OptimSettings`, :class:`SearchSettings`); the method checks ``method.*``
(``Method.validate``), the search variant ``search.*`` and the architecture-gradient registry
``dam.arch_grad``; :func:`validate` parses the numbers, builds them and adds the checks that span
groups or need the file system.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffora_lab.architect import get_architect
from diffora_lab.budget import check_unit
from diffora_lab.methods import get_method, method_for
from diffora_lab.renamed import check_renamed
from diffora_lab.searches import search_for


@dataclass(frozen=True)
class OptimSettings:
    """Weight optimizer (AdamW) and step budget."""

    max_steps: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    accumulate: int
    optimizer: str = "default"  # AdamW kernel: default | foreach | fused (speed.py)
    finite_check_every: int = 1  # steps between reads of the non-finite-loss flag (1: each step)

    def adamw_options(self) -> dict[str, Any]:
        """Keyword arguments selecting the AdamW implementation."""
        from diffora_lab.speed import adamw_options

        return adamw_options(self.optimizer)

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
    """The DAM search (METHOD.md, Phases 1-2)."""

    enabled: bool
    steps: int
    warmup_steps: int
    arch_lr: float
    arch_betas: tuple[float, float]
    arch_weight_decay: float
    tau_start: float
    tau_end: float
    arch_grad: str
    budget: float
    fold_gates: bool
    weight_sharing: bool
    merge_search_split: bool

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            _fail(
                "budget",
                self.budget,
                "must be in (0, 1]: the share of the candidates a selecting method keeps.",
            )
        if not self.enabled:
            return
        if self.steps < 1:
            _fail("dam.search_steps", self.steps, "the search must last >= 1 step.")
        for setting, tau in (("dam.tau", self.tau_start), ("dam.tau_end", self.tau_end)):
            if tau <= 0:  # shown as typed: dam.tau=0, not 0.0
                _fail(setting, int(tau) if tau == int(tau) else tau, "temperatures must be > 0.")
        get_architect(self.arch_grad)  # dam.arch_grad names a registered rule
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


def _fail(setting: str, value: Any, fix: str) -> None:
    raise ValueError(f"{setting}={value!r}: {fix}")


def _number(cfg: DictConfig, key: str, kind: type) -> Any:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, f"must be a number ({kind.__name__}).")
    if not math.isfinite(value):
        _fail(key, value, "must be a finite number.")
    if kind is int and float(value) != int(value):
        _fail(key, value, "must be a whole number.")
    return kind(value)


def _non_finite(node: Any, prefix: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number anywhere in a (resolved) config, with its setting."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        bad = isinstance(node, float) and not math.isfinite(node)
        return (prefix, node) if bad else None
    for key, value in items:
        found = _non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def _check_finite(cfg: DictConfig) -> None:
    """Every number, wherever it is read: NaN passes every range check (nan > 0 is false)."""
    found = _non_finite(OmegaConf.to_container(cfg, resolve=True))
    if found:
        _fail(found[0], found[1], "must be a finite number.")


def _check_adapter_settings(cfg: DictConfig) -> None:
    """``method.scaling``, ``.scale`` and ``.lora_dropout`` of the LoRA-family methods."""
    if cfg.method.get("scaling") is not None:
        from diffora_lab.adapters import SCALINGS

        if cfg.method.scaling not in SCALINGS:
            _fail("method.scaling", cfg.method.scaling, f"choose one of {list(SCALINGS)}.")
        if _number(cfg, "method.scale", float) <= 0:
            _fail("method.scale", cfg.method.scale, "the LoRA update scale s must be > 0.")
    if cfg.method.get("lora_dropout") is not None:
        if not 0.0 <= _number(cfg, "method.lora_dropout", float) < 1.0:
            _fail("method.lora_dropout", cfg.method.lora_dropout, "a probability in [0, 1).")


def validate(cfg: DictConfig, config_dir: Path | None = None) -> None:
    """Checks the composed config; raises ``ValueError`` naming the setting and the fix."""
    from diffora_lab.tasks import TASKS

    check_renamed(cfg)
    if cfg.get("search") is not None:
        search_for(cfg)  # search.name: a registered variant (else the names to choose from)
    _check_finite(cfg)
    _number(cfg, "budget", float)
    check_unit(str(cfg.get("budget_unit") or "params"))
    rank = _number(cfg, "rank", int)
    if rank < 1:
        _fail("rank", cfg.rank, "the LoRA rank must be an integer >= 1.")
    method = get_method(cfg.method.name)()  # unknown: ValueError listing the registered names
    if cfg.task.name not in TASKS:
        _fail("task", cfg.task.name, f"unknown task; choose one of {sorted(TASKS)}.")
    _number(cfg, "train.accumulate", int)
    _number(cfg, "train.lr", float)
    max_steps = optim_settings(cfg).max_steps  # checks train.max_steps, .accumulate, .lr
    _check_run_settings(cfg)
    _check_speedups(cfg)
    if method.search_enabled(cfg):
        ratio = _number(cfg, "dam.search_ratio", float)
        if not 0.0 < ratio < 1.0:
            _fail("dam.search_ratio", ratio, "the share of steps spent searching: (0, 1).")
        frac = _number(cfg, "dam.search_split", float)
        if not 0.0 < frac < 1.0:
            _fail("dam.search_split", frac, "the fraction of train held out for search: (0, 1).")
        for key in ("dam.tau", "dam.tau_end", "dam.arch_lr"):
            _number(cfg, key, float)
        _check_search_optimizer(cfg)
        if cfg.dam.get("search_steps") is not None:
            _number(cfg, "dam.search_steps", int)
        _number(cfg, "dam.warmup_steps", int)
        # Built here: SearchSettings checks the search's own values (tau, arch_grad, gate lr,
        # warmup within the search); the variant checks its own (search.*).
        settings = search_settings(cfg)
        steps = settings.steps
        search_for(cfg).validate(cfg.search, settings)
        _check_sweep_budgets(cfg)
        if steps >= max_steps:
            _fail(
                "dam.search_steps",
                steps,
                f"the search must end before train.max_steps={max_steps} (and last >= 1 step); "
                "lower dam.search_steps / dam.search_ratio or raise train.max_steps.",
            )
    else:
        search_settings(cfg)  # the budget, for every method
    _check_adapter_settings(cfg)
    _check_match(cfg)
    method.validate(cfg)
    _check_paths(cfg)


def _check_match(cfg: DictConfig) -> None:
    """``match=lora_rN``: parameter matching against LoRA rN (matching.py)."""
    match = cfg.get("match")
    if match is not None and match.get("target_rank") is not None:
        if _number(cfg, "match.target_rank", int) < 1:
            _fail("match.target_rank", match.target_rank, "the reference LoRA rank must be >= 1.")
        if _number(cfg, "match.tolerance", float) <= 0:
            _fail("match.tolerance", match.tolerance, "a relative tolerance > 0, e.g. 0.05.")


def _check_paths(cfg: DictConfig) -> None:
    """The data folder's layout, the mask file and the checkpoint exist."""
    from diffora_lab.tasks import TASKS, check_data_dir

    data_dir = cfg.task.get("data_dir")
    if data_dir:
        check_data_dir(TASKS[cfg.task.name], Path(str(data_dir)).expanduser())
    mask_path = cfg.dam.get("mask_path")
    if mask_path and not Path(str(mask_path)).is_file():
        _fail("dam.mask_path", mask_path, "no such file; point it at a run's dam/mask.json.")
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last" and not Path(str(ckpt)).is_file():
        _fail("ckpt_path", ckpt, "no such checkpoint file; use a path or ckpt_path=last.")


def _check_sweep_budgets(cfg: DictConfig) -> None:
    budgets = cfg.dam.get("sweep_budgets")
    if budgets is None:
        return
    shown = OmegaConf.to_container(budgets) if OmegaConf.is_list(budgets) else budgets
    fix = "a list of budgets in (0, 1] that holds this run's budget, e.g. [0.25,0.5,0.75]."
    if not OmegaConf.is_list(budgets) or not budgets:
        _fail("dam.sweep_budgets", shown, fix)
    for value in budgets:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail("dam.sweep_budgets", shown, fix)
        if not 0.0 < float(value) <= 1.0:
            _fail("dam.sweep_budgets", shown, fix)
    if not any(abs(float(b) - float(cfg.budget)) < 1e-12 for b in budgets):
        _fail("dam.sweep_budgets", shown, f"budget={cfg.budget} is not one of them; {fix}")


def check_against_backbone(cfg: DictConfig, positions: int | None, candidates: list) -> None:
    """Settings the backbone bounds: ``task.max_length`` (its positions) and ``rank`` (its
    smallest adapted layer), checked on the weightless copy ``train.prepare`` builds."""
    if positions and int(cfg.task.max_length) > positions:
        _fail(
            "task.max_length",
            cfg.task.max_length,
            f"backbone {cfg.backbone.name} has {positions} positions; use task.max_length<="
            f"{positions}.",
        )
    if candidates and method_for(cfg).adapts_candidates:
        smallest = min(candidates, key=lambda c: min(c.d_in, c.d_out))
        most = min(smallest.d_in, smallest.d_out)
        if int(cfg.rank) > most:
            _fail(
                "rank",
                cfg.rank,
                f"above the rank of the smallest adapted layer ({smallest.name}: {smallest.d_in}"
                f" -> {smallest.d_out}, rank <= {most}); use rank<={most}.",
            )


# Whole-number settings and their smallest value, with what each one is (issue 11: a 0 or a
# negative value here was accepted silently or crashed deep inside Lightning).
_AT_LEAST = (
    ("train.batch_size", 1, "train examples per step"),
    ("train.eval_batch_size", 1, "dev examples per evaluation batch"),
    ("train.val_every", 1, "steps between dev evaluations"),
    ("train.log_every", 1, "steps between metric log lines"),
    ("train.ckpt_every", 1, "steps between writes of checkpoints/last.ckpt"),
    ("task.max_length", 8, "tokens per example, room for the special tokens and some text"),
    ("data.num_workers", 0, "DataLoader worker processes, 0 loads in the main process"),
)
_SEED_MAX = 2**32 - 1  # what numpy and Lightning accept as a seed


def _check_run_settings(cfg: DictConfig) -> None:
    """Step, batch, length, clipping and seed settings (before anything loads)."""
    seed = _number(cfg, "seed", int)
    if not 0 <= seed <= _SEED_MAX:
        _fail("seed", seed, f"use a whole number in [0, {_SEED_MAX}].")
    for key, least, what in _AT_LEAST:
        if _number(cfg, key, int) < least:
            _fail(key, OmegaConf.select(cfg, key), f"{what}: a whole number >= {least}.")
    if cfg.train.get("grad_clip") is not None and _number(cfg, "train.grad_clip", float) < 0:
        _fail("train.grad_clip", cfg.train.grad_clip, "max gradient norm: > 0, or 0 to disable.")
    if _number(cfg, "train.weight_decay", float) < 0:
        _fail("train.weight_decay", cfg.train.weight_decay, "must be >= 0.")
    if not 0.0 <= _number(cfg, "train.warmup_ratio", float) < 1.0:
        _fail("train.warmup_ratio", cfg.train.warmup_ratio, "the share of warmup steps: [0, 1).")
    if cfg.train.get("stop_after") is not None and _number(cfg, "train.stop_after", int) < 1:
        _fail("train.stop_after", cfg.train.stop_after, "steps before a resumable stop: >= 1.")
    for key in ("task.dev_limit", "task.train_limit"):
        limit = OmegaConf.select(cfg, key)
        if limit is not None and _number(cfg, key, int) < 1:
            _fail(key, limit, "keep the first N examples: N >= 1, or null.")
    if not isinstance(cfg.get("overwrite", False), bool):
        _fail("overwrite", cfg.get("overwrite"), "true or false.")


def _check_search_optimizer(cfg: DictConfig) -> None:
    betas = cfg.dam.get("arch_betas")
    valid = OmegaConf.is_list(betas) and len(betas) == 2
    if valid:
        valid = all(
            not isinstance(b, bool) and isinstance(b, (int, float)) and 0.0 <= b < 1.0
            for b in betas
        )
    if not valid:
        shown = OmegaConf.to_container(betas) if OmegaConf.is_list(betas) else betas
        _fail("dam.arch_betas", shown, "Adam's two betas on the gates, each in [0, 1).")
    if _number(cfg, "dam.arch_weight_decay", float) < 0:
        _fail("dam.arch_weight_decay", cfg.dam.arch_weight_decay, "must be >= 0.")
    if _number(cfg, "dam.log_every", int) < 1:
        _fail("dam.log_every", cfg.dam.log_every, "steps between gate records: >= 1.")


def _check_speedups(cfg: DictConfig) -> None:
    """The speed-up settings (speed.py, data.bucketing); each is off by default."""
    from diffora_lab.speed import OPTIMIZER_IMPLS

    if cfg.data.get("bucketing") is not None and _number(cfg, "data.bucketing", int) < 0:
        _fail("data.bucketing", cfg.data.bucketing, "a width in tokens, e.g. 16; 0 turns it off.")
    optimizer = cfg.train.get("optimizer", "default")
    if optimizer not in OPTIMIZER_IMPLS:
        _fail("train.optimizer", optimizer, f"choose one of {list(OPTIMIZER_IMPLS)}.")
    if not isinstance(cfg.train.get("compile", False), bool):
        _fail("train.compile", cfg.train.compile, "true or false.")
    if cfg.train.get("finite_check_every") is not None:
        if _number(cfg, "train.finite_check_every", int) < 1:
            _fail("train.finite_check_every", cfg.train.finite_check_every, "must be >= 1.")


def optim_settings(cfg: DictConfig) -> OptimSettings:
    every = cfg.train.get("finite_check_every")
    return OptimSettings(
        max_steps=int(cfg.train.max_steps),
        lr=float(cfg.train.lr),
        weight_decay=float(cfg.train.weight_decay),
        warmup_ratio=float(cfg.train.warmup_ratio),
        grad_clip=float(cfg.train.grad_clip or 0.0),
        accumulate=int(cfg.train.accumulate),
        optimizer=str(cfg.train.get("optimizer", "default")),
        finite_check_every=int(every if every is not None else cfg.train.log_every),
    )


def search_settings(cfg: DictConfig) -> SearchSettings:
    enabled = method_for(cfg).search_enabled(cfg)
    steps = (
        int(cfg.dam.search_steps)
        if cfg.dam.get("search_steps") is not None
        else max(1, round(float(cfg.dam.search_ratio) * int(cfg.train.max_steps)))
    )
    warmup = int(cfg.dam.warmup_steps)
    return SearchSettings(
        enabled=enabled,
        steps=steps if enabled else 0,
        warmup_steps=warmup,
        arch_lr=float(cfg.dam.arch_lr),
        arch_betas=tuple(float(b) for b in cfg.dam.arch_betas),
        arch_weight_decay=float(cfg.dam.arch_weight_decay),
        tau_start=float(cfg.dam.tau),
        tau_end=float(cfg.dam.tau_end),
        arch_grad=str(cfg.dam.arch_grad),
        budget=float(cfg.budget),
        fold_gates=bool(cfg.dam.fold_gates),
        weight_sharing=bool(cfg.dam.weight_sharing),
        merge_search_split=bool(cfg.dam.merge_search_split),
    )
