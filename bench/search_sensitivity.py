"""Sensitivity of the DAM search to its hyper-parameters, judged on the search split only.

Runs the search phase alone (``train.stop_after`` = the search length) for each setting and
reports the architecture-step loss on the search split (the mean over the last 20 architecture
steps), the gate entropy at the end, how far the gates spread, and the discretization gap measured
on the search loss. Dev is never used: this is how the study's search settings are chosen.

    python bench/search_sensitivity.py --task sst2 dam.arch_lr=0.01 dam.arch_lr=0.05 dam.arch_lr=0.2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "results" / "search_sensitivity"


def search_only(task: str, setting: str, steps: int, data_dir: str, seed: int) -> dict:
    folder = RUNS / task / setting.replace("=", "_") / f"seed{seed}"
    search_steps = steps // 2
    overrides = [
        "backbone=minilm_l6",
        "logger=csv",
        f"task={task}",
        f"task.data_dir={data_dir}",
        "rank=16",
        "budget=0.5",
        f"seed={seed}",
        f"train.max_steps={steps}",
        f"train.stop_after={search_steps}",
        f"train.val_every={steps}",
        "dam.reuse_search=false",
        "ckpt_path=null",
        setting,
        f"hydra.run.dir={folder}",
    ]
    if not (folder / "dam" / "mask.json").is_file():
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        done = subprocess.run([sys.executable, "-m", "diffora_lab", *overrides], env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{setting}: exit {done.returncode}")
    rows = list(csv.DictReader((folder / "csv" / "metrics.csv").open()))
    losses = [float(r["search/loss"]) for r in rows if r.get("search/loss")]
    entropy = [float(r["dam/entropy"]) for r in rows if r.get("dam/entropy")]
    mask = json.loads((folder / "dam" / "mask.json").read_text())
    gates = mask["gates"]
    return {
        "setting": setting,
        "search_loss_last20": statistics.mean(losses[-20:]),
        "entropy_end": entropy[-1],
        "gate_min": min(gates),
        "gate_max": max(gates),
        "kept_by_type": {
            t: sum(mask["kept"][j :: len(mask["module_types"])])
            for j, t in enumerate(mask["module_types"])
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--steps", type=int, default=300, help="the study's max_steps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "glue"))
    parser.add_argument("settings", nargs="+", help="one Hydra override per setting")
    args = parser.parse_args(argv)
    rows = [search_only(args.task, s, args.steps, args.data_dir, args.seed) for s in args.settings]
    print(
        f"| setting ({args.task}, seed {args.seed}) | search loss (last 20 arch steps) | "
        "gate entropy at end | gate range | kept by type |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['search_loss_last20']:.4f} | {r['entropy_end']:.3f} | "
            f"{r['gate_min']:.2f}-{r['gate_max']:.2f} | {r['kept_by_type']} |"
        )


if __name__ == "__main__":
    main()
