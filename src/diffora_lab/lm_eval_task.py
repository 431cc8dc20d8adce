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

For a finished run, ``python -m diffora_lab.lm_eval_task RUN`` writes the run's dev items
into ``RUN/lm_eval/`` (task ``diffora_<task>``), saves the base model there as ``base/`` when the
backbone is built from a config (random weights: nothing else could load it), and prints the
command that scores the run's adapter::

    lm_eval --model hf --model_args pretrained=BASE,peft=RUN/adapter \\
        --tasks diffora_<task> --include_path RUN/lm_eval

lm_eval loads its tokenizer with ``AutoTokenizer`` from ``pretrained=``, and ``AutoTokenizer``
goes by the model's type: a backbone that borrows another family's tokenizer (``tiny_qwen2``
uses SmolLM2's) would be scored with other tokens than it was trained on. The run's tokenizer is
therefore written to ``RUN/lm_eval/tokenizer/`` and passed as ``tokenizer=`` whenever reloading
from the base folder does not give the run's tokens on the items (and always for a
config-built base, whose folder holds the model only).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def run_items(cfg: Any, split: str | None = None) -> tuple[list[ChoiceItem], Any, Any]:
    """A run's dev items as its task kind scores them, with the tokenizer and the resolved build.

    Raises:
        ValueError: The run's task kind is not a causal LM's (nothing for lm_eval to score).
    """
    from omegaconf import OmegaConf

    from diffora_lab import backbones, building
    from diffora_lab.tasks import get_task, load_raw

    spec = get_task(cfg.task.name)
    tokenizer = backbones.load_tokenizer(cfg.backbone)
    resolved = building.resolve(cfg, spec, tokenizer)
    prompt = getattr(resolved.kind, "prompt", None)
    if not resolved.family.causal_lm or prompt is None:
        raise ValueError(
            f"task={spec.name} on backbone={cfg.backbone.name} is not scored by a causal LM's "
            "log-likelihoods; lm_eval tasks are written for decoder runs (task kind choice)."
        )
    split = split or spec.dev_splits[0]
    if split not in spec.dev_splits:
        raise ValueError(f"--split {split}: task {spec.name} has dev splits {spec.dev_splits}")
    synthetic = cfg.task.get("synthetic")
    raw = load_raw(
        spec,
        cfg.task.get("data_dir") or None,
        seed=int(cfg.seed),
        synthetic=OmegaConf.to_container(synthetic) if synthetic else None,
        hub_id=cfg.task.get("hub_id"),
    )
    dev = raw.dev[split]
    second = dev.text_b or [None] * len(dev)
    items = [prompt.item(a, b, y) for a, b, y in zip(dev.text_a, second, dev.labels)]
    return items, tokenizer, resolved


def base_for_lm_eval(cfg: Any, resolved: Any, tokenizer, out: Path) -> str:
    """What lm_eval loads as ``pretrained=``: the backbone's folder or hub id; a config-built
    (random, fixed-seed) backbone is saved to ``out/base`` first (the model only)."""
    from diffora_lab import backbones, building

    if cfg.backbone.get("config") is None:
        return backbones.resolve_source(cfg.backbone)
    folder = out / "base"
    building.load_model(cfg, resolved, tokenizer).save_pretrained(folder)
    return str(folder)


def _same_tokens(tokenizer, folder: Path, items: Sequence[ChoiceItem]) -> bool:
    """Whether ``AutoTokenizer`` on ``folder`` encodes the items' texts as ``tokenizer`` does."""
    from transformers import AutoTokenizer

    try:
        reloaded = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):  # no tokenizer files there
        return False
    texts = [i.context + i.delimiter + c for i in items[:32] for c in i.choices]
    return all(reloaded.encode(t) == tokenizer.encode(t) for t in texts)


def tokenizer_for_lm_eval(tokenizer, base: str, items: Sequence[ChoiceItem], out: Path):
    """The ``tokenizer=`` lm_eval needs (None: the base's own gives the run's tokens).

    A hub id is taken as is (the run loaded its tokenizer from there too).

    Raises:
        ValueError: Even the saved tokenizer reloads into other tokens.
    """
    if not Path(base).is_dir() or _same_tokens(tokenizer, Path(base), items):
        return None
    folder = out / "tokenizer"
    tokenizer.save_pretrained(folder)
    if not _same_tokens(tokenizer, folder, items):
        raise ValueError(
            f"the run's tokenizer, saved to {folder}, reloads with other tokens: lm_eval would "
            "score other requests than the run's. Pass lm_eval the tokenizer the run used."
        )
    return str(folder)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffora_lab.lm_eval_task RUN``: see the module docstring."""
    from diffora_lab.evaluate import locate

    parser = argparse.ArgumentParser(
        prog="python -m diffora_lab.lm_eval_task",
        description="Write a decoder run's dev items as an lm-evaluation-harness task.",
    )
    parser.add_argument("run", type=Path, help="a finished run folder (with adapter/)")
    parser.add_argument("--out", type=Path, help="task folder (default RUN/lm_eval)")
    parser.add_argument("--name", help="task name (default diffora_<task>)")
    parser.add_argument("--split", help="dev split (default the task's first)")
    args = parser.parse_args(argv)
    try:
        source = locate(args.run)
        items, tokenizer, resolved = run_items(source.cfg, args.split)
        out = args.out or args.run / "lm_eval"
        name = args.name or f"diffora_{source.cfg.task.name}"
        write_task(items, out, name)
        base = base_for_lm_eval(source.cfg, resolved, tokenizer, out)
        own = tokenizer_for_lm_eval(tokenizer, base, items, out)
    except ValueError as error:
        print(f"diffora_lab.lm_eval_task: {error}", file=sys.stderr)
        return 2
    peft = f",peft={source.adapter}" if source.adapter is not None else ""
    peft += f",tokenizer={own}" if own else ""
    limit = source.cfg.task.get("eval_max_length")
    length = f",max_length={limit}" if limit else ""
    print(f"wrote {len(items)} items to {out / (name + '.jsonl')} ({out / (name + '.yaml')})")
    print(
        f"lm_eval --model hf --model_args pretrained={base}{peft}{length} "
        f"--tasks {name} --include_path {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
