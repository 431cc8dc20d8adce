"""What a task is: :class:`TaskSpec`, the table of the eight GLUE tasks and ``synthetic``, and the
containers raw data comes in (:class:`Examples`, :class:`RawSplits`).

The table holds what a task *is* (text columns, labels, metrics, dev splits); ``conf/task/*.yaml``
holds how a run reads it (``data_dir``, ``max_length``, the synthetic sizes) and selects it by
``name``.
"""

from __future__ import annotations

from dataclasses import dataclass

METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1", "mcc", "pearson", "spearman")
"""Metric names a :class:`TaskSpec` may list (see ``diffora_lab.metrics``)."""

_CLASSIFICATION_METRICS = frozenset({"accuracy", "f1", "mcc"})
_REGRESSION_METRICS = frozenset({"pearson", "spearman"})

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
        kinds: The task kinds it can run as (``diffora_lab.tasks.kinds``), the encoder default
            first: GLUE tasks ``("classification", "choice")`` (``choice``: as prompts with label
            words on a decoder), the commonsense suite ``("choice",)``.
        source: Where its data comes from (``load_raw`` dispatches on it): ``glue``,
            ``synthetic``, ``commonsense`` (LLM-Adapters JSON), ``synthetic_choice``.
        average_dev_splits: Report ``val/<metric>`` as the mean over the dev splits (every split
            also as ``val/<metric>_<split>``), e.g. the eight commonsense test sets.
    """

    name: str
    glue_dir: str
    text_fields: tuple[str, ...]
    num_labels: int
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    primary_metric: str
    dev_splits: tuple[str, ...]
    kinds: tuple[str, ...] = ("classification", "choice")
    source: str = "glue"
    average_dev_splits: bool = False

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
        if not self.kinds:
            raise ValueError(f"TaskSpec {self.name!r}: kinds must name at least one task kind.")

    @property
    def is_regression(self) -> bool:
        """True when the task predicts one float score (``num_labels == 1``)."""
        return self.num_labels == 1


ENTAILMENT_2 = ("entailment", "not_entailment")

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
            label_names=ENTAILMENT_2,
            metrics=("accuracy",),
            primary_metric="accuracy",
            dev_splits=("validation",),
        ),
        TaskSpec(
            name="rte",
            glue_dir="RTE",
            text_fields=("sentence1", "sentence2"),
            num_labels=2,
            label_names=ENTAILMENT_2,
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
            kinds=("classification",),  # a score, not label words
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
            source="synthetic",
        ),
    )
}
"""Every task, keyed by name: the eight GLUE tasks and ``synthetic`` here, the commonsense suite
and ``synthetic_choice`` added by their modules (:func:`register_tasks`)."""


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def register_tasks(*specs: TaskSpec) -> None:
    """Adds tasks to :data:`TASKS` (a module that defines a task family calls it on import)."""
    for spec in specs:
        if spec.name in TASKS and TASKS[spec.name] != spec:
            raise ValueError(f"task {spec.name!r} is registered twice")
        TASKS[spec.name] = spec


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
    by_key = {_key(task): spec for task, spec in TASKS.items()}
    if _key(name) in by_key:
        return by_key[_key(name)]
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
