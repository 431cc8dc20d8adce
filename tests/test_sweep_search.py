"""One search per budget sweep with the default (progressive) search.

The search runs towards the sweep's smallest budget and leaves a snapshot as it passes each
larger one (searches/progressive.py); the search cache serves them (search_cache.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_main

from diffora_lab.sweep import hydra_sweep_budgets
from diffora_lab.train import run

SWEEP = "dam.sweep_budgets=[0.25,0.5,0.75]"


def smoke(out: Path, cache: Path, *overrides: str) -> dict:
    cfg = compose_config(["+experiment=smoke", "logger=none", *overrides], out)
    cfg.data.cache_dir = str(cache)
    return run(cfg, out)


def mask_of(results: dict) -> dict:
    return json.loads((Path(results["output_dir"]) / "dam" / "mask.json").read_text())


@pytest.mark.slow
def test_a_sweep_run_out_of_order_continues_the_search_and_ends_as_a_lone_search(tmp_path):
    """The largest budget runs first (its search ends early), the smallest continues from its
    snapshot: the smallest ends exactly where its lone search ends."""
    cache = tmp_path / "cache"
    large = smoke(tmp_path / "b075", cache, SWEEP, "budget=0.75")
    small = smoke(tmp_path / "b025", cache, SWEEP, "budget=0.25")
    alone = smoke(tmp_path / "alone", tmp_path / "own_cache", "budget=0.25")
    assert large["search"]["reused"] is False
    assert large["search_variant"]["cut_step"] < small["search_variant"]["cut_step"] == 20
    source = small["search"]["source"]
    assert source["run_folder"] == str(tmp_path / "b075") and source["exact"] is False
    assert source["step"] == large["search_variant"]["cut_step"]  # continued from there
    # The sweep's smallest budget searches what it would search alone (same key, same state).
    assert small["search"]["key"] == alone["search"]["key"]
    assert mask_of(small)["kept"] == mask_of(alone)["kept"]
    assert mask_of(small)["gates"] == pytest.approx(mask_of(alone)["gates"], abs=1e-6)
    assert small["metrics"] == pytest.approx(alone["metrics"])
    # The larger budget kept more, within half a module of its own target.
    assert large["budget_count"]["within_one_module"] and large["k"] > small["k"]


def test_outside_a_multirun_there_is_no_hydra_sweep():
    assert hydra_sweep_budgets() is None


@pytest.mark.slow
def test_a_three_budget_multirun_makes_one_search(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_main(
        [
            "-m",
            "+experiment=smoke",
            "budget=0.25,0.5,0.75",  # the default (progressive) search: depends on the budget
            "logger=none",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sorted(
        (json.loads(p.read_text()) for p in sweep.glob("*/results.json")),
        key=lambda r: r["budget"],
    )
    assert [r["budget"] for r in rows] == [0.25, 0.5, 0.75]
    # Every job read the sweep's budgets from Hydra: one key, one search.
    assert all(r["search_variant"]["sweep_budgets"] == [0.25, 0.5, 0.75] for r in rows)
    assert len({r["search"]["key"] for r in rows}) == 1
    log = done.stdout + done.stderr
    first, *others = rows  # Hydra runs the budgets in order: 0.25 searches first
    assert first["search"]["reused"] is False
    for r in others:
        source = r["search"]["source"]
        assert r["search"]["reused"] is True and source["exact"] is True
        assert source["run_folder"] == first["output_dir"] and source["budget"] == r["budget"]
        assert (
            source["step"] == r["search_variant"]["cut_step"] < first["search_variant"]["cut_step"]
        )
        assert r["budget_count"]["within_one_module"]
        assert f"snapshot after step {source['step']} (budget {r['budget']}" in log
    # Each larger budget's snapshot holds the modules still active when the search passed it:
    # a superset of what the next smaller budget keeps.
    kept = [torch.tensor(mask_of(r)["kept"]) for r in rows]
    assert bool((kept[0] <= kept[1]).all()) and bool((kept[1] <= kept[2]).all())
