"""Figures: the DAM's layers x module-types heatmap, the gate trajectories, the budget curve.

Every heatmap of a run uses the same colour scale, [0, 1] (a gate is a sigmoid or softmax value),
so frames of one search compare at a glance: a frame scaled to its own maximum would draw the
all-0.5 DAM of step 0 like the DAM after the search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def dam_heatmap(
    gates: np.ndarray,
    module_types: list[str],
    title: str,
    kept: np.ndarray | None = None,
):
    """A layers x types heatmap of gate values on the fixed scale [0, 1].

    Args:
        gates: Gate values, shape (layers, types).
        module_types: Column names.
        title: Figure title.
        kept: Optional boolean mask of the same shape: kept modules are outlined, and a legend
            entry says what the outline means.

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
    if kept is not None:
        for i, j in zip(*np.nonzero(kept)):
            rect = plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=KEPT_COLOR, lw=1.5)
            ax.add_patch(rect)
        # The caption sits under the title: a legend below the axes collides with the labels.
        ax.text(
            0.5,
            1.02,
            "red outline: kept (top-k gates)",
            color=KEPT_COLOR,
            fontsize=7,
            ha="center",
            va="bottom",
            transform=ax.transAxes,
        )
        title += "\n"
    ax.set_title(title, fontsize=9)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    colorbar.set_label("gate value")
    return fig


def gate_trajectories(
    steps: Sequence[int],
    history: np.ndarray,
    module_types: Sequence[str],
    kept: Sequence[bool] | None = None,
    discretized_at: int | None = None,
    title: str = "gate trajectories",
):
    """One line per candidate module: its gate over the search.

    Lines are coloured by module type; kept modules (if ``kept`` is given) are solid, dropped
    ones dashed, and a vertical line marks the discretization step.

    Args:
        steps: The recorded steps (x axis).
        history: Gates, shape (len(steps), modules).
        module_types: Each module's type, in the column order of ``history``.
        kept: Each module's fate at discretization, or None before it.
        discretized_at: The step of discretization, or None.
        title: Figure title.

    Returns:
        The figure.
    """
    types = list(dict.fromkeys(module_types))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {t: palette[i % len(palette)] for i, t in enumerate(types)}
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for index, module_type in enumerate(module_types):
        dropped = kept is not None and not kept[index]
        ax.plot(
            steps,
            history[:, index],
            color=colors[module_type],
            ls="--" if dropped else "-",
            lw=0.8 if dropped else 1.3,
            alpha=0.8,
        )
    handles = [Line2D([], [], color=colors[t], lw=2, label=t) for t in types]
    if kept is not None:
        handles += [
            Line2D([], [], color="gray", ls="-", label="kept"),
            Line2D([], [], color="gray", ls="--", label="dropped"),
        ]
    if discretized_at is not None:
        ax.axvline(discretized_at, color="black", ls=":", lw=1.2)
        handles.append(Line2D([], [], color="black", ls=":", label="discretization"))
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


def budget_curve(groups: Sequence[dict[str, Any]], budget_free: Callable[[str], bool]):
    """The primary metric against the budget: one panel per backbone and task, one line per method.

    Points are the mean over seeds, error bars the sample standard deviation (the legend says
    how many seeds). A method that ignores the budget (``budget_free``) and was run
    at a single budget is drawn as a dashed horizontal line with a +-std band, a reference for
    the methods that select modules. The y axis spans at least 10 dev examples' worth of the
    metric (its label states the dev set's size), so a one-example difference is not drawn as
    a trend.

    Args:
        groups: Rows from :func:`diffora_lab.report.aggregate`.
        budget_free: Whether a method ignores the budget.

    Returns:
        The matplotlib figure (the caller saves or shows, then closes it).
    """
    panels = sorted({(g["backbone"], g["task"]) for g in groups})
    # One colour per method and rank, the same in every panel.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = sorted({(g["method"], g["rank"]) for g in groups})
    colors = {key: palette[i % len(palette)] for i, key in enumerate(keys)}
    count = max(1, len(panels))
    fig, axes = plt.subplots(1, count, figsize=(5.0 * count, 4.0), squeeze=False)
    for ax, (backbone, task) in zip(axes[0], panels):
        rows = [g for g in groups if (g["backbone"], g["task"]) == (backbone, task)]
        ranks = {g["rank"] for g in rows}
        budgets = sorted({g["budget"] for g in rows})
        series: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for g in rows:
            series.setdefault((g["method"], g["rank"]), []).append(g)
        for (method, rank), points in sorted(series.items()):
            points = sorted(points, key=lambda g: g["budget"])
            seeds = sorted({p["runs"] for p in points})
            label = method if len(ranks) == 1 else f"{method} r={rank}"
            label += f" ({'-'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})"
            means = [p["mean"] for p in points]
            stds = [p["std"] or 0.0 for p in points]
            color = colors[method, rank]
            if budget_free(method) and len(points) == 1 and len(budgets) > 1:
                ax.axhline(means[0], color=color, ls="--", lw=1.2, label=f"{label}, budget-free")
                ax.axhspan(means[0] - stds[0], means[0] + stds[0], color=color, alpha=0.15)
                continue
            ax.errorbar(
                [p["budget"] for p in points],
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                color=color,
                label=label,
            )
        ax.set_title(f"{task} ({backbone})")
        ax.set_xlabel("budget (fraction of modules kept)")
        ax.set_ylabel(_metric_label(rows))
        if budgets:
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        _unzoomed_ylim(ax, rows)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="mean ± std over seeds", title_fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> Path:
    """Saves (cropped to its content) and closes a figure; long runs must not pile up figures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return path
