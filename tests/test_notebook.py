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


def fake_run(folder: Path, method: str, seed: int, score: float, **fields) -> None:
    """A finished run's results.json (and its dam/mask.json when it selected modules)."""
    modules = [f"layer.{i}.{t}" for i in range(2) for t in ("q", "v")]
    results = {
        "task": "synthetic",
        "method": method,
        "backbone": "fake_backbone",  # never grouped with the real runs
        "budget": 0.5,
        "rank": 8,
        "seed": seed,
        "params_trainable": 100,
        "k": 2,
        "candidate_modules": 4,
        "steps": 40,
        "primary_metric": "val/accuracy",
        "metrics": {"val/accuracy": score},
        **fields,
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    if results.get("search_variant"):
        kept = [True, False, False, True] if seed % 2 else [True, True, False, False]
        mask = {
            "modules": modules,
            "gates": [0.9 if flag else 0.1 for flag in kept],
            "kept": kept,
            "budget": 0.5,
            "k": 2,
            "step": 20,
            "shape": [2, 2],
            "module_types": ["q", "v"],
            "source": "search",
        }
        (folder / "dam").mkdir()
        (folder / "dam" / "mask.json").write_text(json.dumps(mask))


@pytest.mark.slow
def test_notebook_runs_on_real_runs_and_groups_as_the_report_does(runs_dir, tmp_path, monkeypatch):
    """One kernel run over two folders: the real runs (two backbones whose masks cannot be
    averaged) and hand-written results.json files (two presets, a LoRA with and without a
    budget, a repeated seed). The notebook draws its figures and groups every run as the
    report does."""
    from diffora_lab import report

    shapes = set()
    for job in range(len(RUNS)):
        assert (runs_dir / str(job) / "results.json").is_file()
        mask = json.loads((runs_dir / str(job) / "dam" / "mask.json").read_text())
        shapes.add(tuple(mask["shape"]))
    assert len(shapes) == 2  # the masks cannot be averaged together

    fake = tmp_path / "fake"
    default = {"relaxation": "sigmoid", "progressive": True, "budget_penalty": 0.0}
    faithful = {**default, "progressive": False}
    for seed in (1, 2):
        fake_run(fake / f"d{seed}", "diffora", seed, 0.8, preset="default",
                 search_variant=default)  # fmt: skip
        fake_run(fake / f"f{seed}", "diffora", seed, 0.6, preset="faithful",
                 search_variant=faithful)  # fmt: skip
        fake_run(fake / f"l{seed}", "lora", seed, 0.7, budget=None if seed == 2 else 0.5)
    fake_run(fake / "f1_again", "diffora", 1, 0.6, preset="faithful", search_variant=faithful)
    with pytest.warns(UserWarning, match="seed 1 occurs more than once"):
        groups = report.aggregate(report.collect([runs_dir, fake]))
    keys = ("backbone", "task", "method", "search", "budget", "rank")
    expected = [[g[k] for k in keys] for g in groups]
    assert [row[2:5] for row in expected if row[0] == "fake_backbone"] == [
        ["diffora", "sigmoid+progressive", 0.5],
        ["diffora_faithful", "sigmoid", 0.5],
        ["lora", None, None],
    ]

    monkeypatch.setenv("DIFFORA_RUNS", os.pathsep.join([str(runs_dir), str(fake)]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Read the notebook's own grouping back: its groups, and those of its survival table.
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "print('GROUPING', json.dumps({'groups': [list(k) for k in GROUPS], "
            "'survival': sorted({tuple(map(str, i[:-1])) for i in counts.index.tolist()})}))"
        )
    )
    client = NotebookClient(
        notebook,
        timeout=900,  # per cell: a hang guard, not a speed limit
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    assert [out for out in outputs if "image/png" in out.get("data", {})]
    text = "".join(out.get("text", "") for out in outputs)
    assert f"{len(RUNS) + 7} runs from 2 folders" in text  # DIFFORA_RUNS was honoured
    # One survival panel per backbone (titles are in the figures; the table is text/html).
    html = json.dumps([out.get("data", {}).get("text/html", "") for out in outputs])
    assert "tiny_deberta_3l" in html and "tiny_deberta<" in html
    grouping = json.loads(text.split("GROUPING ", 1)[1].splitlines()[0])
    assert grouping["groups"] == expected
    # The survival table keeps the presets apart (and has no row for LoRA, which keeps all).
    fake_rows = [row for row in grouping["survival"] if row[0] == "fake_backbone"]
    assert [row[2] for row in fake_rows] == ["diffora", "diffora_faithful"]
    assert "seed 1 repeated!" in text  # the repeated seed of the faithful group is flagged
