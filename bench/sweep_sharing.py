"""One search per budget sweep, measured both ways (issue 20, part 5).

For each seed, the same budgets with the default (progressive) search, two ways:

- ``shared``: the budgets one after the other in one search cache, each run told the sweep's
  budgets (``dam.sweep_budgets``, what a Hydra multirun over ``budget`` passes by itself): one
  search runs towards the smallest budget and the others start from the snapshot it left as it
  passed theirs (README, "Budget sweeps search once");
- ``separate``: one run per budget, each with its own search: these are the low-budget study's
  ``diffora`` runs (bench/budget_curve.py; the same jobs, folders and record), so no run is
  computed twice. A shared run is that same job with only the sharing settings changed
  (``dam.reuse_search=true``, ``dam.sweep_budgets``, its own cache).

The table gives, per budget, the dev metric of both arms (mean +- std over seeds), their paired
difference, and the search steps each arm computed (one search per seed against one per
budget). Runs are started by bench/gpu_study.py's driver, resumably (finished runs are skipped;
a run stopped at the deadline continues from its checkpoint); the shared runs of one seed go one
after the other.

The rows file ``bench/results/sweep_sharing.json`` is the record across machines, as the budget
curve's is (commit it after a sitting): a shared row recorded with the same settings
(``config_key``, the budget curve's hash of the overrides without machine paths) counts as
finished without its run folder; the separate rows come from the budget curve's record.

    OMP_WAIT_POLICY=PASSIVE python bench/sweep_sharing.py                 # 3 budgets x 5 seeds
    python bench/sweep_sharing.py --backbone tiny_deberta --scale 0.05   # a smoke

Writes ``bench/results/sweep_sharing.{json,md}``; shared runs in ``bench/results/sweep_sharing/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import budget_curve  # noqa: E402  (the separate arm: the study's diffora jobs and record)
import gpu_study  # noqa: E402

Job = budget_curve.CurveJob  # a run: task, method, seed, folder, overrides, budget

# What a shared run changes in the budget curve's job for the same budget and seed.
SHARING = ("dam.reuse_search=", "dam.sweep_budgets=", "data.cache_dir=", "hydra.run.dir=")


def curve_args(args: argparse.Namespace) -> argparse.Namespace:
    """The budget curve's arguments for this sweep's diffora runs."""
    return budget_curve.parse(
        [
            "--tasks", args.task,
            "--budgets", *map(str, args.budgets),
            "--methods", "diffora",
            "--seeds", *map(str, args.seeds),
            "--scale", str(args.scale),
            "--backbone", args.backbone,
            "--data-dir", args.data_dir,
            "--out", args.out,
            *args.extra,
        ]
    )  # fmt: skip


def make_jobs(
    args: argparse.Namespace, out: Path, data_dir: Path
) -> tuple[list[Job], list[list[Job]]]:
    """The separate arm (the budget curve's diffora jobs) and one chain of shared runs per seed,
    smallest budget first (it runs the search the others start from)."""
    separate = budget_curve.make_jobs(curve_args(args), out / "budget_curve", data_dir)
    sweep = "[" + ",".join(f"{b:g}" for b in sorted(args.budgets)) + "]"
    chains = []
    for seed in args.seeds:
        chain = []
        for job in sorted((j for j in separate if j.seed == seed), key=lambda j: j.budget):
            folder = out / args.name / "shared" / f"b{job.budget:g}" / f"seed{seed}"
            overrides = [
                *(o for o in job.overrides if not o.startswith(SHARING)),
                "dam.reuse_search=true",
                f"dam.sweep_budgets={sweep}",
                f"data.cache_dir={out / args.name / 'cache' / 'shared' / f'seed{seed}'}",
                f"hydra.run.dir={folder}",
            ]
            chain.append(Job(args.task, "diffora", seed, folder, overrides, budget=job.budget))
        chains.append(chain)
    return separate, chains


def row_of(job: Job) -> dict:
    results = json.loads((job.folder / "results.json").read_text())
    source = (results.get("search") or {}).get("source") or {}
    cut = results["search_variant"]["cut_step"]
    return {
        "arm": "shared",
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
        "config_key": budget_curve.config_key(job),
    }


def separate_row(row: dict) -> dict:
    """A budget curve row as this table's separate arm: its own search, cut at its end."""
    return {
        "arm": "separate",
        "seed": row["seed"],
        "budget": row["budget"],
        "metric": row["metric"],
        "value": row["value"],
        "cut_step": row.get("cut_step"),
        "searched_steps": row.get("cut_step"),
        "params_adapter": row["params_adapter"],
        "run_dir": row["run_dir"],
        "config_key": row["config_key"],
    }


def collect(
    separate: list[Job],
    chains: list[list[Job]],
    out: Path,
    name: str,
) -> tuple[list[dict], list[Job], list[list[Job]], int]:
    """Both arms' rows, the runs left to do (separate; shared, as chains) and how many shared rows
    came from the record (made with the same settings, no run folder here)."""
    mine = {(j.task, j.method, j.budget, j.seed) for j in separate}
    curve_rows, separate_todo, _, _ = budget_curve.collect(
        separate, budget_curve.recorded_rows(out / "budget_curve.json")
    )
    rows = [separate_row(r) for r in curve_rows if budget_curve.identity(r) in mine]
    path = out / f"{name}.json"
    recorded = json.loads(path.read_text()) if path.is_file() else []
    shared = {(r["budget"], r["seed"]): r for r in recorded if r["arm"] == "shared"}
    todo, reused = [], 0
    for chain in chains:
        left = []
        for job in chain:
            old = shared.get((job.budget, job.seed))
            if job.done:
                rows.append(row_of(job))
            elif old is not None and old.get("config_key") == budget_curve.config_key(job):
                rows.append(old)
                reused += 1
            else:
                left.append(job)
        todo.append(left)
    return rows, separate_todo, todo, reused


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def cut_steps(rows: list[dict]) -> list[str]:
    """The arm's distinct cut steps in order, "-" for rows recorded without one."""
    known = sorted({r["cut_step"] for r in rows if r["cut_step"] is not None})
    return [str(step) for step in known] + ["-"] * any(r["cut_step"] is None for r in rows)


def table(rows: list[dict]) -> str:
    lines = [
        "| budget | shared (mean ± std) | separate (mean ± std) | shared − separate, paired "
        "(seeds) | per seed | paired t (df), p | cut step shared / separate |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget in sorted({r["budget"] for r in rows}):
        here = [r for r in rows if r["budget"] == budget]
        arm = {a: [r for r in here if r["arm"] == a] for a in ("shared", "separate")}
        deltas = budget_curve.paired_deltas(arm["shared"], arm["separate"])
        points = [budget_curve.level(delta) for delta in deltas]
        cuts = ["/".join(cut_steps(arm[a])) for a in ("shared", "separate")]
        lines.append(
            f"| {budget:g} | {_mean_std([r['value'] for r in arm['shared']])} "
            f"| {_mean_std([r['value'] for r in arm['separate']])} "
            f"| {_mean_std(deltas)} ({len(deltas)}) "
            f"| {', '.join(f'{p:+.2f}' for p in points) or '-'} "
            f"| {budget_curve.t_test_cell(points)} "
            f"| {cuts[0]} / {cuts[1]} |"
        )
    lines += ["", "| arm | runs | searches run | search steps computed |", "|---|---|---|---|"]
    for name in ("shared", "separate"):
        mine = [r for r in rows if r["arm"] == name]
        known = [r["searched_steps"] for r in mine if r["searched_steps"] is not None]
        steps = f"{sum(known)}" + (
            f" ({len(mine) - len(known)} runs unknown)" if len(known) < len(mine) else ""
        )
        lines.append(f"| {name} | {len(mine)} | {sum(s > 0 for s in known)} | {steps} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.125, 0.25, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
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
    separate, chains = make_jobs(args, out, Path(args.data_dir).resolve())
    _, separate_todo, todo, _ = collect(separate, chains, out, args.name)
    left = len(separate_todo) + sum(map(len, todo))
    total = len(separate) + sum(map(len, chains))
    print(f"[sweep_sharing] {left} of {total} runs to do, {args.jobs} at a time")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
    gpu_study.run_chains([[job] for job in separate_todo] + todo, args.jobs, threads, deadline)
    rows, separate_todo, todo, reused = collect(separate, chains, out, args.name)
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    markdown = f"`python bench/sweep_sharing.py {' '.join(argv)}`\n\n{table(rows)}\n"
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)
    if reused:
        print(f"[sweep_sharing] {reused} shared rows reused from {out / args.name}.json")
    if separate_todo or any(todo):
        print("[sweep_sharing] runs not finished: run the same command again")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
