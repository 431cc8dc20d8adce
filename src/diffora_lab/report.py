"""Comparison tables and budget curves over finished runs.

Every finished run writes ``results.json`` into its run folder (:func:`diffora_lab.train.run`).
This module gathers them from any number of run or multirun folders, groups the runs that differ
only by their seed, i.e. by ``(task, method, budget, rank)``, and summarises each group by the mean
and sample standard deviation (ddof=1) of its primary dev metric, its mean trainable parameters and
its number of runs::

    python -m diffora_lab.report multirun/2026-11-28/11-43-00 [more folders] [--out report/]

writes ``report.md``, ``report.csv`` and ``budget_curve.png`` (the primary metric against the
selection ratio rho, one line per task and method) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_FILE = "results.json"


GROUP_KEYS = ("task", "method", "budget", "rank")
REQUIRED_KEYS = ("task", "method", "budget", "rank", "seed", "primary_metric", "metrics")
CSV_COLUMNS = (
    "task",
    "method",
    "budget",
    "rank",
    "metric",
    "mean",
    "std",
    "runs",
    "seeds",
    "params_trainable",
)


class ReportError(ValueError):
    """A fixable problem (a missing folder, no finished runs); printed without a traceback."""


def budget_free(method: str) -> bool:
    """Whether a method ignores ``budget`` (its registered ``uses_budget`` is False).

    On the budget curve a single point of such a method is drawn as a horizontal reference line.
    A name no longer registered (an old run folder) counts as budget-dependent: plotted as points.
    """
    from diffora_lab.methods import get_method

    try:
        return not get_method(method).uses_budget
    except ValueError:
        return False


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """All ``results.json`` files under the given folders (recursively) or given directly.

    Args:
        paths: Run folders, multirun folders, any folder above them, or ``results.json`` files.

    Returns:
        The files, each once (by resolved path), sorted.

    Raises:
        ReportError: If a path does not exist.
    """
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{str(path)!r} does not exist.")
        if path.is_file():
            found.add(path.resolve())
        else:
            found.update(p.resolve() for p in path.rglob(RESULTS_FILE) if p.is_file())
    return sorted(found)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        warnings.warn(f"skipping {path}: unreadable ({error})", stacklevel=3)
        return None
    missing = [key for key in REQUIRED_KEYS if key not in data] if isinstance(data, dict) else []
    if not isinstance(data, dict) or missing:
        warnings.warn(f"skipping {path}: not a diffora_lab results file {missing}", stacklevel=3)
        return None
    return data


def collect(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Loads every run's ``results.json`` found under ``paths``.

    Unreadable files, and JSON files that are not a run's results, are skipped with a warning.

    Args:
        paths: Folders to search recursively, or ``results.json`` files.

    Returns:
        One dict per run: the contents of its ``results.json`` plus ``run_dir`` (the folder that
        holds it) and ``score`` (the value of its ``primary_metric``, ``None`` if not recorded).
        Sorted by task, method, budget, rank and seed.

    Raises:
        ReportError: If a path does not exist.
    """
    rows = []
    for path in find_results(paths):
        data = _load(path)
        if data is None:
            continue
        score = data["metrics"].get(data["primary_metric"])
        rows.append({**data, "run_dir": str(path.parent), "score": score})
    return sorted(rows, key=lambda r: (*_group_key(r), r["seed"], r["run_dir"]))


def _group_key(row: dict[str, Any]) -> tuple[str, str, float, int]:
    return (str(row["task"]), str(row["method"]), float(row["budget"]), int(row["rank"]))


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups runs by ``(task, method, budget, rank)`` and summarises each group over its seeds.

    Args:
        rows: Runs as returned by :func:`collect`.

    Returns:
        One dict per group, sorted by its key, with ``task``, ``method``, ``budget``, ``rank``,
        ``metric`` (the primary metric's name), ``mean``, ``std`` (sample standard deviation,
        ddof=1; ``None`` for a single run), ``runs``, ``seeds`` and ``params_trainable`` (mean).
        Runs without a value for their primary metric are left out with a warning.
    """
    groups: dict[tuple[str, str, float, int], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("score") is None:
            warnings.warn(
                f"skipping {row.get('run_dir')}: no {row['primary_metric']} in its metrics",
                stacklevel=2,
            )
            continue
        groups.setdefault(_group_key(row), []).append(row)
    summary = []
    for key in sorted(groups):
        runs = groups[key]
        scores = [float(r["score"]) for r in runs]
        seeds = sorted(int(r["seed"]) for r in runs)
        if len(set(seeds)) < len(seeds):
            warnings.warn(
                f"{dict(zip(GROUP_KEYS, key))}: some seeds occur more than once {seeds} "
                "(the same run reported twice?); every run is counted",
                stacklevel=2,
            )
        metrics = sorted({str(r["primary_metric"]) for r in runs})
        summary.append(
            {
                **dict(zip(GROUP_KEYS, key)),
                "metric": "/".join(metrics),
                "mean": statistics.fmean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else None,
                "runs": len(runs),
                "seeds": seeds,
                "params_trainable": statistics.fmean(float(r["params_trainable"]) for r in runs),
            }
        )
    return summary


def to_markdown(groups: Sequence[dict[str, Any]], digits: int = 4) -> str:
    """The comparison table as GitHub Markdown (``-`` as the std of a single run).

    Args:
        groups: Rows from :func:`aggregate`.
        digits: Decimals shown for the metric's mean and std.

    Returns:
        The table, without a trailing newline.
    """
    header = ["task", "method", "budget", "rank", "metric", "mean", "std", "params", "runs"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 5 + ["---:"] * 4) + "|",
    ]
    for g in groups:
        std = "-" if g["std"] is None else f"{g['std']:.{digits}f}"
        cells = [
            g["task"],
            g["method"],
            f"{g['budget']:g}",
            str(g["rank"]),
            g["metric"],
            f"{g['mean']:.{digits}f}",
            std,
            f"{g['params_trainable']:,.0f}",
            str(g["runs"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(groups: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Writes the groups as CSV; the std of a single run is an empty cell, seeds are ``1;2;3``."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for g in groups:
            writer.writerow(
                {
                    **{key: g[key] for key in CSV_COLUMNS},
                    "std": "" if g["std"] is None else g["std"],
                    "seeds": ";".join(map(str, g["seeds"])),
                }
            )
    return path


def plot_budget_curve(groups: Sequence[dict[str, Any]]):
    """The primary metric against the budget: one panel per task, one line per method (and rank).

    Error bars are the sample standard deviation over seeds. A method that ignores the budget
    (:func:`budget_free`) and was run at a single budget is drawn as a dashed horizontal
    line with a +-std band, a reference for the methods that select modules.

    Args:
        groups: Rows from :func:`aggregate`.

    Returns:
        The matplotlib figure (the caller saves or shows, then closes it).
    """
    tasks = sorted({g["task"] for g in groups})
    # One colour per method and rank, the same in every panel.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = sorted({(g["method"], g["rank"]) for g in groups})
    colors = {key: palette[i % len(palette)] for i, key in enumerate(keys)}
    fig, axes = plt.subplots(
        1, max(1, len(tasks)), figsize=(5.0 * max(1, len(tasks)), 3.8), squeeze=False
    )
    for ax, task in zip(axes[0], tasks):
        rows = [g for g in groups if g["task"] == task]
        ranks = {g["rank"] for g in rows}
        budgets = sorted({g["budget"] for g in rows})
        series: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for g in rows:
            series.setdefault((g["method"], g["rank"]), []).append(g)
        for (method, rank), points in sorted(series.items()):
            points = sorted(points, key=lambda g: g["budget"])
            label = method if len(ranks) == 1 else f"{method} r={rank}"
            means = [p["mean"] for p in points]
            stds = [p["std"] or 0.0 for p in points]
            if budget_free(method) and len(points) == 1 and len(budgets) > 1:
                color = colors[method, rank]
                ax.axhline(means[0], color=color, ls="--", lw=1.2, label=f"{label} (budget-free)")
                ax.axhspan(means[0] - stds[0], means[0] + stds[0], color=color, alpha=0.15)
                continue
            ax.errorbar(
                [p["budget"] for p in points],
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                color=colors[method, rank],
                label=label,
            )
        ax.set_title(task)
        ax.set_xlabel("budget (fraction of modules kept)")
        ax.set_ylabel(" / ".join(sorted({g["metric"] for g in rows})))
        if budgets:
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(
    groups: Sequence[dict[str, Any]],
    out_dir: str | Path,
    sources: Sequence[str | Path] = (),
) -> dict[str, Path]:
    """Writes ``report.md``, ``report.csv`` and ``budget_curve.png`` into ``out_dir``.

    Args:
        groups: Rows from :func:`aggregate`.
        out_dir: Output folder, created if needed.
        sources: The folders the runs came from, named in the Markdown header.

    Returns:
        The written files by kind: ``markdown``, ``csv``, ``plot``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = sum(g["runs"] for g in groups)
    header = f"# diffora_lab report\n\n{runs} runs in {len(groups)} groups"
    if sources:
        header += " from " + ", ".join(f"`{s}`" for s in sources)
    body = (
        f"{header}. Mean and sample std (ddof=1) of the primary dev metric over seeds; "
        "params: mean trainable parameters.\n\n"
        f"{to_markdown(groups)}\n\n![budget curve](budget_curve.png)\n"
    )
    markdown = out_dir / "report.md"
    markdown.write_text(body)
    table = write_csv(groups, out_dir / "report.csv")
    fig = plot_budget_curve(groups)
    plot = out_dir / "budget_curve.png"
    try:
        fig.savefig(plot, dpi=120)
    finally:
        plt.close(fig)
    return {"markdown": markdown, "csv": table, "plot": plot}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 for a user error).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m diffora_lab.report",
        description="Compare finished diffora_lab runs: mean +- std over seeds of the primary dev "
        "metric per (task, method, budget, rank), as Markdown, CSV and a budget curve.",
    )
    parser.add_argument(
        "dirs", nargs="+", metavar="DIR", help="run or multirun folders (searched recursively)"
    )
    parser.add_argument(
        "--out",
        metavar="OUTDIR",
        help="where report.md, report.csv and budget_curve.png go "
        "(default: DIR when a single one is given, else ./report)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.dirs[0] if len(args.dirs) == 1 else "report")
    try:
        rows = collect(args.dirs)
        if not rows:
            raise ReportError(
                f"no {RESULTS_FILE} found under {', '.join(args.dirs)}; a run writes it when it "
                "finishes (python -m diffora_lab ...), so point at a run or multirun folder."
            )
        groups = aggregate(rows)
        if not groups:
            raise ReportError("no run records a value for its primary metric.")
    except ReportError as error:
        print(f"diffora_lab.report: error: {error}", file=sys.stderr)
        return 2
    paths = write_report(groups, out, sources=args.dirs)
    print(to_markdown(groups))
    print(f"\nwrote {paths['markdown']}, {paths['csv']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
