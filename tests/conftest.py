"""Shared fixtures: offline settings, config composition, tiny real models."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = os.environ.get("WANDB_MODE_TESTS", "offline")
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from diffora_lab.runtime import config_dir, quiet_libraries  # noqa: E402

quiet_libraries()

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Composes the app's config as the CLI would (no Hydra run dir involved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.data.cache_dir = str(output_dir / "cache")
    return cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: several times faster for tiny models on shared 2-core machines, and
    reference and resumed runs stay numerically comparable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env_extra: dict | None = None):
    """``python -m diffora_lab ARGS`` in a subprocess, offline, output captured."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "diffora_lab", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def smoke_cfg(tmp_path):
    """A function returning the smoke experiment config with extra overrides."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(["+experiment=smoke", *overrides], tmp_path)

    return make
