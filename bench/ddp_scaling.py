"""DDP scaling on CPU: one process vs two (gloo) on the same cores, same global batch.

Each configuration is a real ``python -m diffora_lab`` job (Lightning DDP, the full search ->
discretization -> fine-tuning path); configurations alternate over rounds so both see the same
machine load, and the script prints the median ratio of fit times (excluding startup):

    efficiency = fit_time(1 process) / fit_time(2 processes)   (1.0 = no overhead, per core)

With the cores held equal (one process with 2 threads vs two processes with 1 thread each), the
ideal is 1.0: DDP cannot add compute here, only split it, so the ratio measures what the
gradient all-reduce, the duplicated architecture-step bookkeeping and the rank synchronisation
cost. On machines with a core (or GPU) per process the same overhead decides scaling.

    python bench/ddp_scaling.py --rounds 3 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(devices: int, steps: int, batch: int, folder: Path, cache: Path) -> float:
    per_device = batch // devices
    overrides = [
        "backbone=minilm_l6",
        "task=synthetic",
        "logger=none",
        "trainer.accelerator=cpu",
        f"trainer.devices={devices}",
        f"trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        f"train.batch_size={per_device}",
        f"train.max_steps={steps}",
        f"train.val_every={steps}",
        f"train.ckpt_every={steps}",
        "dam.warmup_steps=2",
        "dam.reuse_search=false",
        "ckpt_path=null",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={folder}",
    ]
    threads = str(max(1, 2 // devices))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS=threads,
        OMP_WAIT_POLICY="PASSIVE",
    )
    done = subprocess.run(
        [sys.executable, "-m", "diffora_lab", *overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    results = json.loads((folder / "results.json").read_text())
    return float(results["fit_seconds"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    args = parser.parse_args(argv)
    ratios, times = [], {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(1, 8, args.batch, tmp / "warm", tmp / "cache")  # fills the tokenization cache
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            seconds = {
                d: run(d, args.steps, args.batch, tmp / f"r{r}d{d}", tmp / "cache") for d in order
            }
            for d in (1, 2):
                times[d].append(seconds[d])
            ratios.append(seconds[1] / seconds[2])
            print(
                f"round {r + 1}: 1 proc {seconds[1]:.1f}s  2 procs {seconds[2]:.1f}s  "
                f"efficiency {ratios[-1]:.3f}"
            )
    print()
    print("| processes x threads | global batch | steps | fit-time ratio (median) | min-max |")
    print("|---|---|---|---|---|")
    print(
        f"| 2 x 1 vs 1 x 2 | {args.batch} | {args.steps} | {statistics.median(ratios):.3f} "
        f"| {min(ratios):.3f}-{max(ratios):.3f} |"
    )
    print(
        "(context only: median fit time 1 proc "
        f"{statistics.median(times[1]):.1f}s, 2 procs {statistics.median(times[2]):.1f}s)"
    )


if __name__ == "__main__":
    main()
