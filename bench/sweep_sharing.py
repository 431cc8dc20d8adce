"""One search per budget sweep, measured both ways (issue 20, part 5).

For each seed, the same budgets run twice with the default (progressive) search:

- ``shared``: the budgets one after the other in one search cache, each run told the sweep's
  budgets (``dam.sweep_budgets``, what a Hydra multirun over ``budget`` passes by itself): one
  search runs towards the smallest budget and the others start from the snapshot it left as it
  passed theirs (README, "Budget sweeps search once");
- ``separate``: one run per budget, each with its own search (``dam.reuse_search=false``).

The table gives, per budget, the dev metric of both arms (mean +- std over seeds), their paired
difference and the separate arm's seed std (the noise it must be judged against), the search
steps each arm computed and the fit time of each arm, summed over its runs (measured side by
side in this one call; a shared machine's load moves both). Runs are started by
bench/gpu_study.py's driver, resumably (finished runs are skipped; a run stopped at the deadline
continues from its checkpoint); the shared runs of one seed go one after the other.

    OMP_WAIT_POLICY=PASSIVE python bench/sweep_sharing.py                 # 3 budgets x 3 seeds
    python bench/sweep_sharing.py --backbone tiny_deberta --scale 0.05   # a smoke

Writes ``bench/results/sweep_sharing.{json,md}``; runs in ``bench/results/sweep_sharing/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_study  # noqa: E402


@dataclass
class SweepJob(gpu_study.Job):
    arm: str = "separate"
    budget: float = 0.0


def make_chains(args: argparse.Namespace, runs: Path, data_dir: Path) -> list[list[SweepJob]]:
    """Runs that must go in order: one chain per seed for the shared arm, one per run else."""
    settings = gpu_study.task_settings(args.task, "cpu", args.scale)
    steps = settings["max_steps"]
    common = [
        *(o for o in gpu_study.COMMON if not o.startswith("dam.reuse_search")),
        *gpu_study.SPEEDUPS,
        "method=diffora",
        "search=progressive",
        f"rank={args.rank}",
        f"backbone={args.backbone}",
        f"task={args.task}",
        f"task.data_dir={data_dir}",
        f"task.max_length={settings['max_length']}",
        f"train.max_steps={steps}",
        f"train.val_every={max(1, steps // 2)}",
        f"train.ckpt_every={max(1, steps // 4)}",
        f"dam.warmup_steps={min(10, max(1, steps // 8))}",
        "trainer.accelerator=cpu",
        *args.extra,
    ]
    sweep = "[" + ",".join(f"{b:g}" for b in args.budgets) + "]"
    chains = []
    for seed in args.seeds:
        shared = []
        for budget in args.budgets:
            for arm in ("shared", "separate"):
                folder = runs / arm / f"b{budget:g}" / f"seed{seed}"
                cache = runs / "cache" / arm / f"seed{seed}"
                arm_overrides = (
                    ["dam.reuse_search=true", f"dam.sweep_budgets={sweep}"]
                    if arm == "shared"
                    else ["dam.reuse_search=false", f"budget={budget}"]
                )
                overrides = [
                    *common,
                    f"seed={seed}",
                    f"budget={budget}",
                    *arm_overrides,
                    f"data.cache_dir={cache if arm == 'shared' else cache / f'b{budget:g}'}",
                    f"hydra.run.dir={folder}",
                ]
                job = SweepJob(args.task, arm, seed, folder, overrides, arm=arm, budget=budget)
                if arm == "shared":
                    shared.append(job)
                else:
                    chains.append([job])
        chains.append(shared)
    return chains


def run_chains(chains: list[list[SweepJob]], parallel: int, threads: int, deadline) -> None:
    """Like gpu_study.run_all, but each chain's runs one after the other."""
    pending = [[j for j in chain if not j.done] for chain in chains]
    pending = [chain for chain in pending if chain]
    running: list[tuple[SweepJob, list[SweepJob]]] = []
    while pending or running:
        if deadline is not None and time.time() >= deadline:
            for job, _ in running:
                job.process.send_signal(signal.SIGTERM)  # checkpoints; a rerun resumes it
            for job, _ in running:
                job.process.wait()
            print(f"[sweep_sharing] deadline: stopped {len(running)} runs")
            return
        while pending and len(running) < parallel:
            chain = pending.pop(0)
            gpu_study.start(chain[0], threads)
            running.append((chain[0], chain[1:]))
        for job, rest in list(running):
            if job.process.poll() is None:
                continue
            running.remove((job, rest))
            print(f"[sweep_sharing] {'done' if job.done else 'FAILED'}: {job.arm} {job.budget}")
            if rest and job.done:
                pending.insert(0, rest)  # the chain's next run goes first
        time.sleep(1.0)


def row_of(job: SweepJob) -> dict:
    results = json.loads((job.folder / "results.json").read_text())
    source = (results.get("search") or {}).get("source") or {}
    cut = results["search_variant"]["cut_step"]
    return {
        "arm": job.arm,
        "seed": job.seed,
        "budget": results["budget"],
        "metric": results["primary_metric"],
        "value": results["metrics"][results["primary_metric"]],
        "cut_step": cut,
        # the search steps this run computed itself (from a snapshot: only those after it)
        "searched_steps": cut - int(source.get("step", 0)),
        "reused_from": source.get("run_folder"),
        "params_adapter": results["params"]["adapter"],
        "fit_seconds": results.get("fit_seconds"),
        "run_dir": str(job.folder),
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| budget | shared (mean ± std) | separate (mean ± std) | shared − separate, paired "
        "(seeds) | cut step shared / separate |",
        "|---|---|---|---|---|",
    ]
    for budget in sorted({r["budget"] for r in rows}):
        here = [r for r in rows if r["budget"] == budget]
        arm = {a: [r for r in here if r["arm"] == a] for a in ("shared", "separate")}
        alone = {r["seed"]: r["value"] for r in arm["separate"]}
        deltas = [r["value"] - alone[r["seed"]] for r in arm["shared"] if r["seed"] in alone]
        cuts = [sorted({r["cut_step"] for r in arm[a]}) for a in ("shared", "separate")]
        lines.append(
            f"| {budget:g} | {_mean_std([r['value'] for r in arm['shared']])} "
            f"| {_mean_std([r['value'] for r in arm['separate']])} "
            f"| {_mean_std(deltas)} ({len(deltas)}) "
            f"| {'/'.join(map(str, cuts[0]))} / {'/'.join(map(str, cuts[1]))} |"
        )
    lines += ["", "| arm | runs | search steps computed | fit seconds (sum) |", "|---|---|---|---|"]
    totals = {}
    for name in ("shared", "separate"):
        mine = [r for r in rows if r["arm"] == name]
        totals[name] = sum(r["fit_seconds"] or 0 for r in mine)
        steps = sum(r["searched_steps"] for r in mine)
        lines.append(f"| {name} | {len(mine)} | {steps} | {totals[name]:.0f} |")
    if totals.get("separate"):
        lines.append(f"\nfit time shared / separate: {totals['shared'] / totals['separate']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.125, 0.25, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0, help="step-budget factor (smoke)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs")
    parser.add_argument("--deadline-min", type=float, help="stop after this many minutes")
    parser.add_argument("--data-dir", default=str(gpu_study.REPO.parent / "shared/data/glue"))
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--out", default=str(gpu_study.RESULTS))
    parser.add_argument("--name", default="sweep_sharing")
    parser.add_argument("extra", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    chains = make_chains(args, out / args.name, Path(args.data_dir).resolve())
    jobs = [job for chain in chains for job in chain]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
    todo = sum(not j.done for j in jobs)
    print(f"[sweep_sharing] {todo} of {len(jobs)} runs to do, {args.jobs} at a time")
    run_chains(chains, args.jobs, threads, deadline)
    rows = [row_of(job) for job in jobs if job.done]
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    markdown = f"`python bench/sweep_sharing.py {' '.join(argv)}`\n\n{table(rows)}\n"
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
