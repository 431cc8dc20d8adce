"""Our multiple-choice items as an lm-evaluation-harness task (a YAML file and a local JSONL file).

lm-evaluation-harness (``pip install lm_eval``) scores a ``multiple_choice`` task the way
:mod:`diffora_lab.scoring` does: each choice's continuation ``target_delimiter + choice`` is scored
by its summed log-likelihood given ``doc_to_text``; ``acc`` takes the highest, ``acc_norm`` the
highest per character. :func:`write_task` writes the items so that lm_eval builds exactly the
(context, continuation) requests our scorer builds:

- ``<name>.jsonl``: one line per item, ``{"context", "choices", "gold"}``;
- ``<name>.yaml``: ``output_type: multiple_choice``, ``doc_to_text: context``,
  ``doc_to_choice: choices``, ``doc_to_target: gold``, the items' ``target_delimiter``, metrics
  ``acc`` and ``acc_norm``, and the JSONL file read with the ``datasets`` JSON loader (offline).

Then, with an exported run::

    lm_eval --model hf --model_args pretrained=BASE,peft=RUN/adapter \\
        --tasks NAME --include_path FOLDER
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from diffora_lab.scoring import ChoiceItem

METRICS = ("acc", "acc_norm")


def _yaml_string(text: str) -> str:
    """A double-quoted YAML scalar (JSON strings are valid YAML), so spaces and newlines survive."""
    return json.dumps(text)


def task_yaml(name: str, data_file: Path, delimiter: str) -> str:
    """The text of an lm-evaluation-harness task config reading ``data_file`` (JSONL)."""
    metrics = "".join(
        f"  - metric: {metric}\n    aggregation: mean\n    higher_is_better: true\n"
        for metric in METRICS
    )
    return (
        f"# Written by diffora_lab.lm_eval_task: the items of {name} as an lm-evaluation-harness\n"
        "# multiple_choice task (each choice scored by log-likelihood, as diffora_lab scores it).\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {_yaml_string(str(data_file.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        f"target_delimiter: {_yaml_string(delimiter)}\n"
        "metric_list:\n"
        f"{metrics}"
        "metadata:\n"
        "  version: 1.0\n"
    )


def write_task(items: Sequence[ChoiceItem], folder: str | Path, name: str) -> Path:
    """Writes ``<name>.yaml`` and ``<name>.jsonl`` into ``folder``; returns the YAML's path.

    Args:
        items: The questions (every item needs ``gold``; all share one delimiter).
        folder: The ``--include_path`` folder (created if missing).
        name: The task name passed to ``--tasks``; letters, digits and ``_`` only.

    Raises:
        ValueError: No items, an item without ``gold``, mixed delimiters or a bad name.
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"task name {name!r}: use letters, digits and '_' only (e.g. 'sst2_dev')")
    if not items:
        raise ValueError(f"{name}: no items to write")
    delimiters = {item.delimiter for item in items}
    if len(delimiters) != 1:
        raise ValueError(f"{name}: the items use several delimiters {sorted(delimiters)}")
    missing = [i for i, item in enumerate(items) if item.gold is None]
    if missing:
        raise ValueError(f"{name}: items {missing[:5]} have no gold answer (ChoiceItem.gold)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / f"{name}.jsonl"
    with data_file.open("w", encoding="utf-8") as handle:
        for item in items:
            row = {"context": item.context, "choices": list(item.choices), "gold": item.gold}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    config = folder / f"{name}.yaml"
    config.write_text(task_yaml(name, data_file, delimiters.pop()), encoding="utf-8")
    return config
