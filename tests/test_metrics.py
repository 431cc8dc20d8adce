"""Tests for diffora_lab.metrics: each GLUE metric against a hand computation."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import math
from dataclasses import replace

import pytest
import torch

from diffora_lab.metrics import (
    build_metrics,
    compute_metrics,
    predictions_from_logits,
)
from diffora_lab.tasks import TASKS, get_task

PREDS = [0, 1, 1, 0, 1, 1, 0, 0]
TARGET = [0, 1, 0, 0, 0, 1, 1, 0]
# Confusion counts for class 1: TP=2 (idx 1, 5), FP=2 (idx 2, 4), FN=1 (idx 6), TN=3.


def pearson(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    return cov / math.sqrt(var_x * var_y)


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def multiclass_mcc(preds: list[int], target: list[int], num_classes: int) -> float:
    """Gorodkin's R_K from the confusion matrix."""
    samples = len(preds)
    correct = sum(p == t for p, t in zip(preds, target, strict=True))
    predicted = [preds.count(k) for k in range(num_classes)]
    true = [target.count(k) for k in range(num_classes)]
    numerator = correct * samples - sum(p * t for p, t in zip(predicted, true, strict=True))
    denominator = math.sqrt(
        (samples**2 - sum(p * p for p in predicted)) * (samples**2 - sum(t * t for t in true))
    )
    return numerator / denominator


@pytest.mark.parametrize("name", sorted(TASKS))
def test_collection_keys_are_exactly_the_task_metrics(name: str) -> None:
    spec = get_task(name)
    assert set(build_metrics(spec).keys()) == set(spec.metrics)


def test_binary_accuracy_f1_and_mcc_match_hand_values() -> None:
    tp, fp, fn, tn = 2, 2, 1, 3
    accuracy = (tp + tn) / 8
    f1 = 2 * tp / (2 * tp + fp + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    preds, target = torch.tensor(PREDS), torch.tensor(TARGET)

    mrpc = compute_metrics(get_task("mrpc"), preds, target)
    assert set(mrpc) == {"accuracy", "f1"}
    assert mrpc["accuracy"] == pytest.approx(accuracy)  # 0.625
    assert mrpc["f1"] == pytest.approx(f1)  # 4/7

    cola = compute_metrics(get_task("cola"), preds, target)
    assert cola["mcc"] == pytest.approx(mcc, abs=1e-6)  # 0.2582
    assert cola["accuracy"] == pytest.approx(accuracy)


def test_f1_is_of_class_one_not_class_zero() -> None:
    # All-zero predictions: class-0 F1 would be high, class-1 F1 is 0.
    result = compute_metrics(
        get_task("qqp"), torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 1])
    )
    assert result["f1"] == 0.0
    assert result["accuracy"] == pytest.approx(0.75)


def test_mcc_of_perfect_and_inverted_predictions() -> None:
    target = torch.tensor([0, 1, 1, 0, 1])
    assert compute_metrics(get_task("cola"), target, target)["mcc"] == pytest.approx(1.0)
    assert compute_metrics(get_task("cola"), 1 - target, target)["mcc"] == pytest.approx(-1.0)


def test_three_class_accuracy_and_mcc() -> None:
    preds = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
    target = [0, 1, 2, 1, 1, 2, 0, 2, 0, 1]
    result = compute_metrics(get_task("mnli"), torch.tensor(preds), torch.tensor(target))
    assert result == {"accuracy": pytest.approx(0.7)}
    collection = build_metrics(replace(get_task("mnli"), metrics=("accuracy", "mcc")))
    collection.update(torch.tensor(preds), torch.tensor(target))
    mcc = float(collection.compute()["mcc"])
    assert mcc == pytest.approx(multiclass_mcc(preds, target, 3), abs=1e-6)


def test_pearson_and_spearman_match_hand_formulas() -> None:
    preds = [0.5, 2.0, 1.0, 4.5, 3.0, 3.0]
    target = [1.0, 1.8, 0.2, 5.0, 3.9, 2.5]
    result = compute_metrics(get_task("stsb"), torch.tensor(preds), torch.tensor(target))
    assert set(result) == {"pearson", "spearman"}
    assert result["pearson"] == pytest.approx(pearson(preds, target), abs=1e-5)
    # The tie in preds (3.0, 3.0) shares rank 4.5.
    expected_spearman = pearson(average_ranks(preds), average_ranks(target))
    assert result["spearman"] == pytest.approx(expected_spearman, abs=1e-5)
    assert result["spearman"] != pytest.approx(result["pearson"], abs=1e-3)


def test_batched_updates_equal_one_shot() -> None:
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 2, (64,), generator=generator)
    target = torch.randint(0, 2, (64,), generator=generator)
    spec = get_task("mrpc")
    collection = build_metrics(spec)
    for start in range(0, 64, 16):
        collection.update(preds[start : start + 16], target[start : start + 16])
    batched = {name: float(value) for name, value in collection.compute().items()}
    assert batched == pytest.approx(compute_metrics(spec, preds, target))
    assert batched["accuracy"] == pytest.approx(float((preds == target).float().mean()))


def test_predictions_from_logits() -> None:
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    assert predictions_from_logits(get_task("sst2"), logits).tolist() == [1, 0, 1]
    three = torch.tensor([[0.1, 0.2, 0.3], [2.0, 0.0, 1.0]])
    assert predictions_from_logits(get_task("mnli"), three).tolist() == [2, 0]
    scores = predictions_from_logits(get_task("stsb"), torch.tensor([[1.5], [4.0]]))
    assert scores.shape == (2,)
    assert scores.tolist() == [1.5, 4.0]
    with pytest.raises(ValueError, match=r"num_labels=3"):
        predictions_from_logits(get_task("mnli"), logits)
    with pytest.raises(ValueError, match=r"num_labels=1"):
        predictions_from_logits(get_task("stsb"), logits)


def test_compute_metrics_rejects_bad_inputs() -> None:
    spec = get_task("sst2")
    with pytest.raises(ValueError, match="same length"):
        compute_metrics(spec, torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="class ids"):
        compute_metrics(spec, torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        compute_metrics(spec, torch.tensor([0, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(
            spec, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)
        )
