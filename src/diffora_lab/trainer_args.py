"""The Lightning Trainer: the ``trainer.*`` settings the harness supports, and the Trainer built.

``trainer.*`` is passed to ``lightning.Trainer``, but the harness sets the loop itself (steps,
evaluation and log cadence, checkpoints, manual optimization with two optimizers), so only the
settings in :data:`SUPPORTED` are accepted; the others are refused with the setting that does the
job here, or with why the harness cannot honour them (a run on part of the data would report a
metric over all of it). Values are checked too: precision, accelerator, strategy, determinism and
the device count against this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# trainer.* keys that reach lightning.Trainer (conf/config.yaml sets the first seven).
SUPPORTED = (
    "accelerator",
    "devices",
    "strategy",
    "precision",
    "deterministic",
    "enable_progress_bar",
    "enable_model_summary",
    "num_nodes",
    "benchmark",
    "detect_anomaly",
)
# Lightning arguments a setting of ours replaces: manual optimization cannot honour these ...
MANUAL_OPTIMIZATION = {
    "gradient_clip_val": "train.grad_clip",
    "gradient_clip_algorithm": "train.grad_clip",
    "accumulate_grad_batches": "train.accumulate",
    "max_steps": "train.max_steps",
    "max_epochs": "train.max_steps",
}
# ... and the harness sets these itself.
SET_BY_HARNESS = {
    "val_check_interval": "train.val_every",
    "check_val_every_n_epoch": "train.val_every",
    "log_every_n_steps": "train.log_every",
    "default_root_dir": "hydra.run.dir",
    "enable_checkpointing": "train.ckpt_every",  # checkpoints/last.ckpt is how a run resumes
}
PRECISIONS = ("auto", "32", "32-true", "bf16", "bf16-mixed", "bf16-true", "64", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp")


def _fail(setting: str, value: object, fix: str) -> None:
    raise ValueError(f"{setting}={value!r}: {fix}")


def check_trainer_args(cfg: DictConfig) -> None:
    """Refuses ``trainer.*`` settings the harness does not support, and unusable values.

    Raises:
        ValueError: Naming the setting and the fix.
    """
    trainer = cfg.trainer
    for key in trainer:
        if trainer.get(key) is None or key in SUPPORTED:
            continue
        if key in MANUAL_OPTIMIZATION:
            raise ValueError(
                f"trainer.{key}: manual optimization cannot honour it; use "
                f"{MANUAL_OPTIMIZATION[key]} instead."
            )
        if key in SET_BY_HARNESS:
            raise ValueError(f"trainer.{key}: the harness sets it; use {SET_BY_HARNESS[key]}.")
        else:
            raise ValueError(
                f"trainer.{key}: not supported by the harness (it runs every step and scores "
                f"the whole dev set; results.json would describe another run); supported: "
                f"{', '.join(f'trainer.{k}' for k in SUPPORTED)}."
            )
    precision = str(trainer.get("precision") or "auto")
    if precision in ("16", "16-mixed"):
        raise ValueError(
            f"trainer.precision={precision}: fp16 loss scaling is not supported with DiffoRA's "
            "two optimizers; use bf16-mixed (GPU) or 32-true."
        )
    if precision not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision}: not supported (fp16 without loss scaling "
            f"underflows); choose one of {list(PRECISIONS)}."
        )
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator not in ACCELERATORS:
        _fail("trainer.accelerator", accelerator, f"choose one of {list(ACCELERATORS)}.")
    strategy = trainer.get("strategy") or "auto"
    if strategy not in STRATEGIES:
        _fail("trainer.strategy", strategy, f"choose one of {list(STRATEGIES)}.")
    deterministic = trainer.get("deterministic")
    if deterministic is not None and deterministic not in (True, False, "warn"):
        _fail("trainer.deterministic", deterministic, "true, false or warn.")
    if cfg.dam.order == "second" and int(trainer.get("devices") or 1) > 1:
        raise ValueError(
            "dam.order=second: the unrolled architecture step runs on one device only; "
            "use dam.order=first with trainer.devices>1."
        )
    check_devices(cfg)


def _available_devices(accelerator: str) -> tuple[int, str] | None:
    """How many devices of the accelerator's kind this machine has (None: not checked here)."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.device_count(), "GPU(s)"
    if accelerator in ("cpu", "auto"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return int(cores or 1), "CPU core(s)"
    return None


def check_devices(cfg: DictConfig) -> None:
    """``trainer.devices``: a count, a list of ids or auto, within what this machine has."""
    devices = cfg.trainer.get("devices")
    if devices is None or devices in ("auto", -1, "-1"):
        return
    if OmegaConf.is_list(devices):
        wanted = len(devices)
    elif isinstance(devices, str) and devices.replace(",", "").strip().isdigit():
        wanted = int(devices) if "," not in devices else len([d for d in devices.split(",") if d])
    elif isinstance(devices, int) and not isinstance(devices, bool):
        wanted = devices
    else:
        _fail("trainer.devices", devices, "a number of devices >= 1, a list of ids, or auto.")
    if wanted < 1:
        _fail("trainer.devices", devices, "a number of devices >= 1 (or auto).")
    accelerator = str(cfg.trainer.get("accelerator") or "auto")
    available = _available_devices(accelerator)
    if available is not None and wanted > available[0]:
        count, kind = available
        _fail(
            "trainer.devices",
            devices,
            f"this machine has {count} {kind} for trainer.accelerator={accelerator}; use "
            f"trainer.devices<={count} (or trainer.devices=auto).",
        )


def build_trainer(cfg: DictConfig, output_dir: Path, logger, callbacks):
    """The ``lightning.Trainer`` of a run: ``trainer.*`` plus the loop the harness sets."""
    import lightning.pytorch as pl
    import torch

    from diffora_lab.checkpointing import AtomicCheckpointIO
    from diffora_lab.progress import PhaseProgressBar

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
