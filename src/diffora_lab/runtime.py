"""Process set-up shared by the entry points: configs, library chatter, failed writes.

Kept apart from ``__main__`` so that ``evaluate`` (a second entry point) and the tests can use it
without importing the Hydra app (which imports the whole pipeline).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import warnings
from pathlib import Path


def configure_threads(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Sets the OpenMP wait policy and thread count before torch loads, unless the user did.

    OpenMP threads that spin-wait between parallel regions (the ``ACTIVE`` policy) take cores
    from every other process: on a 2-core machine shared with other work the default run took
    604 s instead of 151 s with ``PASSIVE`` (issue 12; BENCHMARKS.md, "Busy machine"). The thread
    count is the number of cores this process may run on (``os.sched_getaffinity``: a SLURM or
    ``taskset`` allocation), not the machine's. Both only take effect if torch is not imported
    yet: ``python -m diffora_lab`` calls this first.

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


# errno values of a write the user can fix: a full disk or quota, a read-only or foreign folder,
# a path through a file, a file over the size limit, an I/O error of the disk.
WRITE_ERRORS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EFBIG", "EIO")
    if hasattr(errno, name)
)


def write_error_message(error: OSError) -> str:
    """What a failed write says: the path, the reason, the free space there, what to do."""
    path = error.filename or "a file of the run"
    reason = error.strerror or str(error)
    free = ""
    folder = Path(str(path)).parent if error.filename else None
    while folder is not None and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder is not None:
        with contextlib.suppress(OSError):
            free = f"; {shutil.disk_usage(folder).free / 1e6:.0f} MB free there"
    return (
        f"{path}: {reason}{free}. Free space, or choose folders this user can write "
        "(hydra.run.dir, data.cache_dir); a checkpoint already written resumes with the same "
        "command."
    )
