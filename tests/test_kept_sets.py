"""bench/kept_sets.py: how much the kept sets of a study's seeds overlap, against chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench

MODULES = [f"model.layers.{i}.self_attn.{t}_proj" for i in range(4) for t in ("q", "k", "v", "o")]


def load_script():
    return load_bench("kept_sets")


def write_masks(folder: Path, kept_by_seed: dict[int, list[str]]) -> None:
    for seed, kept in kept_by_seed.items():
        path = folder / f"seed{seed}" / "dam" / "mask.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"modules": MODULES, "kept_modules": kept}))


def test_overlap_chance_and_types_of_a_method_folder(tmp_path):
    script = load_script()
    a, b, c = MODULES[:4], MODULES[2:6], MODULES[:4]  # a = c; a, b share 2 of 6
    write_masks(tmp_path / "sst2" / "diffora", {1: a, 2: b, 3: c})
    row = script.stability(tmp_path / "sst2" / "diffora")
    assert (row.seeds, row.candidates, row.kept) == (3, 16, [4, 4, 4])
    assert row.overlap_mean == pytest.approx((2 / 6 + 1.0 + 2 / 6) / 3)
    assert (row.overlap_min, row.overlap_max) == (pytest.approx(2 / 6), 1.0)
    assert row.chance == pytest.approx(0.25 / 1.75)  # 4 of 16 kept
    assert row.by_type == {"k_proj": 3, "o_proj": 3, "q_proj": 3, "v_proj": 3}


def test_the_command_prints_a_row_per_method_and_refuses_a_folder_without_pairs(tmp_path, capsys):
    script = load_script()
    write_masks(tmp_path / "sst2" / "diffora", {1: MODULES[:3], 2: MODULES[:3]})
    write_masks(tmp_path / "sst2" / "random_mask", {1: MODULES[:3], 2: MODULES[3:6]})
    write_masks(tmp_path / "sst2" / "lora", {1: MODULES})  # one seed: no pair, left out
    assert script.main([str(tmp_path / "sst2")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| diffora", "| random_mask"]
    assert "1.000 (1.000, 1.000)" in rows[1] and "0.000 (0.000, 0.000)" in rows[2]
    with pytest.raises(SystemExit) as refused:
        script.main([str(tmp_path / "sst2"), "--methods", "lora"])
    assert refused.value.code == 2
    assert "no method folder has two seeds" in capsys.readouterr().err
