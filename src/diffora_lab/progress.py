"""What a running job shows: a progress bar on a terminal, log lines elsewhere, a resume notice.

Both views carry the same fields: the phase (``search`` or ``finetune``), the weight step of the
total, the last train and search losses, steps per second and the estimated time left. Both time
the steps after this process's first one: start-up, a restored checkpoint or search snapshot and
the first batch are no steps, and counting them made the first ETA 2-10 times too long. On a
terminal :class:`PhaseProgressBar` (Lightning's tqdm bar, configured) shows them; when stdout is
not a terminal (SLURM logs, CI, ``> file``), or is one that reports no width (some pseudo-
terminals report 0 columns, and a bar there shows nothing), :class:`ProgressLog` writes one line
every ``train.progress_every`` seconds instead. :func:`progress_callbacks` picks.
"""

from __future__ import annotations

import logging
import math
import os
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
    loss: here the bar's total is the step budget, its description is the phase, and its postfix
    holds the train and search losses. tqdm adds steps/s and the ETA, timed from the end of this
    process's first step (the bar is restarted there).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._timed = False

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._timed = False

    def _restart(self, step: int) -> None:
        bar = self.train_progress_bar
        bar.reset(total=bar.total)
        bar.initial = bar.n = step

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
        if not self._timed:  # this process's first step: the clock starts after it
            self._timed = True
            self._restart(step)
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

    For output that is not a terminal. The first line comes after the second step (the run is
    alive, and one step was timed), then one whenever ``every`` seconds have passed, one when
    the phase changes and one at the end. Steps per second and the ETA count the steps after
    this process's first one (see the module's docstring).

    Args:
        every: Seconds between two lines.
        emit: Where lines go (default: the ``diffora_lab`` logger, which Hydra sends to stdout
            and the run's log file).
    """

    def __init__(self, every: float = 30.0, emit=None) -> None:
        self.every = float(every)
        self.emit = emit or log.info
        self.clock = time.monotonic
        self._timed_from: tuple[float, int] | None = None  # (time, step) after the first step
        self._start_step = 0
        self._last = -math.inf
        self._phase: str | None = None

    def on_train_start(self, trainer, module) -> None:
        self._timed_from = None
        self._start_step = int(module.step)
        self._phase = module.phase

    def line(self, trainer: pl.Trainer, module) -> str:
        """The progress line for the current state."""
        step, total = int(module.step), int(trainer.max_steps)
        rate = 0.0
        if self._timed_from is not None and step > self._timed_from[1]:
            since, from_step = self._timed_from
            rate = (step - from_step) / max(self.clock() - since, 1e-9)
        eta = (total - step) / rate if rate > 0 else math.inf
        if step >= total:
            eta = 0.0
        losses = " ".join(f"{name} {value:.4g}" for name, value in _losses(trainer).items())
        return (
            f"{module.phase} step {step}/{total} | {losses or 'loss -'} | {rate:.2f} steps/s | "
            f"ETA {_duration(eta)}"
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        now = self.clock()
        if self._timed_from is None:  # this process's first step: the clock starts after it
            self._timed_from = (now, int(module.step))
            self._phase = module.phase
            return
        first = self._last == -math.inf
        changed = module.phase != self._phase
        if first or changed or now - self._last >= self.every:
            self._last, self._phase = now, module.phase
            self.emit(self.line(trainer, module))

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.emit(self.line(trainer, module))


class ResumeNotice(pl.Callback):
    """Says in one line where a run continues from: its checkpoint (step, phase), or the end of
    a search another run already made (which run, which cache entry).

    Args:
        emit: Where the line goes (default: ``print``).
        reused: The search cache's record of a reused search (``path``, ``key``, ``run_folder``),
            or None.
    """

    def __init__(self, emit=None, reused: dict[str, Any] | None = None) -> None:
        self.emit = emit or print
        self.reused = reused

    def on_train_start(self, trainer, module) -> None:
        if not trainer.is_global_zero or module.step == 0:
            return
        if self.reused is not None and not self.reused.get("exact", True):
            self.emit(
                f"diffora_lab: the search of this run continues the one "
                f"{self.reused.get('run_folder') or 'another run'} made (search cache entry "
                f"{self.reused.get('key')}) from its snapshot at step {module.step}, to its cut "
                f"and then fine-tuning to step {trainer.max_steps}."
            )
            return
        if self.reused is not None:
            self.emit(
                f"diffora_lab: the search of this run was already made by "
                f"{self.reused.get('run_folder') or 'another run'} (search cache entry "
                f"{self.reused.get('key')}); this run starts from its end: discretization at "
                f"step {module.step}, then fine-tuning to step {trainer.max_steps}."
            )
            return
        self.emit(
            f"diffora_lab: resuming from checkpoint at step {module.step} of "
            f"{trainer.max_steps}, phase {module.phase}"
        )


def usable_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stdout) is a terminal a progress bar can be drawn on.

    A terminal that reports 0 columns (some pseudo-terminals of job runners and IDEs) draws a
    bar of width 0, i.e. nothing: log lines are shown there instead.
    """
    stream = sys.stdout if stream is None else stream
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
    try:
        descriptor = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True  # a terminal-like wrapper without a descriptor: take its word
    try:
        columns = os.get_terminal_size(descriptor).columns
    except OSError:
        return False
    return columns > 0  # tqdm reads the same width (and ignores $COLUMNS when it is 0)


def progress_callbacks(
    enabled: bool,
    every: float,
    terminal: bool | None = None,
    reused: dict[str, Any] | None = None,
) -> list:
    """The callbacks that show a run's progress, and whether Lightning's bar is on.

    Args:
        enabled: ``trainer.enable_progress_bar``: false shows neither bar nor lines.
        every: ``train.progress_every``: seconds between log lines off a terminal.
        terminal: Whether stdout is a terminal with a width (default: :func:`usable_terminal`).
        reused: The search cache's record when this run reuses a search (for the notice).

    Returns:
        The callbacks; the resume notice is always among them.
    """
    if terminal is None:
        terminal = usable_terminal()
    callbacks: list[pl.Callback] = [ResumeNotice(reused=reused)]
    if enabled:
        callbacks.append(PhaseProgressBar() if terminal else ProgressLog(every))
    return callbacks
