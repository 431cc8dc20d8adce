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
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1", "mcc", "pearson", "spearman")
"""Metric names a :class:`TaskSpec` may list (see ``diffora_lab.metrics``)."""

_CLASSIFICATION_METRICS = frozenset({"accuracy", "f1", "mcc"})
_REGRESSION_METRICS = frozenset({"pearson", "spearman"})

# Rows whose field count differs from the header are skipped (with a warning) up to this
# fraction of a file; the real QQP train file has a handful of them. More means a broken file.
MAX_MALFORMED_FRACTION = 0.01

SYNTHETIC_TASK = "synthetic"


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one sequence-classification (or regression) task.

    Attributes:
        name: Task name, e.g. ``"sst2"``; also the ``nyu-mll/glue`` config name for GLUE tasks.
        glue_dir: Folder name in the original GLUE layout, e.g. ``"SST-2"``; empty for the
            synthetic task, which reads no files.
        text_fields: One or two text column names, as on the hub (``("premise", "hypothesis")``
            for MNLI).
        num_labels: Number of classes; 1 means regression (STS-B).
        label_names: Class names in id order (the hub's order); None for regression.
        metrics: Metric names among :data:`METRIC_NAMES`.
        primary_metric: The metric used to select and report runs; one of ``metrics``.
        dev_splits: Names of the dev (reporting) splits: ``("validation",)`` normally,
            ``("matched", "mismatched")`` for MNLI.
    """

    name: str
    glue_dir: str
    text_fields: tuple[str, ...]
    num_labels: int
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    primary_metric: str
    dev_splits: tuple[str, ...]

    def __post_init__(self) -> None:
        """Reject inconsistent specs (labels, metrics, splits) with a ValueError."""
        if len(self.text_fields) not in (1, 2):
            raise ValueError(
                f"TaskSpec {self.name!r}: text_fields must name one or two columns, "
                f"got {self.text_fields!r}."
            )
        if self.num_labels < 1:
            raise ValueError(
                f"TaskSpec {self.name!r}: num_labels must be >= 1 (1 means regression), "
                f"got {self.num_labels}."
            )
        if self.num_labels == 1:
            if self.label_names is not None:
                raise ValueError(
                    f"TaskSpec {self.name!r}: a regression task (num_labels=1) takes "
                    f"label_names=None, got {self.label_names!r}."
                )
        elif self.label_names is None or len(self.label_names) != self.num_labels:
            raise ValueError(
                f"TaskSpec {self.name!r}: label_names must list num_labels={self.num_labels} "
                f"class names in id order, got {self.label_names!r}."
            )
        if not self.metrics:
            raise ValueError(f"TaskSpec {self.name!r}: metrics must name at least one metric.")
        allowed = _REGRESSION_METRICS if self.is_regression else _CLASSIFICATION_METRICS
        for metric in self.metrics:
            if metric not in METRIC_NAMES:
                raise ValueError(
                    f"TaskSpec {self.name!r}: unknown metric {metric!r}; "
                    f"choose among {sorted(METRIC_NAMES)}."
                )
            if metric not in allowed:
                kind = "regression" if self.is_regression else "classification"
                raise ValueError(
                    f"TaskSpec {self.name!r}: metric {metric!r} does not apply to a {kind} "
                    f"task; choose among {sorted(allowed)}."
                )
        if "f1" in self.metrics and self.num_labels != 2:
            raise ValueError(
                f"TaskSpec {self.name!r}: metric 'f1' is the binary F1 of class 1 and needs "
                f"num_labels=2, got {self.num_labels}."
            )
        if self.primary_metric not in self.metrics:
            raise ValueError(
                f"TaskSpec {self.name!r}: primary_metric {self.primary_metric!r} must be one "
                f"of metrics {self.metrics!r}."
            )
        if not self.dev_splits or len(set(self.dev_splits)) != len(self.dev_splits):
            raise ValueError(
                f"TaskSpec {self.name!r}: dev_splits must be distinct, non-empty names, "
                f"got {self.dev_splits!r}."
            )
        if "train" in self.dev_splits:
            raise ValueError(
                f"TaskSpec {self.name!r}: 'train' cannot be a dev split; the dev set is the "
                "reporting set and is kept apart from training."
            )

    @property
    def is_regression(self) -> bool:
        """True when the task predicts one float score (``num_labels == 1``)."""
        return self.num_labels == 1


_ENTAILMENT_2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="mnli",
            glue_dir="MNLI",
            text_fields=("premise", "hypothesis"),
            num_labels=3,
            label_names=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            primary_metric="accuracy",
            dev_splits=("matched", "mismatched"),
        ),
        TaskSpec(
            name="sst2",
            glue_dir="SST-2",
            text_fields=("sentence",),
            num_labels=2,
            label_names=("negative", "positive"),
            metrics=("accuracy",),
            primary_metric="accuracy",
            dev_splits=("validation",),
        ),
        TaskSpec(
            name="cola",
            glue_dir="CoLA",
            text_fields=("sentence",),
            num_labels=2,
            label_names=("unacceptable", "acceptable"),
            metrics=("mcc", "accuracy"),
            primary_metric="mcc",
            dev_splits=("validation",),
        ),
        TaskSpec(
            name="qqp",
            glue_dir="QQP",
            text_fields=("question1", "question2"),
            num_labels=2,
            label_names=("not_duplicate", "duplicate"),
            metrics=("accuracy", "f1"),
            primary_metric="accuracy",
            dev_splits=("validation",),
        ),
        TaskSpec(
            name="qnli",
            glue_dir="QNLI",
            text_fields=("question", "sentence"),
            num_labels=2,
            label_names=_ENTAILMENT_2,
            metrics=("accuracy",),
            primary_metric="accuracy",
            dev_splits=("validation",),
        ),
        TaskSpec(
            name="rte",
            glue_dir="RTE",
            text_fields=("sentence1", "sentence2"),
            num_labels=2,
            label_names=_ENTAILMENT_2,
            metrics=("accuracy",),
            primary_metric="accuracy",
            dev_splits=("validation",),
        ),
        TaskSpec(
            name="mrpc",
            glue_dir="MRPC",
            text_fields=("sentence1", "sentence2"),
            num_labels=2,
            label_names=("not_equivalent", "equivalent"),
            metrics=("accuracy", "f1"),
            primary_metric="accuracy",
            dev_splits=("validation",),
        ),
        TaskSpec(
            name="stsb",
            glue_dir="STS-B",
            text_fields=("sentence1", "sentence2"),
            num_labels=1,
            label_names=None,
            metrics=("pearson", "spearman"),
            primary_metric="pearson",
            dev_splits=("validation",),
        ),
        TaskSpec(
            name=SYNTHETIC_TASK,
            glue_dir="",
            text_fields=("sentence",),
            num_labels=2,
            label_names=("negative", "positive"),
            metrics=("accuracy",),
            primary_metric="accuracy",
            dev_splits=("validation",),
        ),
    )
}
"""The eight GLUE tasks plus ``synthetic``, keyed by name."""


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` registered under ``name``.

    Args:
        name: Task name, e.g. ``"sst2"``; case-insensitive, ``-``/``_`` ignored (``"SST-2"``
            works).

    Returns:
        The task's spec.

    Raises:
        ValueError: ``name`` is not a known task; the message lists the known names.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key in TASKS:
        return TASKS[key]
    raise ValueError(f"Unknown task.name={name!r}; set task.name to one of {sorted(TASKS)}.")


@dataclass
class Examples:
    """Texts and labels of one split, as parallel lists.

    Attributes:
        text_a: First text of each example.
        text_b: Second text of each example for sentence-pair tasks, else None.
        labels: Class ids (classification) or float scores (regression).
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float]

    def __post_init__(self) -> None:
        """Reject lists of different lengths with a ValueError."""
        if len(self.labels) != len(self.text_a):
            raise ValueError(
                f"Examples: labels has {len(self.labels)} entries but text_a has "
                f"{len(self.text_a)}; they must be parallel lists."
            )
        if self.text_b is not None and len(self.text_b) != len(self.text_a):
            raise ValueError(
                f"Examples: text_b has {len(self.text_b)} entries but text_a has "
                f"{len(self.text_a)}; they must be parallel lists (or text_b=None)."
            )

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.text_a)


@dataclass
class RawSplits:
    """A task's raw train split and its dev (reporting) splits.

    Attributes:
        train: The training split (the DiffoRA search split is carved from it).
        dev: Dev splits keyed by ``spec.dev_splits``.
    """

    train: Examples
    dev: dict[str, Examples]


# --------------------------------------------------------------------------------------------
# Original GLUE TSV layout


@dataclass(frozen=True)
class _TsvLayout:
    """Where texts and labels sit in a task's GLUE TSV files.

    Columns are header names, or 0-based indices when the file has no header (CoLA).
    """

    text_columns: tuple[str | int, ...]
    label_column: str | int
    raw_labels: tuple[str, ...] | None  # label strings in id order; None for a float score
    headerless_columns: int | None = None

    @property
    def has_header(self) -> bool:
        return self.headerless_columns is None


_BINARY = ("0", "1")
_TSV_LAYOUTS: dict[str, _TsvLayout] = {
    "cola": _TsvLayout((3,), 1, _BINARY, headerless_columns=4),
    "sst2": _TsvLayout(("sentence",), "label", _BINARY),
    "mrpc": _TsvLayout(("#1 String", "#2 String"), "Quality", _BINARY),
    "stsb": _TsvLayout(("sentence1", "sentence2"), "score", None),
    "qqp": _TsvLayout(("question1", "question2"), "is_duplicate", _BINARY),
    "qnli": _TsvLayout(("question", "sentence"), "label", _ENTAILMENT_2),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label", _ENTAILMENT_2),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label", TASKS["mnli"].label_names),
}

_DEV_FILES = {
    "validation": "dev.tsv",
    "matched": "dev_matched.tsv",
    "mismatched": "dev_mismatched.tsv",
}
_HUB_DEV_SPLITS = {
    "validation": "validation",
    "matched": "validation_matched",
    "mismatched": "validation_mismatched",
}
_STSB_RANGE = (0.0, 5.0)


def _layout(spec: TaskSpec) -> _TsvLayout:
    if spec.name == SYNTHETIC_TASK:
        raise ValueError(
            "task.data_dir is not used by the synthetic task (its data is generated); "
            "set task.data_dir=null, or pick a GLUE task with task.name."
        )
    if spec.name not in _TSV_LAYOUTS:
        raise ValueError(
            f"Task {spec.name!r} has no GLUE TSV layout; TSV reading supports "
            f"{sorted(_TSV_LAYOUTS)}. Leave task.data_dir unset for other tasks."
        )
    return _TSV_LAYOUTS[spec.name]


def _split_file_name(spec: TaskSpec, split: str) -> str:
    if split == "train":
        return "train.tsv"
    if split not in spec.dev_splits:
        raise ValueError(
            f"Task {spec.name!r} has no split {split!r}; choose 'train' or one of "
            f"{list(spec.dev_splits)}."
        )
    return _DEV_FILES[split]


def _task_folder(spec: TaskSpec, data_dir: str | Path) -> Path:
    """Check ``data_dir`` and its ``spec.glue_dir`` folder exist; return the latter."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"task.data_dir={str(data_dir)!r} is not an existing folder; set task.data_dir to "
            f"the folder in the original GLUE layout that contains {spec.glue_dir}/, or leave "
            "it unset to download from the hub."
        )
    folder = root / spec.glue_dir
    if not folder.is_dir():
        found = sorted(child.name for child in root.iterdir() if child.is_dir())
        hint = ""
        if (root / "train.tsv").is_file() or (root / "dev.tsv").is_file():
            hint = " It holds TSV files itself: point task.data_dir at its parent folder."
        raise ValueError(
            f"task.data_dir={str(data_dir)!r} has no {spec.glue_dir}/ folder for task "
            f"{spec.name!r} (sub-folders found: {found}).{hint} Set task.data_dir to the GLUE "
            f"root folder that contains {spec.glue_dir}/."
        )
    return folder


def _split_path(spec: TaskSpec, data_dir: str | Path, split: str) -> Path:
    file_name = _split_file_name(spec, split)
    path = _task_folder(spec, data_dir) / file_name
    if not path.is_file():
        raise ValueError(
            f"task.data_dir={str(data_dir)!r}: missing {spec.glue_dir}/{file_name}, the "
            f"{split!r} split of task {spec.name!r}. Add the file from the original GLUE "
            "download, or leave task.data_dir unset to use the hub."
        )
    return path


def _iter_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for every non-empty line, splitting on tabs only.

    Quoting is not interpreted (sentences contain bare ``"``) and only a line feed ends a line,
    so a stray carriage return inside a sentence cannot split a row.
    """
    # Bytes, decoded line by line: a bad byte is reported by line number, not character offset.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path} line {line_number}: byte {raw[error.start]:#04x} at column "
                    f"{error.start + 1} is not valid UTF-8; GLUE files are UTF-8 (re-save the "
                    "file as UTF-8 or replace it with the original GLUE file)."
                ) from None
            line = line.rstrip("\n").rstrip("\r")
            if line:
                yield line_number, line.split("\t")


def _column_indices(
    path: Path, layout: _TsvLayout, first_row: list[str] | None
) -> tuple[list[int], int, int]:
    """Resolve text/label columns to indices; return them and the expected field count."""
    wanted = [*layout.text_columns, layout.label_column]
    if not layout.has_header:
        assert layout.headerless_columns is not None
        indices = [int(column) for column in wanted]
        return indices[:-1], indices[-1], layout.headerless_columns
    if first_row is None:
        raise ValueError(f"{path} is empty; expected a header with columns {wanted}.")
    missing = [column for column in wanted if column not in first_row]
    if missing:
        raise ValueError(
            f"{path}: header is missing columns {missing}; found columns {first_row}, "
            f"expected {wanted}. Is this the original GLUE TSV for this task?"
        )
    indices = [first_row.index(str(column)) for column in wanted]
    return indices[:-1], indices[-1], len(first_row)


def _first_row(path: Path) -> list[str] | None:
    rows = _iter_rows(path)
    try:
        first = next(rows, None)
    finally:
        rows.close()  # closes the file now rather than at garbage collection
    return None if first is None else first[1]


def check_data_dir(spec: TaskSpec, data_dir: str | Path) -> None:
    """Cheap pre-flight check of a GLUE data folder, meant to run before any model loads.

    Checks that ``data_dir`` exists, holds the task's GLUE folder (``spec.glue_dir``), that the
    train file and every dev split's file exist, and that each file's header (first line for
    the headerless CoLA) has the expected columns. Only the first line of each file is read.

    Args:
        spec: The task.
        data_dir: Root folder in the original GLUE layout (``<data_dir>/<glue_dir>/train.tsv``).

    Raises:
        ValueError: Naming ``task.data_dir``, what is missing, and how to fix it.
    """
    layout = _layout(spec)
    for split in ("train", *spec.dev_splits):
        path = _split_path(spec, data_dir, split)
        first_row = _first_row(path)
        if first_row is None:
            raise ValueError(
                f"task.data_dir={str(data_dir)!r}: {path} is empty; replace it with the "
                "original GLUE file."
            )
        if layout.has_header:
            try:
                _column_indices(path, layout, first_row)
            except ValueError as error:
                raise ValueError(f"task.data_dir={str(data_dir)!r}: {error}") from None
        elif len(first_row) != layout.headerless_columns:
            raise ValueError(
                f"task.data_dir={str(data_dir)!r}: {path} line 1 has {len(first_row)} "
                f"tab-separated fields, expected {layout.headerless_columns} (the original "
                f"{spec.glue_dir} file has no header: source, label, author mark, sentence)."
            )
        elif layout.raw_labels is not None:
            label = first_row[int(layout.label_column)].strip()
            if label not in layout.raw_labels:
                raise ValueError(
                    f"task.data_dir={str(data_dir)!r}: {path} line 1 looks like a header "
                    f"(label field {label!r}); the original {spec.glue_dir} file has none: "
                    "delete that line."
                )


def _parse_label(
    raw: str, vocab: dict[str, int] | None, path: Path, line_number: int
) -> int | float:
    if vocab is not None:
        label = vocab.get(raw.strip())
        if label is None:
            raise ValueError(
                f"{path} line {line_number}: label {raw!r} is not in the task's label set "
                f"{sorted(vocab)}."
            )
        return label
    low, high = _STSB_RANGE
    try:
        score = float(raw)
    except ValueError:
        score = math.nan
    if not low <= score <= high:  # also rejects NaN
        raise ValueError(
            f"{path} line {line_number}: label {raw!r} is not a score in the task's label "
            f"range [{low}, {high}]."
        )
    return score


def _chain_first(
    first: tuple[int, list[str]], rest: Iterator[tuple[int, list[str]]]
) -> Iterator[tuple[int, list[str]]]:
    yield first
    yield from rest


def read_glue_tsv(spec: TaskSpec, data_dir: str | Path, split: str) -> Examples:
    """Read one split of a task from the original GLUE TSV layout.

    Files are read as UTF-8 and split on tabs with quoting disabled. Columns are found by
    header name (CoLA, which has no header, by position). Rows with the wrong number of fields
    are skipped with a warning when they are at most ``MAX_MALFORMED_FRACTION`` of the file
    (the real QQP train file has a few).

    Args:
        spec: The task (one of the eight GLUE tasks).
        data_dir: Root folder in the original GLUE layout.
        split: ``"train"`` or one of ``spec.dev_splits`` (``"validation"`` reads ``dev.tsv``;
            MNLI's ``"matched"``/``"mismatched"`` read ``dev_matched.tsv``/``dev_mismatched.tsv``).

    Returns:
        The split's examples; labels are ids in ``spec.label_names`` order, or float scores.

    Raises:
        ValueError: Missing folder/file, missing columns, a label outside the task's label set
            (naming file, line and value), too many malformed rows, or an empty split.
    """
    layout = _layout(spec)
    path = _split_path(spec, data_dir, split)
    vocab = None if layout.raw_labels is None else {v: i for i, v in enumerate(layout.raw_labels)}
    rows = _iter_rows(path)
    first = next(rows, None)
    if layout.has_header:
        text_indices, label_index, num_fields = _column_indices(
            path, layout, None if first is None else first[1]
        )
        data_rows: Iterator[tuple[int, list[str]]] = rows
    else:
        text_indices, label_index, num_fields = _column_indices(path, layout, None)
        data_rows = rows if first is None else _chain_first(first, rows)

    texts: list[list[str]] = [[] for _ in text_indices]
    labels: list[Any] = []
    malformed: list[int] = []
    for line_number, fields in data_rows:
        if len(fields) != num_fields:
            malformed.append(line_number)
            continue
        labels.append(_parse_label(fields[label_index], vocab, path, line_number))
        for column, index in zip(texts, text_indices, strict=True):
            column.append(fields[index])

    total = len(labels) + len(malformed)
    if total == 0:
        raise ValueError(
            f"{path} has no examples for split {split!r} of task {spec.name!r}; replace it "
            "with the original GLUE file."
        )
    if malformed:
        shown = ", ".join(str(number) for number in malformed[:5])
        summary = (
            f"{path}: {len(malformed)} of {total} rows have a field count other than "
            f"{num_fields} (lines {shown}{', ...' if len(malformed) > 5 else ''})"
        )
        if len(malformed) > MAX_MALFORMED_FRACTION * total:
            raise ValueError(
                f"{summary}; that is more than {MAX_MALFORMED_FRACTION:.0%} of the file, so it "
                "is not in the original GLUE TSV format. Replace it with the original file."
            )
        warnings.warn(f"{summary}; skipped them.", UserWarning, stacklevel=2)
    return Examples(text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None, labels=labels)


# --------------------------------------------------------------------------------------------
# Hugging Face hub


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
    if spec.name not in _TSV_LAYOUTS:
        raise ValueError(
            f"Task {spec.name!r} is not on the hub dataset nyu-mll/glue; hub loading supports "
            f"{sorted(_TSV_LAYOUTS)}."
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


# --------------------------------------------------------------------------------------------
# Synthetic task

_POSITIVE = (
    "wonderful", "delightful", "excellent", "superb", "charming", "brilliant", "lovely",
    "pleasant", "fantastic", "marvelous", "terrific", "splendid", "enjoyable", "graceful",
    "inspiring", "gorgeous", "cheerful", "outstanding", "impressive", "elegant", "refreshing",
    "heartwarming", "magnificent", "remarkable", "satisfying", "uplifting", "wholesome",
)  # fmt: skip
_NEGATIVE = (
    "terrible", "awful", "dreadful", "horrible", "boring", "dull", "disappointing", "miserable",
    "unpleasant", "mediocre", "clumsy", "tedious", "annoying", "painful", "gloomy", "ugly",
    "bland", "frustrating", "lousy", "shoddy", "tiresome", "depressing", "awkward",
    "forgettable", "pathetic", "dismal", "sloppy",
)  # fmt: skip
_NOUNS = (
    "movie", "meal", "hotel", "concert", "service", "book", "game", "trip", "lecture", "show",
    "album", "performance", "restaurant", "apartment", "coffee", "story", "class", "party",
    "flight", "museum", "garden", "play", "song", "camera", "interview", "festival", "workshop",
    "visit", "ferry", "soup", "novel", "tour",
)  # fmt: skip
_DETERMINERS = ("the", "our", "this", "that", "my", "their")
_INTENSIFIERS = (
    "", "", "very", "really", "quite", "truly", "rather", "extremely", "remarkably",
    "surprisingly", "genuinely", "pretty", "so", "absolutely",
)  # fmt: skip
_FILLERS = (
    "", "", "in my opinion", "from start to finish", "for the whole family", "this time around",
    "on that rainy evening", "according to my friends", "as far as i could tell",
    "during our last visit", "for what it cost", "overall", "by the end", "at least for me",
    "if you ask me", "last weekend", "from what we saw", "after all the waiting",
)  # fmt: skip
_TEMPLATES = (
    "{det} {noun} was {intensifier} {adj} {filler}",
    "i thought {det} {noun} was {intensifier} {adj} {filler}",
    "we found {det} {noun} {intensifier} {adj} {filler}",
    "everyone said {det} {noun} seemed {intensifier} {adj}",
    "{det} {noun} and the {noun2} were both {intensifier} {adj}",
    "honestly {det} {noun} turned out {intensifier} {adj} {filler}",
    "{det} {noun} was {adj} and {adj2} {filler}",
    "{filler} {det} {noun} felt {intensifier} {adj}",
    "my sister called {det} {noun} {intensifier} {adj} {filler}",
    "the reviews of {det} {noun} were {intensifier} {adj}",
)
_MIN_WORDS, _MAX_WORDS = 6, 14


def _synthetic_sentence(rng: random.Random, label: int) -> str:
    lexicon = _POSITIVE if label == 1 else _NEGATIVE
    adj, adj2 = rng.sample(lexicon, 2)
    noun, noun2 = rng.sample(_NOUNS, 2)
    text = rng.choice(_TEMPLATES).format(
        det=rng.choice(_DETERMINERS),
        noun=noun,
        noun2=noun2,
        intensifier=rng.choice(_INTENSIFIERS),
        adj=adj,
        adj2=adj2,
        filler=rng.choice(_FILLERS),
    )
    return " ".join(text.split())


def generate_synthetic(seed: int, n_train: int = 2000, n_dev: int = 400) -> RawSplits:
    """Generate the synthetic sentiment-like task, deterministically from ``seed``.

    Sentences of 6-14 words come from a few templates over nouns, intensifiers, neutral fillers
    and one of two adjective lexicons (27 positive, 27 negative words); the label is the
    lexicon's polarity (0 negative, 1 positive). Labels are balanced in both splits (counts
    differ by at most one) and no sentence appears twice, so dev shares none with train.

    Args:
        seed: Seed for ``random.Random``; the same seed gives the same splits.
        n_train: Number of training examples (>= 2).
        n_dev: Number of dev examples, returned as split ``"validation"`` (>= 2).

    Returns:
        Train and ``{"validation": ...}`` dev splits with ``text_b=None``.

    Raises:
        ValueError: A size is not an integer >= 2, or too large for the templates to fill with
            distinct sentences.
    """
    for setting, value in (("n_train", n_train), ("n_dev", n_dev)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(
                f"task.synthetic.{setting} must be an integer >= 2, got {value!r}; set it to "
                "a positive even number such as 2000."
            )
    rng = random.Random(seed)
    # Per label: the first `need_train` sentences go to train, the rest to dev.
    need_train = {0: n_train // 2, 1: n_train - n_train // 2}
    need_dev = {0: n_dev // 2, 1: n_dev - n_dev // 2}
    seen: set[str] = set()
    pools: dict[int, list[str]] = {0: [], 1: []}
    for label in (0, 1):
        needed = need_train[label] + need_dev[label]
        attempts = 0
        while len(pools[label]) < needed:
            attempts += 1
            if attempts > 50 * needed + 1000:
                raise ValueError(
                    f"task.synthetic n_train={n_train}, n_dev={n_dev}: could not generate that "
                    "many distinct sentences; lower task.synthetic.n_train or n_dev."
                )
            sentence = _synthetic_sentence(rng, label)
            if sentence in seen or not _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS:
                continue
            seen.add(sentence)
            pools[label].append(sentence)

    def make_split(part: str) -> Examples:
        pairs = []
        for label in (0, 1):
            pool = pools[label]
            chosen = pool[: need_train[label]] if part == "train" else pool[need_train[label] :]
            pairs.extend((sentence, label) for sentence in chosen)
        rng.shuffle(pairs)
        return Examples(
            text_a=[sentence for sentence, _ in pairs],
            text_b=None,
            labels=[label for _, label in pairs],
        )

    return RawSplits(train=make_split("train"), dev={"validation": make_split("dev")})


# --------------------------------------------------------------------------------------------
# Entry point


def load_raw(
    spec: TaskSpec,
    data_dir: str | Path | None,
    *,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
) -> RawSplits:
    """Load a task's raw splits from the right source.

    * ``synthetic`` task: generated by :func:`generate_synthetic` from ``seed``, with the
      ``synthetic`` mapping's ``n_train``/``n_dev`` overrides;
    * ``data_dir`` given: the original GLUE TSV files under it (:func:`read_glue_tsv`);
    * otherwise: the hub dataset ``nyu-mll/glue`` (:func:`load_hub`).

    Args:
        spec: The task.
        data_dir: GLUE root folder, or None for the hub. Must be None for the synthetic task.
        seed: Seed of the synthetic generator (unused for GLUE tasks).
        synthetic: Optional ``{"n_train": int, "n_dev": int}`` overrides for the synthetic
            task; ignored for GLUE tasks.

    Returns:
        Train and dev splits; ``dev`` keys are ``spec.dev_splits``.

    Raises:
        ValueError: Bad ``data_dir``/files (see :func:`read_glue_tsv`), ``data_dir`` set for
            the synthetic task, or unknown ``synthetic`` keys.
        RuntimeError: No ``data_dir`` and the hub is unreachable.
    """
    if spec.name == SYNTHETIC_TASK:
        if data_dir is not None:
            _layout(spec)  # raises the "data_dir is not used by the synthetic task" error
        overrides = dict(synthetic or {})
        unknown = sorted(set(overrides) - {"n_train", "n_dev"})
        if unknown:
            raise ValueError(
                f"task.synthetic has unknown keys {unknown}; the allowed keys are "
                "['n_dev', 'n_train']."
            )
        return generate_synthetic(seed, **overrides)
    if data_dir is not None:
        check_data_dir(spec, data_dir)
        return RawSplits(
            train=read_glue_tsv(spec, data_dir, "train"),
            dev={split: read_glue_tsv(spec, data_dir, split) for split in spec.dev_splits},
        )
    return load_hub(spec)
