"""One run, from a composed config to ``results.json``: the pipeline every method goes through.

Order matters: everything a user can get wrong is checked first (:func:`prepare`), cheaply, before
a model's weights or a dataset load; then the model, data, module, callbacks and trainer are built,
fitted, scored, exported and summarised.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from diffora_lab import backbones, methods, tracking
from diffora_lab.adapters import export_merged
from diffora_lab.backbones import Candidate
from diffora_lab.callbacks import DAMMonitor, Discretization, Preemption, RunClock, StopAfter
from diffora_lab.config import optim_settings, search_settings, validate
from diffora_lab.dam import Mask, num_kept
from diffora_lab.data import TaskDataModule
from diffora_lab.module import TrainingModule
from diffora_lab.progress import PhaseProgressBar, progress_callbacks
from diffora_lab.results import collect_results, summary_for_logger, summary_text
from diffora_lab.runfolder import (
    FolderState,
    RunFolderLock,
    check_checkpoint,
    check_not_finished,
    clear_outputs,
    divergence_message,
    global_rank,
    remove_stale_temporaries,
    write_hydra_files,
)
from diffora_lab.search_cache import open_entry
from diffora_lab.speed import compile_layers
from diffora_lab.tasks import RawSplits, TaskSpec, check_hub_dataset, get_task, load_raw

log = logging.getLogger(__name__)

REFUSED_TRAINER_ARGS = {
    "gradient_clip_val": "train.grad_clip",
    "gradient_clip_algorithm": "train.grad_clip",
    "accumulate_grad_batches": "train.accumulate",
    "max_steps": "train.max_steps",
    "max_epochs": "train.max_steps",
}


class ConfigError(ValueError):
    """A setting the user can fix; the CLI prints it without a traceback and exits with 2."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file, then renames it: a kill never truncates one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


@dataclass
class Prepared:
    """What the cheap checks produced: the task, tokenizer and candidate modules."""

    spec: TaskSpec
    tokenizer: Any
    candidates: list[Candidate]


def _check_trainer_args(cfg: DictConfig) -> None:
    for key, ours in REFUSED_TRAINER_ARGS.items():
        if cfg.trainer.get(key) is not None:
            raise ValueError(
                f"trainer.{key}: manual optimization cannot honour it; use {ours} instead."
            )
    if cfg.dam.order == "second" and int(cfg.trainer.get("devices") or 1) > 1:
        raise ValueError(
            "dam.order=second: the unrolled architecture step runs on one device only; "
            "use dam.order=first with trainer.devices>1."
        )
    if str(cfg.trainer.get("precision")) in ("16", "16-mixed"):
        raise ValueError(
            "trainer.precision=16-mixed: fp16 loss scaling is not supported with DiffoRA's two "
            "optimizers; use bf16-mixed (GPU) or 32-true."
        )


def _meta_candidates(cfg: DictConfig, spec: TaskSpec, vocab_size: int) -> list[Candidate]:
    """Candidate modules found on a weightless (meta-device) copy of the backbone."""
    import transformers

    bcfg = cfg.backbone
    if bcfg.get("config") is not None:
        with torch.device("meta"):
            model = backbones.load_backbone(bcfg, spec.num_labels, vocab_size=vocab_size)
    else:
        config = transformers.AutoConfig.from_pretrained(
            backbones.resolve_source(bcfg), num_labels=max(spec.num_labels, 1)
        )
        with torch.device("meta"):
            model = transformers.AutoModelForSequenceClassification.from_config(config)
    return backbones.find_candidates(model, str(bcfg.layer_pattern), dict(bcfg.module_types))


def prepare(cfg: DictConfig) -> Prepared:
    """All user-input checks, before any weights or data load.

    Raises:
        ConfigError: With the setting and the fix.
    """
    try:
        validate(cfg)
        _check_trainer_args(cfg)
        if cfg.backbone.get("name") is None:
            raise ValueError("backbone: no backbone selected; pass backbone=<name>.")
        spec = get_task(cfg.task.name)
        if spec.name != "synthetic" and not cfg.task.get("data_dir"):
            check_hub_dataset(spec)
        tokenizer = backbones.load_tokenizer(cfg.backbone)
        candidates = _meta_candidates(cfg, spec, len(tokenizer))
        with open_dict(cfg):
            cfg.rank = methods.resolve_rank(cfg, candidates)  # match=lora_rN (matching.py)
        if methods.method_for(cfg).uses_budget:
            num_kept(float(cfg.budget), len(candidates))
        if cfg.dam.get("mask_path"):
            mask = Mask.load(cfg.dam.mask_path)
            methods.check_mask_fits(mask, candidates, cfg.backbone.name, str(cfg.dam.mask_path))
            if methods.method_for(cfg).searches and float(cfg.budget) != mask.budget:
                # A fine-tuned mask is the run's budget: results, names and reports say so.
                log.info("budget=%s: the mask's budget %s is used", cfg.budget, mask.budget)
                with open_dict(cfg):
                    cfg.budget = mask.budget
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return Prepared(spec, tokenizer, candidates)


def _resolve_ckpt(cfg: DictConfig, ckpt_dir: Path, overwrite: bool = False) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt == "last":
        last = ckpt_dir / "last.ckpt"
        if last.is_file() and not overwrite:
            return str(last)
        log.info("ckpt_path=last: no checkpoint in %s to resume, starting fresh", ckpt_dir)
        return None
    return str(ckpt)


def build_trainer(cfg: DictConfig, output_dir: Path, logger, callbacks) -> pl.Trainer:
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_args.get("precision") in (None, "auto"):
        trainer_args["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    if trainer_args.get("strategy") == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # The weight step leaves the gate logits unused and the architecture step the head:
        # DDP must look for unused parameters.
        trainer_args["strategy"] = DDPStrategy(find_unused_parameters=True)
    # Lightning adds its own bar when enabled; ours (or log lines off a terminal) is in callbacks.
    trainer_args["enable_progress_bar"] = any(isinstance(c, PhaseProgressBar) for c in callbacks)
    return pl.Trainer(
        max_steps=int(cfg.train.max_steps),
        val_check_interval=int(cfg.train.val_every),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=int(cfg.train.log_every),
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # our samplers shard by rank themselves (data.py)
        **trainer_args,
    )


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
    backbone = backbones.load_backbone(
        cfg.backbone, spec.num_labels, vocab_size=len(prepared.tokenizer)
    )
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
        merge_at=search.steps * optim.accumulate if search.merge_search_split else None,
        bucketing=int(cfg.data.get("bucketing") or 0),
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
    )
    return Assembled(module, datamodule, candidates)


@dataclass
class Checked:
    """What the checks of a run produced, before anything was written to its folder."""

    prepared: Prepared
    raw: RawSplits
    ckpt_path: str | None
    start_step: int


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
        )
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
    overwrite = bool(cfg.get("overwrite", False))
    try:
        check_not_finished(output_dir, overwrite)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    ckpt_path = _resolve_ckpt(cfg, output_dir / "checkpoints", overwrite)
    try:
        start_step = check_checkpoint(ckpt_path, cfg) if ckpt_path else 0
    except ValueError as error:
        raise ConfigError(str(error)) from error
    raw = _load_data(cfg, prepared.spec)
    return Checked(prepared, raw, ckpt_path, start_step)


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
    except ValueError as error:
        lock.release()
        found.restore()
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error)) from error
    try:
        if global_rank() == 0:
            if cfg.get("overwrite"):
                clear_outputs(output_dir)
            remove_stale_temporaries(output_dir / "checkpoints")
            write_hydra_files(output_dir, task_cfg)
        return _fit_and_report(cfg, output_dir, checked, started)
    finally:
        lock.release()


def _fit_and_report(
    cfg: DictConfig, output_dir: Path, checked: Checked, started: float
) -> dict[str, Any]:
    """Builds, fits, scores and exports an accepted run."""
    prepared, ckpt_path = checked.prepared, checked.ckpt_path
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt_dir = output_dir / "checkpoints"
    assembled = assemble(cfg, prepared, raw=checked.raw)
    module, datamodule, candidates = assembled.module, assembled.datamodule, assembled.candidates
    search, optim = module.search, module.optim
    if search.enabled:
        split_file = output_dir / "dam" / "search_split.json"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps({"indices": datamodule.search_indices}))
    if module.mask is not None:
        module.mask.save(output_dir / "dam" / "mask.json")

    search_info: dict[str, Any] = {"reused": False, "key": None}
    entry = None
    if search.enabled and cfg.dam.reuse_search:
        entry = open_entry(cfg, checked.raw.train, datamodule.search_indices)
        remove_stale_temporaries(entry.folder)
        search_info["key"] = entry.key
        source = None if ckpt_path else entry.reuse(output_dir, search.steps)
        if source is not None:
            ckpt_path = source["path"]
            module.search_reused = True
            search_info.update(reused=True, source=source)

    run_id_file = ckpt_dir / "wandb_run_id"
    resume_id = None
    if ckpt_path and not search_info["reused"] and run_id_file.is_file():
        resume_id = run_id_file.read_text().strip()
    start_step = search.steps if search_info["reused"] else checked.start_step
    logger = tracking.build_logger(cfg, output_dir, resume_id, start_step)
    failed = True
    try:
        run_id = tracking.wandb_run_id(logger)
        if run_id:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text(run_id)
        preemption = Preemption(ckpt_dir / "last.ckpt")
        clock = RunClock(started, restore=not search_info["reused"])
        callbacks: list[pl.Callback] = [
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                save_last=True,
                save_top_k=0,
                every_n_train_steps=int(cfg.train.ckpt_every),
            ),
            preemption,
            clock,
            *progress_callbacks(
                bool(cfg.trainer.get("enable_progress_bar", True)),
                float(cfg.train.get("progress_every", 30)),
                reused=search_info.get("source"),
            ),
        ]
        if cfg.train.get("stop_after"):
            callbacks.append(StopAfter(int(cfg.train.stop_after)))
        if search.enabled:
            callbacks += [
                Discretization(output_dir, cfg.backbone.name, entry),
                DAMMonitor(output_dir, int(cfg.dam.log_every)),
            ]
        trainer = build_trainer(cfg, output_dir, logger, callbacks)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # Lightning's exit after SIGTERM; Preemption saved first
            preemption.stopped_by = preemption.stopped_by or preemption.stop_signal()
        except FloatingPointError as error:
            raise FloatingPointError(divergence_message(error, ckpt_dir, optim.grad_clip)) from None
        else:
            trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))
        if module.step < optim.max_steps:
            failed = False
            print(
                f"diffora_lab: stopped at step {module.step} of {optim.max_steps}; "
                f"continue with ckpt_path=last hydra.run.dir={output_dir}"
            )
            return {
                "stopped_at": module.step,
                "signal": preemption.stopped_by,
                "output_dir": str(output_dir),
            }
        if search.enabled and module.mask is None:  # never report a search as a DiffoRA result
            raise ConfigError(
                f"the search in {output_dir} ended at step {module.step} without a "
                f"discretization (dam.search_steps={search.steps}); start a new run folder."
            )
        trainer.validate(module, datamodule=datamodule, verbose=False)
        results = collect_results(cfg, module, candidates, started, output_dir)
        results["wall_seconds"] = round(clock.wall_seconds(), 2)
        results["fit_seconds"] = round(clock.fit_seconds(), 2)
        results["seconds"] = clock.seconds()  # start-up, search, fine-tune, the rest
        results["search"] = search_info
        if trainer.is_global_zero:
            reference = backbones.model_reference(cfg.backbone)
            if module.method.export(module.model, output_dir / "adapter", reference) is not None:
                results["adapter"] = str(output_dir / "adapter")
            if cfg.get("export") is not None and cfg.export.get("merged"):
                export_merged(module.model, output_dir / "merged", prepared.tokenizer)
                results["merged"] = str(output_dir / "merged")
            (output_dir / "results.json").write_text(json.dumps(results, indent=2))
            tracking.write_summary(logger, summary_for_logger(results))
            print(summary_text(results, output_dir))
        failed = False
        return results
    finally:
        tracking.finish(logger, failed)
