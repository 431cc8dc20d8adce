"""Divergence found without waiting for the device every step.

Each loss is checked on the device (a running "first non-finite step" per phase and loss); the
host reads those flags every ``train.finite_check_every`` steps, before a checkpoint and before an
evaluation, so a run stops within that many steps of diverging and never saves non-finite
weights. ``train.finite_check_every=1`` reads every loss at once (one sync per step).
"""

from __future__ import annotations

import torch


class FiniteLossChecks:
    """Mixin of :class:`~diffora_lab.module.TrainingModule`: needs ``optim``, ``phase`` and
    ``step``; call :meth:`reset_finite_checks` in ``__init__``."""

    def reset_finite_checks(self) -> None:
        self._first_nonfinite: dict[tuple[str, str], torch.Tensor] = {}
        self._checked_at = 0

    def _check_finite(self, loss: torch.Tensor, which: str) -> None:
        if self.optim.finite_check_every <= 1:  # reads the loss now: one sync per step
            if not torch.isfinite(loss):
                self._diverged(which, self.phase, self.step, value=f" ({float(loss)})")
            return
        key = (self.phase, which)
        first = self._first_nonfinite.get(key)
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = torch.logical_not(torch.isfinite(loss.detach()))
        self._first_nonfinite[key] = torch.where(bad & (first < 0), self.step, first)

    def check_finite(self) -> None:
        """Raises ``FloatingPointError`` if a loss since the last check was not finite.

        Called every ``train.finite_check_every`` steps, before a checkpoint is written and
        before each evaluation, so a run stops within that many steps of diverging and never
        saves non-finite weights. This is the only point that waits for the device.
        """
        if not self._first_nonfinite:
            return
        firsts = torch.stack(list(self._first_nonfinite.values())).tolist()  # the sync
        bad = [(step, key) for step, key in zip(firsts, self._first_nonfinite) if step >= 0]
        if bad:
            step, (phase, which) = min(bad)
            since = f" (checked every {self.optim.finite_check_every} steps, "
            since += f"steps {self._checked_at}-{self.step})"
            self._diverged(which, phase, step, since=since)
        self._checked_at = self.step

    def _diverged(
        self, which: str, phase: str, step: int, value: str = "", since: str = ""
    ) -> None:
        raise FloatingPointError(
            f"non-finite {which} loss{value} at step {step} in phase {phase!r}{since}"
            # train.run adds where to resume from and what to change
        )
