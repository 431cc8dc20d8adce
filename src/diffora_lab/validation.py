"""Dev evaluation inside training: the task kind's validation step, its metrics, their keys.

A mixin of :class:`~diffora_lab.module.TrainingModule` (which provides ``kind``, ``spec``,
``model``, ``val_metrics`` and ``check_finite``). Metric keys are ``val/<metric>`` for the first
dev split and ``val/<metric>_<split>`` for the others; a task that averages its dev splits (the
commonsense test sets) reports ``val/<metric>`` as their mean and every split by name.
"""

from __future__ import annotations

import torch


class DevEvaluation:
    """Dev metrics of the model as it is, through Lightning's validation loop or directly."""

    def _metric_key(self, split_index: int, metric: str) -> str:
        if split_index == 0 and not self.spec.average_dev_splits:
            return f"val/{metric}"
        return f"val/{metric}_{self.spec.dev_splits[split_index]}"

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.kind.validation_step(self, batch, self.val_metrics[dataloader_idx])

    def _compute_val_metrics(self) -> dict[str, float]:
        results = {}
        per_metric: dict[str, list[float]] = {}
        for index, metrics in enumerate(self.val_metrics):
            for name, value in metrics.compute().items():
                results[self._metric_key(index, name)] = float(value)
                per_metric.setdefault(name, []).append(float(value))
            metrics.reset()
        if self.spec.average_dev_splits:  # e.g. the eight commonsense test sets
            results.update({f"val/{k}": sum(v) / len(v) for k, v in per_metric.items()})
        return results

    def on_validation_epoch_end(self) -> None:
        self.check_finite()
        results = self._compute_val_metrics()
        self.last_val = results
        self.last_val_step = None if self.trainer.sanity_checking else self.step
        if not self.trainer.sanity_checking:
            # torchmetrics already synced the states: every rank holds the same values.
            self.log_dict(results, prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev metrics of the model as it is now, from inside training (around discretization).

        Lightning's validation loop cannot run within a training step, so this drives the same
        :meth:`validation_step` and reduction over the dev loaders itself.
        """
        self.check_finite()
        was_training = self.model.training
        self.model.eval()
        for metrics in self.val_metrics:
            metrics.reset()
        for index, loader in enumerate(self.trainer.datamodule.val_dataloader()):
            for batch in loader:
                self.validation_step(self.trainer.strategy.batch_to_device(batch), 0, index)
        results = self._compute_val_metrics()
        self.model.train(was_training)
        return results

    @torch.no_grad()
    def generate(self, **inputs) -> torch.Tensor:
        """``model.generate`` with the gates in place (a task kind's generation scoring)."""
        if self.searching:
            self.lora_gates.set(self.current_gates().detach())
        return self.model.generate(**inputs)
