"""Reading GLUE in the original TSV layout on disk (the hub dataset: glue_hub.py)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffora_lab.tasks.spec import (
    ENTAILMENT_2,
    SYNTHETIC_TASK,
    TASKS,
    Examples,
    TaskSpec,
)

# Rows whose field count differs from the header are skipped (with a warning) up to this
# fraction of a file; the real QQP train file has a handful of them. More means a broken file.
MAX_MALFORMED_FRACTION = 0.01

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
    "qnli": _TsvLayout(("question", "sentence"), "label", ENTAILMENT_2),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label", ENTAILMENT_2),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label", TASKS["mnli"].label_names),
}

_DEV_FILES = {
    "validation": "dev.tsv",
    "matched": "dev_matched.tsv",
    "mismatched": "dev_mismatched.tsv",
}
_STSB_RANGE = (0.0, 5.0)


def glue_task_names() -> list[str]:
    """The GLUE tasks this layout (and the hub dataset) holds."""
    return sorted(_TSV_LAYOUTS)


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
            if line_number == 1 and line.count("\r") > 1:  # a whole file read as one line
                raise ValueError(
                    f"{path} ends its lines with a carriage return only (CR, old Mac style); "
                    "GLUE files end them with a line feed: convert it (tr '\\r' '\\n')."
                )
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


def _check_rows(
    path: Path, spec: TaskSpec, split: str, good: int, malformed: list[int], num_fields: int
) -> None:
    """Refuses an empty split or one with too many malformed rows; warns of a few skipped."""
    total = good + len(malformed)
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

    _check_rows(path, spec, split, len(labels), malformed, num_fields)
    return Examples(text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None, labels=labels)
