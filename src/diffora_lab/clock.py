"""How long a run took, and where the time went: start-up, search, fine-tuning, the rest."""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning.pytorch as pl


class RunClock(pl.Callback):
    """Wall and fit seconds of a run and how they split, added up over its resumes (kept in the
    checkpoint).

    The split: ``startup`` (from the start of each process to its first step: loading, building,
    restoring a checkpoint), ``search`` and ``finetune`` (the steps of each phase, the dev
    evaluations between them included); the rest of the wall time is the final scoring and
    export. A run that starts from a shared search snapshot spent 0 s searching.

    Args:
        started: ``now()`` when this process started the run.
        restore: False when the checkpoint is another run's (a reused search): its time is not
            this run's.
        now: The time source (seconds); tests pass a fake one to check the arithmetic.
    """

    PHASES = ("startup", "search", "finetune")

    def __init__(
        self, started: float, restore: bool = True, now: Callable[[], float] = time.time
    ) -> None:
        self.started = started
        self.restore = restore
        self.now = now
        self.fit_started: float | None = None
        self.wall_before = 0.0  # spent by earlier processes of this run
        self.fit_before = 0.0
        self.split = dict.fromkeys(self.PHASES, 0.0)
        self._mark: float | None = None
        self._phase = "search"

    def on_fit_start(self, trainer, module) -> None:
        self.fit_started = self.now()

    def on_train_start(self, trainer, module) -> None:
        self._mark = self.now()
        self.split["startup"] += self._mark - self.started

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._phase = module.phase

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = self.now()
        if self._mark is not None:
            self.split[self._phase] = self.split.get(self._phase, 0.0) + now - self._mark
        self._mark = now

    def wall_seconds(self) -> float:
        return self.wall_before + self.now() - self.started

    def fit_seconds(self) -> float:
        return self.fit_before + (
            self.now() - self.fit_started if self.fit_started is not None else 0.0
        )

    def seconds(self) -> dict[str, float]:
        """``startup``, ``search``, ``finetune`` and ``other`` (scoring, export) seconds so far."""
        split = {name: round(value, 2) for name, value in self.split.items()}
        split["other"] = round(max(0.0, self.wall_seconds() - sum(self.split.values())), 2)
        return split

    def state_dict(self) -> dict:
        return {
            "wall_seconds": self.wall_seconds(),
            "fit_seconds": self.fit_seconds(),
            "split": dict(self.split),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not self.restore:
            return
        self.wall_before = float(state_dict.get("wall_seconds", 0.0))
        self.fit_before = float(state_dict.get("fit_seconds", 0.0))
        for name, value in (state_dict.get("split") or {}).items():
            self.split[name] = self.split.get(name, 0.0) + float(value)
