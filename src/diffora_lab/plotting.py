"""Figures: the DAM's layers x module-types heatmap, the gate trajectories, the budget curve.

Every heatmap of a run uses the same colour scale, [0, 1] (a gate is a sigmoid or softmax value),
so frames of one search compare at a glance: a frame scaled to its own maximum would draw the
all-0.5 DAM of step 0 like the DAM after the search.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

GATE_RANGE = (0.0, 1.0)
KEPT_COLOR = "red"
PRUNED_COLOR = "white"


def dam_heatmap(
    gates: np.ndarray,
    module_types: list[str],
    title: str,
    kept: np.ndarray | None = None,
    pruned: np.ndarray | None = None,
):
    """A layers x types heatmap of gate values on the fixed scale [0, 1].

    Args:
        gates: Gate values, shape (layers, types).
        module_types: Column names.
        title: Figure title.
        kept: Optional boolean mask of the same shape: kept modules are outlined.
        pruned: Optional boolean mask of the modules removed by progressive discretization
            (the DAM's ``active`` buffer, negated): hatched, so a removed module (gate set to 0)
            is not mistaken for a gate that learned 0.

    Returns:
        The figure (save it with :func:`save`).
    """
    layers = gates.shape[0]
    fig, ax = plt.subplots(figsize=(1.4 + 0.55 * len(module_types), 1.3 + 0.28 * layers))
    image = ax.imshow(gates, vmin=GATE_RANGE[0], vmax=GATE_RANGE[1], cmap="viridis")
    ax.set_xticks(range(len(module_types)), module_types, rotation=45, ha="right")
    ax.set_yticks(range(layers), [str(i) for i in range(layers)])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    captions = []
    if pruned is not None and np.any(pruned):
        for i, j in zip(*np.nonzero(pruned)):
            ax.add_patch(
                plt.Rectangle(
                    (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xxx", ec=PRUNED_COLOR, lw=0
                )
            )
        captions.append(("hatched: pruned during the search (gate set to 0)", "dimgray"))
    if kept is not None:
        for i, j in zip(*np.nonzero(kept)):
            rect = plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=KEPT_COLOR, lw=1.5)
            ax.add_patch(rect)
        captions.append(("red outline: kept (top-k gates)", KEPT_COLOR))
    # Captions sit under the title: a legend below the axes collides with the labels.
    for row, (text, color) in enumerate(reversed(captions)):
        ax.annotate(
            text,
            xy=(0.5, 1.0),
            xycoords="axes fraction",
            xytext=(0, 3 + 9 * row),
            textcoords="offset points",
            color=color,
            fontsize=7,
            ha="center",
            va="bottom",
        )
    ax.set_title(title, fontsize=9, pad=4 + 9 * len(captions))
    colorbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    colorbar.set_label("gate value")
    return fig


def _pruned_at(steps: Sequence[int], column: np.ndarray) -> int | None:
    """Index of the first record from which a pruned module's gate stays exactly 0."""
    nonzero = np.nonzero(column != 0.0)[0]
    last = int(nonzero[-1]) + 1 if len(nonzero) else 0
    return last if last < len(steps) else None


def _trajectory_legend(colors: dict, kept, pruned, discretized_at) -> list[Line2D]:
    """Legend entries: the module types, then what the line styles and markers mean."""
    handles = [Line2D([], [], color=color, lw=2, label=t) for t, color in colors.items()]
    if kept is not None:
        handles += [
            Line2D([], [], color="gray", ls="-", label="kept"),
            Line2D([], [], color="gray", ls="--", label="dropped"),
        ]
    if pruned is not None and any(pruned):
        handles.append(Line2D([], [], color="gray", marker="x", ls="", label="pruned (gate -> 0)"))
    if discretized_at is not None:
        handles.append(Line2D([], [], color="black", ls=":", label="discretization"))
    return handles


def gate_trajectories(
    steps: Sequence[int],
    history: np.ndarray,
    module_types: Sequence[str],
    kept: Sequence[bool] | None = None,
    discretized_at: int | None = None,
    title: str = "gate trajectories",
    pruned: Sequence[bool] | None = None,
):
    """One line per candidate module: its gate over the search.

    Lines are coloured by module type; kept modules (if ``kept`` is given) are solid, dropped
    ones dashed, and a vertical line marks the discretization step. A module removed by
    progressive discretization (``pruned``) ends with an ``x`` where it was removed: its gate is
    0 from then on because it was pruned, not because it learned 0.

    Args:
        steps: The recorded steps (x axis).
        history: Gates, shape (len(steps), modules).
        module_types: Each module's type, in the column order of ``history``.
        kept: Each module's fate at discretization, or None before it.
        discretized_at: The step of discretization, or None.
        title: Figure title.
        pruned: Each module's removal during the search (the DAM's ``active`` negated), or None.

    Returns:
        The figure.
    """
    types = list(dict.fromkeys(module_types))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {t: palette[i % len(palette)] for i, t in enumerate(types)}
    fig, ax = plt.subplots(figsize=(8, 4.2))
    steps = list(steps)
    for index, module_type in enumerate(module_types):
        dropped = kept is not None and not kept[index]
        end = _pruned_at(steps, history[:, index]) if pruned is not None and pruned[index] else None
        shown = slice(None) if end is None else slice(0, end + 1)
        style = {"color": colors[module_type], "alpha": 0.8}
        ax.plot(
            steps[shown],
            history[shown, index],
            ls="--" if dropped else "-",
            lw=0.8 if dropped else 1.3,
            **style,
        )
        if end is not None:
            ax.plot([steps[end]], [history[end, index]], marker="x", ms=5, ls="", **style)
    if discretized_at is not None:
        ax.axvline(discretized_at, color="black", ls=":", lw=1.2)
    handles = _trajectory_legend(colors, kept, pruned, discretized_at)
    ax.set_ylim(GATE_RANGE[0] - 0.02, GATE_RANGE[1] + 0.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("gate value")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _metric_label(rows: Sequence[dict[str, Any]]) -> str:
    """The y label: the metric and how many dev examples one point is scored on."""
    metric = " / ".join(sorted({g["metric"] for g in rows}))
    sizes = sorted({g["dev_examples"] for g in rows if g.get("dev_examples")})
    if not sizes:
        return metric
    n = sizes[0]
    per = "" if len(sizes) > 1 else f"; 1 example = {1 / n:.3g}"
    return f"{metric}\n(dev set: {'-'.join(map(str, sizes))} examples{per})"


def _unzoomed_ylim(ax, rows: Sequence[dict[str, Any]]) -> None:
    """Widens the y range to at least 10 dev examples (and 0.05), so one example is no trend."""
    sizes = [g["dev_examples"] for g in rows if g.get("dev_examples")]
    span = max(0.05, 10.0 / min(sizes)) if sizes else 0.05
    low, high = ax.get_ylim()
    if high - low < span:
        middle = (high + low) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)


def _series_label(method: str, search: str | None, rank: int, rows, points) -> str:
    """``method [search] r=8 (3 seeds)``: the search and rank only where they tell lines apart."""
    label = method
    if len({g["search"] for g in rows if g["method"] == method}) > 1 and search:
        label += f" [{search}]"
    if len({g["rank"] for g in rows}) > 1:
        label += f" r={rank}"
    seeds = sorted({p["runs"] for p in points})
    label += f" ({'-'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}"
    repeated = sorted({seed for p in points for seed in p.get("repeated_seeds") or ()})
    if repeated:
        label += f"; seed {', '.join(map(str, repeated))} repeated!"
    return label + ")"


def _draw_series(ax, points, label: str, color) -> None:
    """One method's points: mean +- std against the budget, or a line for a budget-free one."""
    means = [p["mean"] for p in points]
    stds = [p["std"] or 0.0 for p in points]
    if points[0]["budget"] is None:  # adapts every candidate: the same at every budget
        ax.axhline(means[0], color=color, ls="--", lw=1.2, label=f"{label}, budget-free")
        ax.axhspan(means[0] - stds[0], means[0] + stds[0], color=color, alpha=0.15)
        return
    budgets = [p["budget"] for p in points]
    ax.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, color=color, label=label)


def budget_curve(groups: Sequence[dict[str, Any]]):
    """The primary metric against the budget: one panel per backbone and task, one line per
    method (with its preset), search variant and rank.

    Points are the mean over seeds, error bars the sample standard deviation (the legend says
    how many seeds, and flags a seed that occurs twice). A method without a budget (its groups
    have ``budget`` None) is drawn as a dashed horizontal line with a +-std band, a reference for
    the methods that select modules. The y axis spans at least 10 dev examples' worth of the
    metric (its label states the dev set's size), so a one-example difference is not drawn as
    a trend.

    Args:
        groups: Rows from :func:`diffora_lab.report.aggregate`.

    Returns:
        The matplotlib figure (the caller saves or shows, then closes it).
    """
    panels = sorted({(g["backbone"], g["task"]) for g in groups})
    # One colour per line, the same in every panel.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = sorted({(g["method"], g["search"] or "", g["rank"]) for g in groups})
    colors = {key: palette[i % len(palette)] for i, key in enumerate(keys)}
    count = max(1, len(panels))
    fig, axes = plt.subplots(1, count, figsize=(5.0 * count, 4.0), squeeze=False)
    for ax, (backbone, task) in zip(axes[0], panels):
        rows = [g for g in groups if (g["backbone"], g["task"]) == (backbone, task)]
        series: dict[tuple, list[dict[str, Any]]] = {}
        for g in rows:
            series.setdefault((g["method"], g["search"] or "", g["rank"]), []).append(g)
        for key, points in sorted(series.items()):
            points = sorted(points, key=lambda g: g["budget"] or 0.0)
            label = _series_label(key[0], key[1], key[2], rows, points)
            _draw_series(ax, points, label, colors[key])
        ax.set_title(f"{task} ({backbone})")
        ax.set_xlabel("budget (fraction of modules kept)")
        ax.set_ylabel(_metric_label(rows))
        budgets = sorted({g["budget"] for g in rows if g["budget"] is not None})
        if budgets:
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        _unzoomed_ylim(ax, rows)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="mean ± std over seeds", title_fontsize=8)
    fig.tight_layout()
    return fig


FORMATS = ("png", "pdf", "svg")


def save(fig, path: str | Path, format: str | None = None, dpi: int = 100) -> Path:
    """Saves (cropped to its content) and closes a figure; long runs must not pile up figures.

    Args:
        fig: The figure.
        path: Where to write; its suffix is the format unless ``format`` is given.
        format: ``png``, ``pdf`` or ``svg`` (vector graphics for papers); replaces the suffix.
        dpi: Resolution of a PNG.

    Returns:
        The written file.
    """
    path = Path(path)
    if format is not None:
        if format not in FORMATS:
            plt.close(fig)
            raise ValueError(f"format={format!r}: choose one of {list(FORMATS)}.")
        path = path.with_suffix(f".{format}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    finally:
        plt.close(fig)
    return path
