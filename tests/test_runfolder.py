"""One owner per run folder, history that survives a kill and a resume, no silent rewrite.

Runs are real smoke runs (tiny DeBERTa, CSV logger) called in-process; the lock is also held by a
real second process.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config

from diffora_lab.callbacks import RunClock
from diffora_lab.checkpointing import STATE_FORMAT, STATE_KEY, our_state
from diffora_lab.module import TrainingModule
from diffora_lab.runfolder import RunFolderBusy, RunFolderLock
from diffora_lab.train import ConfigError, run


def smoke(out: Path, *overrides: str) -> dict:
    return run(compose_config(["+experiment=smoke", *overrides], out), out)


def csv_rows(out: Path) -> list[dict]:
    with (out / "csv" / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def by_key(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` in file order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            # "epoch" rides along on every row (train and dev rows share a step).
            if key not in ("step", "epoch") and value not in ("", None):
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    return int(done.stdout)


# ----------------------------------------------------------------------------------- lock


def test_lock_refuses_a_live_holder_and_takes_over_a_killed_ones(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from diffora_lab.runfolder import RunFolderLock; "
            "RunFolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            RunFolderBusy, match=rf"pid {holder.pid} on host {socket.gethostname()}"
        ):
            RunFolderLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays behind
        holder.wait(timeout=30)
    assert json.loads((folder / ".lock").read_text())["pid"] == holder.pid
    with RunFolderLock(folder):
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    assert f"left by pid {holder.pid}" in caplog.text
    assert not (folder / ".lock").exists()  # released on exit


# ----------------------------------------------------------------------- history and resume


@pytest.fixture(scope="module")
def reference(reference_run) -> tuple[Path, dict]:
    """The session's shared smoke run (conftest): read-only here."""
    return reference_run.out, reference_run.results


@pytest.mark.slow
def test_history_survives_a_kill_and_resume(reference, tmp_path):
    """Stopped at 10, continued to 14, then "killed" back to its step-10 checkpoint (records of
    steps 10-14 already written) with a half-written checkpoint left behind, then resumed: the
    CSV history and the gate records are the uninterrupted run's, without duplicates, and the
    wall and fit times add up over the three processes."""
    ref_out, ref_results = reference
    smoke(tmp_path, "train.stop_after=10")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    at_ten = tmp_path / "at_ten.ckpt"
    shutil.copyfile(ckpt, at_ten)
    # Rows after the step-10 checkpoint: a stop logs none of its own (issue 23), so this
    # segment logs every 2 steps (a setting a resume may change).
    smoke(tmp_path, "train.stop_after=14", "train.log_every=2")
    assert max(int(r["step"]) for r in csv_rows(tmp_path)) >= 13
    shutil.copyfile(at_ten, ckpt)
    stale = tmp_path / "checkpoints" / f".last.ckpt.{dead_pid()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    clock = torch.load(at_ten, weights_only=True)["callbacks"]["RunClock"]

    began = time.time()
    results = smoke(tmp_path)
    this_process = time.time() - began

    assert results["steps"] == 40 and not stale.exists()
    mine, ref = by_key(csv_rows(tmp_path)), by_key(csv_rows(ref_out))
    for key, series in mine.items():
        steps = [step for step, _ in series]
        assert steps == sorted(set(steps)), f"{key}: duplicate or unordered steps {steps}"
    for key, series in ref.items():
        ours = dict(mine[key])
        for step, value in series:
            assert ours[step] == pytest.approx(value, abs=1e-5), (key, step)
    records = [
        json.loads(line) for line in (tmp_path / "dam" / "gates.jsonl").read_text().splitlines()
    ]
    ref_records = [
        json.loads(line) for line in (ref_out / "dam" / "gates.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [r["step"] for r in ref_records]
    # Inequalities that hold by construction on any machine (results round to 0.01 s): this
    # process added its own time, which lies within the test's measure of it and includes its
    # fit time. The arithmetic itself is checked exactly with a fake clock below.
    wall_added = results["wall_seconds"] - clock["wall_seconds"]
    fit_added = results["fit_seconds"] - clock["fit_seconds"]
    assert clock["fit_seconds"] > 0 and fit_added > 0
    assert fit_added - 0.01 <= wall_added <= this_process + 0.01
    assert results["metrics"] == pytest.approx(ref_results["metrics"])


class FakeClock:
    """A time source the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_run_clock_adds_wall_and_fit_time_over_resumes_exactly():
    now = FakeClock(100.0)
    first = RunClock(100.0, now=now)  # the process starts at 100
    now.now = 103.0
    first.on_fit_start(None, None)  # 3 s of set-up before the fit
    now.now = 110.0
    saved = first.state_dict()  # the checkpoint at 110
    assert saved == {"wall_seconds": 10.0, "fit_seconds": 7.0}

    now.now = 500.0  # a resumed process: 2 s of set-up, then 5 s of fit
    resumed = RunClock(500.0, now=now)
    resumed.load_state_dict(saved)
    assert (resumed.wall_seconds(), resumed.fit_seconds()) == (10.0, 7.0)
    now.now = 502.0
    resumed.on_fit_start(None, None)
    now.now = 507.0
    assert (resumed.wall_seconds(), resumed.fit_seconds()) == (17.0, 12.0)

    # A reused search's checkpoint carries another run's time: none of it is this run's.
    reuser = RunClock(500.0, restore=False, now=now)
    reuser.load_state_dict(saved)
    assert (reuser.wall_seconds(), reuser.fit_seconds()) == (7.0, 0.0)
    reuser.on_fit_start(None, None)
    now.now = 508.0
    assert (reuser.wall_seconds(), reuser.fit_seconds()) == (8.0, 1.0)


@pytest.mark.slow
def test_finished_folder_is_rerun_only_with_overwrite(tmp_path):
    short = ("train.max_steps=8", "dam.warmup_steps=1", "train.val_every=4")
    first = smoke(tmp_path, *short)
    written = (tmp_path / "results.json").read_bytes()
    rows = csv_rows(tmp_path)
    with pytest.raises(ConfigError, match="overwrite=true"):
        smoke(tmp_path, *short, "seed=7")
    assert (tmp_path / "results.json").read_bytes() == written
    assert csv_rows(tmp_path) == rows

    again = smoke(tmp_path, *short, "seed=7", "overwrite=true")
    assert (again["seed"], again["steps"]) == (7, 8) and first["seed"] == 42
    assert json.loads((tmp_path / "results.json").read_text())["seed"] == 7
    for key, series in by_key(csv_rows(tmp_path)).items():
        steps = [step for step, _ in series]
        assert steps == sorted(set(steps)), key  # the first run's rows are gone, not mixed in


# ------------------------------------------------------------------------------ divergence


@pytest.mark.slow
@pytest.mark.parametrize(
    ("clip", "every", "expected", "absent"),
    [
        ("0", "50", ["no checkpoint was written", "enable train.grad_clip"], []),
        ("1.0", "1", ["the last checkpoint is"], ["grad_clip"]),
    ],
    ids=["no-clip-no-checkpoint", "clip-on-checkpoint"],
)
def test_divergence_advice_matches_the_run(tmp_path, clip, every, expected, absent):
    with pytest.raises(FloatingPointError) as stopped:
        smoke(tmp_path, "train.lr=1e30", f"train.grad_clip={clip}", f"train.ckpt_every={every}")
    message = str(stopped.value)
    assert "non-finite" in message and "lower train.lr or dam.arch_lr" in message
    for text in expected:
        assert text in message
    for text in absent:
        assert text not in message
    if "the last checkpoint is" in message:
        named = Path(message.split("the last checkpoint is ")[1].split(" (step")[0])
        assert named.is_file()
        step = int(message.split("(step ")[1].split(")")[0])
        assert torch.load(named, weights_only=True)[STATE_KEY]["step"] == step


@pytest.mark.parametrize(
    "checkpoint, made",
    [
        ({"state_dict": {}}, "no diffora_lab state"),
        ([1, 2], "no diffora_lab state"),
        ({STATE_KEY: {"format": 1, "step": 3}}, "checkpoint format 1"),
        ({STATE_KEY: {"format": STATE_FORMAT}}, f"checkpoint format {STATE_FORMAT}"),
    ],
)
def test_foreign_checkpoint_state_is_refused_on_both_paths(checkpoint, made):
    """The one format check serves the early check and Lightning's own loading hook alike."""
    with pytest.raises(ValueError, match=f"x.ckpt was not written by this version.*{made}"):
        our_state(checkpoint, "x.ckpt")
    # Lightning's hook (trainer.fit(ckpt_path=...) called directly) runs the same check first.
    with pytest.raises(ValueError, match=f"not written by this version.*{made}"):
        TrainingModule.on_load_checkpoint(None, checkpoint)
    ours = {STATE_KEY: {"format": STATE_FORMAT, "step": 7}}
    assert our_state(ours, "x.ckpt")["step"] == 7
