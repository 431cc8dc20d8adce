"""Command line: ``python -m diffora_lab [overrides]`` (a Hydra app; ``-m`` for multirun)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_libraries() -> None:
    """Silences library chatter that says nothing about the run (kept: real warnings)."""
    import transformers

    transformers.logging.set_verbosity_error()
    for pattern in (
        ".*pre-optimization state.*",  # Lightning: we checkpoint after the step on purpose
        ".*LeafSpec.*",
        ".*is_gradient_checkpointing.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def config_dir() -> str:
    """The packaged configs (wheel install) or the repository's ``conf/`` (editable install)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Runs one job and returns its primary dev metric (what Hydra sweepers optimise)."""
    from diffora_lab.train import ConfigError, run

    quiet_libraries()
    try:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:
        print(f"diffora_lab: error: {error}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:  # a diverged run: the message names step and phase
        print(f"diffora_lab: error: {error}", file=sys.stderr)
        sys.exit(3)
    if "metrics" not in results:  # stopped early (train.stop_after or a signal): resumable
        if results.get("signal"):
            sys.exit(128 + int(results["signal"]))  # the shell convention for "killed by"
        return float("nan")
    return float(results["metrics"][results["primary_metric"]])


if __name__ == "__main__":
    main()
