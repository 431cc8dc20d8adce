"""The steps of an accepted run after it is built: its files, callbacks, the fit, how it stopped,
and its finish (scored, recorded, exported, summarised). train.py calls them in order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from diffora_lab import tracking
from diffora_lab.callbacks import DAMMonitor, Discretization, RunClock
from diffora_lab.export import export_merged, export_run
from diffora_lab.progress import progress_callbacks
from diffora_lab.results import collect_results, summary_for_logger, summary_text
from diffora_lab.runfolder import divergence_message
from diffora_lab.stopping import Preemption, StopAfter

RUN_ID_FILE = "wandb_run_id"


def write_run_files(output_dir: Path, module, datamodule) -> None:
    """The search split (which train rows the architecture steps see) and a mask given up front."""
    if module.search.enabled:
        split_file = output_dir / "dam" / "search_split.json"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps({"indices": datamodule.search_indices}))
    if module.mask is not None:
        module.mask.save(output_dir / "dam" / "mask.json")


def wandb_resume_id(ckpt_dir: Path, own_checkpoint: str | None) -> str | None:
    """The W&B run to continue: only when the run resumes its own checkpoint."""
    run_id_file = ckpt_dir / RUN_ID_FILE
    if own_checkpoint and run_id_file.is_file():
        return run_id_file.read_text().strip()
    return None


def remember_wandb_id(ckpt_dir: Path, logger) -> None:
    """Writes the W&B run id next to the checkpoints, so that a resume continues that run."""
    run_id = tracking.wandb_run_id(logger)
    if run_id:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / RUN_ID_FILE).write_text(run_id)


def run_callbacks(
    cfg: DictConfig,
    output_dir: Path,
    module,
    entry,
    preemption: Preemption,
    clock: RunClock,
    reused: dict[str, Any] | None = None,
) -> list[pl.Callback]:
    """Checkpoints, preemption, clock and progress (``reused``: the search cache's record of the
    search this run starts from, which the progress lines name); with a search, its cut and DAM
    records; last, ``train.stop_after`` (its checkpoint holds all that its step did)."""
    ckpt_dir = output_dir / "checkpoints"
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
            reused=reused,
        ),
    ]
    if module.search.enabled:
        callbacks += [
            Discretization(output_dir, cfg.backbone.name, entry),
            DAMMonitor(output_dir, int(cfg.dam.log_every)),
        ]
    if cfg.train.get("stop_after"):
        callbacks.append(StopAfter(int(cfg.train.stop_after), ckpt_dir / "last.ckpt"))
    return callbacks


def fit(
    trainer: pl.Trainer,
    module,
    datamodule,
    ckpt_path: str | None,
    preemption: Preemption,
    ckpt_dir: Path,
) -> None:
    """``trainer.fit``; a SIGTERM ends it saved (Preemption), a divergence names its step and
    the fix, and a finished fit writes its final checkpoint."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's exit after SIGTERM; Preemption saved first
        preemption.stopped_by = preemption.stopped_by or preemption.stop_signal()
    except FloatingPointError as error:
        message = divergence_message(error, ckpt_dir, module.optim.grad_clip)
        raise FloatingPointError(message) from None
    else:
        if module.step >= module.optim.max_steps:  # a stop saved its own, at the end of its step
            trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))


def stopped_early(module, preemption: Preemption, output_dir: Path) -> dict[str, Any]:
    """A run stopped before ``train.max_steps`` (a signal or ``train.stop_after``): how to go on."""
    max_steps = module.optim.max_steps
    print(
        f"diffora_lab: stopped at step {module.step} of {max_steps}; "
        f"continue with ckpt_path=last hydra.run.dir={output_dir}"
    )
    return {
        "stopped_at": module.step,
        "signal": preemption.stopped_by,
        "output_dir": str(output_dir),
    }


def finish(
    cfg: DictConfig,
    trainer: pl.Trainer,
    assembled,
    clock: RunClock,
    output_dir: Path,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Scores the dev set of the final weights, unless the last scheduled evaluation did so at the
    last step (``train.val_every`` divides ``train.max_steps``), and collects ``results.json``'s
    content (``extra``: what the run recorded on the way, e.g. the search cache's reuse and the
    data warnings)."""
    module = assembled.module
    if module.last_val_step != module.step:
        trainer.validate(module, datamodule=assembled.datamodule, verbose=False)
    results = collect_results(cfg, module, assembled.candidates, clock.started, output_dir)
    results["wall_seconds"] = round(clock.wall_seconds(), 2)
    results["fit_seconds"] = round(clock.fit_seconds(), 2)
    results["seconds"] = clock.seconds()  # start-up, search, fine-tune, the rest
    results.update(extra)
    return results


def publish(cfg: DictConfig, trainer: pl.Trainer, module, tokenizer, results: dict, logger) -> None:
    """On rank 0: the adapter (and merged model), ``results.json``, the logger's summary and the
    printed summary."""
    if not trainer.is_global_zero:
        return
    output_dir = Path(results["output_dir"])
    if export_run(cfg, module, output_dir / "adapter", results) is not None:
        results["adapter"] = str(output_dir / "adapter")
    if cfg.get("export") is not None and cfg.export.get("merged"):
        export_merged(module.model, output_dir / "merged", tokenizer)
        results["merged"] = str(output_dir / "merged")
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    tracking.write_summary(logger, summary_for_logger(results))
    print(summary_text(results, output_dir))
