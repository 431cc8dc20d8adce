"""Callbacks: the discretization of the DAM (METHOD.md, Phase 2), the DAM monitor, the run clock.

:class:`Discretization` runs the search variant's in-search hooks (searches/) and is where the
search ends: at the variant's cut step it scores the dev set, keeps what the variant's cut keeps
under the budget, freezes the mask into the model, scores the dev set again (the discretization
gap) and writes ``dam/mask.json``; on the way it writes the search cache's snapshots.
:class:`DAMMonitor` records the gates while they move: heatmaps at intervals, the raw gates as
JSON lines, and W&B images and tables.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from diffora_lab import plotting
from diffora_lab.dam import Mask

log = logging.getLogger(__name__)


def _wandb_run(trainer: pl.Trainer):
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def _forget_search_metrics(trainer: pl.Trainer) -> None:
    """Drops the search's metrics from Lightning's step results once the search has ended.

    Lightning logs every metric of the epoch's results at each log step until the metric is
    logged again; without this, ``search/loss``, ``dam/mean`` ... would repeat the search's last
    values at every fine-tuning log step (and only in an uninterrupted run: a resumed one starts
    a fresh collection). Lightning 2.6 keeps them in the epoch loop's ``_results``.
    """
    results = getattr(trainer.fit_loop.epoch_loop, "_results", None) or {}
    for key, metric in list(results.items()):
        if key.rsplit(".", 1)[-1].startswith(("search/", "dam/")) or "search/" in key:
            metric.reset()


class Discretization(pl.Callback):
    """Runs the search variant's hooks after each search step and discretizes at its end.

    Args:
        output_dir: The run folder; the mask goes to ``dam/mask.json``.
        backbone: Backbone name recorded in the mask.
        search_cache: Where the search's snapshots are shared (``search_cache.SearchCache``),
            or None.
    """

    def __init__(self, output_dir: str | Path, backbone: str, search_cache=None) -> None:
        self.output_dir = Path(output_dir)
        self.backbone = backbone
        self.search_cache = search_cache
        self._forget = False

    def on_train_start(self, trainer, module) -> None:
        if module.searching:
            # A resumed state (a checkpoint, or another run's snapshot): what the variant had
            # left to do at this step (e.g. the progressive search's removals).
            module.variant.catch_up(module.dam, module.step, module.tau())
        # A run started from its budget's snapshot (or stopped right at the end of the search)
        # discretizes before its first fine-tuning step.
        if module.search_finished:
            self.discretize(trainer, module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._forget:
            _forget_search_metrics(trainer)
            self._forget = False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not module.searching:
            return
        variant, dam, tau = module.variant, module.dam, module.tau()
        # The states the search cache keeps after this step (the variant brings the DAM to
        # each in turn): another run with that budget starts from there.
        for budget in variant.snapshot_budgets(module.step):
            variant.restrict(dam, budget, tau)
            self.save_snapshot(trainer, module, budget)
        if module.search_finished:
            self.discretize(trainer, module)
            return
        removed = variant.after_step(dam, module.step, tau)
        if removed:
            for logger in trainer.loggers:
                logger.log_metrics({"dam/active": float(dam.num_active)}, step=module.step)
            log.debug(
                "step %d: %d modules active, removed %s", module.step, dam.num_active, removed
            )

    def save_snapshot(self, trainer: pl.Trainer, module, budget) -> None:
        """Writes the state after this step for ``budget`` into the search cache (once)."""
        cache = self.search_cache
        # Rank 0 decides: saving a checkpoint waits for every rank.
        if cache is None or trainer.strategy.broadcast(cache.has(module.step, budget), src=0):
            return
        trainer.save_checkpoint(str(cache.snapshot(module.step, budget)))
        if trainer.is_global_zero:
            history = self.output_dir / "dam" / "gates.jsonl"
            if history.is_file():  # the longest history so far: runs keep what precedes them
                shutil.copyfile(history, cache.folder / "gates.jsonl")
            cache.record(self.output_dir, module.step, budget)

    def discretize(self, trainer: pl.Trainer, module) -> Mask:
        """Scores dev, freezes the top-k mask into the model, scores dev again."""
        val_before = module.evaluate()
        mask, gates = module.propose_mask(self.backbone)
        # Ranks hold identical gates, but the mask must be identical bit for bit: rank 0 decides.
        mask = trainer.strategy.broadcast(mask, src=0)
        module.discretize(mask, gates)
        self._forget = True  # after this step's row is logged: it holds its search metrics
        val_after = module.evaluate()
        metrics = module.record_discretization(val_before, val_after)
        for logger in trainer.loggers:  # direct: this may run in on_train_start
            logger.log_metrics(metrics, step=module.step)
        if trainer.is_global_zero:
            mask.save(self.output_dir / "dam" / "mask.json")
        log.info(
            "discretized at step %d: kept %d/%d modules, dev %.4f -> %.4f",
            module.step,
            mask.k,
            len(mask.modules),
            metrics["dam/val_before"],
            metrics["dam/val_after"],
        )
        return mask


class RunClock(pl.Callback):
    """Wall and fit seconds of a run, added up over its resumes (kept in the checkpoint).

    Args:
        started: ``now()`` when this process started the run.
        restore: False when the checkpoint is another run's (a reused search): its time is not
            this run's.
        now: The time source (seconds); tests pass a fake one to check the arithmetic.
    """

    def __init__(
        self, started: float, restore: bool = True, now: Callable[[], float] = time.time
    ) -> None:
        self.started = started
        self.restore = restore
        self.now = now
        self.fit_started: float | None = None
        self.wall_before = 0.0  # spent by earlier processes of this run
        self.fit_before = 0.0

    def on_fit_start(self, trainer, module) -> None:
        self.fit_started = self.now()

    def wall_seconds(self) -> float:
        return self.wall_before + self.now() - self.started

    def fit_seconds(self) -> float:
        return self.fit_before + (
            self.now() - self.fit_started if self.fit_started is not None else 0.0
        )

    def state_dict(self) -> dict[str, float]:
        return {"wall_seconds": self.wall_seconds(), "fit_seconds": self.fit_seconds()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        if not self.restore:
            return
        self.wall_before = float(state_dict.get("wall_seconds", 0.0))
        self.fit_before = float(state_dict.get("fit_seconds", 0.0))


class DAMMonitor(pl.Callback):
    """Records the DAM during the search: heatmaps, raw gates, summary statistics.

    Args:
        output_dir: The run folder (``dam/heatmaps/*.png``, ``dam/gates.jsonl``).
        every: Steps between two records.
    """

    def __init__(self, output_dir: str | Path, every: int) -> None:
        self.output_dir = Path(output_dir)
        self.every = max(1, int(every))
        self.history: dict[int, list[float]] = {}

    @property
    def gates_file(self) -> Path:
        return self.output_dir / "dam" / "gates.jsonl"

    def on_fit_start(self, trainer, module) -> None:
        if not self.gates_file.is_file():
            return
        # A resumed run keeps what was recorded before its checkpoint (records written after it,
        # before a kill, are recorded again from the checkpoint on); a run that reuses a shared
        # search receives that search's records and draws their figures here.
        kept = []
        for line in self.gates_file.read_text().splitlines():
            row = json.loads(line)
            if row["step"] < module.step and row["step"] not in self.history:
                self.history[row["step"]] = row["gates"]
                kept.append(line)
        if trainer.is_global_zero:
            self.gates_file.write_text("".join(f"{line}\n" for line in kept))
        if trainer.is_global_zero and module.dam is not None:
            for step, values in sorted(self.history.items()):
                path = self._heatmap_path(step, masked=False)
                if not path.is_file():
                    gates = torch.tensor(values).view(module.dam.shape)
                    self._draw(trainer, module, step, gates, None)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        # The gates as they were before this step; step 0 records the initial DAM.
        if module.searching and module.step % self.every == 0:
            self.record(trainer, module, module.current_gates().detach(), kept=None)

    def _record_mask_once(self, trainer, module) -> None:
        mask = module.mask
        if mask is None or mask.source != "search":
            return
        if not self._heatmap_path(mask.step, masked=True).is_file():
            self._draw(trainer, module, mask.step, torch.tensor(mask.gates).view(mask.shape), mask)

    def on_train_start(self, trainer, module) -> None:
        # Runs after Discretization.on_train_start, which discretizes reused searches.
        if trainer.is_global_zero:
            self._record_mask_once(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and module.mask is not None and module.mask.step == module.step:
            self._record_mask_once(trainer, module)

    def _heatmap_path(self, step: int, masked: bool) -> Path:
        name = f"step_{step:06d}" + ("_mask" if masked else "")
        return self.output_dir / "dam" / "heatmaps" / f"{name}.png"

    def record(self, trainer, module, gates: torch.Tensor, kept: Mask | None) -> None:
        """Adds the gates at the current step to the history, the JSON lines and a heatmap."""
        step = module.step
        self.history[step] = gates.float().cpu().flatten().tolist()
        if not trainer.is_global_zero:
            return
        self.gates_file.parent.mkdir(parents=True, exist_ok=True)
        with self.gates_file.open("a") as handle:
            handle.write(json.dumps({"step": step, "gates": self.history[step]}) + "\n")
        self._draw(trainer, module, step, gates, kept)

    def _draw(self, trainer, module, step: int, gates: torch.Tensor, kept: Mask | None) -> None:
        values = gates.float().cpu()
        title = f"DAM step {step}" + (f" (kept {kept.k}, budget {kept.budget})" if kept else "")
        disc = module.discretization
        if kept is not None and disc.get("val_before") is not None:
            # The discretization gap, on the figure a researcher looks at first.
            title += (
                f"\ndev {module.spec.primary_metric} {disc['val_before']:.4f} -> "
                f"{disc['val_after']:.4f} at the cut"
            )
        figure = plotting.dam_heatmap(
            values.numpy(),
            module.dam.module_types,
            title,
            kept=None if kept is None else kept.as_tensor().numpy(),
        )
        path = plotting.save(figure, self._heatmap_path(step, masked=kept is not None))
        run = _wandb_run(trainer)
        if run is not None:
            import wandb

            key = "dam/mask" if kept else "dam/heatmap"
            run.log({key: wandb.Image(str(path)), "trainer/global_step": step})

    def on_train_end(self, trainer, module) -> None:
        if not trainer.is_global_zero or len(self.history) < 2 or module.dam is None:
            return
        steps = sorted(self.history)
        history = np.array([self.history[s] for s in steps])
        mask = module.mask if module.mask is not None and module.mask.source == "search" else None
        if mask is not None and mask.step > steps[-1]:  # the gates the mask was taken from
            steps.append(mask.step)
            history = np.vstack([history, mask.gates])
        figure = plotting.gate_trajectories(
            steps,
            history,
            [c.module_type for c in module.candidates],
            kept=None if mask is None else mask.kept,
            discretized_at=None if mask is None else mask.step,
            title=f"DAM gates during the search ({len(module.candidates)} modules)",
        )
        path = plotting.save(figure, self.output_dir / "dam" / "trajectories.png")
        run = _wandb_run(trainer)
        if run is not None:
            import wandb

            rows = []
            for s, gates in zip(steps, history):  # with the mask's own step, if appended
                for index, value in enumerate(gates):
                    cand = module.candidates[index]
                    rows.append([s, cand.layer, cand.module_type, float(value)])
            run.log(
                {
                    "dam/trajectories": wandb.Image(str(path)),
                    "dam/gates_table": wandb.Table(
                        columns=["step", "layer", "module_type", "gate"], data=rows
                    ),
                }
            )
