"""The shared search of a budget sweep: its key, its cache entry, and what a reuse records.

Runs that differ only in settings acting after discretization share one search
(``dam.search_cache_dir/<key>/``). The key covers everything that can change the search: the
settings, the bytes of the training data actually read and the search split carved from it, the
backbone's files (weights, config, tokenizer; a hub model's resolved revision), and the source of
this package. Of the budget it holds only what the search variant declares its search depends on
(:meth:`~diffora_lab.searches.SearchVariant.key_budget`): nothing for the paper's search, the
sweep's smallest budget for the progressive one.

An entry holds snapshots, one per budget the search served (a budget-free search has one, for
any budget): the state after the step at which that budget's search ended, named by step and
budget in ``meta.json``. A run takes the snapshot of its own budget and only discretizes and
fine-tunes; failing that, it continues the search from the latest snapshot before its own end
(the progressive search of a sweep passes the larger budgets first). An entry that cannot be
read, is truncated, or was made with another search split is skipped with a warning and a fresh
search runs.
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
# The budget's settings: the search variant declares what of them its search depends on.
BUDGET_KEYS = ("budget", "budget_unit", "dam.sweep_budgets")
META = "meta.json"


def search_key(cfg: DictConfig, inputs: str = "") -> str:
    """Hash of every setting that can change the state at the end of the search.

    Args:
        cfg: The run's config.
        inputs: :func:`inputs_fingerprint` of the data, backbone and source (empty: settings only).
    """
    from diffora_lab import __version__
    from diffora_lab.checkpointing import STATE_FORMAT
    from diffora_lab.searches import search_for

    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.pop("hydra", None)
    for dotted in (*AFTER_SEARCH_KEYS, *BUDGET_KEYS):
        parts = dotted.split(".")
        node = settings
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    searched = search_for(cfg).key_budget(cfg)  # the variant's declaration, not a list of names
    payload = json.dumps(
        [__version__, STATE_FORMAT, settings, searched, inputs], sort_keys=True, default=str
    )
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
        return "config:" + folder_fingerprint(Path(backbones.tokenizer_source(bcfg)))
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


def snapshot_tag(budget: Any) -> str:
    """A snapshot's budget in its file name: ``any`` for a budget-free search."""
    return "any" if budget is None else f"{budget.unit}{budget.fraction:g}"


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

    def snapshot(self, step: int, budget: Any) -> Path:
        """Where the state after ``step`` of ``budget``'s search is kept."""
        return self.folder / f"step{step:06d}-{snapshot_tag(budget)}.ckpt"

    def _meta(self) -> tuple[dict[str, Any] | None, str]:
        """The entry's record, or None and why it cannot be used."""
        meta_file = self.folder / META
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return None, f"its record {meta_file} is missing or unreadable"
        if meta.get("split") != self.split or meta.get("key") != self.key:
            return None, "it was made with another search split"
        return meta, ""

    def _readable(self, path: Path, step: int, quiet: bool = False) -> bool:
        from diffora_lab.checkpointing import STATE_KEY, UnsafeFile, read_checkpoint

        warn = (lambda why: None) if quiet else self._skip
        try:
            checkpoint = read_checkpoint(path, mmap=True)
            found = checkpoint[STATE_KEY]["step"]
        except UnsafeFile as error:  # planted in a shared cache: say so, never search over it
            raise UnsafeFile(
                f"dam.search_cache_dir: {error}. Delete {self.folder} (and find out who wrote "
                "it), or pass dam.reuse_search=false."
            ) from None
        except Exception as error:  # truncated, empty, not a checkpoint: search afresh
            warn(f"{path.name} cannot be read ({type(error).__name__}: {error})")
            return False
        if found != step:
            warn(f"{path.name} ends at step {found}, its record says {step}")
            return False
        return True

    def usable(self, cut_step: int, budget: Any) -> dict[str, Any] | None:
        """The snapshot this run can start from, or None (with a warning when one is bad).

        The snapshot of ``budget`` after ``cut_step`` (``exact``), else the latest one before
        ``cut_step`` that a budget-dependent search can continue from.
        """
        if not any(self.folder.glob("*.ckpt")):
            return None  # nothing cached yet
        meta, why = self._meta()
        if meta is None:
            return self._skip(why)
        snapshots = meta.get("snapshots") or {}
        mine = snapshots.get(self.snapshot(cut_step, budget).name)
        candidates = [mine] if mine else []
        if budget is not None:  # a budget-dependent search continues from an earlier state
            # (of a larger budget, whose search ended on the way to this one's)
            earlier = [
                s
                for s in snapshots.values()
                if s["step"] < cut_step
                or (s["step"] == cut_step and (s.get("budget") or 0) > budget.fraction)
            ]
            candidates += sorted(earlier, key=lambda s: (s["step"], -s["budget"]), reverse=True)
        for found in candidates:
            path = self.folder / found["file"]
            if path.is_file() and self._readable(path, found["step"]):
                return {
                    "path": str(path),
                    "key": self.key,
                    "run_folder": found.get("run_folder"),
                    "step": found["step"],
                    "budget": found.get("budget"),
                    "exact": found is mine,
                }
        if mine:
            return self._skip(f"its snapshot {mine['file']} cannot be used")
        return None

    def reuse(self, output_dir: Path, cut_step: int, budget: Any) -> dict[str, Any] | None:
        """The snapshot's record when this run can start from it; copies its gate history."""
        source = self.usable(cut_step, budget)
        if source is None:
            return None
        how = "discretizing" if source["exact"] else "continuing the search"
        log.info(
            "search %s: starting from the snapshot after step %d (budget %s, made by %s), %s",
            self.key,
            source["step"],
            source["budget"],
            source["run_folder"],
            how,
        )
        history = self.folder / "gates.jsonl"
        if history.is_file():
            (output_dir / "dam").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(history, output_dir / "dam" / "gates.jsonl")
        return source

    def has(self, step: int, budget: Any) -> bool:
        """Whether a usable snapshot of ``budget`` after ``step`` is there (else write it)."""
        meta, _ = self._meta()
        path = self.snapshot(step, budget)
        recorded = meta is not None and path.name in meta.get("snapshots", {})
        return recorded and path.is_file() and self._readable(path, step, quiet=True)

    def _skip(self, why: str) -> None:
        log.warning("search cache entry %s not reused: %s; searching afresh.", self.folder, why)
        return None

    def record(self, run_folder: Path, step: int, budget: Any) -> None:
        """Adds a written snapshot to the entry's record (rank 0, by Discretization)."""
        meta = self._meta()[0] or {"key": self.key, "split": self.split, "snapshots": {}}
        name = self.snapshot(step, budget).name
        meta.setdefault("snapshots", {})[name] = {
            "file": name,
            "step": int(step),
            "budget": None if budget is None else budget.fraction,
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


def shared_search(
    cfg: DictConfig,
    module: Any,
    train: Any,
    search_indices: list[int],
    output_dir: Path,
    ckpt_path: str | None,
) -> tuple[dict[str, Any], SearchCache | None]:
    """A run's entry in the search cache and what it records of it (``results.json``'s
    ``search``): the snapshot it starts from, if any. A run resuming its own checkpoint takes
    nothing from the cache.
    """
    from diffora_lab.runfolder import remove_stale_temporaries

    info: dict[str, Any] = {"reused": False, "key": None}
    if not (module.search.enabled and cfg.dam.reuse_search):
        return info, None
    entry = open_entry(cfg, train, search_indices)
    remove_stale_temporaries(entry.folder)
    info["key"] = entry.key
    variant = module.variant
    source = None if ckpt_path else entry.reuse(output_dir, variant.cut_step, variant.own_snapshot)
    if source is not None:
        module.search_reused = True
        info.update(reused=True, source=source)
    return info, entry
