"""Comparison tables and budget curves over finished runs.

Runs are found and grouped by :mod:`diffora_lab.runs` (the notebook uses the same grouping): runs
that differ only by their seed share backbone, task, method and preset, search variant, budget
(none for methods without one) and rank. Each group is summarised by the mean and sample standard
deviation (ddof=1) of its primary dev metric, its mean trainable parameters and its runs; a group
whose runs differ in more than their seed (their ``.hydra/config.yaml``: steps, learning rate,
...) or that holds one seed twice is flagged::

    python -m diffora_lab.report multirun/synthetic/diffora/2026-11-28_11-43-00 [more] [--out DIR]

writes ``report.md``, ``report.csv`` and ``budget_curve.png`` (``--format pdf|svg`` for the
figure; the primary metric against the budget, one panel per backbone and task, one line per
method, methods without a budget as horizontal lines) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffora_lab import plotting
from diffora_lab.runs import (
    GROUP_KEYS,
    RESULTS_FILE,
    ReportError,
    budget_free,
    collect,
    differences,
    find_results,
    group,
    group_label,
    method_label,
    off_target,
    repeated_seeds,
    run_settings,
)

__all__ = [
    "ReportError",
    "aggregate",
    "budget_free",
    "collect",
    "differences",
    "find_results",
    "main",
    "method_label",
    "off_target",
    "plot_budget_curve",
    "run_settings",
    "to_markdown",
    "write_csv",
    "write_report",
]

CSV_COLUMNS = (
    *GROUP_KEYS,
    "metric",
    "mean",
    "std",
    "runs",
    "seeds",
    "params_trainable",
    "dev_examples",
)
FIGURE_FORMATS = ("png", "pdf", "svg")


def _summary(key: tuple, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One group's row: mean and sample std of the metric, flags for what does not fit."""
    scores = [float(r["score"]) for r in runs]
    repeated = repeated_seeds(runs)
    if repeated:
        warnings.warn(
            f"{group_label(key)}: seed {', '.join(map(str, repeated))} occurs more than once "
            "(the same run reported twice?); every run is counted",
            stacklevel=3,
        )
    differ = differences(runs) if len(runs) > 1 else {}
    if differ:
        listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in differ.items())
        warnings.warn(
            f"{group_label(key)}: the {len(runs)} runs averaged here differ in more than "
            f"their seed: {listed}",
            stacklevel=3,
        )
    missed = [r["run_dir"] for r in runs if off_target(r)]
    if missed:
        warnings.warn(
            f"{group_label(key)}: {len(missed)} run(s) kept more than one module away from "
            f"their budget's target (results.json budget_count): {', '.join(missed)}",
            stacklevel=3,
        )
    return {
        **dict(zip(GROUP_KEYS, key)),
        "metric": "/".join(sorted({str(r["primary_metric"]) for r in runs})),
        "mean": statistics.fmean(scores),
        "std": statistics.stdev(scores) if len(scores) > 1 else None,
        "runs": len(runs),
        "seeds": sorted(int(r["seed"]) for r in runs),
        "repeated_seeds": repeated,
        "params_trainable": statistics.fmean(float(r["params_trainable"]) for r in runs),
        "dev_examples": min(
            (int(r["dev_examples"]) for r in runs if r.get("dev_examples")), default=None
        ),
        "differs_in": sorted(differ),
        "off_target": missed,
    }


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups runs (:func:`diffora_lab.runs.group_key`) and summarises each over seeds.

    Args:
        rows: Runs as returned by :func:`collect`.

    Returns:
        One dict per group, sorted by its key, with ``backbone``, ``task``, ``method`` (with its
        preset), ``search`` (the search variant, None without a search), ``budget`` (None for a
        method without one), ``rank``, ``metric`` (the primary metric's name), ``mean``,
        ``std`` (sample standard deviation, ddof=1; ``None`` for a single run), ``runs``,
        ``seeds``, ``repeated_seeds``, ``params_trainable`` (mean), ``dev_examples`` (the dev
        set's size, if recorded), ``differs_in`` (settings besides the seed that differ
        within the group) and ``off_target`` (runs more than one module away from their
        budget's target: :func:`~diffora_lab.runs.off_target`). Repeated seeds, differing
        settings and off-target runs are also warned about; runs without a value for their
        primary metric are left out with a warning.
    """
    scored = []
    for row in rows:
        if row.get("score") is None:
            warnings.warn(
                f"skipping {row.get('run_dir')}: no {row['primary_metric']} in its metrics",
                stacklevel=2,
            )
            continue
        scored.append(row)
    return [_summary(key, runs) for key, runs in group(scored).items()]


def runs_cell(g: dict[str, Any]) -> str:
    """The run count with its flags: ``!`` settings differ, ``seed N twice`` a repeated seed."""
    cell = str(g["runs"])
    if g.get("differs_in"):
        cell += " !"
    for seed in g.get("repeated_seeds") or ():
        cell += f", seed {seed} {g['seeds'].count(seed)}x"
    return cell


def to_markdown(groups: Sequence[dict[str, Any]], digits: int = 4) -> str:
    """The comparison table as GitHub Markdown (``-`` as the std of a single run, as the budget
    of a method without one and as the search of a method without one).

    Args:
        groups: Rows from :func:`aggregate`.
        digits: Decimals shown for the metric's mean and std.

    Returns:
        The table, without a trailing newline.
    """
    header = [*GROUP_KEYS, "metric", "mean", "std", "params", "runs"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 7 + ["---:"] * 4) + "|",
    ]
    for g in groups:
        cells = [
            g["backbone"],
            g["task"],
            g["method"],
            g["search"] or "-",
            "-" if g["budget"] is None else f"{g['budget']:g}",
            str(g["rank"]),
            g["metric"],
            f"{g['mean']:.{digits}f}",
            "-" if g["std"] is None else f"{g['std']:.{digits}f}",
            f"{g['params_trainable']:,.0f}" + (" ‡" if g.get("off_target") else ""),
            runs_cell(g),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(groups: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Writes the groups as CSV; the std of a single run, the budget of a method without one and
    an absent search are empty cells; seeds are ``1;2;3``."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for g in groups:
            row = {key: g[key] for key in CSV_COLUMNS}
            row.update(
                {
                    key: "" if g[key] is None else g[key]
                    for key in ("std", "budget", "search", "dev_examples")
                }
            )
            row["seeds"] = ";".join(map(str, g["seeds"]))
            writer.writerow(row)
    return path


def plot_budget_curve(groups: Sequence[dict[str, Any]]):
    """The budget curve of :func:`aggregate`'s groups (:func:`diffora_lab.plotting.budget_curve`).

    Returns:
        The matplotlib figure (the caller saves or shows, then closes it).
    """
    return plotting.budget_curve(groups)


def write_report(
    groups: Sequence[dict[str, Any]],
    out_dir: str | Path,
    sources: Sequence[str | Path] = (),
    figure_format: str = "png",
) -> dict[str, Path]:
    """Writes ``report.md``, ``report.csv`` and ``budget_curve.<format>`` into ``out_dir``.

    Args:
        groups: Rows from :func:`aggregate`.
        out_dir: Output folder, created if needed.
        sources: The folders the runs came from, named in the Markdown header.
        figure_format: ``png``, ``pdf`` or ``svg``.

    Returns:
        The written files by kind: ``markdown``, ``csv``, ``plot``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = sum(g["runs"] for g in groups)
    header = f"# diffora_lab report\n\n{runs} runs in {len(groups)} groups"
    if sources:
        header += " from " + ", ".join(f"`{s}`" for s in sources)
    plot = out_dir / f"budget_curve.{figure_format}"
    body = (
        f"{header}. Mean and sample std (ddof=1) of the primary dev metric over seeds; "
        "search: the search variant; budget `-`: a method without a budget (it adapts every "
        "candidate); params: mean trainable parameters (`‡`: some runs kept more than one "
        "module away from their budget's target); runs: `!` the runs of that group "
        "differ in more than their seed (listed in the warnings), `seed N 2x` a seed that "
        f"occurs twice.\n\n{to_markdown(groups)}\n\n![budget curve]({plot.name})\n"
    )
    markdown = out_dir / "report.md"
    markdown.write_text(body)
    table = write_csv(groups, out_dir / "report.csv")
    plotting.save(plot_budget_curve(groups), plot, dpi=120)
    return {"markdown": markdown, "csv": table, "plot": plot}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffora_lab.report",
        description="Compare finished diffora_lab runs: mean +- std over seeds of the primary dev "
        "metric per (backbone, task, method and preset, search variant, budget, rank), as "
        "Markdown, CSV and a budget curve.",
    )
    parser.add_argument(
        "dirs", nargs="+", metavar="DIR", help="run or multirun folders (searched recursively)"
    )
    parser.add_argument(
        "--out",
        metavar="OUTDIR",
        help="where report.md, report.csv and the budget curve go "
        "(default: DIR when a single one is given, else ./report)",
    )
    parser.add_argument(
        "--format",
        choices=FIGURE_FORMATS,
        default="png",
        help="file format of the budget curve (default: png; pdf and svg are vector graphics)",
    )
    return parser


def _out_folder(dirs: Sequence[str], out: str | None) -> Path:
    """``--out``, else the one folder given (a ``results.json``'s own folder), else ./report."""
    if out is not None:
        if Path(out).exists() and not Path(out).is_dir():
            raise ReportError(
                f"--out {out} is a file; give a folder (it receives report.md, report.csv and "
                "the budget curve)."
            )
        return Path(out)
    if len(dirs) == 1:
        return Path(dirs[0]).parent if Path(dirs[0]).is_file() else Path(dirs[0])
    return Path("report")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 for a user error).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    args = _parser().parse_args(argv)
    try:
        out = _out_folder(args.dirs, args.out)
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
    paths = write_report(groups, out, sources=args.dirs, figure_format=args.format)
    print(to_markdown(groups))
    print(f"\nwrote {paths['markdown']}, {paths['csv']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
