"""bench/gpu_study.py: the comparison study's driver (a dry run at a tiny scale)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import load_bench


def load_study():
    return load_bench("gpu_study")


def write_sst2(root: Path, n_train: int = 160, n_dev: int = 48) -> None:
    rng = random.Random(0)
    words = {0: ["dull", "bad", "boring", "awful"], 1: ["great", "fine", "moving", "bright"]}
    (root / "SST-2").mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            rows.append(f"a {' '.join(rng.choices(words[label], k=3))} film \t{label}")
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def test_holdout_dev_is_carved_from_train_only(tmp_path):
    study = load_study()
    write_sst2(tmp_path / "glue")
    out = study.holdout_data(tmp_path / "glue", ["sst2"], 0.25, tmp_path / "sel", seed=0)
    original = (tmp_path / "glue" / "SST-2" / "train.tsv").read_text().splitlines()
    train = (out / "SST-2" / "train.tsv").read_text().splitlines()
    dev = (out / "SST-2" / "dev.tsv").read_text().splitlines()
    assert train[0] == dev[0] == original[0] == "sentence\tlabel"
    assert len(dev) - 1 == 40 and len(train) - 1 == 120
    assert sorted(train[1:] + dev[1:]) == sorted(original[1:])


@pytest.mark.slow
def test_dry_run_writes_the_table_and_resumes(tmp_path):
    study = load_study()
    write_sst2(tmp_path / "glue")
    args = [
        "--backbone",
        "tiny_deberta",
        "--scale",
        "0.03",
        "--tasks",
        "sst2",
        "--methods",
        "lora",
        "diffora",
        "--seeds",
        "1",
        "--data-dir",
        str(tmp_path / "glue"),
        "--out",
        str(tmp_path / "results"),
        "--name",
        "dry",
    ]
    assert study.main(args) == 0
    rows = json.loads((tmp_path / "results" / "dry.json").read_text())
    assert sorted(r["method"] for r in rows) == ["diffora", "lora"]
    by_method = {r["method"]: r for r in rows}
    assert by_method["diffora"]["val_before"] is not None  # discretization gap recorded
    assert by_method["lora"]["val_before"] is None
    assert by_method["diffora"]["steps"] == by_method["lora"]["steps"] == 9  # 300 x 0.03
    table = (tmp_path / "results" / "dry.md").read_text()
    assert "| sst2 | diffora |" in table and "| sst2 | lora |" in table
    assert "python bench/gpu_study.py --backbone tiny_deberta" in table
    # A second call finds both runs finished and reruns nothing.
    stamp = (tmp_path / "results" / "dry" / "sst2" / "lora" / "seed1" / "results.json").stat()
    assert study.main(args) == 0
    again = (tmp_path / "results" / "dry" / "sst2" / "lora" / "seed1" / "results.json").stat()
    assert again.st_mtime_ns == stamp.st_mtime_ns
    # Another table over the same runs (an ablation sharing its reference runs) has its own files.
    lora_only = [*args[: args.index("--methods") + 1], "lora", *args[args.index("--seeds") :]]
    assert study.main([*lora_only, "--table", "dry_lora", "--summarize-only"]) == 0
    assert [
        r["method"] for r in json.loads((tmp_path / "results" / "dry_lora.json").read_text())
    ] == ["lora"]
    assert len(json.loads((tmp_path / "results" / "dry.json").read_text())) == 2


def test_table_pairs_seeds_with_lora_and_flags_parameter_mismatch():
    study = load_study()

    def row(method, seed, value, params, before=None):
        return dict(
            task="sst2",
            method=method,
            seed=seed,
            metric="val/accuracy",
            value=value,
            params_adapter=params,
            val_before=before,
            val_after=None if before is None else value,
        )

    rows = [
        row("lora", 1, 0.80, 1000),
        row("lora", 2, 0.90, 1000),
        row("lora", 3, 0.85, 1000),
        # seed 3 has no diffora run: only seeds 1 and 2 are paired
        row("diffora", 1, 0.82, 700, 0.81),
        row("diffora", 2, 0.91, 700, 0.90),
        row("random_mask", 1, 0.79, 1040),
        row("random_mask", 4, 0.99, 1040),
    ]
    lines = {
        line.split(" | ")[1]: line
        for line in study.table(rows, ["lora", "diffora", "random_mask"]).splitlines()
        if line.startswith("| sst2")
    }
    # per-seed differences +2 and +1 points: mean +1.50, std 0.71, over 2 seeds
    assert "| +1.50 ± 0.71 (2) |" in lines["diffora"]
    assert "0.700 (differs > 5 %)" in lines["diffora"]
    # only seed 1 pairs (seed 4 has no LoRA run); 4 % more parameters is not flagged
    assert "| -1.00 ± 0.00 (1) |" in lines["random_mask"] and "| 1.040 |" in lines["random_mask"]
    assert "| 85.00 ± 5.00 | 3 | - |" in lines["lora"]
