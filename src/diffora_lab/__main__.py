"""Command line: ``python -m diffora_lab [overrides]`` (a Hydra app; ``-m`` for multirun)."""

from __future__ import annotations

import os


def configure_threads(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Sets the OpenMP wait policy and thread count before torch loads, unless the user did.

    OpenMP threads that spin-wait between parallel regions (the default ``ACTIVE`` policy) take
    cores from every other process: on a 2-core machine shared with one busy process the default
    run took 4x longer than with ``PASSIVE`` (BENCHMARKS.md, "Busy machine"). The thread count
    is the number of cores this process may run on (``os.sched_getaffinity``: a SLURM or
    ``taskset`` allocation), not the machine's. Both only take effect if torch is not imported
    yet, which is why this runs at the top of the entry point.

    Args:
        environ: The environment to update (default ``os.environ``).

    Returns:
        The variables this call set (empty when the user had set both).
    """
    environ = os.environ if environ is None else environ
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    wanted = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, cores))}
    applied = {key: value for key, value in wanted.items() if not environ.get(key)}
    environ.update(applied)
    return applied


configure_threads()  # before anything below can import torch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


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
    from diffora_lab.checkpointing import BackboneMismatch
    from diffora_lab.train import ConfigError, run

    quiet_libraries()
    try:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, BackboneMismatch) as error:
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
