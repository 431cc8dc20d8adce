"""DAM figures: one colour scale for every frame, labelled, explained, cropped; trajectories."""

from __future__ import annotations

import matplotlib.image
import matplotlib.pyplot
import numpy as np
import pytest
from matplotlib.image import AxesImage

from diffora_lab import plotting

TYPES = ["q", "k", "v", "o", "ffn_in", "ffn_out"]


def _image(fig) -> AxesImage:
    (image,) = [a for a in fig.axes[0].get_children() if isinstance(a, AxesImage)]
    return image


@pytest.mark.parametrize("level", [0.5, 0.72, 0.05])
def test_every_heatmap_frame_has_the_scale_zero_to_one(level):
    fig = plotting.dam_heatmap(np.full((6, 6), level), TYPES, "DAM step 0")
    assert _image(fig).get_clim() == (0.0, 1.0)
    colorbar_axes = fig.axes[1]
    assert colorbar_axes.get_ylabel() == "gate value"
    matplotlib.pyplot.close(fig)


def test_mask_frame_explains_its_outline(tmp_path):
    gates = np.linspace(0.3, 0.8, 36).reshape(6, 6)
    kept = gates > 0.55
    fig = plotting.dam_heatmap(gates, TYPES, "DAM step 75", kept=kept)
    outlined = [p for p in fig.axes[0].patches if not p.get_fill()]
    assert len(outlined) == int(kept.sum())
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("outline" in t and "kept" in t for t in texts), texts
    plotting.save(fig, tmp_path / "mask.png")


def _margin_fraction(path) -> float:
    """Share of the image's rows and columns that are blank at its borders."""
    pixels = matplotlib.image.imread(str(path))[..., :3]
    blank_rows = np.all(pixels > 0.99, axis=(1, 2))
    blank_cols = np.all(pixels > 0.99, axis=(0, 2))

    def border(flags):
        count = 0
        for side in (flags, flags[::-1]):
            count += int(np.argmin(side)) if not side.all() else len(side)
        return count / len(flags)

    return max(border(blank_rows), border(blank_cols))


def test_saved_heatmap_has_no_empty_margin(tmp_path):
    path = plotting.save(
        plotting.dam_heatmap(np.full((12, 6), 0.5), TYPES, "DAM step 0"), tmp_path / "h.png"
    )
    assert _margin_fraction(path) < 0.05


def test_trajectories_are_lines_kept_solid_dropped_dashed_with_discretization():
    steps = [0, 10, 20, 30]
    history = np.linspace(0.4, 0.6, 4 * 12).reshape(4, 12)
    kept = [i % 3 == 0 for i in range(12)]
    fig = plotting.gate_trajectories(
        steps, history, TYPES * 2, kept=kept, discretized_at=30, title="gates"
    )
    ax = fig.axes[0]
    module_lines = [line for line in ax.lines if len(line.get_xdata()) == len(steps)]
    assert len(module_lines) == 12
    for line, keep in zip(module_lines, kept):
        assert line.get_linestyle() == ("-" if keep else "--")
    vertical = [line for line in ax.lines if list(line.get_xdata()) == [30, 30]]
    assert len(vertical) == 1
    assert ax.get_title() == "gates"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "gate value")
    assert ax.get_ylim()[0] <= 0.0 and ax.get_ylim()[1] >= 1.0  # the whole gate range
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"kept", "dropped", "discretization", *TYPES} <= set(labels)


def test_trajectories_before_discretization_are_all_solid():
    fig = plotting.gate_trajectories([0, 5], np.full((2, 6), 0.5), TYPES)
    assert {line.get_linestyle() for line in fig.axes[0].lines} == {"-"}
