"""Every value checked before anything is written, beyond the README's bad-input table: NaN in any
setting, degenerate data (warned in the summary), methods without a budget, evaluate's and
report's arguments, and writes that fail (a folder that cannot be made, a full disk)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from diffora_lab import evaluate, report
from diffora_lab.config import validate
from diffora_lab.train import ConfigError, run

SHORT = ("+experiment=smoke", "train.max_steps=8", "dam.warmup_steps=1", "train.val_every=4")


def short_run(out: Path, *overrides: str) -> dict:
    return run(compose_config([*SHORT, *overrides], out), out)


def number_settings(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from number_settings(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix


SMOKE = OmegaConf.to_container(compose_config(["+experiment=smoke"]), resolve=True)


SETTINGS = sorted(number_settings(SMOKE))


@pytest.mark.parametrize(
    "setting, value", [(s, ("nan", "inf", "-inf")[i % 3]) for i, s in enumerate(SETTINGS)]
)
def test_every_number_setting_refuses_nan_and_infinity(setting, value):
    cfg = compose_config(["+experiment=smoke", f"{setting}={value}"])
    with pytest.raises(ValueError, match=rf"^{setting}={value}: must be a finite number\."):
        validate(cfg)


def write_sst2(root: Path, train_rows: list[str]) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("\n".join(["sentence\tlabel", *train_rows]) + "\n")
    dev = [f"a fine film {i}\t1" for i in range(4)] + [f"a dull plot {i}\t0" for i in range(4)]
    (folder / "dev.tsv").write_text("\n".join(["sentence\tlabel", *dev]) + "\n")
    return root


def test_degenerate_data_is_warned_in_the_summary_and_results(tmp_path, capsys):
    # 12 rows of one class, 3 of them empty; 2 go to the search split, 10 < a batch of 16.
    rows = [f"a fine film {i}\t1" for i in range(9)] + ["\t1"] * 3
    data = write_sst2(tmp_path / "glue", rows)
    results = short_run(tmp_path / "run", "task=sst2", f"task.data_dir={data}")
    assert results["warnings"] == [
        "every train example has label 1: a model that always answers it scores the majority "
        "rate, whatever it learned",
        "10 training example(s), fewer than train.batch_size=16: every step sees the same examples",
        "3 of 12 train examples have empty text",
    ]
    printed = capsys.readouterr().out
    assert all(f"warning             {w}" in printed for w in results["warnings"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["warnings"] == results["warnings"]


def test_a_method_without_a_budget_records_none(tmp_path):
    results = short_run(tmp_path, "method=lora", "budget=0.3")
    assert results["budget"] is None
    assert json.loads((tmp_path / "results.json").read_text())["budget"] is None


# -------------------------------------------------------------------- evaluate and report


@pytest.fixture(scope="module")
def bitfit_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A finished and a stopped BitFit run (scored from their checkpoints)."""
    root = tmp_path_factory.mktemp("bitfit")
    short_run(root / "finished", "method=bitfit")
    short_run(root / "stopped", "method=bitfit", "train.stop_after=3")
    return root / "finished", root / "stopped"


def test_evaluate_refuses_an_unfinished_run_or_labels_it(bitfit_runs, capsys):
    _, stopped = bitfit_runs
    assert evaluate.main([str(stopped)]) == 2
    err = capsys.readouterr().err
    assert f"{stopped} has not finished (no results.json; its checkpoint is at step 3 of 8)" in err
    assert "--unfinished" in err
    assert evaluate.main([str(stopped), "--unfinished"]) == 0
    captured = capsys.readouterr()
    assert "note:" in captured.err and "step 3 of 8" in captured.err
    assert "val/accuracy" in captured.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size: '0': a whole number >= 1"),
        (["--json", "{tmp}/missing/metrics.json"], "no folder {tmp}/missing"),
    ],
    ids=["batch-size-0", "json-into-missing-folder"],
)
def test_evaluate_arguments_are_checked_first(bitfit_runs, tmp_path, capsys, args, message):
    finished, _ = bitfit_runs
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as refused:
        evaluate.main([str(finished), *args])
    assert refused.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_evaluate_names_a_damaged_run_config(bitfit_runs, tmp_path, capsys):
    finished, _ = bitfit_runs
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns("cache"))
    (copy / ".hydra").mkdir()
    (copy / ".hydra" / "config.yaml").write_text("task: [unclosed\n")
    assert evaluate.main([str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy}/.hydra/config.yaml is damaged (" in err and "Traceback" not in err


def test_report_takes_a_results_file_and_refuses_an_out_that_is_a_file(bitfit_runs, capsys):
    finished, _ = bitfit_runs
    assert report.main([str(finished / "results.json")]) == 0
    assert (finished / "report.md").is_file()
    capsys.readouterr()
    assert report.main([str(finished), "--out", str(finished / "results.json")]) == 2
    assert f"--out {finished / 'results.json'} is a file; give a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------- failed writes


def test_a_run_folder_that_cannot_be_made_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"hydra.run.dir='{blocker}/run': {blocker}/run: "):
        short_run(blocker / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_refused_naming_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            short_run(folder)
    finally:
        folder.chmod(0o700)


def _file_size_limit() -> None:  # writes past 120 kB fail as on a full disk (no signal)
    resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.slow
def test_a_full_disk_ends_with_exit_2_naming_the_file(tmp_path):
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "diffora_lab", "+experiment=smoke", f"hydra.run.dir={tmp_path}/run",
         f"data.cache_dir={tmp_path}/cache", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"), preexec_fn=_file_size_limit,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"diffora_lab: error: {tmp_path}/run/" in done.stderr
    assert "MB free there" in done.stderr and "Traceback" not in done.stderr
