"""bench/sweep_sharing.py: one search per budget sweep against one search per budget."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import compose_config, load_bench
from omegaconf import OmegaConf

BUDGETS = ["0.125", "0.25", "0.5"]


def parse(sweep, tmp_path: Path, *extra: str):
    return sweep.argparse.Namespace(
        task="sst2",
        budgets=[float(b) for b in BUDGETS],
        seeds=[1, 2],
        scale=1.0,
        backbone="minilm_l6",
        data_dir=str(tmp_path / "glue"),
        out=str(tmp_path),
        name="sweep_sharing",
        extra=list(extra),
    )


def test_the_separate_arm_is_the_budget_curves_search_and_shared_runs_change_only_the_sharing(
    tmp_path,
):
    sweep = load_bench("sweep_sharing")
    separate, chains = sweep.make_jobs(parse(sweep, tmp_path), tmp_path, tmp_path / "glue")
    curve = sweep.budget_curve
    study = curve.make_jobs(
        curve.parse(["--tasks", "sst2", "--methods", "diffora", "--budgets", *BUDGETS]),
        tmp_path / "budget_curve",
        tmp_path / "glue",
    )
    by_run = {(j.budget, j.seed): j for j in study}
    # The separate arm is the study's own diffora runs: same folders, same settings, no rerun.
    assert [(j.folder, j.overrides) for j in separate] == [
        (by_run[j.budget, j.seed].folder, by_run[j.budget, j.seed].overrides) for j in separate
    ]
    assert len(separate) == 6 and [len(c) for c in chains] == [3, 3]
    for chain in chains:
        # The smallest budget first: its run searches, the others start from its snapshots.
        assert [j.budget for j in chain] == [0.125, 0.25, 0.5]
        assert len({j.folder for j in chain}) == 3
        caches = {o for j in chain for o in j.overrides if o.startswith("data.cache_dir=")}
        assert len(caches) == 1  # one search cache per seed
        for job in chain:
            alone = by_run[job.budget, job.seed]
            changed = set(job.overrides) ^ set(alone.overrides)
            assert {o.split("=")[0] for o in changed} == {
                "dam.reuse_search",
                "dam.sweep_budgets",
                "data.cache_dir",
                "hydra.run.dir",
            }
            without_dir = [o for o in job.overrides if not o.startswith("hydra.run.dir=")]
            cfg = compose_config(without_dir)
            assert cfg.dam.reuse_search is True
            assert list(cfg.dam.sweep_budgets) == [0.125, 0.25, 0.5]
            plain = compose_config([o for o in alone.overrides if not o.startswith("hydra.")])
            for key in ("dam", "data"):
                OmegaConf.update(cfg, key, None, merge=False)
                OmegaConf.update(plain, key, None, merge=False)
            assert cfg == plain


def shared_row(sweep, job, value, key=None):
    return {
        "arm": "shared",
        "seed": job.seed,
        "budget": job.budget,
        "metric": "val/accuracy",
        "value": value,
        "cut_step": 36,
        "searched_steps": 0,
        "params_adapter": 100,
        "run_dir": "/elsewhere",
        "config_key": key or sweep.budget_curve.config_key(job),
    }


def test_recorded_rows_count_as_finished_only_with_the_same_settings_and_the_table_pairs_them(
    tmp_path,
):
    sweep = load_bench("sweep_sharing")
    curve = sweep.budget_curve
    separate, chains = sweep.make_jobs(parse(sweep, tmp_path), tmp_path, tmp_path / "glue")
    seed1, seed2 = chains
    # The study recorded its diffora runs of seed 1 on another machine (no folders here).
    study_rows = [
        {
            "task": "sst2",
            "method": "diffora",
            "budget": j.budget,
            "seed": j.seed,
            "metric": "val/accuracy",
            "value": 0.80 + j.budget / 10,
            "params_adapter": 100,
            "run_dir": "/elsewhere",
            "config_key": curve.config_key(j),
        }
        for j in separate
        if j.seed == 1
    ]
    study_rows[0]["cut_step"] = 150
    (tmp_path / "budget_curve.json").write_text(json.dumps(study_rows))
    recorded = [shared_row(sweep, j, 0.80 + j.budget / 10 - 0.01) for j in seed1]
    recorded += [shared_row(sweep, seed2[0], 0.5, key="0" * 16)]  # other settings: run again
    (tmp_path / "sweep_sharing.json").write_text(json.dumps(recorded))

    rows, separate_todo, todo, reused = sweep.collect(separate, chains, tmp_path, "sweep_sharing")
    assert reused == 3
    assert sorted((j.budget, j.seed) for j in separate_todo) == [(0.125, 2), (0.25, 2), (0.5, 2)]
    assert todo[0] == [] and todo[1] == seed2  # seed 2's chain whole, smallest budget first
    arms = sorted((r["arm"], r["seed"]) for r in rows)
    assert arms == [("separate", 1)] * 3 + [("shared", 1)] * 3

    lines = sweep.table(rows).splitlines()
    quarter = next(line for line in lines if line.startswith("| 0.25 |"))
    # shared - separate, paired by seed: one pair, its difference in points, no t-test
    assert "| -1.00 ± 0.00 (1) | -1.00 | - |" in quarter
    assert next(line for line in lines if line.startswith("| 0.125 |")).endswith("| 36 / 150 |")
    assert "| 36 / - |" in quarter  # a recorded row without its cut step says so
    assert "| shared | 3 | 0 | 0 |" in lines
    assert "| separate | 3 | 1 | 150 (2 runs unknown) |" in lines
