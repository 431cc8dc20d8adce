"""The commonsense suite of LLM-Adapters and DoRA: eight test sets and ``commonsense_170k``.

Items are JSON objects ``{"instruction", "input", "output", "answer"}``: the instruction ends
with ``Answer format: a/b/c``, the answer is one of those words, the output is "the correct answer
is <answer>". Files follow those repositories' layout under ``task.data_dir``:

- ``dataset/<folder>/test.json``: the test set of each task (``boolq``, ``piqa``,
  ``social_i_qa``, ``hellaswag``, ``winogrande``, ``ARC-Easy``, ``ARC-Challenge``,
  ``openbookqa``), the reporting split here (there is no separate dev set);
- ``dataset/<folder>/train.json``: a task's own training items (``task=boolq``);
- ``ft-training_set/commonsense_170k.json``: the eight tasks' training items together
  (``task=commonsense_170k``, which reports the mean over the eight test sets).

Without ``task.data_dir`` the same files come from ``task.hub_id``, a Hugging Face dataset
repository in that layout (``hf_hub_download``). An item is read as ``Examples`` with the
instruction as ``text_a``, the input (if any item has one) as ``text_b`` and the answer's index
among its ``Answer format`` words as the label.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from diffora_lab.tasks.prompts import COMMONSENSE, answer_format
from diffora_lab.tasks.spec import Examples, RawSplits, TaskSpec, register_tasks

FOLDERS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "openbookqa": "openbookqa",
}
CHOICES = {
    "boolq": 2,
    "piqa": 2,
    "social_i_qa": 3,
    "hellaswag": 4,
    "winogrande": 2,
    "arc_easy": 5,
    "arc_challenge": 5,
    "openbookqa": 4,
}
TRAIN_170K = "ft-training_set/commonsense_170k.json"


def _spec(name: str, choices: int, dev_splits: tuple[str, ...], average: bool = False) -> TaskSpec:
    return TaskSpec(
        name=name,
        glue_dir="",
        text_fields=("instruction", "input"),
        num_labels=choices,
        label_names=tuple(f"choice{i + 1}" for i in range(choices)),
        metrics=("accuracy",),
        primary_metric="accuracy",
        dev_splits=dev_splits,
        kinds=("choice",),
        source="commonsense",
        average_dev_splits=average,
    )


SPECS = [_spec(name, n, ("test",)) for name, n in CHOICES.items()]
SPECS.append(_spec("commonsense_170k", max(CHOICES.values()), tuple(FOLDERS), average=True))
register_tasks(*SPECS)


def split_files(spec: TaskSpec) -> dict[str, str]:
    """Split name -> file path in the layout (``train`` and each dev split)."""
    if spec.name == "commonsense_170k":
        files = {"train": TRAIN_170K}
        files.update({task: f"dataset/{FOLDERS[task]}/test.json" for task in spec.dev_splits})
        return files
    folder = FOLDERS[spec.name]
    return {"train": f"dataset/{folder}/train.json", "test": f"dataset/{folder}/test.json"}


def check_data_dir(spec: TaskSpec, data_dir: str | Path) -> None:
    """The task's files exist under ``data_dir`` (nothing is read).

    Raises:
        ValueError: Naming ``task.data_dir`` and the missing files.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"task.data_dir={str(data_dir)!r} is not an existing folder; set it to a folder in the "
            "LLM-Adapters layout (dataset/<task>/test.json, ft-training_set/commonsense_170k.json)."
        )
    missing = [rel for rel in split_files(spec).values() if not (root / rel).is_file()]
    if missing:
        hint = " (or train on task=commonsense_170k)" if "train.json" in missing[0] else ""
        raise ValueError(
            f"task.data_dir={str(data_dir)!r} lacks {missing} for task {spec.name!r}; add them "
            f"from the LLM-Adapters or DoRA repository{hint}."
        )


def _item_label(item: object, where: str, limit: int) -> tuple[str, str | None, int, str | None]:
    """``(instruction, input, label, output)`` of one item, checked."""
    if not isinstance(item, dict) or not isinstance(item.get("instruction"), str):
        raise ValueError(f"{where} is not an object with an 'instruction' string.")
    instruction = item["instruction"]
    choices = answer_format(instruction)
    if not choices:
        raise ValueError(
            f"{where}: its instruction has no 'Answer format: a/b' line, so its choices are "
            "unknown; every item lists its answer words on that line."
        )
    if "answer" not in item or item["answer"] in (None, ""):
        raise ValueError(
            f"{where} has no 'answer'; every item needs one, a word of its 'Answer format' line "
            f"{list(choices)}."
        )
    answer = str(item["answer"]).strip()
    if answer not in choices:
        raise ValueError(
            f"{where}: its answer {answer!r} is not among its choices {list(choices)} (its "
            "'Answer format' line); fix the item's answer or instruction."
        )
    if len(choices) > limit:
        raise ValueError(f"{where} lists {len(choices)} choices; this task has at most {limit}.")
    return instruction, item.get("input") or None, choices.index(answer), item.get("output")


def read_items(path: Path, spec: TaskSpec, shown: str) -> Examples:
    """One JSON file of items as :class:`Examples` (label = the answer's index among its choices).

    Raises:
        ValueError: Not a JSON list, or an item without instruction/answer format/answer, or an
            answer that is not one of its choices (naming the file and the item).
    """
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{shown}: not a JSON file of items ({error}).") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{shown}: expected a non-empty JSON list of items.")
    rows = [_item_label(it, f"{shown} item {i}", spec.num_labels) for i, it in enumerate(items)]
    unlike = sum(
        1
        for instruction, _, label, output in rows
        if output is not None
        and output.strip() != f"{COMMONSENSE.answer_prefix} {answer_format(instruction)[label]}"
    )
    if unlike:
        warnings.warn(
            f"{shown}: {unlike} of {len(rows)} items' output differs from 'the correct answer is "
            "<answer>'; training uses that form (the answer scored).",
            UserWarning,
            stacklevel=2,
        )
    inputs = [row[1] or "" for row in rows]
    return Examples(
        text_a=[row[0] for row in rows],
        text_b=inputs if any(inputs) else None,
        labels=[row[2] for row in rows],
    )


def load_local(spec: TaskSpec, data_dir: str | Path) -> RawSplits:
    """The task's train and test splits from a folder in the LLM-Adapters layout."""
    check_data_dir(spec, data_dir)
    root = Path(data_dir).expanduser()
    splits = {
        split: read_items(root / rel, spec, f"task.data_dir={str(data_dir)!r}: {root / rel}")
        for split, rel in split_files(spec).items()
    }
    train = splits.pop("train")
    return RawSplits(train=train, dev=splits)


def check_hub(spec: TaskSpec, hub_id: str | None) -> None:
    """Before anything loads: a hub repository is named and reachable (or cached).

    Raises:
        ValueError: Neither ``task.data_dir`` nor a usable ``task.hub_id``.
    """
    from diffora_lab.backbones import hub_reachable

    files = sorted(set(split_files(spec).values()))
    if hub_id is None:
        raise ValueError(
            f"task {spec.name!r} needs task.data_dir (a folder in the LLM-Adapters layout with "
            f"{files}) or task.hub_id (a Hugging Face dataset repository in that layout)."
        )
    if not hub_reachable() and not _hub_cached(hub_id, files):
        raise ValueError(
            f"task.hub_id={hub_id!r}: the Hugging Face Hub cannot be reached from here and has no "
            f"cached copy of {files}; pass task.data_dir, a folder in the LLM-Adapters layout."
        )


def _hub_cached(hub_id: str, files: list[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return all(
        isinstance(try_to_load_from_cache(hub_id, f, repo_type="dataset"), str) for f in files
    )


def load_hub(spec: TaskSpec, hub_id: str) -> RawSplits:
    """The task's splits from a hub dataset repository in the LLM-Adapters layout."""
    from huggingface_hub import hf_hub_download

    splits = {}
    for split, rel in split_files(spec).items():
        try:
            path = Path(hf_hub_download(hub_id, rel, repo_type="dataset"))
        except Exception as error:  # offline, missing file, no access: all mean "use data_dir"
            raise ValueError(
                f"task.hub_id={hub_id!r}: could not download {rel} ({type(error).__name__}: "
                f"{error}); pass task.data_dir, a folder in the LLM-Adapters layout."
            ) from error
        splits[split] = read_items(path, spec, f"task.hub_id={hub_id!r}: {rel}")
    train = splits.pop("train")
    return RawSplits(train=train, dev=splits)
