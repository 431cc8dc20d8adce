"""The run report: grouping, mean and sample std over seeds, written files, CLI errors."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from diffora_lab import report  # noqa: E402

# (method, budget) -> accuracy of seeds 1, 2, 3; params = 1000 * budget + 10 * seed (+ 5000 lora).
SCORES = {
    ("diffora", 0.25): [0.70, 0.74, 0.78],
    ("diffora", 0.5): [0.80, 0.81, 0.85],
    ("random_mask", 0.25): [0.60, 0.66, 0.63],
    ("random_mask", 0.5): [0.72, 0.70, 0.77],
}
SEEDS = (1, 2, 3)


def params_of(method: str, budget: float, seed: int) -> int:
    return int(1000 * budget) + 10 * seed + (5000 if method == "random_mask" else 0)


def write_run(folder: Path, **fields) -> Path:
    """A results.json with the keys train.run writes (values invented)."""
    results = {
        "task": "rte",
        "method": "diffora",
        "backbone": "tiny_deberta",
        "budget": 0.5,
        "rank": 8,
        "seed": 1,
        "params_trainable": 1000,
        "params": {"adapter": 800, "head": 200, "total": 1000},
        "candidate_modules": 12,
        "kept_modules": [],
        "kept_by_type": {},
        "k": 6,
        "primary_metric": "val/accuracy",
        "metrics": {"val/accuracy": 0.5, "val/loss": 0.7},
        "discretization": {"val_before": None, "val_after": None, "step": None},
        "steps": 40,
        "wall_seconds": 1.0,
        "output_dir": str(folder),
    }
    metric = fields.pop("metric", None)
    results.update(fields)
    if metric is not None:
        results["metrics"] = {results["primary_metric"]: metric, "val/loss": 0.7}
    results["params"]["total"] = results["params_trainable"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Two multirun folders (one per method), each 2 budgets x 3 seeds, like Hydra numbers them."""
    root = tmp_path / "runs"
    for method in ("diffora", "random_mask"):
        job = 0
        for budget in (0.25, 0.5):
            for index, seed in enumerate(SEEDS):
                write_run(
                    root / method / str(job),
                    method=method,
                    budget=budget,
                    seed=seed,
                    metric=SCORES[method, budget][index],
                    params_trainable=params_of(method, budget, seed),
                )
                job += 1
    (root / "diffora" / "multirun.yaml").write_text("hydra: {}\n")
    return root


def expected(method: str, budget: float) -> tuple[float, float, float]:
    """Mean, sample std (ddof=1) and mean params, computed by hand."""
    values = SCORES[method, budget]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    params = sum(params_of(method, budget, s) for s in SEEDS) / len(SEEDS)
    return mean, std, params


def test_collect_finds_every_run_once(sweep):
    rows = report.collect([sweep, sweep / "diffora", sweep / "diffora" / "0" / "results.json"])
    assert len(rows) == 12
    assert {row["score"] for row in rows} == {v for vs in SCORES.values() for v in vs}
    assert all(Path(row["run_dir"], "results.json").is_file() for row in rows)


def test_aggregate_matches_hand_computation(sweep):
    groups = report.aggregate(report.collect([sweep]))
    assert [(g["method"], g["budget"]) for g in groups] == sorted(SCORES)
    for g in groups:
        mean, std, params = expected(g["method"], g["budget"])
        assert g["task"] == "rte" and g["rank"] == 8 and g["metric"] == "val/accuracy"
        assert g["runs"] == 3 and g["seeds"] == [1, 2, 3]
        assert g["mean"] == pytest.approx(mean, abs=1e-12)
        assert g["std"] == pytest.approx(std, abs=1e-12)
        assert g["params_trainable"] == pytest.approx(params)


def test_single_seed_has_no_std_and_rank_splits_groups(tmp_path):
    write_run(tmp_path / "a", seed=1, metric=0.6)
    write_run(tmp_path / "b", seed=2, metric=0.8)
    write_run(tmp_path / "c", seed=1, rank=4, metric=0.7)
    groups = report.aggregate(report.collect([tmp_path]))
    assert [(g["rank"], g["runs"]) for g in groups] == [(4, 1), (8, 2)]
    assert groups[0]["std"] is None
    assert groups[1]["std"] == pytest.approx(math.sqrt(0.02))
    row = report.to_markdown(groups).splitlines()[2]
    assert row.split("|")[7:9] == [" 0.7000 ", " - "]


def test_write_report_files(sweep, tmp_path):
    groups = report.aggregate(report.collect([sweep]))
    paths = report.write_report(groups, tmp_path / "out", sources=[sweep])
    for kind in ("markdown", "csv", "plot"):
        assert paths[kind].is_file() and paths[kind].stat().st_size > 0
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    for row in table:
        mean, std, params = expected(row["method"], float(row["budget"]))
        assert float(row["mean"]) == pytest.approx(mean)
        assert float(row["std"]) == pytest.approx(std)
        assert float(row["params_trainable"]) == pytest.approx(params)
        assert row["runs"] == "3" and row["seeds"] == "1;2;3"
    markdown = paths["markdown"].read_text()
    mean, std, _ = expected("diffora", 0.5)
    assert f"| rte | diffora | 0.5 | 8 | val/accuracy | {mean:.4f} | {std:.4f} |" in markdown


def test_main_prints_markdown_and_writes(sweep, tmp_path, capsys):
    assert report.main([str(sweep), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| backbone | task | method | budget |")
    assert out.count("| rte |") == 4
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "budget_curve.png",
        "report.csv",
        "report.md",
    ]


def write_config(folder: Path, **train) -> None:
    """A run's .hydra/config.yaml with the given train settings (and per-run paths)."""
    import yaml

    config = {
        "seed": int(json.loads((folder / "results.json").read_text())["seed"]),
        "rank": 8,
        "train": {"max_steps": 40, "lr": 0.001, **train},
        "data": {"cache_dir": str(folder / "cache")},  # differs per run, ignored
    }
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))


def test_runs_of_two_backbones_are_not_averaged(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path / f"mini{seed}", backbone="minilm_l6", seed=seed, metric=0.9)
        write_run(tmp_path / f"tiny{seed}", backbone="tiny_deberta", seed=seed, metric=0.5)
    groups = report.aggregate(report.collect([tmp_path]))
    assert [(g["backbone"], g["mean"], g["runs"]) for g in groups] == [
        ("minilm_l6", pytest.approx(0.9), 2),
        ("tiny_deberta", pytest.approx(0.5), 2),
    ]
    fig = report.plot_budget_curve(groups)
    titles = sorted(ax.get_title() for ax in fig.axes)
    assert titles == ["rte (minilm_l6)", "rte (tiny_deberta)"]


def test_the_faithful_preset_is_its_own_row(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path / f"default{seed}", preset="default", seed=seed, metric=0.8)
        write_run(tmp_path / f"faithful{seed}", preset="faithful", seed=seed, metric=0.6)
    groups = report.aggregate(report.collect([tmp_path]))
    assert [(g["method"], g["mean"], g["runs"]) for g in groups] == [
        ("diffora", pytest.approx(0.8), 2),
        ("diffora_faithful", pytest.approx(0.6), 2),
    ]


def test_group_warns_about_what_differs_besides_the_seed(tmp_path):
    for seed, steps in ((1, 40), (2, 40), (3, 12)):
        write_run(tmp_path / f"s{seed}", seed=seed, metric=0.6 + seed / 100)
        write_config(tmp_path / f"s{seed}", max_steps=steps)
    with pytest.warns(
        UserWarning, match=r"differ in more than their seed: train.max_steps: 12, 40"
    ):
        groups = report.aggregate(report.collect([tmp_path]))
    assert groups[0]["differs_in"] == ["train.max_steps"]
    assert report.to_markdown(groups).splitlines()[2].rstrip().endswith("| 3 ! |")


def test_seeds_alone_raise_no_warning(tmp_path, recwarn):
    for seed in (1, 2):
        write_run(tmp_path / f"s{seed}", seed=seed, metric=0.6)
        write_config(tmp_path / f"s{seed}")
    groups = report.aggregate(report.collect([tmp_path]))
    assert groups[0]["differs_in"] == [] and groups[0]["runs"] == 2
    assert not [w for w in recwarn if "differ" in str(w.message)]


def test_budget_curve_does_not_zoom_into_one_example(tmp_path):
    # 0.01 apart on a 200-example dev set: two examples, not a trend.
    for budget, metric in ((0.25, 0.700), (0.5, 0.705), (0.75, 0.710)):
        for seed in (1, 2):
            write_run(
                tmp_path / f"b{budget}s{seed}",
                budget=budget,
                seed=seed,
                metric=metric + 0.005 * seed,
                dev_examples=200,
            )
    groups = report.aggregate(report.collect([tmp_path]))
    fig = report.plot_budget_curve(groups)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert high - low >= 10 / 200
    assert "200 examples" in ax.get_ylabel() and "1 example = 0.005" in ax.get_ylabel()
    (container,) = ax.containers  # one errorbar series: the mean with +-std bars
    assert len(container.lines[2][0].get_segments()) == 3
    assert "2 seeds" in ax.get_legend().get_texts()[0].get_text()


def test_broken_files_are_skipped(tmp_path):
    write_run(tmp_path / "ok", metric=0.9)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"accuracy": 1.0}))
    with pytest.warns(UserWarning, match="skipping"):
        rows = report.collect([tmp_path])
    assert [row["score"] for row in rows] == [0.9]


@pytest.mark.slow
def test_cli_errors_clearly_on_empty_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "diffora_lab.report", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=900,  # hang guard
    )
    assert result.returncode == 2
    assert "no results.json found under" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "empty" / "report.md").exists()


def test_cli_errors_on_missing_folder(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
