"""What a run continues from: a checkpoint of the same run, or a finished folder left alone.

A resume is the same run. The checkpoint records the resolved config it was written with
(``TrainingModule``'s hparams); :func:`check_checkpoint` refuses a resume whose settings differ in
anything but :data:`RESUME_SAFE`, naming each with both values. A finished folder (``results.json``)
run again with its own settings has nothing to do (:func:`finished_run`): a requeued job or a
rerun sweep skips it. ``overwrite=true`` deletes only a finished run's outputs; an unfinished run
always resumes (:func:`resolve_checkpoint`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

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
        if theirs.get(key) is None and mine.get(key) is None:
            continue  # null and absent both mean unset
        old, new = theirs.get(key, "(not set)"), mine.get(key, "(not set)")
        if old != new:  # 1 == 1.0: a number typed either way is the same setting
            differences.append(f"{key}={_shown(old)} there, {key}={_shown(new)} here")
    return differences


def check_checkpoint(path: str, cfg: DictConfig) -> tuple[int, int | None]:
    """Checks a checkpoint to resume before anything loads.

    Returns:
        Its step, and the step of the discretization it holds (None: still searching, or no
        search).

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
                "train.stop_after and cache folders: resume.RESUME_SAFE)."
            )
    max_steps = int(cfg.train.max_steps)
    if step > max_steps:
        raise ValueError(
            f"train.max_steps={max_steps} is below the step of the checkpoint to resume "
            f"({path}, step {step}); raise train.max_steps to at least {step}, or start a new "
            "run folder."
        )
    return step, (state.get("discretization") or {}).get("step")


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


def resolve_checkpoint(cfg: DictConfig, ckpt_dir: Path, restart: bool = False) -> str | None:
    """The checkpoint to resume: ``ckpt_path=last`` is the folder's ``last.ckpt`` when there is
    one (not when ``restart``: overwrite=true on a finished run), a path is that file."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt == "last":
        last = ckpt_dir / "last.ckpt"
        if last.is_file() and not restart:
            return str(last)
        log.info("ckpt_path=last: no checkpoint in %s to resume, starting fresh", ckpt_dir)
        return None
    return str(ckpt)


def say_skipped(results: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Prints that ``folder`` already holds this run, finished; returns its results."""
    metric = results.get("primary_metric")
    value = (results.get("metrics") or {}).get(metric)
    print(
        f"diffora_lab: {folder} holds this run, finished ({metric} {value}); skipped, nothing "
        "written (overwrite=true runs it again)."
    )
    return results
