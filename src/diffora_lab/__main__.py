"""Command line: ``python -m diffora_lab [overrides]`` (a Hydra app; ``-m`` for multirun).

``config_dir`` and ``quiet_libraries`` live in :mod:`diffora_lab.runtime` (re-exported here).
"""

from __future__ import annotations

import copy
import os
import sys

from diffora_lab.runtime import (
    WRITE_ERRORS,
    config_dir,
    configure_threads,
    quiet_libraries,
    write_error_message,
)

configure_threads()  # before anything below can import torch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

__all__ = ["config_dir", "main", "quiet_libraries"]


def _job_log(hydra_cfg) -> str | None:
    """The file of Hydra's job logging, if it has one."""
    try:
        return str(hydra_cfg.job_logging.handlers.file.filename)
    except Exception:  # no file handler configured
        return None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Runs one job and returns its primary dev metric (what Hydra sweepers optimise)."""
    from diffora_lab.checkpointing import BackboneMismatch
    from diffora_lab.runfolder import FolderState
    from diffora_lab.train import ConfigError, run

    quiet_libraries()
    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    # Hydra has created the folder and opened its job log; a refused run puts both back.
    found = FolderState.capture(output_dir, _job_log(hydra_cfg))
    task_cfg = copy.deepcopy(cfg)  # as composed: run() fills in derived settings
    try:
        results = run(cfg, output_dir, task_cfg=task_cfg)
    except (ConfigError, BackboneMismatch) as error:
        found.restore()
        print(f"diffora_lab: error: {error}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:  # a diverged run: the message names step and phase
        print(f"diffora_lab: error: {error}", file=sys.stderr)
        sys.exit(3)
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        # A full disk, a quota, a read-only or foreign folder: the user frees space or moves.
        print(f"diffora_lab: error: {write_error_message(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside training (during training it checkpoints)
        print(
            "diffora_lab: interrupted before training started or after it ended; nothing new "
            "to resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    if "metrics" not in results:  # stopped early (train.stop_after or a signal): resumable
        if results.get("signal"):
            sys.exit(128 + int(results["signal"]))  # the shell convention for "killed by"
        return float("nan")
    return float(results["metrics"][results["primary_metric"]])


if __name__ == "__main__":
    main()
