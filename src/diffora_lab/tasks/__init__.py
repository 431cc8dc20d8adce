"""GLUE tasks and a synthetic task: what each task is and how its raw data is read.

A task is described by a frozen :class:`TaskSpec` (text columns, labels, metrics, dev splits).
Raw data comes from one of three places, chosen by :func:`load_raw`:

* the ``synthetic`` task is generated in memory (:func:`generate_synthetic`), for offline tests
  and smoke runs;
* ``task.data_dir`` given: the original GLUE TSV layout on disk (:func:`read_glue_tsv`), e.g.
  ``<data_dir>/SST-2/train.tsv`` and ``<data_dir>/SST-2/dev.tsv``;
* otherwise the Hugging Face hub dataset ``nyu-mll/glue`` (:func:`load_hub`).

The task's dev split is the reporting set; the search split of DiffoRA's phase 1 is carved from
``RawSplits.train`` elsewhere, never from ``RawSplits.dev``.

Files: ``spec.py`` (what a task is: :class:`TaskSpec` and the :data:`TASKS` table),
``glue_files.py`` (the TSV and hub readers), ``synthetic.py`` (the generator),
``commonsense.py`` (the LLM-Adapters commonsense suite: specs and JSON reader),
``synthetic_choice.py`` (generated multiple-choice items in that format), ``prompts.py`` (how an
example reads as a causal-LM question), ``kinds/`` (how a task meets a model: classification,
causal-LM choice); this module picks the source (:func:`load_raw`, by ``TaskSpec.source``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffora_lab.tasks import commonsense, synthetic_choice
from diffora_lab.tasks.glue_files import MAX_MALFORMED_FRACTION, _layout, read_glue_tsv
from diffora_lab.tasks.glue_files import check_data_dir as check_glue_dir
from diffora_lab.tasks.glue_hub import check_hub_dataset, load_hub
from diffora_lab.tasks.spec import (
    METRIC_NAMES,
    SYNTHETIC_TASK,
    TASKS,
    Examples,
    RawSplits,
    TaskSpec,
    get_task,
)
from diffora_lab.tasks.synthetic import generate_synthetic

__all__ = [
    "MAX_MALFORMED_FRACTION",
    "METRIC_NAMES",
    "SYNTHETIC_TASK",
    "TASKS",
    "Examples",
    "RawSplits",
    "TaskSpec",
    "check_data_dir",
    "check_hub_dataset",
    "check_source",
    "generate_synthetic",
    "get_task",
    "load_hub",
    "load_raw",
    "read_glue_tsv",
]

# --------------------------------------------------------------------------------------------
# Entry point


def check_data_dir(spec: TaskSpec, data_dir: str | Path) -> None:
    """Cheap check of ``task.data_dir`` for the task's source (files exist, headers fit).

    Raises:
        ValueError: Naming ``task.data_dir`` and the fix.
    """
    if spec.source == "commonsense":
        commonsense.check_data_dir(spec, data_dir)
    elif spec.source == "synthetic_choice":
        _layout(TASKS["synthetic"])  # "data_dir is not used by the synthetic task"
    else:
        check_glue_dir(spec, data_dir)


def check_source(spec: TaskSpec, data_dir: str | None, hub_id: str | None = None) -> None:
    """Before anything loads: the task's data can be read (a folder given, or the hub).

    Raises:
        ValueError: With the fix (``task.data_dir``).
    """
    if data_dir or spec.source in ("synthetic", "synthetic_choice"):
        return
    if spec.source == "commonsense":
        commonsense.check_hub(spec, hub_id)
    else:
        check_hub_dataset(spec)


def load_raw(
    spec: TaskSpec,
    data_dir: str | Path | None,
    *,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
    hub_id: str | None = None,
    dev_limit: int | None = None,
    train_limit: int | None = None,
) -> RawSplits:
    """Load a task's raw splits from the right source (see :func:`_load_all`), dev splits cut to
    their first ``dev_limit`` examples when it is set (``task.dev_limit``: cheaper evaluations of
    a large model on a CPU; the same examples in every run and in ``diffora_lab.evaluate``), the
    train split to its first ``train_limit`` (``task.train_limit``: a short run on a large task
    tokenizes only what it can see; the search split is carved from these).

    Raises:
        ValueError: A limit below 1, or what :func:`_load_all` raises.
    """
    for name, limit in (("dev_limit", dev_limit), ("train_limit", train_limit)):
        if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
            raise ValueError(f"task.{name}={limit!r}: a number of examples >= 1, or null.")
    raw = _load_all(spec, data_dir, seed=seed, synthetic=synthetic, hub_id=hub_id)
    train = raw.train if train_limit is None else _first(raw.train, int(train_limit))
    dev = raw.dev
    if dev_limit is not None:
        dev = {name: _first(examples, int(dev_limit)) for name, examples in dev.items()}
    return RawSplits(train, dev)


def _first(examples: Examples, n: int) -> Examples:
    text_b = None if examples.text_b is None else examples.text_b[:n]
    return Examples(examples.text_a[:n], text_b, examples.labels[:n])


def _load_all(
    spec: TaskSpec,
    data_dir: str | Path | None,
    *,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
    hub_id: str | None = None,
) -> RawSplits:
    """Load a task's raw splits from the right source.

    * ``synthetic`` task: generated by :func:`generate_synthetic` from ``seed``, with the
      ``synthetic`` mapping's settings (``n_train``, ``n_dev``, ``negation``, ...);
    * ``data_dir`` given: the original GLUE TSV files under it (:func:`read_glue_tsv`);
    * otherwise: the hub dataset ``nyu-mll/glue`` (:func:`load_hub`).

    Args:
        spec: The task.
        data_dir: GLUE root folder, or None for the hub. Must be None for the synthetic task.
        seed: Seed of the synthetic generator (unused for GLUE tasks).
        synthetic: Optional settings of the synthetic task
            (:class:`~diffora_lab.tasks.synthetic.SyntheticSettings`; ``n_train`` and ``n_dev``
            only for ``synthetic_choice``); ignored for other tasks.
        hub_id: The hub dataset repository of a commonsense task (LLM-Adapters layout).

    Returns:
        Train and dev splits; ``dev`` keys are ``spec.dev_splits``.

    Raises:
        ValueError: Bad ``data_dir``/files (see :func:`read_glue_tsv`), ``data_dir`` set for
            the synthetic task, or unknown ``synthetic`` keys.
        RuntimeError: No ``data_dir`` and the hub is unreachable.
    """
    if spec.source in ("synthetic", "synthetic_choice"):
        if data_dir is not None:
            _layout(TASKS[SYNTHETIC_TASK])  # "data_dir is not used by the synthetic task"
        overrides = dict(synthetic or {})
        if spec.source == "synthetic_choice":
            unknown = sorted(set(overrides) - {"n_train", "n_dev"})
            if unknown:
                raise ValueError(
                    f"task.synthetic has unknown keys {unknown}; the allowed keys are "
                    "['n_dev', 'n_train']."
                )
            return synthetic_choice.generate_choice_items(seed, **overrides)
        return generate_synthetic(seed, **overrides)  # checks the keys
    if spec.source == "commonsense":
        if data_dir is not None:
            return commonsense.load_local(spec, data_dir)
        return commonsense.load_hub(spec, str(hub_id))
    if data_dir is not None:
        check_data_dir(spec, data_dir)
        return RawSplits(
            train=read_glue_tsv(spec, data_dir, "train"),
            dev={split: read_glue_tsv(spec, data_dir, split) for split in spec.dev_splits},
        )
    return load_hub(spec)
