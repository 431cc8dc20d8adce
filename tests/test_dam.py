"""Tests for diffora_lab.dam: relaxed gates, top-k discretization, the saved mask."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffora_lab.dam import DAM, Mask, gate_entropy, num_kept, top_k_mask

TYPES = ["q", "k", "v", "o", "ffn_in", "ffn_out"]


def names(layers: int, types: list[str] = TYPES) -> list[str]:
    return [f"enc.layer.{i}.{t}" for i in range(layers) for t in types]


# ------------------------------------------------------------------------------- relaxed gates


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0, 4.0])
def test_sigmoid_gates_in_unit_interval_and_follow_tau(tau):
    dam = DAM(3, TYPES, relaxation="sigmoid")
    with torch.no_grad():
        dam.logits.copy_(torch.linspace(-60.0, 60.0, dam.logits.numel()).view(dam.shape))
    gates = dam.gates(tau)
    assert gates.shape == (3, len(TYPES))
    assert torch.isfinite(gates).all()
    assert gates.min() >= 0.0 and gates.max() <= 1.0
    torch.testing.assert_close(gates, torch.sigmoid(dam.logits / tau))
    # Independent gates: no normalisation across a row or the grid.
    assert not torch.allclose(gates.sum(-1), torch.ones(3))


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0, 4.0])
def test_softmax_row_gates_sum_to_one_per_layer(tau):
    dam = DAM(4, TYPES, relaxation="softmax_row")
    with torch.no_grad():
        dam.logits.copy_(torch.randn(dam.shape, generator=torch.Generator().manual_seed(0)) * 30)
    gates = dam.gates(tau)
    assert torch.isfinite(gates).all()
    assert gates.min() >= 0.0 and gates.max() <= 1.0
    torch.testing.assert_close(gates.sum(-1), torch.ones(4))
    torch.testing.assert_close(gates, torch.softmax(dam.logits / tau, dim=-1))


@pytest.mark.parametrize("relaxation", ["sigmoid", "softmax_row"])
def test_lower_temperature_sharpens_gates(relaxation):
    dam = DAM(2, TYPES, relaxation=relaxation)
    with torch.no_grad():
        dam.logits.copy_(torch.arange(12, dtype=torch.float32).view(2, 6) / 6 - 1)
    hot, cold = dam.gates(4.0), dam.gates(0.25)
    # Same ranking within a layer at every temperature, but cold gates are more decided.
    assert torch.equal(hot.argsort(dim=-1, stable=True), cold.argsort(dim=-1, stable=True))
    if relaxation == "sigmoid":
        assert float(gate_entropy(cold)) < float(gate_entropy(hot))
        assert ((cold - 0.5).abs() >= (hot - 0.5).abs()).all()
    else:
        assert (cold.max(-1).values > hot.max(-1).values).all()


def test_initial_gates_and_gradient_reach_the_logits():
    dam = DAM(2, TYPES, init=0.0)
    torch.testing.assert_close(dam.gates(), torch.full((2, 6), 0.5))
    dam.gates(2.0).sum().backward()
    assert dam.logits.grad is not None
    # d sigmoid(x / tau) / dx at 0 is 0.25 / tau.
    torch.testing.assert_close(dam.logits.grad, torch.full((2, 6), 0.125))


def test_logits_are_a_registered_parameter():
    dam = DAM(2, TYPES, init=1.5)
    assert [name for name, _ in dam.named_parameters()] == ["logits"]
    assert torch.equal(dam.state_dict()["logits"], torch.full((2, 6), 1.5))
    assert dam.to(torch.float64).logits.dtype == torch.float64


def test_unknown_relaxation_names_the_setting():
    with pytest.raises(ValueError, match="relaxation='gumbel'"):
        DAM(2, TYPES, relaxation="gumbel")


def test_gate_entropy_extremes():
    assert float(gate_entropy(torch.full((2, 3), 0.5))) == pytest.approx(math.log(2), rel=1e-5)
    assert float(gate_entropy(torch.tensor([0.0, 1.0, 1.0]))) < 1e-4


# ------------------------------------------------------------------------------ discretization


@pytest.mark.parametrize(
    ("budget", "n", "k"),
    [
        (0.5, 12, 6),
        (1.0, 12, 12),
        (0.25, 72, 18),
        (0.5, 5, 3),  # 2.5 rounds half up
        (0.3, 5, 2),  # 1.5 rounds half up
        (0.1, 12, 1),  # 1.2
        (0.01, 12, 1),  # round() gives 0: at least one module is kept
        (1e-9, 3, 1),
    ],
)
def test_num_kept(budget, n, k):
    assert num_kept(budget, n) == k


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, 1.0000001, float("nan"), float("inf")])
def test_num_kept_rejects_budget_outside_unit_interval(budget):
    with pytest.raises(ValueError, match="budget"):
        num_kept(budget, 12)


def test_top_k_mask_ties_go_to_earliest_modules():
    assert top_k_mask(torch.full((12,), 0.5), 4).tolist() == [True] * 4 + [False] * 8
    scores = torch.tensor([0.1, 0.7, 0.5, 0.7, 0.5, 0.5, 0.2])
    assert top_k_mask(scores, 3).tolist() == [False, True, True, True, False, False, False]
    # Row-major over (layer, type): the tie between layer 0 and layer 1 goes to layer 0.
    grid = torch.tensor([[0.3, 0.9, 0.3], [0.3, 0.3, 0.9]])
    assert top_k_mask(grid, 3).tolist() == [[True, True, False], [False, False, True]]


def test_top_k_mask_is_deterministic_across_orderings_of_equal_values():
    # Many ties, larger than a sorting network's small-input special case.
    scores = torch.tensor([0.25, 0.75] * 40)
    mask = top_k_mask(scores, 50)
    expected = [True] * 80
    # All 40 of the 0.75s are kept, then the first 10 of the 0.25s (indices 0, 2, ..., 18).
    for index in range(20, 80, 2):
        expected[index] = False
    assert mask.tolist() == expected


@pytest.mark.parametrize(
    ("budget", "k"), [(0.01, 1), (0.2, 5), (0.5, 12), (0.51, 12), (0.75, 18), (1.0, 24)]
)
def test_mask_from_scores_keeps_exactly_k_largest(budget, k):
    scores = torch.rand(4, 6, generator=torch.Generator().manual_seed(3))
    mask = Mask.from_scores(scores, names(4), TYPES, budget, step=17)
    assert mask.k == k == sum(mask.kept) == len(mask.kept_modules)
    kept_scores = [g for g, keep in zip(mask.gates, mask.kept) if keep]
    dropped_scores = [g for g, keep in zip(mask.gates, mask.kept) if not keep]
    if dropped_scores:
        assert min(kept_scores) > max(dropped_scores)
    assert mask.gates == pytest.approx(scores.flatten().tolist())
    assert mask.shape == (4, 6) and mask.step == 17 and mask.budget == budget
    assert torch.equal(mask.as_tensor(), top_k_mask(scores, k))
    assert sum(mask.counts_by_type().values()) == k


def test_mask_from_equal_scores_keeps_the_first_modules():
    mask = Mask.from_scores(torch.full((2, 6), 0.5), names(2), TYPES, 0.25, step=0)
    assert mask.k == 3
    assert mask.kept_modules == names(2)[:3]


def test_mask_save_load_round_trip(tmp_path):
    scores = torch.rand(3, 6, generator=torch.Generator().manual_seed(1))
    mask = Mask.from_scores(scores, names(3), TYPES, 0.4, step=42, backbone="tiny")
    path = tmp_path / "dam" / "mask.json"
    mask.save(path)
    payload = json.loads(path.read_text())
    for key in ("modules", "gates", "kept", "budget", "k", "step"):
        assert key in payload
    assert payload["kept_modules"] == mask.kept_modules
    loaded = Mask.load(path)
    assert loaded == mask
    assert isinstance(loaded.shape, tuple)
    assert torch.equal(loaded.as_tensor(), mask.as_tensor())


def test_mask_load_missing_file_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="dam.mask_path"):
        Mask.load(tmp_path / "nope.json")
