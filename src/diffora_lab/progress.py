"""What a running job shows: a progress bar on a terminal, log lines elsewhere, a resume notice.

Both views carry the same fields: the phase (``search`` or ``finetune``), the weight step of the
total, the last train and search losses, steps per second since this process started training,
and the estimated time left. On a terminal :class:`PhaseProgressBar` (Lightning's tqdm bar,
configured) shows them; when stdout is not a terminal (SLURM logs, CI, ``> file``) a bar would
write thousands of carriage returns, so :class:`ProgressLog` writes one line every
``train.progress_every`` seconds instead. :func:`progress_callbacks` picks.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger("diffora_lab")

LOSS_KEYS = {"loss": "train/loss", "search_loss": "search/loss"}


def _losses(trainer: pl.Trainer) -> dict[str, float]:
    """The last logged train and search losses (the search loss only while searching)."""
    values = {}
    for short, key in LOSS_KEYS.items():
        if short == "search_loss" and trainer.lightning_module.phase != "search":
            continue  # Lightning keeps the last value logged; it is stale after the search
        value = trainer.callback_metrics.get(key)
        if value is not None:
            values[short] = float(value)
    return values


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting weight steps over ``train.max_steps``, named by the phase.

    The stock bar counts batches of an epoch (``Epoch 0/-2`` with a step budget) and shows no
    loss: here the bar's total is the step budget, it starts at the resumed step (so the rate and
    ETA count only this process's steps), its description is the phase, and its postfix holds the
    train and search losses. tqdm adds steps/s and the ETA.
    """

    BAR_FORMAT = (
        "{desc} {n_fmt}/{total_fmt} steps |{bar:20}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    )

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        module = trainer.lightning_module
        bar = self.train_progress_bar
        bar.reset(total=int(trainer.max_steps))
        bar.initial = bar.n = int(module.step)
        bar.unit = "step"
        bar.set_description_str(module.phase)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        step = int(pl_module.step)
        if self._should_update(step, bar.total) or bar.desc.strip() != pl_module.phase:
            bar.set_description_str(pl_module.phase, refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.n = step
            bar.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The losses (4 significant digits) instead of Lightning's version number."""
        return {name: f"{value:.4g}" for name, value in _losses(trainer).items()}


class ProgressLog(pl.Callback):
    """One log line at least every ``every`` seconds with the progress bar's fields.

    For output that is not a terminal. The first line comes after the first step (the run is
    alive), then one whenever ``every`` seconds have passed, one when the phase changes and one
    at the end.

    Args:
        every: Seconds between two lines.
        emit: Where lines go (default: the ``diffora_lab`` logger, which Hydra sends to stdout
            and the run's log file).
    """

    def __init__(self, every: float = 30.0, emit=None) -> None:
        self.every = float(every)
        self.emit = emit or log.info
        self._started = 0.0
        self._start_step = 0
        self._last = -math.inf
        self._phase: str | None = None

    def on_train_start(self, trainer, module) -> None:
        self._started = time.monotonic()
        self._start_step = int(module.step)
        self._phase = module.phase

    def line(self, trainer: pl.Trainer, module) -> str:
        """The progress line for the current state."""
        step, total = int(module.step), int(trainer.max_steps)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = (step - self._start_step) / elapsed
        eta = (total - step) / rate if rate > 0 else math.inf
        losses = " ".join(f"{name} {value:.4g}" for name, value in _losses(trainer).items())
        return (
            f"{module.phase} step {step}/{total} | {losses or 'loss -'} | {rate:.2f} steps/s | "
            f"ETA {_duration(eta)}"
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        now = time.monotonic()
        first = self._last == -math.inf and module.step > self._start_step
        changed = module.phase != self._phase
        if first or changed or now - self._last >= self.every:
            self._last, self._phase = now, module.phase
            self.emit(self.line(trainer, module))

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.emit(self.line(trainer, module))


class ResumeNotice(pl.Callback):
    """Says in one line where a run continues from (step, phase), or that it reuses a search."""

    def __init__(self, emit=None) -> None:
        self.emit = emit or print

    def on_train_start(self, trainer, module) -> None:
        if not trainer.is_global_zero or module.step == 0:
            return
        source = "a shared search snapshot" if module.search_reused else "checkpoint"
        self.emit(
            f"diffora_lab: resuming from {source} at step {module.step} of "
            f"{trainer.max_steps}, phase {module.phase}"
        )


def progress_callbacks(enabled: bool, every: float, terminal: bool | None = None) -> list:
    """The callbacks that show a run's progress, and whether Lightning's bar is on.

    Args:
        enabled: ``trainer.enable_progress_bar``: false shows neither bar nor lines.
        every: ``train.progress_every``: seconds between log lines off a terminal.
        terminal: Whether stdout is a terminal (default: asks ``sys.stdout``).

    Returns:
        The callbacks; the resume notice is always among them.
    """
    if terminal is None:
        terminal = sys.stdout.isatty()
    callbacks: list[pl.Callback] = [ResumeNotice()]
    if enabled:
        callbacks.append(PhaseProgressBar() if terminal else ProgressLog(every))
    return callbacks
