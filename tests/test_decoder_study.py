"""bench/decoder_study.py: the decoder study's harness (job list, the control, table, figure)."""

from __future__ import annotations

from conftest import load_bench


def load_study():
    load_bench("budget_curve")  # decoder_study imports it
    return load_bench("decoder_study")


def test_every_row_has_the_same_parameter_target_and_the_control_differs_by_its_order(tmp_path):
    study = load_study()
    args = study.parse(["--out", str(tmp_path), "--tasks", "sst2"])
    jobs = study.make_jobs(args, tmp_path / "runs")
    assert len(jobs) == 3 * len(study.METHODS)
    assert [j.seed for j in jobs] == sorted(j.seed for j in jobs)  # seed first
    by = {(j.method, j.seed): set(j.overrides) for j in jobs}
    searched = {"budget=0.25", "budget_unit=params", "rank=8", "backbone=smollm2_135m"}
    assert searched | {"method=diffora"} <= by[("diffora", 1)]
    assert searched | {"method=random_mask"} <= by[("random_mask", 2)]
    assert {"method=lora", "rank=2"} <= by[("lora", 3)]  # a quarter of r=8: r=2
    control = by[("diffora_random_order", 1)]
    # The control is DiffoRA's run with one more setting: the random order of removal.
    assert control - by[("diffora", 1)] == {"search=progressive_random"} | {
        o for o in control if o.startswith(("hydra.run.dir", "data.cache_dir"))
    }
    assert "search=progressive_random" not in by[("diffora", 1)]
    assert len({j.folder for j in jobs}) == len(jobs)


def row(method, seed, value, params=600_000, target=610_560, kept=None, rank=8):
    return dict(
        task="sst2",
        method=method,
        seed=seed,
        value=value,
        params_adapter=params,
        target_params=target,
        kept_by_type=kept or {"q": 2, "up": 3},
        rank=rank,
    )


def test_the_table_pairs_every_row_with_diffora_by_seed(tmp_path):
    from PIL import Image

    study = load_study()
    rows = [
        row("diffora", 1, 0.80),
        row("diffora", 2, 0.84),
        row("diffora_random_order", 1, 0.76),
        row("diffora_random_order", 2, 0.82),
        row("diffora_random_order", 3, 0.99),  # no DiffoRA seed 3: not paired
        row("lora", 1, 0.78, rank=2),
    ]
    lines = {
        line.split(" | ")[1]: line
        for line in study.table(rows, study.METHODS).splitlines()
        if line.startswith("| sst2")
    }
    # per-seed differences +4 and +2 points: +3.00 ± 1.41 over 2 seeds
    assert lines["diffora_random_order"].endswith("| +3.00 ± 1.41 (2) |")
    assert "| 76.0 82.0 99.0 |" in lines["diffora_random_order"]
    assert lines["diffora"].endswith("| - |") and "| 0.983 |" in lines["diffora"]
    assert lines["lora"].endswith("| +2.00 ± - (1) |")
    path = study.figure(rows, "sst2", study.METHODS, tmp_path / "decoder_sst2.png")
    assert Image.open(path).size[0] > 600
    assert study.Y_SCALES["sst2"][1:] == (0.5, 1.0)
