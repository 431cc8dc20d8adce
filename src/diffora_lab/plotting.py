"""Figures of the DAM: the layers x module-types heatmap and gate trajectories."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def dam_heatmap(
    gates: np.ndarray,
    module_types: list[str],
    title: str,
    kept: np.ndarray | None = None,
):
    """A layers x types heatmap of gate values; kept modules (if given) are outlined."""
    layers = gates.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(module_types), 1.0 + 0.35 * layers))
    image = ax.imshow(gates, vmin=0.0, vmax=max(1e-6, float(gates.max())), cmap="viridis")
    ax.set_xticks(range(len(module_types)), module_types, rotation=45, ha="right")
    ax.set_yticks(range(layers), [str(i) for i in range(layers)])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    if kept is not None:
        for i, j in zip(*np.nonzero(kept)):
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def gate_trajectories(steps: list[int], history: np.ndarray, labels: list[str]):
    """Modules x time image of the gates over the search (history: time x modules)."""
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.12 * history.shape[1]))
    image = ax.imshow(history.T, aspect="auto", cmap="viridis", interpolation="nearest")
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int)
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_yticks(range(len(labels)), labels, fontsize=5)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> Path:
    """Saves and closes a figure (long runs must not accumulate open figures)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
