"""Scale-out and reliability through the real CLI: DDP, submitit, signals, divergence, wheels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli as cli
from conftest import run_main

from diffora_lab.module import STATE_KEY

REPO = Path(__file__).resolve().parents[1]


def smoke_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["+experiment=smoke", f"data.cache_dir={tmp_path / 'cache'}", *extra]


@pytest.mark.slow
def test_ddp_two_processes_agree(tmp_path):
    """Two ranks, with the speed-ups that change what a rank does on its own: length-bucketed
    batches (each rank its slice of a global batch: our sampler, not Lightning's), the deferred
    non-finite check (every rank reads its flag at the same steps) and the foreach AdamW."""
    run = tmp_path / "ddp"
    done = cli(
        smoke_args(
            tmp_path,
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "dam.reuse_search=false",
            "data.bucketing=8",
            "train.finite_check_every=5",
            "train.optimizer=foreach",
            f"hydra.run.dir={run}",
        ),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2
    # Both ranks ended with bit-identical gates, mask and trainable weights.
    assert results["ranks_consistent"] is True
    mask = json.loads((run / "dam" / "mask.json").read_text())
    assert sum(mask["kept"]) == mask["k"] == len(results["kept_modules"])


@pytest.mark.slow
def test_submitit_local_sweep_runs_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    done = cli(
        [
            "-m",
            *smoke_args(tmp_path),
            "hydra/launcher=submitit_local",
            "budget=0.25,0.5",
            "budget_unit=modules",
            f"hydra.sweep.dir={sweep}",
            f"dam.search_cache_dir={tmp_path / 'search'}",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ks = sorted(json.loads((sweep / str(i) / "results.json").read_text())["k"] for i in (0, 1))
    assert ks == [3, 6]  # 12 candidates: round(0.25 * 12), round(0.5 * 12)
    assert (sweep / ".submitit").is_dir()


def interrupt_training(tmp_path: Path, signum: int) -> tuple[Path, list[str], object, str, str]:
    """Starts a 120-step smoke run, sends ``signum`` once training is under way, waits for it.

    Returns the run folder, the CLI arguments (to resume with), the process, stdout and stderr.
    """
    run = tmp_path / "run"
    args = smoke_args(
        tmp_path, "train.max_steps=120", "train.ckpt_every=1000", f"hydra.run.dir={run}"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffora_lab", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    gates = run / "dam" / "gates.jsonl"
    # A hang guard, not a speed limit: starting takes minutes on a loaded 2-core machine.
    deadline = time.time() + 900
    while not (gates.is_file() and len(gates.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "training did not start within 15 minutes"
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=900)
    return run, args, proc, out, err


def checkpoint_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)[STATE_KEY]["step"]


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_run_resumes(tmp_path):
    run, args, proc, _, err = interrupt_training(tmp_path, signal.SIGTERM)
    assert proc.returncode == 143, err[-3000:]  # interrupted, not finished
    assert 1 <= checkpoint_step(run) < 120
    assert not (run / "results.json").exists()

    resumed = run_main(args, tmp_path)  # ckpt_path=last is the default
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 120


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_130_like_sigterm(tmp_path):
    """Ctrl-C mid-training: the checkpoint is written, the message says how to continue, and the
    exit code is the shell's 128 + SIGINT (it was 1, with nothing printed)."""
    run, _, proc, out, err = interrupt_training(tmp_path, signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    stopped_at = checkpoint_step(run)
    assert f"stopped at step {stopped_at} of 120; continue with ckpt_path=last" in out
    assert "Traceback" not in err
    assert not (run / "results.json").exists() and not (run / ".lock").exists()


@pytest.mark.slow
def test_divergence_stops_with_step_and_phase(tmp_path):
    done = run_main(
        smoke_args(tmp_path, "train.lr=1e30", "train.grad_clip=0", f"hydra.run.dir={tmp_path}/r"),
        cwd=tmp_path,
    )
    assert done.returncode == 3
    assert "non-finite" in done.stderr and "at step" in done.stderr
    assert "phase 'search'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_wheel_carries_configs_and_runs_from_elsewhere(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("diffora_lab-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "diffora_lab/conf/config.yaml" in names
        assert "diffora_lab/conf/experiment/smoke.yaml" in names
        archive.extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = cli(
        smoke_args(tmp_path, "train.max_steps=12", "hydra.run.dir=out"),
        cwd=elsewhere,
        env_extra={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (elsewhere / "out" / "results.json").is_file()
    probe = subprocess.run(
        [sys.executable, "-c", "import diffora_lab.__main__ as m; print(m.config_dir())"],
        cwd=elsewhere,
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip().startswith(str(tmp_path / "site"))
