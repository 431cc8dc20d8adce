"""Comparison tables and budget curves over finished runs.

Every finished run writes ``results.json`` into its run folder (:func:`diffora_lab.train.run`).
This module gathers them from any number of run or multirun folders, groups the runs that should
differ only by their seed, i.e. by ``(backbone, task, method, budget, rank)``, warns when runs of
one group differ in anything else (their ``.hydra/config.yaml``: steps, learning rate, ...), and
summarises each group by the mean and sample standard deviation (ddof=1) of its primary dev
metric, its mean trainable parameters and its number of runs::

    python -m diffora_lab.report multirun/2026-11-28/11-43-00 [more folders] [--out report/]

writes ``report.md``, ``report.csv`` and ``budget_curve.png`` (the primary metric against the
selection ratio rho, one panel per backbone and task, one line per method) and prints the Markdown
table.
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

from diffora_lab import plotting  # noqa: E402

RESULTS_FILE = "results.json"


GROUP_KEYS = ("backbone", "task", "method", "budget", "rank")
# Settings that may differ between the seeds of one group without making them different
# experiments: where files go, how often things are logged or saved, how progress is shown.
IGNORED_SETTINGS = (
    "seed",
    "ckpt_path",
    "logger",
    "data.cache_dir",
    "data.num_workers",
    "dam.search_cache_dir",
    "dam.reuse_search",
    "dam.log_every",
    "train.log_every",
    "train.ckpt_every",
    "train.progress_every",
    "train.stop_after",
    "train.eval_batch_size",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)
# results.json fields compared too (a run folder may lack .hydra/).
COMPARED_RESULTS = ("steps", "world_size", "primary_metric", "dev_examples")
REQUIRED_KEYS = ("task", "method", "budget", "rank", "seed", "primary_metric", "metrics")
CSV_COLUMNS = (
    "backbone",
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
    "dev_examples",
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
    if data["budget"] is None:  # a method without a budget: it adapts every candidate
        data["budget"] = 1.0
    return data


def collect(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Loads every run's ``results.json`` found under ``paths``.

    Unreadable files, and JSON files that are not a run's results, are skipped with a warning.

    Args:
        paths: Folders to search recursively, or ``results.json`` files.

    Returns:
        One dict per run: the contents of its ``results.json`` plus ``run_dir`` (the folder that
        holds it) and ``score`` (the value of its ``primary_metric``, ``None`` if not recorded).
        Sorted by backbone, task, method, budget, rank and seed.

    Raises:
        ReportError: If a path does not exist.
    """
    rows = []
    for path in find_results(paths):
        data = _load(path)
        if data is None:
            continue
        score = data["metrics"].get(data["primary_metric"])
        data.setdefault("backbone", "?")  # results written before the backbone was recorded
        rows.append({**data, "run_dir": str(path.parent), "score": score})
    return sorted(rows, key=lambda r: (*_group_key(r), r["seed"], r["run_dir"]))


def method_label(row: dict[str, Any]) -> str:
    """The method as a report names it: a preset other than the default is part of it.

    ``method=diffora_faithful`` runs DiffoRA's class with the paper's search; its results say
    ``method: diffora, preset: faithful`` and must not be averaged with the default search.
    """
    preset = row.get("preset")
    return f"{row['method']}_{preset}" if preset and preset != "default" else str(row["method"])


def _group_key(row: dict[str, Any]) -> tuple[str, str, str, float, int]:
    return (
        str(row.get("backbone", "?")),
        str(row["task"]),
        method_label(row),
        float(row["budget"]),
        int(row["rank"]),
    )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def run_settings(row: dict[str, Any]) -> dict[str, Any]:
    """What defines a run besides its seed: its saved Hydra config (flattened) and a few results.

    Location, logging and progress settings (:data:`IGNORED_SETTINGS`) are left out.
    """
    settings: dict[str, Any] = {}
    config = Path(row["run_dir"]) / ".hydra" / "config.yaml"
    if config.is_file():
        import yaml

        try:
            settings = _flatten(yaml.safe_load(config.read_text()) or {})
        except yaml.YAMLError as error:
            warnings.warn(f"{config}: unreadable ({error})", stacklevel=2)
    for key in COMPARED_RESULTS:
        if key in row:
            settings[f"results.{key}"] = row[key]
    return {
        key: value
        for key, value in settings.items()
        if not any(key == i or key.startswith(i + ".") for i in IGNORED_SETTINGS)
    }


def differences(runs: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Settings whose values differ between ``runs``, each with its distinct values (as text)."""
    per_run = [run_settings(r) for r in runs]
    keys = sorted({key for settings in per_run for key in settings})
    found = {}
    for key in keys:
        values = sorted({json.dumps(s.get(key), sort_keys=True) for s in per_run})
        if len(values) > 1:
            found[key] = values
    return found


def off_target(row: dict[str, Any]) -> bool:
    """Whether a run kept more than one module away from its budget's target.

    The budget rule keeps within half a module of the target (budget.py), so this flags a run
    whose count is not what its budget asked for (e.g. a saved mask, or a fixed choice whose
    rank cannot reach the target).
    """
    count = row.get("budget_count")
    if not isinstance(count, dict) or count.get("target") is None:
        return False
    return abs(float(count["achieved"]) - float(count["target"])) > float(count["largest_module"])


def _group_label(key: tuple) -> str:
    backbone, task, method, budget, rank = key
    return f"{method} on {task} ({backbone}, budget {budget:g}, rank {rank})"


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups runs by ``(backbone, task, method, budget, rank)`` and summarises each over seeds.

    Args:
        rows: Runs as returned by :func:`collect`.

    Returns:
        One dict per group, sorted by its key, with ``backbone``, ``task``, ``method``,
        ``budget``, ``rank``, ``metric`` (the primary metric's name), ``mean``, ``std`` (sample
        standard deviation, ddof=1; ``None`` for a single run), ``runs``, ``seeds``,
        ``params_trainable`` (mean), ``dev_examples`` (the dev set's size, if recorded) and
        ``differs_in`` (settings besides the seed that differ within the group; each also
        warned about) and ``off_target`` (runs more than one module away from their budget's
        target: :func:`off_target`, also warned about). Runs without a value for their primary
        metric are left out with a warning.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
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
                f"{_group_label(key)}: some seeds occur more than once {seeds} "
                "(the same run reported twice?); every run is counted",
                stacklevel=2,
            )
        differ = differences(runs) if len(runs) > 1 else {}
        if differ:
            listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in differ.items())
            warnings.warn(
                f"{_group_label(key)}: the {len(runs)} runs averaged here differ in more than "
                f"their seed: {listed}",
                stacklevel=2,
            )
        metrics = sorted({str(r["primary_metric"]) for r in runs})
        missed = [r["run_dir"] for r in runs if off_target(r)]
        if missed:
            warnings.warn(
                f"{_group_label(key)}: {len(missed)} run(s) kept more than one module away from "
                f"their budget's target (results.json budget_count): {', '.join(missed)}",
                stacklevel=2,
            )
        summary.append(
            {
                **dict(zip(GROUP_KEYS, key)),
                "metric": "/".join(metrics),
                "mean": statistics.fmean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else None,
                "runs": len(runs),
                "seeds": seeds,
                "params_trainable": statistics.fmean(float(r["params_trainable"]) for r in runs),
                "dev_examples": min(
                    (int(r["dev_examples"]) for r in runs if r.get("dev_examples")), default=None
                ),
                "differs_in": sorted(differ),
                "off_target": missed,
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
    header = [
        "backbone",
        "task",
        "method",
        "budget",
        "rank",
        "metric",
        "mean",
        "std",
        "params",
        "runs",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 6 + ["---:"] * 4) + "|",
    ]
    for g in groups:
        std = "-" if g["std"] is None else f"{g['std']:.{digits}f}"
        runs = str(g["runs"]) + (" !" if g.get("differs_in") else "")
        params = f"{g['params_trainable']:,.0f}" + (" ‡" if g.get("off_target") else "")
        cells = [
            g["backbone"],
            g["task"],
            g["method"],
            f"{g['budget']:g}",
            str(g["rank"]),
            g["metric"],
            f"{g['mean']:.{digits}f}",
            std,
            params,
            runs,
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
                    "dev_examples": g.get("dev_examples") or "",
                }
            )
    return path


def plot_budget_curve(groups: Sequence[dict[str, Any]]):
    """The budget curve of :func:`aggregate`'s groups (:func:`diffora_lab.plotting.budget_curve`).

    One panel per backbone and task, mean +- std over seeds; methods for which
    :func:`budget_free` holds are drawn as horizontal reference lines.

    Returns:
        The matplotlib figure (the caller saves or shows, then closes it).
    """
    return plotting.budget_curve(groups, budget_free)


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
        "params: mean trainable parameters (`‡`: some runs kept more than one module away from "
        "their budget's target); `!` after the run count: the runs of that group differ in more "
        "than their seed (listed in the warnings).\n\n"
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


def _out_folder(dirs: Sequence[str], out: str | None) -> Path:
    """``--out``, else the one folder given (a ``results.json``'s own folder), else ./report."""
    if out is not None:
        if Path(out).exists() and not Path(out).is_dir():
            raise ReportError(
                f"--out {out} is a file; give a folder (it receives report.md, report.csv and "
                "budget_curve.png)."
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
    parser = argparse.ArgumentParser(
        prog="python -m diffora_lab.report",
        description="Compare finished diffora_lab runs: mean +- std over seeds of the primary dev "
        "metric per (backbone, task, method, budget, rank), as Markdown, CSV and a budget curve.",
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
    paths = write_report(groups, out, sources=args.dirs)
    print(to_markdown(groups))
    print(f"\nwrote {paths['markdown']}, {paths['csv']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
