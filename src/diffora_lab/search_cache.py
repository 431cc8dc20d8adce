"""Budget sweeps search once: the key of a search, and where its end-of-search snapshot lives.

Runs that differ only in settings acting after discretization (:data:`AFTER_SEARCH_KEYS`) share
one search: the first saves its state at the end of the search under
``dam.search_cache_dir/<key>/``, the others start from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffora_lab.module import STATE_FORMAT

log = logging.getLogger(__name__)


# Settings that act only after discretization (or not on training at all): runs that differ in
# nothing else share one search (issue: "search once" budget sweeps).
AFTER_SEARCH_KEYS = (
    "budget",
    "ckpt_path",
    "logger",
    "train.val_every",
    "train.ckpt_every",
    "train.log_every",
    "train.eval_batch_size",
    "train.stop_after",
    "dam.fold_gates",
    "dam.weight_sharing",
    "dam.merge_search_split",
    "dam.mask_path",
    "dam.log_every",
    "dam.reuse_search",
    "dam.search_cache_dir",
    "data",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)


def search_key(cfg: DictConfig) -> str:
    """Hash of every setting that can change the state at the end of the search."""
    from diffora_lab import __version__

    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.pop("hydra", None)
    dam = cfg.dam
    budget_shapes_search = (
        dam.relaxation == "topk" or dam.get("progressive") or float(dam.budget_penalty) > 0
    )
    for dotted in AFTER_SEARCH_KEYS:
        if dotted == "budget" and budget_shapes_search:
            continue  # these searches steer towards k: the budget changes their end state
        parts = dotted.split(".")
        node = settings
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    payload = json.dumps([__version__, STATE_FORMAT, settings], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shared_search(cfg: DictConfig, output_dir: Path, can_reuse: bool) -> tuple[dict, Path]:
    """Where this run's end-of-search snapshot lives, and whether another run already made it.

    A reused snapshot's gate records are copied into this run, so its figures show the search.
    """
    key = search_key(cfg)
    snapshot = Path(str(cfg.dam.search_cache_dir)).expanduser() / key / "search_end.ckpt"
    reused = can_reuse and snapshot.is_file()
    if reused:
        log.info("search %s already done: starting from %s", key, snapshot)
        history = snapshot.with_name("gates.jsonl")
        if history.is_file():
            (output_dir / "dam").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(history, output_dir / "dam" / "gates.jsonl")
    return {"reused": reused, "key": key}, snapshot
