"""Tracking and sweeps: real Hydra multirun with search reuse, a real offline W&B run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_main as cli

from diffora_lab.search_cache import search_key
from diffora_lab.train import run


def sweep_results(sweep: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    return sorted(rows, key=lambda r: r["budget"])


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False])
def test_budget_multirun_searches_once_when_reuse_is_on(tmp_path, reuse):
    sweep = tmp_path / "sweep"
    done = cli(
        [
            "-m",
            "+experiment=smoke",
            "method=diffora_faithful",  # the paper's search does not look at the budget
            "budget=0.25,0.5,0.75",
            "budget_unit=modules",  # the paper's k, a fixed count per budget
            f"dam.reuse_search={str(reuse).lower()}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sweep_results(sweep)
    assert [r["k"] for r in rows] == [3, 6, 9]  # 12 candidates
    assert len({r["search"]["key"] for r in rows}) == 1
    reused = [r["search"]["reused"] for r in rows]
    searches = reused.count(False)
    assert searches == (1 if reuse else 3)
    if reuse:
        # The shared search gives every budget the same gates before discretization.
        gates = [
            json.loads((Path(r["output_dir"]) / "dam" / "mask.json").read_text())["gates"]
            for r in rows
        ]
        assert gates[0] == gates[1] == gates[2]
        # And the same pre-discretization dev metric.
        assert len({r["discretization"]["val_before"] for r in rows}) == 1


@pytest.mark.slow
def test_search_key_ignores_only_post_search_settings(smoke_cfg):
    def key(*overrides: str) -> str:
        return search_key(smoke_cfg("method=diffora_faithful", *overrides))

    base = key()
    assert key("budget=0.25") == base
    assert key("dam.fold_gates=false") == base
    assert key("train.val_every=7") == base
    assert key("seed=3") != base
    assert key("dam.arch_lr=0.2") != base
    assert key("rank=4") != base
    assert key("train.max_steps=60") != base
    # The default search removes modules on a schedule that ends at the budget: not shared.
    assert search_key(smoke_cfg("budget=0.25")) != search_key(smoke_cfg())


@pytest.mark.slow
def test_mask_path_fine_tunes_a_saved_mask_without_search(smoke_cfg, tmp_path):
    first = run(smoke_cfg("dam.reuse_search=false"), tmp_path / "first")
    mask_file = tmp_path / "first" / "dam" / "mask.json"
    again = run(smoke_cfg(f"dam.mask_path={mask_file}", "budget=0.25"), tmp_path / "again")
    assert again["kept_modules"] == first["kept_modules"]
    # The mask's budget and k are the run's, not the config's budget=0.25.
    mask = json.loads(mask_file.read_text())
    assert (again["budget"], again["k"]) == (mask["budget"], mask["k"])
    assert (again["budget_unit"], again["budget"]) == (mask["unit"], 0.5)
    assert again["discretization"]["val_before"] is None  # no search happened
    assert not (tmp_path / "again" / "dam" / "heatmaps").exists()


@pytest.mark.slow
def test_offline_wandb_run_has_heatmaps_over_time_and_gates_table(tmp_path):
    run_dir = tmp_path / "run"
    done = cli(
        [
            "+experiment=smoke",
            "logger=wandb",
            "logger.mode=offline",
            "dam.reuse_search=false",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    media = offline / "files" / "media"
    heatmaps = list((media / "images" / "dam").glob("heatmap_*.png"))
    masks = list((media / "images" / "dam").glob("mask_*.png"))
    tables = list((media / "table" / "dam").glob("gates_table_*.table.json"))
    # 40 steps, search until 20, a record every 5 steps: steps 0, 5, 10, 15.
    assert len(heatmaps) >= 2 and len(masks) == 1 and len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "layer", "module_type", "gate"]
    steps = {row[0] for row in table["data"]}
    assert len(steps) >= 2
    assert all(0.0 <= row[3] <= 1.0 for row in table["data"])
    record = offline / f"run-{offline.name.split('-')[-1]}.wandb"
    assert record.is_file()
    # The run carries what ran as tags, and its group (the run record holds them as text).
    for text in (b"task:synthetic", b"method:diffora", b"budget:0.5", b"seed:42"):
        assert text in record.read_bytes(), text


def test_wandb_names_and_tags_say_what_ran(smoke_cfg):
    from diffora_lab.tracking import run_name, run_tags

    faithful = smoke_cfg(
        "method=diffora_faithful", "budget=0.25", "seed=3", "logger=wandb", "logger.tags=[a]"
    )
    assert run_name(faithful) == "diffora_faithful-synthetic-b0.25-r8-s3"
    assert run_tags(faithful) == [
        "a",
        "task:synthetic",
        "method:diffora_faithful",
        "budget:0.25",
        "seed:3",
    ]
    lora = smoke_cfg("method=lora")  # adapts every candidate: no budget of its own
    assert run_name(lora) == "lora-synthetic-r8-s42"
    assert "budget:none" in run_tags(lora)


@pytest.mark.slow
def test_run_folders_are_named_by_task_and_method(tmp_path):
    short = ["+experiment=smoke", "train.max_steps=4", "train.val_every=4", "dam.warmup_steps=1",
             "logger=none", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    done = cli(short, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (single,) = (tmp_path / "outputs").glob("*/*/*/results.json")
    assert single.parent.parent.relative_to(tmp_path).as_posix() == "outputs/synthetic/diffora"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", single.parent.name)
    done = cli(["-m", *short, "method=lora,diffora_faithful"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(
        p.parent.relative_to(tmp_path / "multirun").parts
        for p in (tmp_path / "multirun").glob("*/*/*/*/results.json")
    )
    assert [(task, method, job) for task, method, _, job in jobs] == [
        ("synthetic", "diffora_faithful", "1"),
        ("synthetic", "lora", "0"),
    ]
