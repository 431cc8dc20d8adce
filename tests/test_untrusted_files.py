"""A file is data, never code: every checkpoint, snapshot and cache entry loads with
``weights_only=True``, and a crafted pickle is refused (exit 2) before anything in it runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_main

from diffora_lab.checkpointing import AtomicCheckpointIO, UnsafeFile, read_checkpoint
from diffora_lab.train import ConfigError, run

SAFELY = "is not a checkpoint this version of diffora_lab can read safely"


class Planted:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted(real: Path, target: Path, marker: Path) -> Path:
    """``real`` with an object planted among its entries, saved at ``target``."""
    checkpoint = torch.load(real, map_location="cpu", weights_only=True)
    checkpoint["callbacks"]["Planted"] = Planted(marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A smoke run stopped right after its search (its end is in the search cache)."""
    root = tmp_path_factory.mktemp("untrusted")
    cfg = compose_config(["+experiment=smoke", "train.stop_after=21"], root)
    run(cfg, root / "run")
    return root


def cache_entry(root: Path) -> Path:
    (snapshot,) = (root / "cache" / "search").glob("*/step*.ckpt")  # one budget, one snapshot
    return snapshot


def test_what_we_write_loads_as_plain_data(stopped):
    for path in (stopped / "run" / "checkpoints" / "last.ckpt", cache_entry(stopped)):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["diffora_lab"]["step"] in (20, 21)
        assert checkpoint["hyper_parameters"]["config"]["budget"] == 0.5


def test_the_crafted_file_runs_code_when_unpickled_and_not_when_read(stopped, tmp_path):
    marker = tmp_path / "ran"
    evil = crafted(stopped / "run" / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", marker)
    torch.load(evil, map_location="cpu", weights_only=False)  # the danger is real
    assert marker.is_file()
    marker.unlink()
    with pytest.raises(UnsafeFile, match=f"{evil} {SAFELY} .it asks for .*open"):
        read_checkpoint(evil)
    # Lightning's own loading (trainer.fit(ckpt_path=...)) too, whatever it is asked.
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with pytest.raises(UnsafeFile):
            AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    assert not marker.exists()


def _resume(root: Path, tmp: Path, marker: Path) -> tuple[list[str], Path]:
    shutil.copytree(root / "run", tmp / "run")
    last = tmp / "run" / "checkpoints" / "last.ckpt"
    crafted(root / "run" / "checkpoints" / "last.ckpt", last, marker)
    return [f"hydra.run.dir={tmp / 'run'}"], last


def _ckpt_path(root: Path, tmp: Path, marker: Path) -> tuple[list[str], Path]:
    evil = crafted(root / "run" / "checkpoints" / "last.ckpt", tmp / "evil.ckpt", marker)
    return [f"hydra.run.dir={tmp / 'run'}", f"ckpt_path={evil}"], evil


def _search_cache(root: Path, tmp: Path, marker: Path) -> tuple[list[str], Path]:
    shutil.copytree(root / "cache" / "search", tmp / "cache" / "search")
    snapshot = tmp / cache_entry(root).relative_to(root)
    crafted(cache_entry(root), snapshot, marker)
    return [f"hydra.run.dir={tmp / 'run'}", "train.stop_after=21"], snapshot


ENTRY_POINTS = {"resume": _resume, "ckpt_path": _ckpt_path, "search_cache": _search_cache}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_crafted_pickle_is_refused_before_anything_runs(stopped, tmp_path, entry):
    """Each way a run reads a checkpoint (its own folder's, ckpt_path=, the search cache) refuses
    a crafted one with a ConfigError naming it (the CLI's exit 2) before anything in it runs."""
    marker = tmp_path / "ran"
    overrides, evil = ENTRY_POINTS[entry](stopped, tmp_path, marker)
    cfg = compose_config(["+experiment=smoke", *overrides], tmp_path)  # its cache: tmp_path/cache
    with pytest.raises(ConfigError) as refused:
        run(cfg, tmp_path / "run")
    assert f"{evil} {SAFELY}" in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["resume", "evaluate"])
def test_a_crafted_pickle_is_refused_by_the_cli_with_exit_2(stopped, tmp_path, entry):
    """Both command lines, training's and evaluate's: exit 2, the message, no traceback."""
    marker = tmp_path / "ran"
    env = {"DIFFORA_CACHE": str(tmp_path / "cache")}
    if entry == "evaluate":
        shutil.copytree(stopped / "run", tmp_path / "run")  # no .hydra/: config from the file
        evil = crafted(
            stopped / "run" / "checkpoints" / "last.ckpt",
            tmp_path / "run" / "checkpoints" / "last.ckpt",
            marker,
        )
        done = run_main([str(tmp_path / "run")], tmp_path, env, module="diffora_lab.evaluate")
    else:
        overrides, evil = ENTRY_POINTS[entry](stopped, tmp_path, marker)
        done = run_main(["+experiment=smoke", *overrides], tmp_path, env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"{evil} {SAFELY}" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not marker.exists()
