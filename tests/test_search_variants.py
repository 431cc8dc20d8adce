"""Search variants that control the discretization gap, and the LoRA scaling rule.

- ``search=topk``: sigmoid gates held at sum k by one shared threshold;
- ``search=progressive`` (the default): modules leave during the search on a cubic schedule;
- each variant's declarations (budget dependence) drive the search cache key;
- ``method.scaling``: the LoRA update scale s is the same at every rank by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from diffora_lab.adapters import lora_alpha_for, lora_layer
from diffora_lab.dam import DAM, budget_sigmoid, cubic_count, top_k_mask
from diffora_lab.search_cache import search_key
from diffora_lab.searches import SearchVariant, register_search, registry, search_names
from diffora_lab.train import run

TYPES = ["q", "k", "v", "o", "ffn_in", "ffn_out"]


# ------------------------------------------------------------------------ topk relaxation


@pytest.mark.parametrize("spread", [0.1, 3.0, 40.0])
@pytest.mark.parametrize("k", [1, 9, 35])
def test_budget_sigmoid_sums_to_k(spread, k):
    logits = torch.randn(36, generator=torch.Generator().manual_seed(k)) * spread
    gates = budget_sigmoid(logits, k)
    assert gates.sum().item() == pytest.approx(k, abs=1e-3)
    assert gates.min() >= 0 and gates.max() <= 1
    # A soft top-k: the gates are monotone in the logits (equal only where they saturate).
    ordered = gates[torch.argsort(logits)]
    assert bool((ordered[1:] >= ordered[:-1]).all())


def test_budget_sigmoid_gradient_is_the_implicit_one():
    """Autograd through the threshold equals central finite differences of the gates."""
    logits = torch.randn(24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = logits.clone().requires_grad_(True)
    (budget_sigmoid(x, 10.0) * weights).sum().backward()
    eps = 1e-5
    for i in range(0, 24, 5):
        up, down = logits.clone(), logits.clone()
        up[i] += eps
        down[i] -= eps
        numeric = ((budget_sigmoid(up, 10.0) - budget_sigmoid(down, 10.0)) * weights).sum()
        assert x.grad[i].item() == pytest.approx(numeric.item() / (2 * eps), rel=1e-4, abs=1e-8)
    # The sum is held at k, so the gradient of the sum itself vanishes.
    y = logits.clone().requires_grad_(True)
    budget_sigmoid(y, 10.0).sum().backward()
    assert y.grad.abs().max().item() < 1e-6


def test_topk_gates_compete_where_sigmoid_gates_do_not():
    """Raising one logit lowers the other topk gates; sigmoid gates are independent."""
    for relaxation, others_fall in (("topk", True), ("sigmoid", False)):
        dam = DAM(2, TYPES, relaxation=relaxation, k=6)
        before = dam.gates().detach().clone()
        with torch.no_grad():
            dam.logits[0, 0] += 2.0
        after = dam.gates().detach()
        assert after[0, 0] > before[0, 0]
        rest = torch.ones_like(after, dtype=torch.bool)
        rest[0, 0] = False
        assert bool((after[rest] < before[rest] - 1e-4).all()) == others_fall


# ------------------------------------------------------------- progressive discretization


def test_cubic_count_falls_from_n_to_k():
    counts = [cubic_count(step, 36, 9, start=10, end=110) for step in range(0, 140)]
    assert counts[:11] == [36] * 11 and counts[110:] == [9] * 30
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    # Cubic: more than half of the removals happen in the first fifth of the schedule.
    assert 36 - counts[30] > (36 - 9) / 2


@pytest.mark.parametrize("relaxation", ["sigmoid", "softmax_row", "topk"])
def test_prune_keeps_the_largest_gates_and_zeroes_the_rest(relaxation):
    dam = DAM(3, TYPES, relaxation=relaxation, k=4)
    with torch.no_grad():
        dam.logits.copy_(torch.randn(dam.shape, generator=torch.Generator().manual_seed(3)))
    expected = top_k_mask(dam.gates().detach(), 10)
    removed = dam.prune_to(10)
    assert len(removed) == 18 - 10
    assert torch.equal(dam.active, expected)
    assert bool((dam.gates()[~dam.active] == 0).all())
    if relaxation == "topk":
        assert dam.gates().sum().item() == pytest.approx(4, abs=1e-3)
    # A second call with a larger count changes nothing; removed modules never come back.
    assert dam.prune_to(12) == []
    with torch.no_grad():
        dam.logits[~dam.active] = 50.0
    dam.prune_to(5)
    assert int(dam.active.sum()) == 5 and bool((dam.active <= expected).all())


def test_pruned_set_travels_in_the_state_dict():
    dam = DAM(2, TYPES, k=3)
    dam.prune_to(7)
    fresh = DAM(2, TYPES, k=3)
    fresh.load_state_dict(dam.state_dict())
    assert torch.equal(fresh.active, dam.active)


# ---------------------------------------------------------------- the variants end to end


def _run(smoke_cfg, tmp_path, name: str, *overrides: str) -> tuple[dict, dict]:
    out = tmp_path / name
    results = run(smoke_cfg("dam.reuse_search=false", "budget=0.25", *overrides), out)
    return results, json.loads((out / "dam" / "mask.json").read_text())


@pytest.mark.slow
def test_progressive_search_has_no_discretization_gap(smoke_cfg, tmp_path):
    """Only k modules are active when the search ends: the cut removes nothing in use, so
    the dev metric just after discretization is the one just before (and the kept modules'
    functions are preserved by folding)."""
    results, mask = _run(smoke_cfg, tmp_path, "prog", "search=progressive")
    assert results["search_variant"]["name"] == "progressive" and results["preset"] == "default"
    assert mask["gates"].count(0.0) == len(mask["gates"]) - mask["k"]
    assert all(g > 0 for g, keep in zip(mask["gates"], mask["kept"]) if keep)
    disc = results["discretization"]
    assert disc["val_before"] == disc["val_after"] and disc["gap"] == 0.0


@pytest.mark.slow
def test_topk_search_ends_with_gates_summing_to_k(smoke_cfg, tmp_path):
    results, mask = _run(smoke_cfg, tmp_path, "topk", "search=topk")
    # k: the budget's expected count (a quarter of 12 modules, in parameters or in modules)
    assert sum(mask["gates"]) == pytest.approx(0.25 * 12, abs=1e-3)
    assert results["search_variant"]["relaxation"] == "topk"
    assert results["preset"] == "topk"


def key(*overrides: str) -> str:
    return search_key(compose_config(["+experiment=smoke", *overrides]))


@pytest.mark.slow
def test_search_cache_key_has_the_budget_only_when_the_search_uses_it():
    for budget_free in ("search=faithful", "search=softmax_row", "method=diffora_faithful"):
        assert key(budget_free, "budget=0.25") == key(budget_free, "budget=0.5")
        assert key(budget_free, "budget_unit=modules") == key(budget_free)
    for variant in ("search=topk", "search=progressive", "search=budget_penalty"):
        assert key(variant, "budget=0.25") != key(variant, "budget=0.5")
    # The progressive search of a sweep goes to the sweep's smallest budget: shared by all.
    sweep = "dam.sweep_budgets=[0.25,0.5,0.75]"
    assert len({key(sweep, f"budget={b}") for b in (0.25, 0.5, 0.75)}) == 1
    assert key(sweep, "budget=0.75") == key("budget=0.25")  # the smallest budget's own search


class BudgetFree(SearchVariant):
    name = "budget_free_test"
    budget_dependent = False


def test_a_variants_declaration_drives_the_cache_key():
    """The key reads the variant's declaration, not a list of setting names: a new variant
    that declares itself budget-free is shared across budgets, and stops being when it says
    otherwise."""
    register_search(BudgetFree)
    try:
        assert "budget_free_test" in search_names()
        free = "search.name=budget_free_test"
        assert key(free, "budget=0.25") == key(free, "budget=0.5")
        BudgetFree.budget_dependent = True
        assert key(free, "budget=0.25") != key(free, "budget=0.5")
    finally:
        BudgetFree.budget_dependent = False
        registry._REGISTRY.pop("budget_free_test")


def test_every_variant_has_a_config_file_and_a_class():
    from diffora_lab.runtime import config_dir

    files = sorted(p.stem for p in (Path(config_dir()) / "search").glob("*.yaml"))
    assert (
        files
        == search_names()
        == [
            "budget_penalty",
            "faithful",
            "progressive",
            "progressive_random",
            "softmax_row",
            "topk",
        ]
    )
    for name in files:
        cfg = compose_config([f"search={name}"])
        assert cfg.search.name == name


# ------------------------------------------------------------------------- LoRA scaling


def test_scaling_rules():
    assert lora_alpha_for("constant", 16, 2.0, 16) == (32.0, False)
    assert lora_alpha_for("alpha", 16, 2.0, 16) == (16.0, False)
    assert lora_alpha_for("rslora", 16, 2.0, 16) == (16.0, True)
    with pytest.raises(ValueError, match="method.scaling"):
        lora_alpha_for("fixed", 8, 2.0, 16)


@pytest.mark.parametrize(
    ("method", "rank", "scaling", "expected"),
    [
        ("lora", 8, "constant", 2.0),
        ("lora", 16, "constant", 2.0),  # the default keeps s across ranks
        ("random_mask", 32, "constant", 2.0),
        ("lora", 16, "alpha", 1.0),  # the old behaviour: alpha 16 / r 16
        ("lora", 16, "rslora", 4.0),  # 16 / sqrt(16)
    ],
)
def test_peft_layers_get_the_configured_update_scale(tmp_path, method, rank, scaling, expected):
    from diffora_lab.train import assemble, prepare

    cfg = compose_config(
        ["+experiment=smoke", f"method={method}", f"rank={rank}", f"method.scaling={scaling}"],
        tmp_path,
    )
    assembled = assemble(cfg, prepare(cfg))
    model, candidate = assembled.module.model, assembled.candidates[0]
    layer = lora_layer(model, candidate.name)
    assert layer.scaling["default"] == pytest.approx(expected)


def test_adalora_scale_follows_its_initial_rank(tmp_path):
    from diffora_lab.train import assemble, prepare

    cfg = compose_config(["+experiment=smoke", "method=adalora", "rank=8"], tmp_path)
    assembled = assemble(cfg, prepare(cfg))
    layer = assembled.module.model.base_model.model.get_submodule(assembled.candidates[0].name)
    # peft's AdaLoRA multiplies by lora_alpha / ranknum, ranknum being the initial rank (12).
    assert float(layer.ranknum["default"]) == 12
    scale = layer.scaling["default"] / float(layer.ranknum["default"])
    assert scale == pytest.approx(float(cfg.method.scale), rel=1e-6)


class OneDevice(SearchVariant):
    name = "one_device_test"
    budget_dependent = False
    supports_ddp = False


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for 2 CPU devices")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.name=one_device_test"], "search=one_device_test: runs on one device only"),
        (["dam.arch_grad=second"], "dam.arch_grad=second: runs on one device only"),
    ],
)
def test_what_declares_no_ddp_is_refused_on_two_devices(smoke_cfg, overrides, message):
    from diffora_lab.train import ConfigError, prepare

    register_search(OneDevice)
    try:
        cfg = smoke_cfg("trainer.accelerator=cpu", "trainer.devices=2", *overrides)
        with pytest.raises(ConfigError, match=message):
            prepare(cfg)
        prepare(smoke_cfg("trainer.accelerator=cpu", "trainer.devices=1", *overrides))
    finally:
        registry._REGISTRY.pop("one_device_test")


@pytest.mark.parametrize(
    ("old", "search"),
    [
        ({"progressive": True, "prune_end": 0.5}, {"name": "progressive", "prune_end": 0.5}),
        ({"relaxation": "topk"}, {"name": "topk"}),
        ({"budget_penalty": 2.0}, {"name": "budget_penalty", "weight": 2.0}),
        ({}, {"name": "faithful"}),
    ],
)
def test_a_run_config_saved_before_the_search_group_reads_in_todays_keys(tmp_path, old, search):
    """Old run folders stay scorable (evaluate.py reads their saved config through this)."""
    from omegaconf import OmegaConf, open_dict

    from diffora_lab.config import validate
    from diffora_lab.evaluate import _run_config

    cfg = compose_config(["+experiment=smoke"])
    with open_dict(cfg):  # the layout of a config saved before the change
        for key in ("budget_unit", "search"):
            cfg.pop(key)
        cfg.dam.pop("arch_grad")
        cfg.dam.pop("sweep_budgets")
        base = {"order": "second", "relaxation": "sigmoid", "progressive": False}
        cfg.dam.update({**base, "budget_penalty": 0.0, "prune_start": None, "prune_end": 0.75})
        cfg.dam.update(old)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    upgraded = _run_config(tmp_path)
    validate(upgraded)
    assert upgraded.budget_unit == "modules" and upgraded.dam.arch_grad == "second"
    assert {k: v for k, v in upgraded.search.items() if v is not None} == search
