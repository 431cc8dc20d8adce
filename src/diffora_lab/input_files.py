"""What a run reads or writes besides its settings, checked before its folder is written.

A mask file's values (:func:`check_mask_values`: after ``Mask.load`` has checked its structure),
the cache folders (:func:`check_writable`) and the training data once read
(:func:`check_train_data`: refuses data a run cannot use, and returns warnings for data it can
use but whose result means little; they are logged, recorded in ``results.json`` and printed in
the summary).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

UNEDITED = "use an unedited dam/mask.json"


def check_mask_values(path: str | Path) -> None:
    """Refuses a mask whose values disagree: non-bool ``kept``, non-finite ``gates``,
    ``module_types`` that do not match ``shape``, or a ``budget`` that does not keep ``k``.

    Raises:
        ValueError: Naming ``dam.mask_path`` and the entry.
    """
    from diffora_lab.dam import num_kept

    where = f"dam.mask_path={str(path)!r}"
    data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    for index, flag in enumerate(data["kept"]):
        if not isinstance(flag, bool):
            raise ValueError(f"{where}: kept[{index}]={flag!r} is not true or false; {UNEDITED}.")
    for index, gate in enumerate(data["gates"]):
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not math.isfinite(gate):
            raise ValueError(
                f"{where}: gates[{index}]={gate!r} is not a finite number; {UNEDITED}."
            )
    types, shape = data["module_types"], list(data["shape"])
    if len(types) != shape[1]:
        raise ValueError(
            f"{where}: shape {shape} has {shape[1]} module types, module_types lists "
            f"{len(types)} ({types}); {UNEDITED}."
        )
    budget, k, n = data["budget"], data["k"], len(data["modules"])
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"{where}: budget={budget!r} is not in (0, 1]; {UNEDITED}.")
    if data.get("unit", "modules") == "modules" and k != num_kept(budget, n):
        raise ValueError(
            f"{where}: budget={budget} keeps {num_kept(budget, n)} of {n} modules, the mask keeps "
            f"k={k}; {UNEDITED} (the run reports the mask's budget)."
        )
    sizes, target = data.get("sizes"), data.get("target")
    if data.get("unit") == "params" and sizes is not None and target is not None:
        held = sum(size for size, keep in zip(sizes, data["kept"]) if keep)
        if len(sizes) != n or abs(held - target) > max(sizes):
            raise ValueError(
                f"{where}: its kept modules hold {held:,} adapter parameters, its target is "
                f"{target:,.0f} (budget={budget} in params), more than one module "
                f"({max(sizes):,}) apart; {UNEDITED} (the run reports the mask's budget)."
            )


def check_writable(setting: str, folder: str | Path) -> None:
    """Refuses a folder that cannot be created or written (a file in its path, no permission).

    Raises:
        ValueError: Naming the setting, the path and why.
    """
    path = Path(str(folder)).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"{setting}={str(folder)!r}: {existing} is a file, not a folder; choose a folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{setting}={str(folder)!r}: {existing} is not writable (read-only or no permission "
            "for this user); choose a folder you can write to."
        )


def check_train_data(
    train: Any, spec: Any, batch_size: int, search_split: float, seed: int
) -> list[str]:
    """Refuses training data a run cannot use; returns warnings about data it can.

    Args:
        train: The train split as read (``tasks.Examples``).
        spec: The task (``tasks.TaskSpec``).
        batch_size: ``train.batch_size``.
        search_split: ``dam.search_split`` when the run searches, else 0.
        seed: The run's seed (the search split is carved with it).

    Raises:
        ValueError: Too few examples to carve a search split and still train.
    """
    from diffora_lab.data import carve_search_split

    n = len(train)
    train_rows = n
    if search_split > 0:
        try:
            train_rows = n - len(carve_search_split(n, search_split, seed))
        except ValueError as error:
            raise ValueError(
                f"task: the train split has {n} example(s); {error} A search needs at least 2 "
                "(one for the search split, one to train on): use more training data."
            ) from None
    warnings = []
    if not spec.is_regression and len(set(train.labels)) == 1:
        warnings.append(
            f"every train example has label {train.labels[0]!r}: a model that always answers "
            "it scores the majority rate, whatever it learned"
        )
    if train_rows < batch_size:
        warnings.append(
            f"{train_rows} training example(s), fewer than train.batch_size={batch_size}: every "
            "step sees the same examples"
        )
    texts = zip(train.text_a, train.text_b or [""] * n)
    empty = sum(1 for a, b in texts if not a.strip() and not b.strip())
    if empty:
        warnings.append(f"{empty} of {n} train examples have empty text")
    return warnings


def check_folders(cfg: DictConfig) -> None:
    """The cache folders a run writes: ``data.cache_dir``, and the search cache when used."""
    from diffora_lab import methods

    check_writable("data.cache_dir", cfg.data.cache_dir)
    if methods.method_for(cfg).search_enabled(cfg) and cfg.dam.reuse_search:
        check_writable("dam.search_cache_dir", cfg.dam.search_cache_dir)


def check_mask_method(cfg: DictConfig) -> None:
    """Refuses ``dam.mask_path`` for a method that would ignore it."""
    from diffora_lab import methods

    if not methods.method_for(cfg).searches:  # it never reads a mask: refuse, not ignore
        takes = [name for name in methods.method_names() if methods.get_method(name).searches]
        raise ValueError(
            f"dam.mask_path={str(cfg.dam.mask_path)!r}: method={cfg.method.name} does not read "
            f"a mask; drop dam.mask_path, or fine-tune the mask with method={takes[0]}."
        )
