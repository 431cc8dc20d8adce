"""Process set-up shared by the entry points: where the configs live, which library chatter to mute.

Kept apart from ``__main__`` so that ``evaluate`` (a second entry point) and the tests can use it
without importing the Hydra app (which imports the whole pipeline).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path


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
