"""Experiment tracking: the W&B (or CSV) logger of a run, its name, group, mode and summary.

Without an API key W&B runs offline (the run files are written under the run folder and can be
uploaded later with ``wandb sync``); an unreachable server never stops training.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CUT_KEY = "dam/val_before"  # a metric only the discretization's record row has


def run_name(cfg: DictConfig) -> str:
    """``method-task-b<budget>-r<rank>-s<seed>``: the fields a budget/method sweep varies."""
    return (
        f"{cfg.method.name}-{cfg.task.name}-b{float(cfg.budget):g}-r{int(cfg.rank)}"
        f"-s{int(cfg.seed)}"
    )


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None) -> str:
    """online / offline / disabled; ``None`` means online with an API key, else offline."""
    if requested:
        if requested not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode={requested!r}: choose online, offline or disabled.")
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if has_wandb_key():
        return "online"
    log.warning(
        "W&B: no API key found, logging offline to the run folder "
        "(upload later with `wandb sync <run>/wandb/offline-run-*`)."
    )
    return "offline"


def build_logger(
    cfg: DictConfig,
    output_dir: Path,
    resume_id: str | None = None,
    start_step: int = 0,
    cut_kept: bool = False,
):
    """The Lightning logger chosen by ``logger.name`` (wandb, csv or none).

    Args:
        cfg: The run's config.
        output_dir: The run folder.
        resume_id: The W&B run to continue.
        start_step: The step training starts from; a CSV history keeps its rows before it.
        cut_kept: The checkpoint holds the discretization made at ``start_step``: its record
            row (``dam/val_before`` ...) is kept, since the resumed run does not make it again.
    """
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        return resumable_csv_logger(output_dir, start_step, cut_kept)
    if name != "wandb":
        raise ValueError(f"logger={name!r}: choose wandb, csv or none.")
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")

    def make(mode: str) -> WandbLogger:
        return WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=run_group(cfg),
            name=run_name(cfg),
            tags=list(cfg.logger.get("tags") or []),
            save_dir=str(output_dir),
            mode=mode,
            id=resume_id,
            resume="allow" if resume_id else None,
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=_wandb_settings(),
        )

    mode = wandb_mode(cfg.logger.get("mode"))
    logger = make(mode)
    try:
        logger.experiment  # noqa: B018 - starts the run now, not in the middle of training
    except Exception as error:  # an unreachable server must never stop training
        if mode != "online":
            raise
        log.warning("W&B: could not reach the server (%s); logging offline instead.", error)
        logger = make("offline")
    return logger


def resumable_csv_logger(output_dir: Path, start_step: int, cut_kept: bool = False):
    """A CSVLogger writing ``csv/metrics.csv`` that continues an existing file.

    Lightning's CSV logger deletes an existing ``metrics.csv``; this one keeps its rows logged
    before ``start_step`` (later ones were logged after the checkpoint the run resumes from and
    are logged again), with ``cut_kept`` the discretization's row at ``start_step`` too, and
    appends.
    """

    def kept(row: dict) -> bool:
        step = int(row["step"]) if row.get("step") else None
        if step is None:
            return False
        return step < start_step or (cut_kept and step == start_step and bool(row.get(CUT_KEY)))

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    class _AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            path = Path(self.metrics_file_path)
            if not path.is_file():
                return
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                rows = list(reader)
            keep = [row for row in rows if kept(row)]
            if len(keep) != len(rows):
                with path.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=header)
                    writer.writeheader()
                    writer.writerows(keep)
            self.metrics_keys = header

    class _AppendingCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None and rank_zero_only.rank == 0:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _AppendingWriter(log_dir=self.log_dir)
            return super().experiment

    return _AppendingCSVLogger(save_dir=str(output_dir), name="csv", version="")


def run_group(cfg: DictConfig) -> str:
    """``logger.group``, else the sweep folder of a multirun, else ``task-backbone``."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if str(hydra_cfg.mode) == "RunMode.MULTIRUN":
            return "sweep-" + Path(str(hydra_cfg.sweep.dir)).name
    return f"{cfg.task.name}-{cfg.backbone.name}"


def _wandb_settings():
    import wandb

    # Never let a slow or unreachable server stall training.
    return wandb.Settings(init_timeout=120, x_disable_stats=True)


def wandb_run_id(logger: Any) -> str | None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        return logger.experiment.id
    return None


def write_summary(logger: Any, summary: dict[str, Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(summary)


def finish(logger: Any, failed: bool) -> None:
    """Closes the W&B run with the job's exit code, so the next multirun job starts clean."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
