"""Figures of the DAM: the layers x module-types heatmap and the gate trajectories.

Every heatmap of a run uses the same colour scale, [0, 1] (a gate is a sigmoid or softmax value),
so frames of one search compare at a glance: a frame scaled to its own maximum would draw the
all-0.5 DAM of step 0 like the DAM after the search.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

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
    ax.set_xlabel("step")
    ax.set_ylabel("gate value")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def save(fig, path: str | Path) -> Path:
    """Saves (cropped to its content) and closes a figure; long runs must not pile up figures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return path
