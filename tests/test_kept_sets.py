"""bench/kept_sets.py: how much the kept sets of a study's seeds overlap, against chance."""

from __future__ import annotations

import json
import statistics
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
        (folder / f"seed{seed}" / "results.json").write_text("{}")  # a finished run


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
    write_masks(tmp_path / "sst2" / "lora", {2: MODULES})
    (tmp_path / "sst2" / "lora" / "seed2" / "results.json").unlink()  # stopped mid-way: left out
    assert script.main([str(tmp_path / "sst2")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| diffora", "| random_mask"]
    assert "1.000 (1.000, 1.000)" in rows[1] and "0.000 (0.000, 0.000)" in rows[2]
    with pytest.raises(SystemExit) as refused:
        script.main([str(tmp_path / "sst2"), "--methods", "lora"])
    assert refused.value.code == 2
    assert "no method folder has two seeds" in capsys.readouterr().err


def write_gates(folder: Path, seed: int, records: list[tuple[int, list[float]]]) -> None:
    path = folder / f"seed{seed}" / "dam" / "gates.jsonl"
    path.write_text("".join(json.dumps({"step": s, "gates": g}) + "\n" for s, g in records))


def test_removal_orders_are_compared_across_seeds(tmp_path):
    script = load_script()
    folder = tmp_path / "sst2" / "diffora"
    write_masks(folder, {1: MODULES[:2], 2: MODULES[:2], 3: MODULES[2:4]})
    n = len(MODULES)
    start = [0.5] * n
    # Seeds 1 and 2 remove modules 15..2 in the same order (by step 30: 15..9; by 40: the rest
    # but 0 and 1); seed 3 removes them in the reverse order (0, 1, ... first).
    same_a = [0.6 + 0.01 * i for i in range(n)]
    step30 = [g if i < 9 else 0.0 for i, g in enumerate(same_a)]
    step40 = [g if i < 2 else 0.0 for i, g in enumerate(same_a)]
    for seed in (1, 2):
        write_gates(folder, seed, [(0, start), (20, same_a), (30, step30), (40, step40)])
    reverse30 = [0.0 if i < 7 else 0.7 for i in range(n)]
    reverse40 = [0.0 if i < 14 else 0.7 for i in range(n)]
    write_gates(folder, 3, [(0, start), (20, start), (30, reverse30), (40, reverse40)])
    row = script.stability(folder)
    assert row.first_removal == [30, 30, 30]
    assert row.spread_before == [pytest.approx(0.15), pytest.approx(0.15), 0.0]
    # Ranks by removal step, ties sharing their mean rank: the 7 removed at step 30 rank 4, the
    # 7 at step 40 rank 11, the 2 never removed 15.5. Pair (1, 2): identical orders, 1.
    first = [15.5] * 2 + [11.0] * 7 + [4.0] * 7
    third = [4.0] * 7 + [11.0] * 7 + [15.5] * 2
    mirrored = statistics.correlation(first, third)
    assert mirrored < -0.7
    assert row.order_agreement == pytest.approx((1 + 2 * mirrored) / 3)
    assert script.spearman([3.0, 1.0, 3.0, float("inf")], [2.5, 1.0, 2.5, 4.0]) == pytest.approx(1)
    line = script.table([row]).splitlines()[-1]
    assert f"| {(1 + 2 * mirrored) / 3:.3f} | 30 | 0.0000-0.1500 |" in line


def test_module_types_are_named_apart_where_last_name_parts_repeat():
    script = load_script()
    assert script.module_type(MODULES[1], MODULES) == "k_proj"
    bert = [
        f"encoder.layer.{i}.{t}"
        for i in range(2)
        for t in ("attention.self.query", "attention.output.dense", "output.dense")
    ]
    assert script.module_type(bert[1], bert) == "attention.output.dense"
    assert script.module_type(bert[5], bert) == "output.dense"
