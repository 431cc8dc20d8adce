"""Finished runs: finding their ``results.json``, naming what ran, grouping the runs over seeds.

Every finished run writes ``results.json`` into its run folder (:func:`diffora_lab.train.run`).
The report (:mod:`diffora_lab.report`) and the notebook (``notebooks/dam_analysis.ipynb``) both
read runs through :func:`collect` and group them through :func:`group_key`, so they always agree
on which runs are seeds of one experiment: runs that share backbone, task, method and preset
(:func:`method_label`), search variant (:func:`search_label`), budget and rank. A method without
a budget (its registered ``uses_budget`` is False, or ``budget: null`` in its results) is grouped
with ``budget`` None, whatever budget its config held.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
GROUP_KEYS = ("backbone", "task", "method", "search", "budget", "rank")
REQUIRED_KEYS = ("task", "method", "rank", "seed", "primary_metric", "metrics")
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


class ReportError(ValueError):
    """A fixable problem (a missing folder, no finished runs); printed without a traceback."""


def budget_free(method: str) -> bool:
    """Whether a method ignores ``budget`` (its registered ``uses_budget`` is False).

    Args:
        method: The registered name (``results.json``'s ``method``, not the preset's label).

    A name no longer registered (an old run folder) counts as budget-dependent.
    """
    from diffora_lab.methods import get_method

    try:
        return not get_method(method).uses_budget
    except ValueError:
        return False


def method_label(row: dict[str, Any]) -> str:
    """The method as the user selected it: a preset other than the default is part of it.

    ``method=diffora_faithful`` runs DiffoRA's class with the paper's search; its results say
    ``method: diffora, preset: faithful`` and must not be averaged with the default search.
    """
    preset = row.get("preset")
    return f"{row['method']}_{preset}" if preset and preset != "default" else str(row["method"])


def search_label(row: dict[str, Any]) -> str | None:
    """The search variant in a few words (``progressive``, ``topk+tau 2-0.5``), None for runs
    without one.

    From ``results.json``'s ``search_variant``: the variant's name (``search=``), then the shared
    search settings that differ from the paper's (an annealed temperature, the second-order
    architecture gradient). Results written before the ``search=`` group name the relaxation and
    what differed from the paper's search (progressive, a budget penalty) instead.
    """
    variant = row.get("search_variant")
    if not variant:
        return None
    if variant.get("name"):
        parts = [str(variant["name"])]
    else:  # written before the search= group
        parts = [str(variant.get("relaxation", "?"))]
        if variant.get("progressive"):
            parts.append("progressive")
        if variant.get("budget_penalty"):
            parts.append(f"penalty {variant['budget_penalty']:g}")
    tau = variant.get("tau") or [1.0, 1.0]
    if list(tau) != [1.0, 1.0]:
        parts.append(f"tau {tau[0]:g}-{tau[-1]:g}")
    arch_grad = variant.get("arch_grad", variant.get("order", "first"))
    if arch_grad != "first":
        parts.append(f"{arch_grad} order")
    return "+".join(parts)


def run_budget(row: dict[str, Any]) -> float | None:
    """The run's budget, or None for a method without one (whatever its config held)."""
    if row.get("budget") is None or budget_free(str(row["method"])):
        return None
    return float(row["budget"])


def off_target(row: dict[str, Any]) -> bool:
    """Whether a run kept more than one module away from its budget's target.

    The budget rule keeps within half a module of the target (budget.py), so this flags a run
    whose count is not what its budget asked for (e.g. a saved mask, or a fixed choice whose
    rank cannot reach the target). From ``results.json``'s ``budget_count``: one module is its
    ``tolerance`` (a module at the rank the target is counted at, budget.py).
    """
    count = row.get("budget_count")
    if not isinstance(count, dict) or count.get("target") is None:
        return False
    tolerance = count.get("tolerance", count["largest_module"])  # older runs: the largest
    return abs(float(count["achieved"]) - float(count["target"])) > float(tolerance)


def group_key(row: dict[str, Any]) -> tuple:
    """What the runs of one group share: ``(backbone, task, method, search, budget, rank)``."""
    return (
        str(row.get("backbone", "?")),
        str(row["task"]),
        method_label(row),
        search_label(row),
        run_budget(row),
        int(row["rank"]),
    )


def sort_key(key: tuple) -> tuple:
    """Orders group keys whose search or budget may be None (those first)."""
    return tuple((value is not None, value if value is not None else 0) for value in key)


def group_label(key: tuple) -> str:
    """A group in words, for warnings and titles."""
    backbone, task, method, search, budget, rank = key
    where = f"{backbone}, " + ("" if budget is None else f"budget {budget:g}, ") + f"rank {rank}"
    return f"{method}{f' [{search}]' if search else ''} on {task} ({where})"


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
    if isinstance(data, dict) and "budget" not in data:
        missing.append("budget")
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
        holds it), ``score`` (the value of its ``primary_metric``, ``None`` if not recorded) and
        ``label`` (:func:`method_label`). Sorted by group key, then seed.

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
    for row in rows:
        row["label"] = method_label(row)
    return sorted(rows, key=lambda r: (sort_key(group_key(r)), r["seed"], r["run_dir"]))


def group(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Runs by :func:`group_key`, groups in sorted order (runs keep their order)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    return {key: groups[key] for key in sorted(groups, key=sort_key)}


def repeated_seeds(runs: Sequence[dict[str, Any]]) -> list[int]:
    """Seeds that occur more than once among ``runs`` (the same run reported twice?)."""
    seeds = [int(r["seed"]) for r in runs]
    return sorted({seed for seed in seeds if seeds.count(seed) > 1})


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
    if run_budget(row) is None:
        settings.pop("budget", None)  # a method without a budget: the value is not used
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
