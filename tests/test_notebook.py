"""notebooks/dam_analysis.ipynb runs top to bottom on real (tiny) runs and draws its figures."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import nbformat  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

import diffora_lab.__main__ as cli  # noqa: E402
from diffora_lab.train import run  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dam_analysis.ipynb"
# 12 of the smoke experiment's 40 steps: still a searched DAM, gate records and a mask. Two
# backbones whose masks have different shapes (2 and 3 layers): the notebook must not average
# them (tests/test_report.py covers grouping over budgets and seeds).
RUNS = (
    ("budget=0.5",),
    ("budget=0.5", "backbone.name=tiny_deberta_3l", "backbone.config.num_hidden_layers=3"),
)
SHORT = ("train.max_steps=12", "dam.log_every=2", "logger=none")


def smoke_config(tmp: Path, *overrides: str):
    """The smoke experiment composed as the CLI would, with its data cache under ``tmp``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=["+experiment=smoke", f"data.cache_dir={tmp}/cache", *overrides],
        )


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """A multirun-like folder with one finished DiffoRA run per entry of ``RUNS``."""
    root = tmp_path_factory.mktemp("notebook")
    cli.quiet_libraries()
    for job, overrides in enumerate(RUNS):
        cfg = smoke_config(root, *overrides, *SHORT)
        run(cfg, root / "multirun" / str(job))
    GlobalHydra.instance().clear()
    return root / "multirun"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_notebook_executes_on_real_runs(runs_dir, monkeypatch):
    shapes = set()
    for job in range(len(RUNS)):
        assert (runs_dir / str(job) / "results.json").is_file()
        mask = json.loads((runs_dir / str(job) / "dam" / "mask.json").read_text())
        shapes.add(tuple(mask["shape"]))
    assert len(shapes) == 2  # the masks cannot be averaged together
    monkeypatch.setenv("DIFFORA_RUNS", str(runs_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=900,  # per cell: a hang guard, not a speed limit
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 1
    text = json.dumps([out.get("text", "") for out in outputs])
    assert f"{len(RUNS)} runs from 1 folders" in text  # DIFFORA_RUNS was honoured
    # One survival panel per backbone (titles are in the figures; the table is text/html).
    html = json.dumps([out.get("data", {}).get("text/html", "") for out in outputs])
    assert "tiny_deberta_3l" in html and "tiny_deberta<" in html
