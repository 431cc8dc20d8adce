"""bench/gpu_study.py: the comparison study's driver (a dry run at a tiny scale)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location("gpu_study", REPO / "bench" / "gpu_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_study"] = module
    spec.loader.exec_module(module)
    return module


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
