"""One run, from a composed config to ``results.json``: the pipeline every method goes through.

Order matters: everything a user can get wrong is checked first (:func:`prepare`), cheaply, before
a model's weights or a dataset load; then the model, data, module, callbacks and trainer are built,
fitted, scored, exported and summarised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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
from diffora_lab.dam import Mask, gate_entropy, num_kept
from diffora_lab.data import GlueDataModule
from diffora_lab.matching import achieved, target_rank_of
from diffora_lab.module import STATE_FORMAT, DiffoRAModule
from diffora_lab.speed import compile_layers
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


# Settings that act only after discretization (or not on training at all): runs that differ in
# nothing else share one search (issue: "search once" budget sweeps).
AFTER_SEARCH_KEYS = (
    "budget",
    "ckpt_path",
    "logger",
    "train.val_every",
    "train.ckpt_every",
    "train.log_every",
    "train.eval_batch_size",
    "train.stop_after",
    "train.finite_check_every",
    "dam.fold_gates",
    "dam.weight_sharing",
    "dam.merge_search_split",
    "dam.mask_path",
    "dam.log_every",
    "dam.reuse_search",
    "dam.search_cache_dir",
    "data.cache_dir",  # data.bucketing stays in the key: it changes the batches
    "data.num_workers",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)


def search_key(cfg: DictConfig) -> str:
    """Hash of every setting that can change the state at the end of the search."""
    from diffora_lab import __version__

    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.pop("hydra", None)
    dam = cfg.dam
    budget_shapes_search = (
        dam.relaxation == "topk" or dam.get("progressive") or float(dam.budget_penalty) > 0
    )
    for dotted in AFTER_SEARCH_KEYS:
        if dotted == "budget" and budget_shapes_search:
            continue  # these searches steer towards k: the budget changes their end state
        parts = dotted.split(".")
        node = settings
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    payload = json.dumps([__version__, STATE_FORMAT, settings], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
    if cfg.train.get("compile"):
        compile_layers(
            built.model,
            str(cfg.backbone.layer_pattern),
            backend=str(cfg.train.get("compile_backend") or "inductor"),
            mode=cfg.train.get("compile_mode"),
        )
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


def _shared_search(cfg: DictConfig, output_dir: Path, can_reuse: bool) -> tuple[dict, Path]:
    """Where this run's end-of-search snapshot lives, and whether another run already made it.

    A reused snapshot's gate records are copied into this run, so its figures show the search.
    """
    key = search_key(cfg)
    snapshot = Path(str(cfg.dam.search_cache_dir)).expanduser() / key / "search_end.ckpt"
    reused = can_reuse and snapshot.is_file()
    if reused:
        log.info("search %s already done: starting from %s", key, snapshot)
        history = snapshot.with_name("gates.jsonl")
        if history.is_file():
            (output_dir / "dam").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(history, output_dir / "dam" / "gates.jsonl")
    return {"reused": reused, "key": key}, snapshot


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
    module, datamodule, candidates = assembled.module, assembled.datamodule, assembled.candidates
    search, optim = module.search, module.optim
    if search.enabled:
        split_file = output_dir / "dam" / "search_split.json"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps({"indices": datamodule.search_indices}))
    if module.mask is not None:
        module.mask.save(output_dir / "dam" / "mask.json")

    search_info, snapshot = {"reused": False, "key": None}, None
    if search.enabled and cfg.dam.reuse_search:
        search_info, snapshot = _shared_search(cfg, output_dir, can_reuse=ckpt_path is None)
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
        callbacks: list[pl.Callback] = [
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                save_last=True,
                save_top_k=0,
                every_n_train_steps=int(cfg.train.ckpt_every),
            ),
            preemption,
        ]
        if cfg.train.get("stop_after"):
            callbacks.append(StopAfter(int(cfg.train.stop_after)))
        if search.enabled:
            callbacks += [
                Discretization(output_dir, cfg.backbone.name, snapshot),
                DAMMonitor(output_dir, int(cfg.dam.log_every)),
            ]
        trainer = build_trainer(cfg, output_dir, logger, callbacks)
        fit_started = time.time()
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # Lightning's exit after SIGTERM; Preemption saved first
            preemption.stopped_by = preemption.stopped_by or int(signal.SIGTERM)
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
        trainer.validate(module, datamodule=datamodule, verbose=False)
        results = _results(cfg, module, candidates, started, output_dir)
        results["fit_seconds"] = round(time.time() - fit_started, 2)
        results["search"] = search_info
        if trainer.is_global_zero:
            if module.method.export(module.model, output_dir / "adapter") is not None:
                results["adapter"] = str(output_dir / "adapter")
            if cfg.get("export") is not None and cfg.export.get("merged"):
                export_merged(module.model, output_dir / "merged", prepared.tokenizer)
                results["merged"] = str(output_dir / "merged")
            (output_dir / "results.json").write_text(json.dumps(results, indent=2))
            tracking.write_summary(logger, _summary_for_logger(results))
            print(summary_text(results, output_dir))
        failed = False
        return results
    finally:
        tracking.finish(logger, failed)


def _results(
    cfg: DictConfig,
    module: DiffoRAModule,
    candidates: list[Candidate],
    started: float,
    output_dir: Path,
) -> dict[str, Any]:
    params = module.trainable_parameters()
    mask = module.mask
    spec = module.spec
    results = {
        "task": spec.name,
        "method": cfg.method.name,
        "preset": cfg.method.get("preset"),
        "backbone": cfg.backbone.name,
        "budget": float(cfg.budget),
        "rank": int(cfg.rank),
        "seed": int(cfg.seed),
        "params_trainable": params["total"],
        "params": params,
        "candidate_modules": len(candidates),
        "kept_modules": mask.kept_modules if mask is not None else [],
        "kept_by_type": mask.counts_by_type() if mask is not None else {},
        "k": mask.k if mask is not None else 0,
        "dam_entropy": (
            float(gate_entropy(torch.tensor(mask.gates)))
            if mask is not None and mask.source == "search"
            else None
        ),
        "primary_metric": f"val/{spec.primary_metric}",
        "metrics": dict(module.last_val),
        "discretization": {
            "val_before": module.discretization.get("val_before"),
            "val_after": module.discretization.get("val_after"),
            "step": module.discretization.get("step"),
            "gap": (
                module.discretization["val_before"] - module.discretization["val_after"]
                if module.discretization.get("val_before") is not None
                else None
            ),
        },
        "steps": module.step,
        "world_size": module.trainer.world_size,
        "ranks_consistent": module.ranks_consistent,
        "wall_seconds": round(time.time() - started, 2),
        "output_dir": str(output_dir),
    }
    if module.search.enabled or cfg.dam.get("mask_path"):
        dam = cfg.dam
        results["search_variant"] = {
            "relaxation": str(dam.relaxation),
            "budget_penalty": float(dam.budget_penalty),
            "progressive": bool(dam.get("progressive", False)),
            "tau": [float(dam.tau), float(dam.tau_end)],
            "order": str(dam.order),
        }
    if cfg.method.get("scaling") is not None:
        method = cfg.method
        results["lora_scaling"] = {"rule": str(method.scaling), "scale": method.get("scale")}
    target_rank = target_rank_of(cfg)
    if target_rank is not None and mask is not None:
        results["match"] = achieved(mask.kept, candidates, int(cfg.rank), target_rank).as_dict()
    results.update(module.method.results(module.model, candidates))
    return results


def _summary_for_logger(results: dict[str, Any]) -> dict[str, Any]:
    flat = {f"final/{k.split('/', 1)[-1]}": v for k, v in results["metrics"].items()}
    flat.update(
        {
            "params/trainable": results["params_trainable"],
            "dam/k": results["k"],
            "dam/sparsity": 1 - results["k"] / max(1, results["candidate_modules"]),
            "dam/entropy": results["dam_entropy"],
            "dam/kept_modules": results["kept_modules"],
            "dam/kept_by_type": results["kept_by_type"],
            "dam/val_before": results["discretization"]["val_before"],
            "dam/val_after": results["discretization"]["val_after"],
        }
    )
    return flat


def summary_text(results: dict[str, Any], output_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    primary = results["primary_metric"]
    disc = results["discretization"]
    lines = [
        "",
        "=" * 72,
        f"diffora_lab: {results['method']} on {results['task']} "
        f"({results['backbone']}, budget {results['budget']}, rank {results['rank']}, "
        f"seed {results['seed']})",
        f"  steps               {results['steps']}  ({results['wall_seconds']:.0f} s)",
        f"  trainable params    {results['params_trainable']:,} "
        f"(adapter {results['params']['adapter']:,}, head {results['params']['head']:,}"
        + (
            f", backbone {results['params']['backbone']:,})"
            if results["params"]["backbone"]
            else ")"
        ),
    ]
    if results["kept_modules"]:
        lines.append(
            f"  kept modules        {results['k']}/{results['candidate_modules']}  "
            + " ".join(f"{t}:{n}" for t, n in results["kept_by_type"].items())
        )
    if disc["val_before"] is not None:
        lines.append(
            f"  discretization      {primary} {disc['val_before']:.4f} -> "
            f"{disc['val_after']:.4f} (step {disc['step']})"
        )
    for key, value in results["metrics"].items():
        lines.append(f"  final {key:<14}{value:.4f}")
    written = ["results.json", "checkpoints/last.ckpt"]
    for name in ("dam/mask.json", "dam/heatmaps/", "adapter/", "merged/"):
        if (output_dir / name).exists():
            written.append(name)
    lines += [
        f"  outputs             {output_dir}",
        "                      " + ", ".join(written),
        "=" * 72,
    ]
    return "\n".join(lines)
