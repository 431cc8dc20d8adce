"""The shared search of a budget sweep: its key, its cache entry, and what a reuse records.

Runs that differ only in settings acting after discretization share the state at the end of the
search (``dam.search_cache_dir/<key>/search_end.ckpt``). The key covers everything that can change
that state: the settings, the bytes of the training data actually read and the search split carved
from it, the backbone's files (weights, config, tokenizer; a hub model's resolved revision), and
the source of this package. An entry that cannot be read, is truncated, or was made with another
search split is skipped with a warning and a fresh search runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Settings that act only after discretization (or not on training at all): runs that differ in
# nothing else share one search.
AFTER_SEARCH_KEYS = (
    "budget",
    "ckpt_path",
    "overwrite",
    "logger",
    "train.val_every",
    "train.ckpt_every",
    "train.log_every",
    "train.progress_every",
    "train.eval_batch_size",
    "train.stop_after",
    "train.finite_check_every",
    "dam.fold_gates",
    "dam.weight_sharing",
    "dam.merge_search_split",
    "dam.mask_path",
    "dam.log_every",
    "dam.reuse_search",
    "dam.search_cache_dir",
    "data.cache_dir",  # data.bucketing stays in the key: it changes the batches
    "data.num_workers",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)
SNAPSHOT = "search_end.ckpt"
META = "meta.json"


def search_key(cfg: DictConfig, inputs: str = "") -> str:
    """Hash of every setting that can change the state at the end of the search.

    Args:
        cfg: The run's config.
        inputs: :func:`inputs_fingerprint` of the data, backbone and source (empty: settings only).
    """
    from diffora_lab import __version__
    from diffora_lab.checkpointing import STATE_FORMAT

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
    payload = json.dumps([__version__, STATE_FORMAT, settings, inputs], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _hash_files(files: list[Path], root: Path, digest) -> None:
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)


def source_fingerprint(root: Path | None = None) -> str:
    """Hash of the package's Python source (``diffora_lab/**/*.py``, or under ``root``)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    digest = hashlib.sha256()
    _hash_files(sorted(root.rglob("*.py")), root, digest)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """Hash of every file in a model folder (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    _hash_files(files, folder, digest)
    return digest.hexdigest()


def backbone_fingerprint(bcfg: DictConfig) -> str:
    """What the backbone's state depends on beyond the settings.

    A local or package folder: its files; a config-built model: its tokenizer's folder (the
    config itself is a setting); a hub id: the resolved revision of the cached snapshot, else the
    id (a later download may differ, and then so does the next key).
    """
    from diffora_lab import backbones

    if bcfg.get("config") is not None:
        return "config:" + folder_fingerprint(backbones.package_folder(str(bcfg.tokenizer_from)))
    source = backbones.resolve_source(bcfg)
    if Path(source).is_dir():
        return "files:" + folder_fingerprint(Path(source))
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(source, local_files_only=True)
        return f"hub:{source}@{Path(snapshot).name}"
    except Exception:  # not cached: the id is all there is
        return f"hub:{source}"


def data_fingerprint(train: Any, search_indices: list[int]) -> str:
    """Hash of the training examples as read (texts and labels) and the search split's rows."""
    digest = hashlib.sha256()
    for column in (train.text_a, train.text_b or [], train.labels):
        digest.update(json.dumps(list(column)).encode())
        digest.update(b"\0")
    digest.update(json.dumps(list(search_indices)).encode())
    return digest.hexdigest()


def inputs_fingerprint(cfg: DictConfig, train: Any, search_indices: list[int]) -> str:
    """Data, backbone and source fingerprints together (the non-settings part of the key)."""
    return json.dumps(
        {
            "data": data_fingerprint(train, search_indices),
            "backbone": backbone_fingerprint(cfg.backbone),
            "source": source_fingerprint(),
        },
        sort_keys=True,
    )


@dataclass
class SearchCache:
    """One entry of the search cache.

    Attributes:
        key: The search key.
        folder: ``dam.search_cache_dir/<key>``.
        split: Hash of the search split the entry must have been made with.
    """

    key: str
    folder: Path
    split: str

    @property
    def snapshot(self) -> Path:
        return self.folder / SNAPSHOT

    def usable(self, search_steps: int) -> dict[str, Any] | None:
        """The entry's record when it can be reused, else None (with a warning why not)."""
        if not self.snapshot.is_file():
            return None
        meta_file = self.folder / META
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return self._skip(f"its record {meta_file} is missing or unreadable")
        if meta.get("split") != self.split or meta.get("key") != self.key:
            return self._skip("it was made with another search split")
        from diffora_lab.checkpointing import STATE_KEY, UnsafeFile, read_checkpoint

        try:
            checkpoint = read_checkpoint(self.snapshot, mmap=True)
            step = checkpoint[STATE_KEY]["step"]
        except UnsafeFile as error:  # planted in a shared cache: say so, never search over it
            raise UnsafeFile(
                f"dam.search_cache_dir: {error}. Delete {self.folder} (and find out who wrote "
                "it), or pass dam.reuse_search=false."
            ) from None
        except Exception as error:  # truncated, empty, not a checkpoint: search afresh
            return self._skip(f"it cannot be read ({type(error).__name__}: {error})")
        if step != search_steps:
            return self._skip(f"it ends at step {step}, this search at step {search_steps}")
        return {"path": str(self.snapshot), "key": self.key, "run_folder": meta.get("run_folder")}

    def reuse(self, output_dir: Path, search_steps: int) -> dict[str, Any] | None:
        """The cache entry's record when this run can start from it; copies its gate history."""
        source = self.usable(search_steps)
        if source is None:
            return None
        log.info("search %s already done: starting from %s", self.key, self.snapshot)
        history = self.folder / "gates.jsonl"
        if history.is_file():
            (output_dir / "dam").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(history, output_dir / "dam" / "gates.jsonl")
        return source

    def _skip(self, why: str) -> None:
        log.warning("search cache entry %s not reused: %s; searching afresh.", self.folder, why)
        return None

    def record(self, run_folder: Path) -> None:
        """Writes the entry's record after its snapshot (called on rank 0 by Discretization)."""
        meta = {
            "key": self.key,
            "split": self.split,
            "run_folder": str(run_folder),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp = self.folder / f".{META}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.folder / META)


def open_entry(cfg: DictConfig, train: Any, search_indices: list[int]) -> SearchCache:
    """The cache entry this run's search maps to."""
    key = search_key(cfg, inputs_fingerprint(cfg, train, search_indices))
    folder = Path(str(cfg.dam.search_cache_dir)).expanduser() / key
    split = hashlib.sha256(json.dumps(list(search_indices)).encode()).hexdigest()
    return SearchCache(key, folder, split)
