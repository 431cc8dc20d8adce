"""The low-budget study (issue 20): where does the search beat a random choice of modules?

Parameter budgets of about 5 %, 12.5 %, 25 % and 50 % of LoRA r=8 on all candidates (MiniLM;
SST-2 and CoLA on CPU, ``--tasks rte`` too). At each budget, all at rank 8 with the budget in
parameters (``budget_unit=params``, the default):

- ``diffora`` (the default search, one search per run) and ``random_mask``: 5 seeds;
- the fixed choices ``lora_qv``, ``lora_attn``, ``lora_mlp`` at the rank whose adapter comes
  closest to the same count: 3 seeds;
- ``lora`` on all candidates at the nearest rank, max(1, round(8 x budget)): 3 seeds (one run
  folder serves every budget with that rank; 5 % and 12.5 % both get r=1).

Every run is a ``python -m diffora_lab`` job, run by bench/gpu_study.py's driver: a run whose
``results.json`` exists is skipped, so the study completes over several sittings (run the same
command again); ``--deadline-min`` stops running jobs with SIGTERM (they checkpoint and resume);
jobs go seed first, so a cut-short sitting leaves whole seeds. ``--dry-run`` lists the jobs
without running any; ``--scale`` shrinks the step budget (a smoke of the harness).

    OMP_WAIT_POLICY=PASSIVE python bench/budget_curve.py --deadline-min 90   # one sitting
    python bench/budget_curve.py --summarize-only                            # table + figures
    python bench/budget_curve.py --dry-run                                   # the job list

Writes ``bench/results/budget_curve.json`` (one row per finished run: task, method, budget,
seed, value, adapter parameters, the budget's target count, ...), ``budget_curve.md`` (mean
+- std per task x budget x method, achieved / target parameters, paired differences to the
random mask and to DiffoRA; then DiffoRA − each method per seed, with a paired t-test) and
``budget_curve_<task>.png`` (the curve: mean +- std against the budget, on a fixed y scale per
task). Run folders: ``bench/results/budget_curve/`` (ignored by git).

The rows file is the study's record across machines: commit it after a sitting. A run whose
row is recorded there with the same settings (``config_key``: a hash of the job's overrides
without its machine paths) counts as finished even where its run folder is absent, and keeps
its row; a recorded row made with other settings is run again. Rows of jobs outside this call
(other tasks, methods, seeds) are kept as they are. The summary says how many rows it reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from diffora_lab.runs import off_target  # the report's "more than one module off"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_study  # noqa: E402  (the driver: jobs, start, deadline, resumable folders)

BUDGETS = [0.05, 0.125, 0.25, 0.5]
REFERENCE_RANK = 8
SEARCHED = ["diffora", "random_mask"]  # 5 seeds
FIXED = ["lora_qv", "lora_attn", "lora_mlp"]  # 3 seeds
METHODS = [*SEARCHED, *FIXED, "lora"]
# Diagnostic arms of the search (not in the default list; ``--methods diffora_late``): the
# default search with one setting changed. ``diffora_late`` starts removing modules at step 75
# of the 150-step search instead of right after the 10-step gate warm-up, so the gates have had
# 65 architecture steps before the first removal (the default removes a third of the
# candidates' parameters within 10 architecture steps of the warm-up's end, BENCHMARKS.md).
VARIANTS = {
    "diffora_late": ["search.prune_start=75"],  # removal starts once the gates have spread
    "diffora_second": ["dam.arch_grad=second"],  # DARTS' second-order architecture step
    "diffora_softmax_row": ["search=softmax_row"],  # the module types compete within each layer
}
# Fixed y scales (the metric, not the data, sets them): figures of different sittings compare.
Y_SCALES = {
    "sst2": ("dev accuracy (SST-2)", 0.70, 0.95),
    "cola": ("dev Matthews corr. (CoLA)", 0.0, 0.60),
    "rte": ("dev accuracy (RTE)", 0.45, 0.75),
}


@dataclass
class CurveJob(gpu_study.Job):
    budget: float = 0.0


def lora_rank(budget: float) -> int:
    """Uniform LoRA's rank nearest to the budget: max(1, round(8 x budget))."""
    return max(1, round(REFERENCE_RANK * budget))


def method_overrides(method: str, budget: float) -> list[str]:
    if method == "lora":
        return ["method=lora", f"rank={lora_rank(budget)}"]
    if method in VARIANTS:
        return [*method_overrides("diffora", budget), *VARIANTS[method]]
    common = [f"method={method}", f"budget={budget}", "budget_unit=params"]
    if method in FIXED:
        return [*common, f"method.reference_rank={REFERENCE_RANK}"]
    return [*common, f"rank={REFERENCE_RANK}"]


def folder_of(runs: Path, task: str, method: str, budget: float, seed: int) -> Path:
    if method == "lora":  # one folder per rank: budgets with the same rank share the run
        return runs / task / f"lora_r{lora_rank(budget)}" / f"seed{seed}"
    return runs / task / f"b{budget:g}" / method / f"seed{seed}"


def make_jobs(args: argparse.Namespace, runs: Path, data_dir: Path) -> list[CurveJob]:
    """Seed first, then task, budget and method; 5 seeds for the searched, 3 for the rest."""
    jobs = []
    for seed in args.seeds:
        for task in args.tasks:
            settings = gpu_study.task_settings(task, "cpu", args.scale)
            steps = settings["max_steps"]
            for budget in args.budgets:
                for method in args.methods:
                    searched = method in SEARCHED or method in VARIANTS
                    if not searched and seed not in args.seeds[: args.fixed_seeds]:
                        continue
                    folder = folder_of(runs, task, method, budget, seed)
                    overrides = [
                        *gpu_study.COMMON,
                        *gpu_study.SPEEDUPS,
                        f"backbone={args.backbone}",
                        f"task={task}",
                        f"task.data_dir={data_dir}",
                        f"task.max_length={settings['max_length']}",
                        f"train.max_steps={steps}",
                        f"train.val_every={max(1, steps // 2)}",
                        f"train.ckpt_every={max(1, steps // 4)}",
                        f"dam.warmup_steps={min(10, max(1, steps // 8))}",
                        f"seed={seed}",
                        "trainer.accelerator=cpu",
                        *method_overrides(method, budget),
                        f"hydra.run.dir={folder}",
                        # One cache per job: concurrent jobs never write the same cache files.
                        f"data.cache_dir={runs / 'cache' / folder.relative_to(runs)}",
                        *args.extra,
                    ]
                    jobs.append(CurveJob(task, method, seed, folder, overrides, budget=budget))
    return jobs


def unique(jobs: list[CurveJob]) -> list[CurveJob]:
    """One job per run folder (uniform LoRA serves several budgets from one run)."""
    seen, out = set(), []
    for job in jobs:
        if job.folder not in seen:
            seen.add(job.folder)
            out.append(job)
    return out


# Overrides naming a path on this machine: not part of what a run was made from.
MACHINE_PATHS = ("hydra.run.dir=", "data.cache_dir=", "task.data_dir=")


def config_key(job: CurveJob) -> str:
    """What a run was made from: its overrides without the machine's paths, hashed."""
    settings = [o for o in job.overrides if not o.startswith(MACHINE_PATHS)]
    return hashlib.sha256("\n".join(settings).encode()).hexdigest()[:16]


def identity(row: dict) -> tuple:
    return (row["task"], row["method"], row["budget"], row["seed"])


def recorded_rows(path: Path) -> dict[tuple, dict]:
    """The rows a previous sitting (on any machine) recorded, by task, method, budget, seed."""
    if not path.is_file():
        return {}
    return {identity(r): r for r in json.loads(path.read_text())}


def collect(
    jobs: list[CurveJob], recorded: dict[tuple, dict]
) -> tuple[list[dict], list[CurveJob], int, int]:
    """Rows of the finished jobs (from their folders, else from the record when it was made with
    the same settings), the jobs left to run, and how many rows were reused / found stale.
    Recorded rows of jobs outside ``jobs`` are kept."""
    rows, todo, reused, stale = [], [], 0, 0
    covered = set()
    for job in jobs:
        ident = (job.task, job.method, job.budget, job.seed)
        covered.add(ident)
        old = recorded.get(ident)
        if job.done:
            rows.append(row_of(job))
        elif old is not None and old.get("config_key") == config_key(job):
            rows.append(old)
            reused += 1
        else:
            stale += old is not None
            todo.append(job)
    kept = [r for ident, r in recorded.items() if ident not in covered]
    return kept + rows, unique(todo), reused, stale


def within_one_module(results: dict) -> bool | None:
    """Whether the run kept within one module of its target, that module counted at the rank of
    the target (LoRA r=8): budget.py's ``tolerance``; a run recorded before there was one (a fixed
    choice's then measured one module at its own rank) is measured at r=8 here. None: no target
    (uniform LoRA)."""
    count = results.get("budget_count")
    if not count:
        return None
    if "tolerance" not in count:  # the largest module at the run's rank, scaled to the reference
        count = {**count, "tolerance": count["largest_module"] * REFERENCE_RANK / results["rank"]}
    return not off_target({"budget_count": count})


def row_of(job: CurveJob) -> dict:
    results = json.loads((job.folder / "results.json").read_text())
    primary = results["primary_metric"]
    count = results.get("budget_count") or {}
    adapter = results["params"]["adapter"]
    if job.method == "lora":  # r x sum (d_in + d_out): the target is budget x 8 x that sum
        target = job.budget * REFERENCE_RANK * adapter / results["rank"]
    else:
        target = count.get("target")
    return {
        "task": job.task,
        "method": job.method,
        "budget": job.budget,
        "seed": job.seed,
        "metric": primary,
        "value": results["metrics"][primary],
        "params_adapter": adapter,
        "target_params": target,
        "within_one_module": within_one_module(results),
        "rank": results["rank"],
        "k": results["k"],
        "kept_by_type": results["kept_by_type"],
        "val_before": (results.get("discretization") or {}).get("val_before"),
        "steps": results["steps"],
        "cut_step": (results.get("search_variant") or {}).get("cut_step"),
        "fit_seconds": results.get("fit_seconds"),
        "wall_seconds": results.get("wall_seconds"),
        "run_dir": str(job.folder),
        "config_key": config_key(job),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (NaN for one value: no spread measured, shown as "-")."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def plus_minus(mean: float, std: float, sign: str = "") -> str:
    """``mean ± std`` x 100 (``sign="+"``: signed), "-" for an unmeasured spread."""
    spread = "-" if math.isnan(std) else f"{100 * std:.2f}"
    return f"{100 * mean:{sign}.2f} ± {spread}"


def paired_deltas(mine: list[dict], other: list[dict]) -> list[float]:
    """The per-seed differences mine - other over the seeds both have, in seed order."""
    reference = {r["seed"]: r["value"] for r in other}
    ordered = sorted(mine, key=lambda r: r["seed"])
    return [r["value"] - reference[r["seed"]] for r in ordered if r["seed"] in reference]


def paired(mine: list[dict], other: list[dict]) -> str:
    """Mean +- std (x100) of the per-seed difference mine - other, over the seeds both have."""
    deltas = paired_deltas(mine, other)
    if not deltas:
        return "-"
    return f"{plus_minus(*mean_std(deltas), sign='+')} ({len(deltas)})"


def two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` (an integer >= 1) degrees of freedom.

    The CDF of t with integer df is a finite series in theta = atan(|t| / sqrt(df))
    (Abramowitz & Stegun 26.7.3 and 26.7.4): P(|T| < |t|) = sin(theta) (1 + 1/2 cos^2 + 1*3/
    (2*4) cos^4 + ...) for even df, (2/pi) (theta + sin(theta) (cos + 2/3 cos^3 + ...)) for odd
    df, each up to cos^(df-2). Exact: no table and no scipy.
    """
    if df < 1:
        raise ValueError(f"df={df}: a paired t needs at least two pairs")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for j in range(2, df, 2):  # 1*3*...*(j-1) / (2*4*...*j) cos^j
            term *= (j - 1) / j * cos2
            total += term
        inside = math.sin(theta) * total
    else:
        term = total = math.cos(theta) if df > 1 else 0.0
        for j in range(3, df, 2):  # 2*4*...*(j-1) / (1*3*...*j) cos^j
            term *= (j - 1) / j * cos2
            total += term
        inside = 2 / math.pi * (theta + math.sin(theta) * total)
    return max(0.0, 1.0 - inside)


def paired_test(deltas: list[float]) -> tuple[float, float] | None:
    """Paired t statistic of the per-seed differences and its two-sided p (df = pairs - 1);
    None with fewer than two pairs. All differences equal and nonzero: t is infinite, p 0."""
    if len(deltas) < 2:
        return None
    mean, std = mean_std(deltas)
    if std == 0:
        return (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (std / math.sqrt(len(deltas)))
    return t, two_sided_p(t, len(deltas) - 1)


def level(difference: float) -> float:
    """A metric difference in points (x100); under 1e-4 points it is float noise (two runs with
    the same predictions can differ in the last bits of an MCC): 0, level."""
    points = 100 * difference
    return 0.0 if abs(points) < 1e-4 else points


def t_test_cell(points: list[float]) -> str:
    """``t (df), p`` of the paired t-test on per-seed differences, "-" for fewer than two."""
    test = paired_test(points)
    return "-" if test is None else f"{test[0]:.2f} ({len(points) - 1}), {test[1]:.3f}"


def paired_tests_table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: DiffoRA − every other method, paired by seed, at each task x budget and over
    all budgets of a task: the per-seed differences (x100), mean +- std, the paired t with its
    two-sided p, and how many seeds DiffoRA is ahead, level and behind. The all-budgets line
    pools pairs that are not independent (a seed's budgets share its data order, and uniform
    LoRA's r=1 run stands for both 5 % and 12.5 %): a summary, not a test of its own."""
    lines = [
        "| task | budget | DiffoRA − | per seed (seeds) | mean ± std | paired t (df), p "
        "| ahead / level / behind |",
        "|---|---|---|---|---|---|---|",
    ]

    def line(task: str, budget: str, method: str, seeds: str, points: list[float]) -> str:
        mean, std = mean_std(points)
        spread = "-" if math.isnan(std) else f"{std:.2f}"
        ahead, behind = sum(d > 0 for d in points), sum(d < 0 for d in points)
        return (
            f"| {task} | {budget} | {method} | {seeds} | {mean:+.2f} ± {spread} "
            f"| {t_test_cell(points)} | {ahead} / {len(points) - ahead - behind} / {behind} |"
        )

    for task in sorted({r["task"] for r in rows}):
        here = [r for r in rows if r["task"] == task]
        budgets = sorted({r["budget"] for r in here})
        for method in [m for m in methods if m != "diffora"]:
            pooled: list[float] = []
            for budget in budgets:
                at = [r for r in here if r["budget"] == budget]
                diffora = [r for r in at if r["method"] == "diffora"]
                mine = [r for r in at if r["method"] == method]
                points = [level(d) for d in paired_deltas(diffora, mine)]
                if points:
                    seeds = ", ".join(f"{d:+.2f}" for d in points) + f" ({len(points)})"
                    lines.append(line(task, f"{budget:g}", method, seeds, points))
                pooled += points
            if pooled and len(budgets) > 1:
                seeds = f"{len(pooled)} pairs over the budgets"
                lines.append(line(task, "all", method, seeds, pooled))
    return "\n".join(lines)


def table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: per task x budget x method, mean +- std (x100), seeds, achieved / target
    adapter parameters (flagged when a run is more than one module away), and two paired
    differences at the same budget and seed: the method's to the random mask (does it beat
    chance?), and DiffoRA's to the method (does the search beat a hand choice or a variant?).
    Uniform LoRA is paired at the budget it stands for (its nearest rank)."""
    lines = [
        "| task | budget | method | rank | mean ± std | seeds | adapter params (mean) "
        "| / target | this − random mask, paired (seeds) | DiffoRA − this, paired (seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in sorted({r["task"] for r in rows}):
        for budget in sorted({r["budget"] for r in rows if r["task"] == task}):
            here = [r for r in rows if r["task"] == task and r["budget"] == budget]
            for method in methods:
                mine = [r for r in here if r["method"] == method]
                if not mine:
                    continue
                mean, std = mean_std([r["value"] for r in mine])
                params = statistics.mean(r["params_adapter"] for r in mine)
                targets = [r["target_params"] for r in mine if r["target_params"]]
                ratio = f"{params / statistics.mean(targets):.3f}" if targets else "-"
                if any(r["within_one_module"] is False for r in mine):
                    ratio += " (> 1 module off)"
                ranks = sorted({r["rank"] for r in mine})
                chance = search = "-"
                if method != "random_mask":
                    chance = paired(mine, [r for r in here if r["method"] == "random_mask"])
                if method not in ("diffora", "random_mask"):
                    search = paired([r for r in here if r["method"] == "diffora"], mine)
                lines.append(
                    f"| {task} | {budget:g} | {method} | {'/'.join(map(str, ranks))} "
                    f"| {plus_minus(mean, std)} | {len(mine)} | {params:,.0f} "
                    f"| {ratio} | {chance} | {search} |"
                )
    return "\n".join(lines)


def figure(rows: list[dict], task: str, methods: list[str], path: Path) -> Path:
    """The budget curve of one task: mean +- std over seeds against the budget (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, low, high = Y_SCALES.get(task, (f"dev metric ({task})", 0.0, 1.0))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    budgets = sorted({r["budget"] for r in rows if r["task"] == task})
    for offset, method in enumerate(methods):
        points = []
        for budget in budgets:
            values = [
                r["value"]
                for r in rows
                if (r["task"], r["method"], r["budget"]) == (task, method, budget)
            ]
            if values:
                mean, std = mean_std(values)
                points.append((budget, mean, 0.0 if math.isnan(std) else std))
        if not points:
            continue
        xs = [b * (1 + 0.03 * (offset - len(methods) / 2)) for b, _, _ in points]  # no overlap
        ax.errorbar(
            xs,
            [m for _, m, _ in points],
            yerr=[s for _, _, s in points],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{100 * b:g} %" for b in budgets])
    ax.minorticks_off()  # the log axis's own labels (2 x 10^-1, ...) would overlap the budgets'
    ax.set_xlabel(f"adapter parameters, share of LoRA r={REFERENCE_RANK} on all candidates")
    ax.set_ylim(low, high)
    ax.set_ylabel(label)
    ax.set_title(f"{task}: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(rows: list[dict], args: argparse.Namespace, out: Path, argv: list[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    stem = args.table
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    command = "python bench/budget_curve.py " + " ".join(argv)
    tables = [table(rows, args.methods), paired_tests_table(rows, args.methods)]
    markdown = f"`{command}`\n\n" + "\n\n".join(tables) + "\n"
    for task in sorted({r["task"] for r in rows}):
        path = figure(rows, task, args.methods, out / f"{stem}_{task}.png")
        markdown += f"\n![{task}]({path.name})\n"
    (out / f"{stem}.md").write_text(markdown)
    return markdown


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "cola"])
    parser.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=[*METHODS, *VARIANTS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--fixed-seeds", type=int, default=3, help="seeds of all but the searched")
    parser.add_argument("--scale", type=float, default=1.0, help="step-budget factor (smoke)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs")
    parser.add_argument("--deadline-min", type=float, help="stop after this many minutes")
    parser.add_argument("--data-dir", default=str(gpu_study.REPO.parent / "shared/data/glue"))
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--out", default=str(gpu_study.RESULTS))
    parser.add_argument("--name", default="budget_curve", help="runs folder under --out")
    parser.add_argument("--table", default="budget_curve", help="stem of the table files")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs, run nothing")
    parser.add_argument("extra", nargs="*", help="extra Hydra overrides for every job")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    out = Path(args.out)
    jobs = make_jobs(args, out / args.name, Path(args.data_dir).resolve())
    record = out / f"{args.table}.json"
    _, todo, reused, stale = collect(jobs, recorded_rows(record))
    if args.dry_run:
        for job in todo:
            print(f"{job.task} b{job.budget:g} {job.method} seed {job.seed}: {job.folder}")
        print(f"[budget_curve] {len(todo)} of {len(unique(jobs))} runs to do")
        return 0
    if not args.summarize_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
        total = len(unique(jobs))
        print(f"[budget_curve] {len(todo)} of {total} runs to do, {args.jobs} at a time")
        gpu_study.run_all(todo, args.jobs, threads, deadline)
    rows, todo, reused, stale = collect(jobs, recorded_rows(record))
    print(write_outputs(rows, args, out, argv))
    if reused or stale:
        print(
            f"[budget_curve] {reused} rows reused from {record} (recorded with the same "
            f"settings, no run folder here); {stale} recorded rows were made with other "
            "settings and are not used"
        )
    if todo:
        print(f"[budget_curve] {len(todo)} runs not finished: run the same command again")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
