"""One run, from a composed config to ``results.json``: the pipeline every method goes through.

Order matters: everything a user can get wrong is checked first (:func:`prepare`), cheaply, before
a model's weights or a dataset load; then the model, data, module, callbacks and trainer are built,
fitted, scored, exported and summarised.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from diffora_lab import backbones, building, fitting, methods, searches, tracking
from diffora_lab.architect import get_architect
from diffora_lab.backbones import Candidate
from diffora_lab.building import Resolved
from diffora_lab.callbacks import RunClock
from diffora_lab.checkpointing import UnsafeFile
from diffora_lab.config import check_against_backbone, optim_settings, search_settings, validate
from diffora_lab.dam import Mask
from diffora_lab.data import TaskDataModule
from diffora_lab.input_files import (
    check_folders,
    check_mask_method,
    check_mask_values,
    check_train_data,
)
from diffora_lab.module import TrainingModule
from diffora_lab.resume import check_checkpoint, finished_run, resolve_checkpoint, say_skipped
from diffora_lab.runfolder import (
    FolderState,
    RunFolderLock,
    clear_outputs,
    global_rank,
    remove_stale_temporaries,
    write_hydra_files,
)
from diffora_lab.runtime import WRITE_ERRORS, write_error_message
from diffora_lab.search_cache import shared_search
from diffora_lab.speed import compile_layers
from diffora_lab.stopping import Preemption
from diffora_lab.sweep import resolve_sweep_budgets
from diffora_lab.tasks import RawSplits, TaskSpec, check_source, get_task, load_raw
from diffora_lab.trainer_args import build_trainer, check_trainer_args

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting the user can fix; the CLI prints it without a traceback and exits with 2."""


@dataclass
class Prepared:
    """What the cheap checks produced: the task, tokenizer, candidate modules, family and kind."""

    spec: TaskSpec
    tokenizer: Any
    candidates: list[Candidate]
    resolved: Resolved

    @property
    def kind(self):
        """The run's task kind (:mod:`diffora_lab.tasks.kinds`)."""
        return self.resolved.kind


def _check_search_devices(cfg: DictConfig) -> None:
    """Several devices: the search variant and the gradient rule must each support DDP."""
    devices = str(cfg.trainer.get("devices") or 1)
    if devices.isdigit() and int(devices) > 1 and methods.method_for(cfg).search_enabled(cfg):
        variant = searches.search_for(cfg)  # each part declares whether it supports DDP
        rule = (f"dam.arch_grad={cfg.dam.arch_grad}", get_architect(str(cfg.dam.arch_grad)))
        for setting, part in (rule, (f"search={variant.name}", variant)):
            if not part.supports_ddp:
                raise ValueError(
                    f"{setting}: runs on one device only; choose another with trainer.devices>1."
                )


def prepare(cfg: DictConfig) -> Prepared:
    """All user-input checks, before any weights or data load.

    Raises:
        ConfigError: With the setting and the fix.
    """
    try:
        validate(cfg)
        check_trainer_args(cfg)
        _check_search_devices(cfg)
        if cfg.backbone.get("name") is None:
            raise ValueError("backbone: no backbone selected; pass backbone=<name>.")
        spec = get_task(cfg.task.name)
        tokenizer = backbones.load_tokenizer(cfg.backbone)
        # Family, task kind and candidates from a weightless model (written into cfg).
        resolved = building.resolve(cfg, spec, tokenizer)
        candidates = resolved.candidates
        check_source(spec, cfg.task.get("data_dir") or None, cfg.task.get("hub_id"))
        method = methods.method_for(cfg)
        with open_dict(cfg):
            cfg.rank = methods.resolve_rank(cfg, candidates)  # match=lora_rN (matching.py)
            if method.search_enabled(cfg):
                cfg.dam.sweep_budgets = resolve_sweep_budgets(cfg)  # sweep.py
        check_against_backbone(cfg, resolved.positions, candidates)
        method.budget(cfg, candidates)  # budget.py: the budget against the candidates
        check_folders(cfg)
        if cfg.dam.get("mask_path"):
            check_mask_method(cfg)
            mask = Mask.load(cfg.dam.mask_path)
            check_mask_values(cfg.dam.mask_path)
            methods.check_mask_fits(mask, candidates, cfg.backbone.name, str(cfg.dam.mask_path))
            unit = cfg.get("budget_unit") or "params"
            if method.searches and (float(cfg.budget), unit) != (mask.budget, mask.unit):
                # A fine-tuned mask is the run's budget: results, names and reports say so.
                log.info("budget=%s: the mask's budget %s is used", cfg.budget, mask.budget)
                with open_dict(cfg):
                    cfg.budget, cfg.budget_unit = mask.budget, mask.unit
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return Prepared(spec, tokenizer, candidates, resolved)


@dataclass
class Assembled:
    """A run's parts, ready for a Trainer."""

    module: TrainingModule
    datamodule: TaskDataModule
    candidates: list[Candidate]


def assemble(
    cfg: DictConfig,
    prepared: Prepared,
    module_cls: type[TrainingModule] = TrainingModule,
    raw: RawSplits | None = None,
) -> Assembled:
    """Loads data (unless given) and weights and builds the model, data module and module."""
    spec = prepared.spec
    if raw is None:
        raw = _load_data(cfg, spec)
    backbone = building.load_model(cfg, prepared.resolved, prepared.tokenizer)
    candidates = backbones.find_candidates(
        backbone, str(cfg.backbone.layer_pattern), dict(cfg.backbone.module_types)
    )
    method = methods.method_for(cfg)
    built = methods.build(cfg, backbone, candidates, method)
    if cfg.train.get("compile"):
        compile_layers(
            built.model,
            str(cfg.backbone.layer_pattern),
            backend=str(cfg.train.get("compile_backend") or "inductor"),
            mode=cfg.train.get("compile_mode"),
        )
    search = search_settings(cfg)
    optim = optim_settings(cfg)
    variant = searches.for_run(cfg, search, lambda c: method.budget(c, candidates))
    cut_step = variant.cut_step if variant is not None else search.steps
    datamodule = TaskDataModule(
        spec,
        raw,
        prepared.tokenizer,
        max_length=int(cfg.task.max_length),
        batch_size=int(cfg.train.batch_size),
        eval_batch_size=int(cfg.train.eval_batch_size),
        seed=int(cfg.seed),
        search_split=float(cfg.dam.search_split) if search.enabled else 0.0,
        cache_dir=cfg.data.cache_dir,
        num_workers=int(cfg.data.num_workers),
        merge_at=cut_step * optim.accumulate if search.merge_search_split else None,
        bucketing=int(cfg.data.get("bucketing") or 0),
        kind=prepared.kind,
    )
    module = module_cls(
        built.model,
        spec,
        candidates if method.adapts_candidates else [],
        optim,
        search,
        dam=built.dam,
        mask=built.mask,
        hparams=OmegaConf.to_container(cfg, resolve=True),
        method=method,
        variant=variant,
        kind=prepared.kind,
    )
    return Assembled(module, datamodule, candidates)


@dataclass
class Checked:
    """What the checks of a run produced, before anything was written to its folder."""

    prepared: Prepared
    raw: RawSplits | None
    ckpt_path: str | None
    start_step: int
    cut_step: int | None  # the discretization the checkpoint holds (its record row is kept)
    restart: bool = False  # overwrite=true on a finished folder: its outputs go first
    finished: dict[str, Any] | None = None  # this very run, finished already: its results
    warnings: list[str] = field(default_factory=list)  # about the data, in the summary


def _load_data(cfg: DictConfig, spec: TaskSpec) -> RawSplits:
    """The task's splits; a file that cannot be read is a user error (exit 2)."""
    try:
        return load_raw(
            spec,
            cfg.task.get("data_dir") or None,
            seed=int(cfg.seed),
            synthetic=(
                OmegaConf.to_container(cfg.task.synthetic) if cfg.task.get("synthetic") else None
            ),
            hub_id=cfg.task.get("hub_id"),
            dev_limit=cfg.task.get("dev_limit"),
            train_limit=cfg.task.get("train_limit"),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _check_data(prepared: Prepared, raw: RawSplits) -> None:
    """The task kind's checks of the loaded data (e.g. answer words), before any weights."""
    try:
        prepared.kind.check_data(raw, prepared.tokenizer)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def check_run(cfg: DictConfig, output_dir: Path) -> Checked:
    """Everything that can refuse a run, with its folder still untouched.

    Settings (:func:`prepare`), a finished folder, the checkpoint to resume (readable, same
    method/backbone/task/rank, not past ``train.max_steps``) and the data files.

    Raises:
        ConfigError: With the setting and the fix.
    """
    prepared = prepare(cfg)
    # overwrite=true deletes a finished run's outputs; an unfinished run resumes (a requeued
    # command that carries overwrite=true continues instead of starting over every time).
    restart = bool(cfg.get("overwrite")) and (output_dir / "results.json").is_file()
    try:
        done = finished_run(output_dir, cfg)
        if done is not None:
            return Checked(prepared, None, None, 0, None, finished=done)
        ckpt_path = resolve_checkpoint(cfg, output_dir / "checkpoints", restart)
        start_step, cut_step = check_checkpoint(ckpt_path, cfg) if ckpt_path else (0, None)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    raw = _load_data(cfg, prepared.spec)
    _check_data(prepared, raw)
    search = search_settings(cfg)
    try:
        split = float(cfg.dam.search_split) if search.enabled else 0.0
        warnings = check_train_data(
            raw.train, prepared.spec, int(cfg.train.batch_size), split, int(cfg.seed)
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error
    for warning in warnings:
        log.warning("training data: %s", warning)
    return Checked(
        prepared, raw, ckpt_path, start_step, cut_step, restart=restart, warnings=warnings
    )


def run(
    cfg: DictConfig, output_dir: str | Path, task_cfg: DictConfig | None = None
) -> dict[str, Any]:
    """Runs one job end to end and returns its results (also written to ``results.json``).

    Args:
        cfg: The composed config.
        output_dir: The run folder.
        task_cfg: The config as composed, written to ``.hydra/config.yaml`` once the run is
            accepted (the CLI passes it; Hydra itself writes nothing there).

    Raises:
        ConfigError: A refused run (bad setting, data, checkpoint, a busy or finished folder);
            the folder is left as it was found.
    """
    started = time.time()
    output_dir = Path(output_dir)
    found = FolderState.capture(output_dir)
    lock = RunFolderLock(output_dir)
    try:
        lock.acquire()
        checked = check_run(cfg, output_dir)
    except (ValueError, OSError) as error:
        lock.release()
        found.restore()
        if isinstance(error, ConfigError) or (
            isinstance(error, OSError) and error.errno not in WRITE_ERRORS
        ):
            raise
        if isinstance(error, OSError):  # e.g. a read-only folder: nothing was written
            message = write_error_message(error)
            raise ConfigError(f"hydra.run.dir={str(output_dir)!r}: {message}") from None
        raise ConfigError(str(error)) from error
    if checked.finished is not None:
        lock.release()
        return say_skipped(checked.finished, output_dir)
    try:
        if global_rank() == 0:
            if checked.restart:
                clear_outputs(output_dir)
            remove_stale_temporaries(output_dir / "checkpoints")
            write_hydra_files(output_dir, task_cfg)
        return _fit_and_report(cfg, output_dir, checked, started)
    finally:
        lock.release()


def _fit_and_report(
    cfg: DictConfig, output_dir: Path, checked: Checked, started: float
) -> dict[str, Any]:
    """Builds, fits, scores and exports an accepted run (the steps are in fitting.py)."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt_dir = output_dir / "checkpoints"
    assembled = assemble(cfg, checked.prepared, raw=checked.raw)
    module, datamodule = assembled.module, assembled.datamodule
    fitting.write_run_files(output_dir, module, datamodule)
    search_info, entry, ckpt_path, start_step = _starting_point(cfg, checked, assembled, output_dir)
    reused = search_info["reused"]
    resume_id = fitting.wandb_resume_id(ckpt_dir, ckpt_path if not reused else None)
    cut_kept = not reused and checked.cut_step == start_step
    logger = tracking.build_logger(cfg, output_dir, resume_id, start_step, cut_kept)
    failed = True
    try:
        fitting.remember_wandb_id(ckpt_dir, logger)
        preemption = Preemption(ckpt_dir / "last.ckpt")
        clock = RunClock(started, restore=not reused)
        callbacks = fitting.run_callbacks(
            cfg, output_dir, module, entry, preemption, clock, reused=search_info.get("source")
        )
        trainer = build_trainer(cfg, output_dir, logger, callbacks)
        fitting.fit(trainer, module, datamodule, ckpt_path, preemption, ckpt_dir)
        if module.step < module.optim.max_steps:
            failed = False
            return fitting.stopped_early(module, preemption, output_dir)
        if module.search.enabled and module.mask is None:  # never report a search as a result
            raise ConfigError(
                f"the search in {output_dir} ended at step {module.step} without a "
                f"discretization (dam.search_steps={module.search.steps}); start a new run folder."
            )
        extra = {"search": search_info, "warnings": checked.warnings}
        results = fitting.finish(cfg, trainer, assembled, clock, output_dir, extra)
        fitting.publish(cfg, trainer, module, checked.prepared.tokenizer, results, logger)
        failed = False
        return results
    finally:
        tracking.finish(logger, failed)


def _starting_point(
    cfg: DictConfig, checked: Checked, assembled: Assembled, output_dir: Path
) -> tuple[dict[str, Any], Any, str | None, int]:
    """Where the fit starts: the run's own checkpoint, a shared search snapshot, or step 0.

    Returns:
        What ``results.json`` records of the search cache, its entry, the checkpoint to fit from
        and its step.
    """
    module, datamodule = assembled.module, assembled.datamodule
    try:
        search_info, entry = shared_search(
            cfg, module, checked.raw.train, datamodule.search_indices, output_dir, checked.ckpt_path
        )
    except UnsafeFile as error:
        raise ConfigError(str(error)) from None
    if search_info["reused"]:
        return search_info, entry, search_info["source"]["path"], search_info["source"]["step"]
    return search_info, entry, checked.ckpt_path, checked.start_step
