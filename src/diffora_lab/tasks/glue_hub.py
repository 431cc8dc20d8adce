"""Reading GLUE from the Hugging Face hub dataset ``nyu-mll/glue`` (users with the hub; the TSV
layout on disk is glue_files.py)."""

from __future__ import annotations

from pathlib import Path

from diffora_lab.tasks.glue_files import glue_task_names
from diffora_lab.tasks.spec import Examples, RawSplits, TaskSpec

_HUB_DEV_SPLITS = {
    "validation": "validation",
    "matched": "validation_matched",
    "mismatched": "validation_mismatched",
}


def check_hub_dataset(spec: TaskSpec) -> None:
    """Pre-flight check for hub data: cached locally, or the hub answers within seconds.

    Raises:
        ValueError: Neither, with the fix (``task.data_dir``).
    """
    import datasets
    from huggingface_hub import constants

    from diffora_lab.backbones import hub_reachable

    cached = [
        Path(datasets.config.HF_DATASETS_CACHE) / "nyu-mll___glue" / spec.name,
        Path(constants.HF_HUB_CACHE) / "datasets--nyu-mll--glue",
    ]
    if any(path.exists() for path in cached) or hub_reachable():
        return
    raise ValueError(
        f"task.data_dir is not set, so task {spec.name!r} would load nyu-mll/glue from the "
        "Hugging Face Hub, which cannot be reached from here and has no cached copy. Pass "
        f"task.data_dir=/path/to/glue (a folder in the original GLUE TSV layout, with "
        f"{spec.glue_dir}/train.tsv and the dev files)."
    )


def load_hub(spec: TaskSpec, *, cache_dir: str | Path | None = None) -> RawSplits:
    """Load a GLUE task from the hub dataset ``nyu-mll/glue``.

    Args:
        spec: The task (one of the eight GLUE tasks).
        cache_dir: Optional ``datasets`` cache folder; the library default when None.

    Returns:
        The train split and the dev splits (MNLI: ``validation_matched`` as ``"matched"`` and
        ``validation_mismatched`` as ``"mismatched"``).

    Raises:
        ValueError: ``spec`` is the synthetic task.
        RuntimeError: The hub (or the ``datasets`` library) is unavailable; the message tells
            the user to pass ``task.data_dir``.
    """
    if spec.name not in glue_task_names():
        raise ValueError(
            f"Task {spec.name!r} is not on the hub dataset nyu-mll/glue; hub loading supports "
            f"{glue_task_names()}."
        )
    try:
        import datasets

        dataset = datasets.load_dataset(
            "nyu-mll/glue", spec.name, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except Exception as error:  # network, offline mode, missing library: all mean "use TSVs"
        raise RuntimeError(
            f"Could not load task {spec.name!r} from the hub dataset nyu-mll/glue "
            f"({type(error).__name__}: {error}). When the hub is unreachable, pass "
            f"task.data_dir=/path/to/glue, a folder in the original GLUE TSV layout holding "
            f"{spec.glue_dir}/train.tsv and its dev file(s)."
        ) from error

    def convert(split_name: str) -> Examples:
        split = dataset[split_name]
        second = split[spec.text_fields[1]] if len(spec.text_fields) > 1 else None
        labels = split["label"]
        labels = [float(x) for x in labels] if spec.is_regression else [int(x) for x in labels]
        return Examples(text_a=list(split[spec.text_fields[0]]), text_b=second, labels=labels)

    return RawSplits(
        train=convert("train"),
        dev={name: convert(_HUB_DEV_SPLITS[name]) for name in spec.dev_splits},
    )
