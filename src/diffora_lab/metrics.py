"""GLUE metrics for a task, built from torchmetrics.

``build_metrics(spec)`` returns a :class:`torchmetrics.MetricCollection` whose keys are exactly
``spec.metrics``; callers add the ``val/``-style prefix themselves (e.g. ``.clone(prefix=...)``).
What each name means:

* ``accuracy``: multiclass accuracy, micro-averaged (fraction of correct predictions);
* ``f1``: binary F1 of class 1 (the positive class), as GLUE reports for MRPC and QQP;
* ``mcc``: Matthews correlation coefficient (CoLA);
* ``pearson`` / ``spearman``: correlation of predicted and gold scores (STS-B).

Classification metrics are updated with predicted class ids (``LongTensor [N]``), regression
metrics with float scores (``[N]``, same dtype as the target); see
:func:`predictions_from_logits`.
"""

from __future__ import annotations

import warnings

import torch
import torchmetrics
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassMatthewsCorrCoef,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from diffora_lab.tasks import METRIC_NAMES, TaskSpec


def _build_metric(spec: TaskSpec, name: str) -> torchmetrics.Metric:
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=spec.num_labels, average="micro")
    if name == "f1":
        return BinaryF1Score()
    if name == "mcc":
        return MulticlassMatthewsCorrCoef(num_classes=spec.num_labels)
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        # Spearman keeps every prediction to rank them; fine at GLUE dev sizes (STS-B: 1,500),
        # so its construction-time memory warning is silenced.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions")
            return SpearmanCorrCoef()
    raise ValueError(
        f"Task {spec.name!r}: unknown metric {name!r}; choose among {list(METRIC_NAMES)}."
    )


def build_metrics(spec: TaskSpec) -> torchmetrics.MetricCollection:
    """Build the task's metrics as one collection keyed by the names in ``spec.metrics``.

    Args:
        spec: The task; its ``metrics`` were checked against its kind (classification or
            regression) when the spec was created.

    Returns:
        A fresh collection. ``update(preds, target)`` takes class ids (classification) or float
        scores (regression); ``compute()`` returns a dict of scalar tensors.

    Raises:
        ValueError: ``spec.metrics`` names an unknown metric.
    """
    return torchmetrics.MetricCollection({name: _build_metric(spec, name) for name in spec.metrics})


def _check_pair(preds: torch.Tensor, target: torch.Tensor) -> None:
    if preds.ndim != 1 or preds.shape != target.shape:
        raise ValueError(
            f"preds and target must be 1-D tensors of the same length, got shapes "
            f"{tuple(preds.shape)} and {tuple(target.shape)}; pass predictions_from_logits(...) "
            "as preds."
        )
    if preds.numel() == 0:
        raise ValueError("preds and target are empty; metrics need at least one example.")


def compute_metrics(spec: TaskSpec, preds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Compute the task's metrics in one shot.

    Args:
        spec: The task.
        preds: Predicted class ids (classification) or scores (regression), shape ``[N]``.
        target: Gold class ids or scores, shape ``[N]``.

    Returns:
        ``{metric name: value}`` for every name in ``spec.metrics``.

    Raises:
        ValueError: Shapes differ, are not 1-D, or are empty; or a class id is out of range.
    """
    preds = torch.as_tensor(preds).detach().cpu()
    target = torch.as_tensor(target).detach().cpu()
    _check_pair(preds, target)
    if spec.is_regression:
        preds, target = preds.float(), target.float()
    else:
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError(
                f"Task {spec.name!r} is a classification task: preds and target must be class "
                "ids (integer tensors); turn logits into ids with predictions_from_logits."
            )
        preds, target = preds.long(), target.long()
        for label, values in (("preds", preds), ("target", target)):
            if values.min() < 0 or values.max() >= spec.num_labels:
                raise ValueError(
                    f"Task {spec.name!r}: {label} holds class ids outside "
                    f"[0, {spec.num_labels - 1}] (min {int(values.min())}, "
                    f"max {int(values.max())})."
                )
    collection = build_metrics(spec)
    collection.update(preds, target)
    return {name: float(value) for name, value in collection.compute().items()}


def predictions_from_logits(spec: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """Turn model outputs into what the task's metrics take.

    Args:
        spec: The task.
        logits: ``[N, num_labels]`` class logits, or ``[N, 1]`` (or ``[N]``) regression scores.

    Returns:
        Class ids ``[N]`` (argmax) for classification; float scores ``[N]`` for regression.

    Raises:
        ValueError: The last dimension does not match ``spec.num_labels``.
    """
    if spec.is_regression:
        if logits.ndim == 2 and logits.shape[-1] == 1:
            return logits.squeeze(-1)
        if logits.ndim == 1:
            return logits
        raise ValueError(
            f"Task {spec.name!r} is a regression task: expected logits of shape [N, 1] or [N], "
            f"got {tuple(logits.shape)}; build the model head with num_labels=1."
        )
    if logits.ndim != 2 or logits.shape[-1] != spec.num_labels:
        raise ValueError(
            f"Task {spec.name!r}: expected logits of shape [N, {spec.num_labels}], got "
            f"{tuple(logits.shape)}; build the model head with num_labels={spec.num_labels}."
        )
    return logits.argmax(dim=-1)
