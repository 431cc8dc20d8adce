"""A run that stops before its end: after ``train.stop_after`` steps, or told to by a signal.

Both stops end the loop as ``max_steps`` would (:func:`stop_here`) and leave
``checkpoints/last.ckpt`` written at the end of the step, where Lightning's own checkpoints are
written, so the resumed run continues exactly, its records included (README, "Long runs and
clusters").
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger(__name__)


def stop_here(trainer: pl.Trainer) -> None:
    """Ends training after the current step as if ``max_steps`` were reached there.

    ``trainer.should_stop`` would also log a train row and run a dev evaluation the schedule does
    not have (Lightning does both on a requested stop): the records of a stopped and resumed run
    would hold rows an uninterrupted one lacks.
    """
    trainer.fit_loop.epoch_loop.max_steps = trainer.global_step


class StopAfter(pl.Callback):
    """Stops a run after ``step`` weight steps, saving ``checkpoint`` to resume from.

    For time-limited slots: a run split over several jobs with ``ckpt_path=last`` ends exactly
    as one uninterrupted run, records included. The checkpoint is written here, at the end of
    the step (after the discretization when the step ends the search: keep this callback after
    :class:`Discretization`), where Lightning's own checkpoints are written: its loop counters
    resume from there without an off-by-one in the logged steps.
    """

    def __init__(self, step: int, checkpoint: str | Path) -> None:
        self.step = int(step)
        self.checkpoint = Path(checkpoint)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.step >= self.step:
            trainer.save_checkpoint(str(self.checkpoint))
            stop_here(trainer)


class Preemption(pl.Callback):
    """Saves ``last.ckpt`` and stops when the job is told to go (SIGTERM, SIGINT, or SIGUSR1 off
    SLURM).

    Lightning turns SIGTERM into an exception after the current batch; this callback writes the
    checkpoint first. SIGINT (Ctrl-C) takes the same path (a second one stops at once). Under
    SLURM with auto-requeue, Lightning's own SIGUSR1 handler saves and requeues, and this one
    leaves SIGUSR1 alone.
    """

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.signalled = False
        self.interrupted = False
        self.stopped_by: int | None = None  # the signal that stopped the run, if any
        self._previous_sigint = None

    def on_fit_start(self, trainer, module) -> None:
        import os
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        if "SLURM_JOB_ID" not in os.environ and hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._notice)
        self._previous_sigint = signal.signal(signal.SIGINT, self._interrupt)

    def _notice(self, signum, frame) -> None:
        self.signalled = True

    def _interrupt(self, signum, frame) -> None:
        import os
        import signal

        if self.interrupted:  # the second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.interrupted = True
        # Lightning's SIGTERM path: stops child processes and every rank after this batch.
        os.kill(os.getpid(), signal.SIGTERM)

    def teardown(self, trainer, module, stage: str) -> None:
        import signal
        import threading

        if (
            self._previous_sigint is not None
            and threading.current_thread() is threading.main_thread()
        ):
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def stop_signal(self) -> int:
        """The signal that stopped the run (SIGINT, SIGUSR1 or SIGTERM)."""
        import signal

        if self.interrupted:
            return int(signal.SIGINT)
        return int(signal.SIGUSR1 if self.signalled else signal.SIGTERM)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.signalled or trainer.received_sigterm:
            self.stopped_by = self.stop_signal()
            trainer.save_checkpoint(str(self.checkpoint))
            stop_here(trainer)
            log.warning("signal received: saved %s at step %d", self.checkpoint, module.step)
