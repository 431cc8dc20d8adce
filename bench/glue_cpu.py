"""The CPU study: DiffoRA vs LoRA vs a random mask (vs AdaLoRA, full FT) on real GLUE data.

MiniLM-L6 on SST-2, CoLA and RTE from a local GLUE folder, matched trainable parameters
(DiffoRA and random_mask at budget 0.5 and rank 16 against LoRA r=8 on all 36 candidates), a fixed
step budget per task, several seeds. Each run is an ordinary ``python -m diffora_lab`` job in its
own folder; the study skips runs whose ``results.json`` exists, so it can be completed over several
sittings, one task or one method at a time.

    python bench/glue_cpu.py --data-dir ../shared/data/glue                 # everything
    python bench/glue_cpu.py --tasks rte --methods diffora lora --seeds 1   # a slice
    python bench/glue_cpu.py --summarize-only                               # table from what exists

Writes ``bench/results/glue_cpu.json`` (per task, method, seed: metric, params, wall time, kept
module types, discretization gap) and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "results" / "glue_cpu"
SUMMARY = HERE / "results" / "glue_cpu.json"

# Steps per task, fixed so a run takes about 2-4 minutes on 2 CPU cores for SST-2 and CoLA (short
# sentences; dynamic padding keeps their batches small) and about 4-7 minutes for RTE (long
# sentence pairs, max length 128). Measured here: SST-2 ~150-260 s, CoLA ~125-180 s, RTE ~420 s
# for DiffoRA (its search steps cost two passes).
TASKS = {
    "sst2": {"max_steps": 300, "max_length": 64},
    "cola": {"max_steps": 300, "max_length": 64},
    "rte": {"max_steps": 150, "max_length": 128},
}
# Matched trainable parameters: budget 0.5 at rank 16 keeps, in expectation, the adapter size of
# LoRA r=8 on every candidate (the achieved count is recorded per run).
METHODS = {
    "diffora": ["method=diffora", "rank=16", "budget=0.5"],
    "lora": ["method=lora", "rank=8"],
    "random_mask": ["method=random_mask", "rank=16", "budget=0.5"],
    # DiffoRA with our budget penalty on the mean gate (dam.budget_penalty; not in the paper).
    "diffora_bp": ["method=diffora", "rank=16", "budget=0.5", "dam.budget_penalty=1"],
    "adalora": ["method=adalora", "rank=8"],
    "full": ["method=full", "train.lr=5e-5"],
}
COMMON = ["backbone=minilm_l6", "logger=csv", "train.batch_size=32", "train.lr=1e-3"]


def run_dir(task: str, method: str, seed: int) -> Path:
    return RUNS / task / method / f"seed{seed}"


def run_one(task: str, method: str, seed: int, data_dir: str, extra: list[str]) -> dict | None:
    folder = run_dir(task, method, seed)
    if (folder / "results.json").is_file():
        return json.loads((folder / "results.json").read_text())
    settings = TASKS[task]
    steps = settings["max_steps"]
    overrides = [
        *COMMON,
        f"task={task}",
        f"task.data_dir={data_dir}",
        f"task.max_length={settings['max_length']}",
        f"train.max_steps={steps}",
        f"train.val_every={steps // 2}",
        f"train.ckpt_every={steps}",
        f"seed={seed}",
        *METHODS[method],
        f"hydra.run.dir={folder}",
        f"dam.search_cache_dir={RUNS / 'search_cache'}",
        *extra,
    ]
    print(f"[glue_cpu] {task} {method} seed {seed}: python -m diffora_lab {' '.join(overrides)}")
    # The checkout's own src/ first: the runs use this tree even if the installed copy is stale.
    src = str(HERE.parent / "src")
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-m", "diffora_lab", *overrides], env=env)
    if done.returncode != 0:
        print(f"[glue_cpu] FAILED ({done.returncode}): {task} {method} seed {seed}")
        return None
    return json.loads((folder / "results.json").read_text())


def record(result: dict, label: str) -> dict:
    primary = result["primary_metric"]
    disc = result["discretization"]
    return {
        "task": result["task"],
        "method": label,
        "seed": result["seed"],
        "metric": primary,
        "value": result["metrics"][primary],
        "metrics": result["metrics"],
        "params_trainable": result["params_trainable"],
        "params_adapter": result["params"]["adapter"],
        "rank": result["rank"],
        "k": result["k"],
        "kept_by_type": result["kept_by_type"],
        "val_before": disc["val_before"],
        "val_after": disc["val_after"],
        "wall_seconds": result["wall_seconds"],
        "steps": result["steps"],
    }


def summarize(rows: list[dict]) -> str:
    lines = [
        "| task | method | metric | mean ± std | seeds | trainable params (adapter) | "
        "wall s/run | disc. gap (before → after) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    for task in TASKS:
        for method in METHODS:
            group = groups.get((task, method))
            if not group:
                continue
            values = [100 * r["value"] for r in group]
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            params = statistics.mean(r["params_trainable"] for r in group)
            adapter = statistics.mean(r["params_adapter"] for r in group)
            wall = statistics.mean(r["wall_seconds"] for r in group)
            gap = "-"
            if group[0]["val_before"] is not None:
                before = statistics.mean(100 * r["val_before"] for r in group)
                after = statistics.mean(100 * r["val_after"] for r in group)
                gap = f"{before:.1f} → {after:.1f}"
            lines.append(
                f"| {task} | {method} | {group[0]['metric']} | {statistics.mean(values):.2f} ± "
                f"{std:.2f} | {len(group)} | {params:,.0f} ({adapter:,.0f}) | {wall:.0f} | {gap} |"
            )
    kept = [
        "",
        "Module types DiffoRA keeps (summed over seeds):",
        "",
        "| task | " + " | ".join(["q", "k", "v", "o", "ffn_in", "ffn_out"]) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        for label in ("diffora", "diffora_bp"):
            group = groups.get((task, label), [])
            if not group:
                continue
            totals = {
                t: sum(r["kept_by_type"].get(t, 0) for r in group)
                for t in ["q", "k", "v", "o", "ffn_in", "ffn_out"]
            }
            row = " | ".join(str(v) for v in totals.values())
            kept.append(f"| {task} ({label}, {len(group)} seeds) | {row} |")
    return "\n".join(lines + kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "glue"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--methods", nargs="+", default=["diffora", "lora", "random_mask"], choices=list(METHODS)
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    if not args.summarize_only:
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    run_one(task, method, seed, args.data_dir, args.overrides)
    rows = [
        record(json.loads(path.read_text()), path.parent.parent.name)
        for path in sorted(RUNS.glob("*/*/seed*/results.json"))
    ]
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps(rows, indent=2))
    print(summarize(rows))


if __name__ == "__main__":
    main()
