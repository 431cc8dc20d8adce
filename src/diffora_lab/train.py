"""One run, from a composed config to ``results.json``: the pipeline every method goes through.

Order matters: everything a user can get wrong is checked first (:func:`prepare`), cheaply, before
a model's weights or a dataset load; then the model, data, module, callbacks and trainer are built,
fitted, scored, exported and summarised.
"""

from __future__ import annotations

import json
import logging
import os
import signal
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
from diffora_lab.callbacks import DAMMonitor, Discretization, Preemption, StopAfter
from diffora_lab.config import optim_settings, search_settings, validate
from diffora_lab.dam import Mask, num_kept
from diffora_lab.data import GlueDataModule
from diffora_lab.module import DiffoRAModule
from diffora_lab.results import collect_results, summary_for_logger, summary_text
from diffora_lab.search_cache import search_key, shared_search  # noqa: F401 (re-exported)
from diffora_lab.tasks import TaskSpec, check_hub_dataset, get_task, load_raw

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
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return Prepared(spec, tokenizer, candidates)


def _resolve_ckpt(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt == "last":
        last = ckpt_dir / "last.ckpt"
        if last.is_file():
            return str(last)
        log.info("ckpt_path=last: no checkpoint in %s yet, starting fresh", ckpt_dir)
        return None
    return str(ckpt)


def _check_ckpt_matches(path: str, cfg: DictConfig) -> None:
    # mmap: only the hyper-parameters are read here; Lightning loads the tensors later.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    saved = checkpoint.get("hyper_parameters", {})
    saved_cfg = saved.get("config") or {}
    for key in ("method.name", "backbone.name", "task.name", "rank"):
        mine = OmegaConf.select(cfg, key)
        theirs = OmegaConf.select(OmegaConf.create(saved_cfg), key) if saved_cfg else None
        if theirs is not None and theirs != mine:
            raise ConfigError(
                f"ckpt_path={path!r} was written with {key}={theirs!r}, this run has "
                f"{key}={mine!r}; resume with the same settings or start a new run."
            )


def build_trainer(cfg: DictConfig, output_dir: Path, logger, callbacks) -> pl.Trainer:
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_args.get("precision") in (None, "auto"):
        trainer_args["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    if trainer_args.get("strategy") == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # The weight step leaves the gate logits unused and the architecture step the head:
        # DDP must look for unused parameters.
        trainer_args["strategy"] = DDPStrategy(find_unused_parameters=True)
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

    module: DiffoRAModule
    datamodule: GlueDataModule
    candidates: list[Candidate]


def assemble(
    cfg: DictConfig, prepared: Prepared, module_cls: type[DiffoRAModule] = DiffoRAModule
) -> Assembled:
    """Loads data and weights and builds the method's model, the data module and the module."""
    spec = prepared.spec
    raw = load_raw(
        spec,
        cfg.task.get("data_dir") or None,
        seed=int(cfg.seed),
        synthetic=(
            OmegaConf.to_container(cfg.task.synthetic) if cfg.task.get("synthetic") else None
        ),
    )
    backbone = backbones.load_backbone(
        cfg.backbone, spec.num_labels, vocab_size=len(prepared.tokenizer)
    )
    candidates = backbones.find_candidates(
        backbone, str(cfg.backbone.layer_pattern), dict(cfg.backbone.module_types)
    )
    method = methods.method_for(cfg)
    built = methods.build(cfg, backbone, candidates, method)
    search = search_settings(cfg)
    optim = optim_settings(cfg)
    datamodule = GlueDataModule(
        spec,
        raw,
        prepared.tokenizer,
        max_length=int(cfg.task.max_length),
        batch_size=int(cfg.train.batch_size),
        eval_batch_size=int(cfg.train.eval_batch_size),
        seed=int(cfg.seed),
        search_split=search.split if search.enabled else 0.0,
        cache_dir=cfg.data.cache_dir,
        num_workers=int(cfg.data.num_workers),
        merge_at=search.steps * optim.accumulate if search.merge_search_split else None,
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


def _callbacks(
    cfg: DictConfig, output_dir: Path, preemption: Preemption, search_enabled: bool, snapshot
) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=str(output_dir / "checkpoints"),
            save_last=True,
            save_top_k=0,
            every_n_train_steps=int(cfg.train.ckpt_every),
        ),
        preemption,
    ]
    if cfg.train.get("stop_after"):
        callbacks.append(StopAfter(int(cfg.train.stop_after)))
    if search_enabled:
        callbacks += [
            Discretization(output_dir, cfg.backbone.name, snapshot),
            DAMMonitor(output_dir, int(cfg.dam.log_every)),
        ]
    return callbacks


def _write_run_files(assembled: Assembled, output_dir: Path) -> None:
    """The search split (when searching) and a mask known before training (other methods)."""
    module = assembled.module
    if module.search.enabled:
        split_file = output_dir / "dam" / "search_split.json"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps({"indices": assembled.datamodule.search_indices}))
    if module.mask is not None:
        module.mask.save(output_dir / "dam" / "mask.json")


def _publish(
    cfg: DictConfig, module: DiffoRAModule, tokenizer, results: dict, output_dir: Path, logger
) -> None:
    """Exports (adapter, merged model), ``results.json``, the logger's summary, the printout."""
    if module.method.export(module.model, output_dir / "adapter") is not None:
        results["adapter"] = str(output_dir / "adapter")
    if cfg.get("export") is not None and cfg.export.get("merged"):
        export_merged(module.model, output_dir / "merged", tokenizer)
        results["merged"] = str(output_dir / "merged")
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    tracking.write_summary(logger, summary_for_logger(results))
    print(summary_text(results, output_dir))


def _stopped(module: DiffoRAModule, preemption: Preemption, output_dir: Path) -> dict[str, Any]:
    print(
        f"diffora_lab: stopped at step {module.step} of {module.optim.max_steps}; "
        f"continue with ckpt_path=last hydra.run.dir={output_dir}"
    )
    return {
        "stopped_at": module.step,
        "signal": preemption.stopped_by,
        "output_dir": str(output_dir),
    }


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Runs one job end to end and returns its results (also written to ``results.json``)."""
    started = time.time()
    output_dir = Path(output_dir)
    prepared = prepare(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt_dir = output_dir / "checkpoints"
    ckpt_path = _resolve_ckpt(cfg, ckpt_dir)
    if ckpt_path:
        _check_ckpt_matches(ckpt_path, cfg)

    assembled = assemble(cfg, prepared)
    module, datamodule = assembled.module, assembled.datamodule
    _write_run_files(assembled, output_dir)
    search_info, snapshot = {"reused": False, "key": None}, None
    if module.search.enabled and cfg.dam.reuse_search:
        search_info, snapshot = shared_search(cfg, output_dir, can_reuse=ckpt_path is None)
        if search_info["reused"]:
            ckpt_path = str(snapshot)
            module.search_reused = True

    run_id_file = ckpt_dir / "wandb_run_id"
    resume_id = None
    if ckpt_path and not search_info["reused"] and run_id_file.is_file():
        resume_id = run_id_file.read_text().strip()
    logger = tracking.build_logger(cfg, output_dir, resume_id)
    failed = True
    try:
        run_id = tracking.wandb_run_id(logger)
        if run_id:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text(run_id)
        preemption = Preemption(ckpt_dir / "last.ckpt")
        callbacks = _callbacks(cfg, output_dir, preemption, module.search.enabled, snapshot)
        trainer = build_trainer(cfg, output_dir, logger, callbacks)
        fit_started = time.time()
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # Lightning's exit after SIGTERM; Preemption saved first
            preemption.stopped_by = preemption.stopped_by or int(signal.SIGTERM)
        else:
            trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))
        if module.step < module.optim.max_steps:
            failed = False
            return _stopped(module, preemption, output_dir)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        results = collect_results(cfg, module, assembled.candidates, started, output_dir)
        results["fit_seconds"] = round(time.time() - fit_started, 2)
        results["search"] = search_info
        if trainer.is_global_zero:
            _publish(cfg, module, prepared.tokenizer, results, output_dir, logger)
        failed = False
        return results
    finally:
        tracking.finish(logger, failed)
