"""One owner per run folder, and a folder left as it was found when a run is refused.

A run takes :class:`RunFolderLock` before it writes anything; a second process in the same folder
is refused at once with the first one's pid and host. Everything a run checks (settings, data,
checkpoint, a finished folder) happens while the folder is still untouched; only then
:func:`accept` writes ``.hydra/`` (Hydra itself is told not to: ``hydra.output_subdir: null``),
removes stale temporary checkpoints and, with ``overwrite=true``, the previous run's outputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# What a run writes into its folder, removed by overwrite=true (never .hydra/ or unknown files).
RUN_OUTPUTS = (
    "results.json",
    "checkpoints",
    "dam",
    "csv",
    "adapter",
    "merged",
    "wandb",
)


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


def global_rank() -> int:
    """This process's rank from the launcher's environment (0 when not distributed)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunFolderLock:
    """An exclusive lock on a run folder: ``<folder>/.lock`` holds the owner's pid and host.

    The lock is an ``fcntl.flock`` on that file, so the kernel releases it when its process dies
    (a SIGKILL included); the file then stays behind with a dead pid and is taken over, with a
    log line, by the next run. Ranks other than 0 of a distributed run share rank 0's lock.

    Args:
        folder: The run folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
            RunFolderBusy: Naming the holder's pid and host, and what to do.
        """
        if global_rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderBusy(self._busy_message()) from None
            # The holder may have removed the file between our open and our lock: retry on
            # the file that is there now, or two processes would each lock a different inode.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_owner(fd)
        if previous and previous.get("pid") != os.getpid():
            log.warning(
                "run folder %s: taking over the lock left by pid %s on %s (no longer running)",
                self.path.parent,
                previous.get("pid"),
                previous.get("host"),
            )
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        if os.environ.get("SLURM_JOB_ID"):
            owner["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd

    def _busy_message(self) -> str:
        owner: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads(self.path.read_text() or "{}")
        pid, host = owner.get("pid", "?"), owner.get("host", "?")
        return (
            f"hydra.run.dir={str(self.path.parent)!r} is in use by pid {pid} on host {host} "
            f"(lock file {self.path}); wait for that run to end, or choose another "
            "hydra.run.dir."
        )

    def release(self) -> None:
        """Removes the lock file and lets go of the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Deletes ``.<name>.<pid>.tmp`` files left by a killed checkpoint write.

    Only files whose writer is no longer running on this host are removed (a search cache folder
    may be shared with live runs).
    """
    removed = []
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        pid = tmp.name.rsplit(".", 2)[-2] if tmp.name.count(".") >= 3 else ""
        if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    if removed:
        log.info("removed %d stale temporary checkpoint file(s) in %s", len(removed), folder)
    return removed


def clear_outputs(folder: Path) -> None:
    """``overwrite=true``: removes what an earlier run wrote here (see :data:`RUN_OUTPUTS`)."""
    for name in RUN_OUTPUTS:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_hydra_files(folder: Path, task_cfg: DictConfig | None) -> None:
    """Writes ``.hydra/{config,hydra,overrides}.yaml`` as Hydra would, once the run is accepted.

    Hydra writes them before the task starts (so a refused run would rewrite them); the app's
    config sets ``hydra.output_subdir: null`` and this writes them instead. Nothing happens
    outside a Hydra app, on ranks other than 0, or when the user set ``hydra.output_subdir``
    (then Hydra has written them already).
    """
    from hydra.core.hydra_config import HydraConfig

    if task_cfg is None or global_rank() != 0 or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        return
    target = folder / ".hydra"
    target.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(task_cfg, target / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), target / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, target / "overrides.yaml")


def divergence_message(error: FloatingPointError, ckpt_dir: Path, grad_clip: float) -> str:
    """The non-finite-loss message with advice that matches this run."""
    from diffora_lab.checkpointing import STATE_KEY, read_checkpoint

    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        try:
            saved = read_checkpoint(last, mmap=True)
            where = f"the last checkpoint is {last} (step {saved[STATE_KEY]['step']})"
        except Exception:
            where = f"the last checkpoint is {last}"
    else:
        where = "no checkpoint was written before it"
    fixes = "lower train.lr or dam.arch_lr"
    if grad_clip <= 0:
        fixes += ", or enable train.grad_clip (e.g. train.grad_clip=1.0)"
    return f"{error}; {where}. To go on, {fixes}."


class FolderState:
    """What a refused run must put back: Hydra's job log, and the folder if Hydra created it.

    Hydra creates the run folder and opens its job log (``<job name>.log``) before the task
    starts; :meth:`restore` truncates the log to its size at :meth:`capture` and removes the
    folder again when it was empty then and is empty now.
    """

    def __init__(self, folder: Path, log_file: Path | None) -> None:
        self.folder = folder
        self.log_file = log_file
        self.log_size: int | None = None
        self.was_empty = False

    @classmethod
    def capture(cls, folder: str | Path, log_file: str | Path | None = None) -> FolderState:
        folder = Path(folder)
        state = cls(folder, Path(log_file) if log_file else None)
        entries = [p for p in folder.iterdir()] if folder.is_dir() else []
        if state.log_file is not None and state.log_file.is_file():
            state.log_size = state.log_file.stat().st_size
            entries = [p for p in entries if p != state.log_file]
        state.was_empty = not entries and (state.log_size or 0) == 0
        return state

    def restore(self) -> None:
        if self.log_file is not None and self.log_file.is_file():
            if self.log_size is None:  # written since capture (Hydra opens it lazily)
                self.log_file.unlink()
            else:
                with self.log_file.open("r+b") as handle:
                    handle.truncate(self.log_size)
        if self.was_empty and self.folder.is_dir():
            leftovers = [p for p in self.folder.iterdir() if p != self.log_file]
            if not leftovers:
                if self.log_file is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self.log_file.unlink()
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
