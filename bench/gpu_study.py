"""The comparison study at scale: DiffoRA against LoRA, a random mask and AdaLoRA, many seeds.

Every run is an ordinary ``python -m diffora_lab`` job in its own folder, started as a separate
process; ``--jobs`` of them run side by side (about 14 MiniLM jobs fit one H200 with 16 cores; 2
one-thread jobs on a 2-core CPU). Jobs are ordered seed first (seed 1 of every task x method
finishes before any seed 2 starts), so a deadline that cuts the study short still leaves a
complete first table. At the deadline, running jobs are stopped (SIGTERM: they checkpoint and can
be resumed by running the same command again) and the table is written from what finished.

    # GPU (one H200): SST-2, CoLA, RTE x 5 methods x 5 seeds, 4x the CPU step budgets
    python bench/gpu_study.py --device cuda --data-dir glue --deadline-min 7.5
    # CPU, no GPU available: the reduced matrix (SST-2 and CoLA, 5 seeds, CPU step budgets)
    OMP_WAIT_POLICY=PASSIVE python bench/gpu_study.py --device cpu
    # choosing the search variant on a split of TRAIN (dev is never used): --holdout 0.2
    python bench/gpu_study.py --device cpu --name selection --holdout 0.2 \\
        --methods diffora_faithful diffora_bp diffora_topk diffora_prog diffora_softmax_row
    # any GLUE folder in the original layout, any task
    python bench/gpu_study.py --data-dir /data/glue --tasks mrpc stsb
    python bench/gpu_study.py --summarize-only --name cpu          # the table from what exists
    # an ablation in the same runs folder (shared reference runs), its own table ablation.md
    python bench/gpu_study.py --device cpu --name cpu --table ablation --seeds 1 2 3 \
        --methods lora diffora diffora_alpha16 diffora_search75 diffora_reinit

Writes ``bench/results/<table>.json`` (one row per finished run) and ``bench/results/<table>.md``
(mean +- std per task x method, achieved adapter parameters against LoRA's, the discretization
gap before -> after); the table is named ``--table``, by default ``--name``, and holds only the
runs of this call's tasks x methods x seeds. Run folders live in ``bench/results/<name>/``
(ignored by git); a run whose ``results.json`` exists is not run again, so the study can be
completed over several sittings, and another table over the same runs reuses what it shares.
On a machine without hydra-core / omegaconf / antlr4, ``--wheels DIR`` installs them from DIR
first (``pip install --no-index``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

# Step budgets per task on CPU (a run takes 2-5 minutes on 2 cores); the GPU study multiplies
# them by GPU_FACTOR (several epochs of RTE and CoLA). Unknown tasks get DEFAULT_TASK.
CPU_TASKS = {
    "sst2": {"max_steps": 300, "max_length": 64},
    "cola": {"max_steps": 300, "max_length": 64},
    "rte": {"max_steps": 150, "max_length": 128},
}
DEFAULT_TASK = {"max_steps": 300, "max_length": 128}
GPU_FACTOR = 4
GLUE_DIRS = {
    "sst2": "SST-2",
    "cola": "CoLA",
    "rte": "RTE",
    "mrpc": "MRPC",
    "stsb": "STS-B",
    "qnli": "QNLI",
    "qqp": "QQP",
    "mnli": "MNLI",
}
HEADERLESS = {"CoLA"}
DEV_FILES = {"MNLI": ("dev_matched.tsv", "dev_mismatched.tsv")}

# Matched trainable parameters: DiffoRA and random_mask at budget 0.5 pick their rank with
# match=lora_r8 (rank 16 on MiniLM: the expected kept adapter size equals LoRA r=8 on all 36
# candidates); each run records the achieved count. This study's protocol is the paper's budget
# in modules (k = 18 of 36), pinned so its runs folder stays one protocol; the budget curve
# (bench/budget_curve.py) uses the default budget in parameters. Every LoRA-family method uses
# the harness's default scaling (s = 2 at every rank) unless the variant says otherwise.
MATCHED = ["budget=0.5", "budget_unit=modules", "match=lora_r8"]
METHODS = {
    "lora": ["method=lora", "rank=8"],
    "diffora": ["method=diffora", *MATCHED],
    "diffora_faithful": ["method=diffora_faithful", *MATCHED],
    "random_mask": ["method=random_mask", *MATCHED],
    "adalora": ["method=adalora", "rank=8"],
    # Search variants (selection and ablations; conf/search/):
    "diffora_bp": ["method=diffora", "search=budget_penalty", "search.weight=1", *MATCHED],
    "diffora_topk": ["method=diffora", "search=topk", *MATCHED],
    "diffora_prog": ["method=diffora", "search=progressive", *MATCHED],
    "diffora_softmax_row": ["method=diffora", "search=softmax_row", *MATCHED],
    # Ablations of the default: the old scaling (s = alpha / r = 1 at r = 16), no weight sharing,
    # a longer search.
    "diffora_alpha16": ["method=diffora", *MATCHED, "method.scaling=alpha"],
    "diffora_reinit": ["method=diffora", *MATCHED, "dam.weight_sharing=false"],
    "diffora_search75": ["method=diffora", *MATCHED, "dam.search_ratio=0.75"],
    "lora_alpha16_r16": ["method=lora", "rank=16", "method.scaling=alpha"],
    "full": ["method=full", "train.lr=5e-5"],
    # AdaLoRA's update scale (BENCHMARKS.md, "AdaLoRA in this harness (issue 20.4)"): LoRA's
    # s = 2 (the recipe before issue 20.4) and the candidates selected between on a train split.
    "adalora_s2": ["method=adalora", "rank=8", "method.scale=2"],
    "adalora_s16": ["method=adalora", "rank=8", "method.scale=16"],
    "adalora_s32": ["method=adalora", "rank=8", "method.scale=32"],
    "adalora_s64": ["method=adalora", "rank=8", "method.scale=64"],
    "adalora_s128": ["method=adalora", "rank=8", "method.scale=128"],
}
STUDY_METHODS = ["lora", "diffora", "diffora_faithful", "random_mask", "adalora"]
COMMON = ["logger=csv", "train.batch_size=32", "train.lr=1e-3", "dam.reuse_search=false"]
# The speed-ups that do not change what a step computes, plus length bucketing (which changes the
# batch composition, the same way for every method): about 0.6x the plain CPU step time
# (BENCHMARKS.md, "Speed-ups"). `data.bucketing=0` among the overrides restores random batches.
SPEEDUPS = ["data.bucketing=8", "train.finite_check_every=10", "train.optimizer=fused"]


@dataclass
class Job:
    task: str
    method: str
    seed: int
    folder: Path
    overrides: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    log: Path = field(default_factory=Path)

    @property
    def done(self) -> bool:
        return (self.folder / "results.json").is_file()


def task_settings(task: str, device: str, scale: float) -> dict:
    base = dict(CPU_TASKS.get(task, DEFAULT_TASK))
    steps = base["max_steps"] * (GPU_FACTOR if device == "cuda" else 1)
    base["max_steps"] = max(8, round(steps * scale))
    return base


def holdout_data(
    data_dir: Path, tasks: list[str], fraction: float, out: Path, seed: int, cap: int = 2000
) -> Path:
    """A GLUE folder whose dev files are a seeded ``fraction`` (at most ``cap`` rows) of TRAIN.

    The selection of search settings runs on this folder: the real dev set is never looked at.
    Rows are copied byte for byte (GLUE TSVs are read with quoting off, so lines are records).
    """
    for task in tasks:
        glue = GLUE_DIRS.get(task, task)
        source = data_dir / glue / "train.tsv"
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        header = [] if glue in HEADERLESS else lines[:1]
        rows = lines[len(header) :]
        rows = [r if r.endswith("\n") else r + "\n" for r in rows]
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        cut = min(cap, round(fraction * len(rows)))
        held, kept = sorted(order[:cut]), sorted(order[cut:])
        target = out / glue
        target.mkdir(parents=True, exist_ok=True)
        (target / "train.tsv").write_text("".join(header + [rows[i] for i in kept]))
        for name in DEV_FILES.get(glue, ("dev.tsv",)):
            (target / name).write_text("".join(header + [rows[i] for i in held]))
    return out


def make_jobs(args: argparse.Namespace, runs: Path, data_dir: Path) -> list[Job]:
    jobs = []
    for seed in args.seeds:  # seed first: a deadline leaves whole seeds
        for task in args.tasks:
            settings = task_settings(task, args.device, args.scale)
            steps = settings["max_steps"]
            for method in args.methods:
                folder = runs / task / method / f"seed{seed}"
                overrides = [
                    *COMMON,
                    *SPEEDUPS,
                    f"backbone={args.backbone}",
                    f"task={task}",
                    f"task.data_dir={data_dir}",
                    f"task.max_length={settings['max_length']}",
                    f"train.max_steps={steps}",
                    f"train.val_every={max(1, steps // 2)}",
                    f"train.ckpt_every={max(1, steps // 4)}",
                    f"dam.warmup_steps={min(10, max(1, steps // 8))}",
                    f"seed={seed}",
                    f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                    *METHODS[method],
                    f"hydra.run.dir={folder}",
                    # One cache per job: concurrent jobs never write the same cache files.
                    f"data.cache_dir={runs / 'cache' / task / method / f'seed{seed}'}",
                    *args.extra,
                ]
                jobs.append(Job(task, method, seed, folder, overrides))
    return jobs


def start(job: Job, threads: int) -> None:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        # The checkout's own src/ first: the runs use this tree even if an install is stale.
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    )
    job.folder.mkdir(parents=True, exist_ok=True)
    job.log = job.folder / "study.log"
    handle = job.log.open("a")
    print(f"[study] start {job.task} {job.method} seed {job.seed}", flush=True)
    job.process = subprocess.Popen(
        [sys.executable, "-m", "diffora_lab", *job.overrides],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    job.started = time.time()


def stop(running: list[Job]) -> None:
    """SIGTERM to every running job (each checkpoints; a rerun resumes it), then wait."""
    for job in running:
        job.process.send_signal(signal.SIGTERM)
    for job in running:
        try:
            job.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.process.kill()


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_all(jobs: list[Job], parallel: int, threads: int, deadline: float | None) -> None:
    """Runs the jobs ``parallel`` at a time until all are done or the deadline passes."""
    run_chains([[job] for job in jobs], parallel, threads, deadline)


def run_chains(
    chains: list[list[Job]], parallel: int, threads: int, deadline: float | None
) -> None:
    """Runs chains of jobs ``parallel`` chains at a time, each chain's jobs one after the other
    (a job starts when the one before it has finished; a failed job ends its chain), until all
    are done or the deadline passes.

    A SIGTERM or Ctrl-C to this driver stops its running jobs the same way as the deadline
    (they checkpoint) before it exits: no job is left running on its own.
    """
    pending = [[j for j in chain if not j.done] for chain in chains]
    pending = [chain for chain in pending if chain]
    running: list[tuple[Job, list[Job]]] = []
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        while pending or running:
            if deadline is not None and time.time() >= deadline:
                stop([job for job, _ in running])
                print(f"[study] deadline: stopped {len(running)}, {len(pending)} not started")
                return
            while pending and len(running) < parallel:
                chain = pending.pop(0)
                start(chain[0], threads)
                running.append((chain[0], chain[1:]))
            for job, rest in list(running):
                code = job.process.poll()
                if code is None:
                    continue
                running.remove((job, rest))
                took = time.time() - job.started
                status = "done" if job.done else f"FAILED (exit {code}, see {job.log})"
                print(f"[study] {status}: {job.task} {job.method} seed {job.seed} ({took:.0f} s)")
                if rest and job.done:
                    pending.insert(0, rest)  # the chain's next job goes first
            time.sleep(1.0)
    except KeyboardInterrupt:
        stop([job for job, _ in running])
        print(f"[study] interrupted: stopped {len(running)}, {len(pending)} not started")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def row_of(job: Job) -> dict:
    results = json.loads((job.folder / "results.json").read_text())
    primary = results["primary_metric"]
    disc = results.get("discretization") or {}
    return {
        "task": job.task,
        "method": job.method,
        "seed": job.seed,
        "metric": primary,
        "value": results["metrics"][primary],
        "params_adapter": results["params"]["adapter"],
        "params_trainable": results["params_trainable"],
        "rank": results["rank"],
        "k": results["k"],
        "kept_by_type": results["kept_by_type"],
        "val_before": disc.get("val_before"),
        "val_after": disc.get("val_after"),
        "steps": results["steps"],
        "wall_seconds": results.get("wall_seconds"),
        "overrides": job.overrides,
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def paired_delta(mine: list[dict], lora: list[dict]) -> str:
    """Mean +- std (x100) of the per-seed difference to LoRA r=8, over the seeds both have."""
    reference = {r["seed"]: r["value"] for r in lora}
    deltas = [r["value"] - reference[r["seed"]] for r in mine if r["seed"] in reference]
    if not deltas:
        return "-"
    std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    return f"{100 * statistics.mean(deltas):+.2f} ± {100 * std:.2f} ({len(deltas)})"


def table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: mean +- std (x100) per task x method, the paired difference to LoRA r=8, params
    against LoRA's (flagged beyond 5 %), the discretization gap."""
    lines = [
        "| task | method | metric | mean ± std | seeds | Δ vs LoRA r=8, paired (seeds) "
        "| adapter params (mean) | vs LoRA r=8 | disc. gap (before → after) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in sorted({r["task"] for r in rows}):
        lora_rows = [r for r in rows if r["task"] == task and r["method"] == "lora"]
        lora = [r["params_adapter"] for r in lora_rows]
        for method in methods:
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            params = statistics.mean(r["params_adapter"] for r in mine)
            ratio = params / statistics.mean(lora) if lora else None
            flag = " (differs > 5 %)" if ratio is not None and abs(ratio - 1) > 0.05 else ""
            gaps = [r for r in mine if r["val_before"] is not None]
            gap = (
                f"{_mean_std([r['val_before'] for r in gaps])} → "
                f"{_mean_std([r['val_after'] for r in gaps])}"
                if gaps
                else "-"
            )
            delta = "-" if method == "lora" else paired_delta(mine, lora_rows)
            lines.append(
                f"| {task} | {method} | {mine[0]['metric']} | "
                f"{_mean_std([r['value'] for r in mine])} | {len(mine)} | {delta} | "
                f"{params:,.0f} | "
                + (f"{ratio:.3f}{flag}" if ratio is not None else "-")
                + f" | {gap} |"
            )
    return "\n".join(lines)


def install_wheels(folder: str) -> None:
    """Installs the wheels a bare GPU machine lacks (hydra-core, omegaconf, antlr4), offline."""
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"--wheels {folder}: no .whl files there")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels],
        check=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--name", help="runs folder name (default: the device, or 'selection')")
    parser.add_argument("--table", help="name of the table files (default: --name)")
    parser.add_argument("--tasks", nargs="+", help="default: sst2 cola rte (GPU), sst2 cola (CPU)")
    parser.add_argument("--methods", nargs="+", default=STUDY_METHODS, choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--scale", type=float, default=1.0, help="step-budget factor (dry run)")
    parser.add_argument("--jobs", type=int, help="parallel jobs (default: 14 GPU, 2 CPU)")
    parser.add_argument("--threads", type=int, help="threads per job (default: cores / jobs)")
    parser.add_argument("--deadline-min", type=float, help="stop after this many minutes")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--holdout", type=float, help="dev = this fraction of train (selection)")
    parser.add_argument("--wheels", help="install the .whl files in this folder first")
    parser.add_argument("--out", default=str(RESULTS), help="folder for <name>.json/.md and runs")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("extra", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    if args.wheels:
        install_wheels(args.wheels)
    if not args.tasks:
        args.tasks = ["sst2", "cola", "rte"] if args.device == "cuda" else ["sst2", "cola"]
    name = args.name or ("selection" if args.holdout else args.device)
    out = Path(args.out)
    runs = out / name
    data_dir = Path(args.data_dir).resolve()
    if args.holdout:
        data_dir = holdout_data(data_dir, args.tasks, args.holdout, runs / "data", seed=0)
    jobs = make_jobs(args, runs, data_dir)
    if not args.summarize_only:
        cores = os.cpu_count() or 1
        parallel = args.jobs or (14 if args.device == "cuda" else 2)
        threads = args.threads or max(1, cores // parallel)
        deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
        todo = sum(not j.done for j in jobs)
        print(f"[study] {name}: {todo} of {len(jobs)} runs to do, {parallel} at a time")
        run_all(jobs, parallel, threads, deadline)
    rows = [row_of(j) for j in jobs if j.done]
    out.mkdir(parents=True, exist_ok=True)
    stem = args.table or name  # the table's files; the runs stay in out / name
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    command = "python bench/gpu_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = f"`{command}`\n\n{table(rows, args.methods)}\n"
    (out / f"{stem}.md").write_text(markdown)
    with (out / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "method", "seed", "metric", "value", "params_adapter"])
        for r in rows:
            writer.writerow(
                [r[k] for k in ("task", "method", "seed", "metric", "value")]
                + [r["params_adapter"]]
            )
    print(markdown)
    missing = len(jobs) - len(rows)
    if missing:
        print(f"[study] {missing} runs not finished: run the same command again to continue")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
