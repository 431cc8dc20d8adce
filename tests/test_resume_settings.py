"""A resume is the same run: it checks every setting that shapes the result (resume.py), a
requeued ``overwrite=true`` command continues, and a rerun of a finished run (alone or in a sweep)
is skipped, not redone. Refusals of changed settings are rows of the README's bad-input table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose_config, run_main

from diffora_lab.resume import RESUME_SAFE, setting_differences
from diffora_lab.train import run

SHORT = ("+experiment=smoke", "train.max_steps=8", "dam.warmup_steps=1", "train.val_every=4")


def short_run(out: Path, *overrides: str) -> dict:
    return run(compose_config([*SHORT, *overrides], out), out)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_setting_differences_name_each_setting_with_both_values():
    saved = {"budget": 0.5, "train": {"lr": 0.005, "log_every": 10}, "dam": {"betas": [0.5, 1]}}
    current = {"budget": 0.25, "train": {"lr": 0.005, "log_every": 5}, "dam": {"betas": [0.9, 1]}}
    current["logger"] = {"name": "csv"}  # a whole group that is safe to change
    assert setting_differences(saved, current) == [
        "budget=0.5 there, budget=0.25 here",
        "dam.betas=[0.5, 1] there, dam.betas=[0.9, 1] here",
    ]
    assert setting_differences({"rank": 8}, {"rank": 8.0, "seed": 1}) == [
        "seed=(not set) there, seed=1 here"
    ]
    assert "train.stop_after" in RESUME_SAFE and "budget" not in RESUME_SAFE


def test_a_requeued_overwrite_command_resumes_the_unfinished_run(tmp_path, capsys):
    stopped = short_run(tmp_path, "train.stop_after=3")
    assert stopped["stopped_at"] == 3
    capsys.readouterr()
    # As a requeued job runs it: overwrite=true (and safe changes) on an unfinished folder.
    results = short_run(tmp_path, "overwrite=true", "train.log_every=2")
    out = capsys.readouterr().out
    assert "resuming from checkpoint at step 3 of 8" in out
    assert "starting fresh" not in out
    assert results["steps"] == 8


def test_a_finished_run_rerun_as_it_was_is_skipped_and_left_alone(tmp_path, capsys):
    first = short_run(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    again = short_run(tmp_path, "trainer.enable_progress_bar=false")  # a safe difference
    out = capsys.readouterr().out
    assert f"{tmp_path} holds this run, finished" in out and "skipped" in out
    assert again == first
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_an_interrupted_sweep_continues_when_run_again(tmp_path):
    """A 2-job sweep killed (SIGTERM) in its second job, then the same command again: the first
    job is skipped (not trained again), the second resumes and both end finished."""
    sweep = tmp_path / "sweep"
    args = [
        sys.executable, "-m", "diffora_lab", "-m", "+experiment=smoke", "budget=0.25,0.5",
        f"hydra.sweep.dir={sweep}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=100", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # The second job has trained (its first checkpoint, 10 steps after the shared search's end at
    # step 50: 40 steps are left when the signal is sent; its gates.jsonl may come from the
    # shared search's cache entry before it trains at all).
    trained = sweep / "1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not trained.is_file():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the second job did not start training"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    first = (sweep / "0" / "results.json").read_bytes()
    assert not (sweep / "1" / "results.json").exists()

    again = run_main(args[3:], tmp_path)  # the same command (in this process: conftest.run_main)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{sweep / '0'} holds this run, finished" in again.stdout
    assert "diffora_lab: resuming from checkpoint at step" in again.stdout
    assert (sweep / "0" / "results.json").read_bytes() == first  # not trained again
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [(r["budget"], r["steps"]) for r in results] == [(0.25, 100), (0.5, 100)]


# ----------------------------------------------------------------------------- records


def csv_rows(out: Path) -> dict[tuple[int, tuple[str, ...]], dict[str, float]]:
    """``{(step, metric names): values}`` of ``csv/metrics.csv`` (each row once)."""
    import csv

    rows: dict[tuple[int, tuple[str, ...]], dict[str, float]] = {}
    with (out / "csv" / "metrics.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if v and k not in ("step", "epoch")}
            key = (int(row["step"]), tuple(sorted(values)))
            assert key not in rows, f"row {key} twice"
            rows[key] = values
    return rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run(compose_config(["+experiment=smoke"], out), out)
    return out


@pytest.mark.parametrize(
    "stop_at",
    [  # the stop at the cut is the fast tier's; the stops beside it are the full suite's
        pytest.param(11, id="off-the-log-schedule", marks=pytest.mark.slow),
        pytest.param(20, id="at-the-cut"),
        pytest.param(21, id="right-after-the-cut", marks=pytest.mark.slow),
    ],
)
def test_a_stopped_and_resumed_run_records_what_an_uninterrupted_one_does(
    uninterrupted, tmp_path, stop_at
):
    """The discretization's row (gap, kept, dev before/after) survives a stop at or right after
    the cut; a stop adds no train or dev row the schedule lacks; the search's metrics are not
    repeated after it ends."""
    cfg = compose_config(["+experiment=smoke", f"train.stop_after={stop_at}"], tmp_path)
    stopped = run(cfg, tmp_path)
    assert stopped["stopped_at"] == stop_at
    run(compose_config(["+experiment=smoke"], tmp_path), tmp_path)
    mine, reference = csv_rows(tmp_path), csv_rows(uninterrupted)
    assert sorted(mine) == sorted(reference)
    for key, values in reference.items():
        assert mine[key] == pytest.approx(values, abs=1e-5), key
    cut = [key for key in reference if "dam/val_before" in key[1]]
    assert [step for step, _ in cut] == [20]
    after = [names for step, names in reference if step > 20]
    assert after and not any(n.startswith(("search/", "dam/")) for names in after for n in names)
