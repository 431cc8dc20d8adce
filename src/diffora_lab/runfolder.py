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


def finished_run(folder: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """A finished folder (one with ``results.json``): its results when this command is that run.

    A rerun with the settings the run was made with (its ``checkpoints/last.ckpt`` records them;
    :data:`RESUME_SAFE` may differ) has nothing to do: a requeued job or a rerun sweep skips it.

    Returns:
        The stored results; None when the folder is not finished or ``overwrite=true`` (its
        outputs are then deleted and the run starts over).

    Raises:
        ValueError: Finished with other settings (each named), or without a checkpoint that says
            what it was made with; the fix is ``overwrite=true`` or another folder.
    """
    from diffora_lab.checkpointing import UnsafeFile, read_checkpoint

    results = folder / "results.json"
    if not results.is_file() or cfg.get("overwrite"):
        return None
    again = (
        "pass overwrite=true to delete its outputs and run again, or choose another hydra.run.dir."
    )
    last = folder / "checkpoints" / "last.ckpt"
    differences = None
    try:
        saved = read_checkpoint(last, mmap=True)["hyper_parameters"]["config"]
        differences = setting_differences(saved, OmegaConf.to_container(cfg, resolve=True))
        if not differences:
            return json.loads(results.read_text())
    except UnsafeFile as error:
        raise ValueError(f"hydra.run.dir={str(folder)!r}: {error}; {again}") from None
    except Exception:  # no (readable) checkpoint or results: what it was made with is unknown
        pass
    if differences:
        raise ValueError(
            f"hydra.run.dir={str(folder)!r} holds a run finished with other settings: "
            f"{'; '.join(differences)}. To run it with these, {again}"
        )
    raise ValueError(
        f"hydra.run.dir={str(folder)!r} holds a finished run ({results.name}); {again}"
    )


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


# Settings a resume may change (README, "Long runs and clusters"): how a run is watched, stored
# and scheduled, never what it computes. Any other difference from the config stored in the
# checkpoint refuses the resume (a dotted name covers everything below it). Not here on purpose:
# trainer.devices (the global batch is train.batch_size x devices), trainer.accelerator and
# .precision (other numerics), train.eval_batch_size (dev scores in other batches).
RESUME_SAFE = (
    "ckpt_path",
    "overwrite",
    "logger",
    "export",
    "train.log_every",
    "train.progress_every",
    "train.ckpt_every",
    "train.stop_after",
    "train.finite_check_every",
    "train.compile",  # compiled and eager runs resume from each other (README, "Speed-ups")
    "train.compile_backend",
    "train.compile_mode",
    "dam.log_every",
    "dam.reuse_search",
    "dam.search_cache_dir",
    "data.cache_dir",
    "data.num_workers",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "hydra",
)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def setting_differences(
    saved: dict[str, Any], current: dict[str, Any], safe: tuple[str, ...] = RESUME_SAFE
) -> list[str]:
    """Each setting (outside ``safe``) whose value differs, as ``key=old there, key=new here``."""
    theirs, mine = _flat(saved), _flat(current)
    differences = []
    for key in sorted(set(theirs) | set(mine)):
        if any(key == s or key.startswith(f"{s}.") for s in safe):
            continue
        old, new = theirs.get(key, "(not set)"), mine.get(key, "(not set)")
        if old != new:  # 1 == 1.0: a number typed either way is the same setting
            differences.append(f"{key}={_shown(old)} there, {key}={_shown(new)} here")
    return differences


def check_checkpoint(path: str, cfg: DictConfig) -> int:
    """Checks a checkpoint to resume before anything loads; returns its step.

    Raises:
        ValueError: A damaged file, one written with other settings, or one past
            ``train.max_steps``.
    """
    from diffora_lab.checkpointing import UnsafeFile, our_state, read_checkpoint

    setting = f"ckpt_path={cfg.get('ckpt_path')}"
    if cfg.get("ckpt_path") == "last":  # the run's own checkpoint
        fix = "Delete it to start this run over, or pass ckpt_path=null to start fresh"
    else:  # a file the user named: never advise deleting it (it may be a mask, another run's)
        fix = "Point ckpt_path at a checkpoints/last.ckpt, or pass ckpt_path=null to start fresh"
    try:
        # mmap: only the small entries are read here; Lightning loads the tensors later.
        checkpoint = read_checkpoint(path, mmap=True)
    except UnsafeFile as error:
        raise ValueError(f"{setting}: {error}. {fix}.") from None
    except Exception as error:
        size = Path(path).stat().st_size
        what = "empty (0 bytes)" if size == 0 else f"truncated or not a checkpoint ({size} bytes)"
        raise ValueError(
            f"{setting}: {path} is damaged: {what}, {type(error).__name__}. {fix} without "
            "reading it."
        ) from None
    state = our_state(checkpoint, f"{setting}: {path}")
    step = int(state["step"])
    saved = (checkpoint.get("hyper_parameters") or {}).get("config")
    if saved:  # the resolved config of the run that wrote it (TrainingModule's hparams)
        differences = setting_differences(saved, OmegaConf.to_container(cfg, resolve=True))
        if differences:
            start_over = (
                "start a new run folder"
                if cfg.get("ckpt_path") == "last"
                else "pass ckpt_path=null to start without it"
            )
            raise ValueError(
                f"{setting}: {path} was written with other settings: {'; '.join(differences)}. "
                f"A resume continues the same run: use the checkpoint's settings, or {start_over}"
                " (a resume may change only logging, progress, checkpoint cadence, "
                "train.stop_after and cache folders: runfolder.RESUME_SAFE)."
            )
    max_steps = int(cfg.train.max_steps)
    if step > max_steps:
        raise ValueError(
            f"train.max_steps={max_steps} is below the step of the checkpoint to resume "
            f"({path}, step {step}); raise train.max_steps to at least {step}, or start a new "
            "run folder."
        )
    return step


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
