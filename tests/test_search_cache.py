"""The shared search's key and cache entries (search_cache.py): a reused search must be the search
this run would have made, and a bad entry only costs a fresh search."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import REPO, compose_config

from diffora_lab.budget import Budget
from diffora_lab.search_cache import (
    SearchCache,
    backbone_fingerprint,
    folder_fingerprint,
    search_key,
    source_fingerprint,
)
from diffora_lab.train import run

SHORT = (
    "task=sst2",
    "task.max_length=16",
    "train.max_steps=8",
    "train.val_every=4",
    "train.ckpt_every=8",
    "dam.warmup_steps=1",
)


def write_sst2(root: Path, words: str) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{words} number {i}\t{i % 2}" for i in range(48)]
    (folder / "train.tsv").write_text("\n".join(["sentence\tlabel", *rows]) + "\n")
    (folder / "dev.tsv").write_text("\n".join(["sentence\tlabel", *rows[:8]]) + "\n")
    return root


def short_run(out: Path, data: Path, cache: Path, *overrides: str) -> dict:
    cfg = compose_config(["+experiment=smoke", *SHORT, f"task.data_dir={data}", *overrides], out)
    cfg.data.cache_dir = str(cache)
    return run(cfg, out)


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A search on a small SST-2 folder, saved in a cache folder other runs share."""
    root = tmp_path_factory.mktemp("search")
    data = write_sst2(root / "glue", "a fine film")
    results = short_run(root / "first", data, root / "cache")
    return root, data, results


@pytest.mark.slow
def test_an_identical_run_reuses_the_search_and_says_where_from(first, tmp_path):
    root, data, made = first
    again = short_run(tmp_path / "again", data, root / "cache", "dam.fold_gates=false")
    search = again["search"]
    assert made["search"]["reused"] is False and search["reused"] is True
    assert search["key"] == made["search"]["key"]
    entry = root / "cache" / "search" / search["key"]
    # The default search at budget 0.5 (in parameters) ends after step 4 of this short run.
    assert search["source"] == {
        "path": str(entry / "step000004-params0.5.ckpt"),
        "key": search["key"],
        "run_folder": str(root / "first"),
        "step": 4,
        "budget": 0.5,
        "exact": True,
    }


@pytest.mark.slow
def test_changed_training_rows_are_searched_afresh(first, tmp_path):
    root, data, made = first
    changed = write_sst2(tmp_path / "glue", "a dull plot")  # same size, other rows
    again = short_run(tmp_path / "again", changed, root / "cache", "dam.fold_gates=false")
    assert again["search"]["reused"] is False
    assert again["search"]["key"] != made["search"]["key"]


def copy_entry(first, tmp_path) -> SearchCache:
    root, _, made = first
    key = made["search"]["key"]
    folder = tmp_path / "cache" / "search" / key
    shutil.copytree(root / "cache" / "search" / key, folder)
    split = json.loads((folder / "meta.json").read_text())["split"]
    return SearchCache(key, folder, split)


BUDGET = Budget("params", 0.5, 3584.0, (512,) * 8 + (768,) * 4, (512,) * 8 + (768,) * 4)


def snapshot(entry: SearchCache) -> Path:
    return entry.snapshot(4, BUDGET)


def truncate(entry: SearchCache) -> None:
    data = snapshot(entry).read_bytes()
    snapshot(entry).write_bytes(data[: len(data) // 3])


def other_split(entry: SearchCache) -> None:
    meta = json.loads((entry.folder / "meta.json").read_text())
    meta["split"] = "0" * 64
    (entry.folder / "meta.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "truncated": (truncate, "cannot be read"),
    "empty": (lambda e: snapshot(e).write_bytes(b""), "cannot be read"),
    "no-record": (lambda e: (e.folder / "meta.json").unlink(), "missing or unreadable"),
    "unreadable-record": (lambda e: (e.folder / "meta.json").write_text("{"), "unreadable"),
    "other-split": (other_split, "another search split"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_bad_cache_entry_is_skipped_with_a_warning(first, tmp_path, caplog, name):
    entry = copy_entry(first, tmp_path)
    assert entry.usable(4, BUDGET) is not None  # the copy is good before the damage
    damage, why = CORRUPTIONS[name]
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="diffora_lab.search_cache"):
        assert entry.usable(4, BUDGET) is None
    assert why in caplog.text and "searching afresh" in caplog.text


@pytest.mark.slow
def test_a_truncated_cache_entry_never_fails_a_run(first, tmp_path):
    root, data, made = first
    entry = copy_entry(first, tmp_path)
    truncate(entry)
    done = short_run(tmp_path / "run", data, tmp_path / "cache", "dam.fold_gates=false")
    assert done["search"] == {"reused": False, "key": made["search"]["key"]}
    assert done["steps"] == 8 and done["kept_modules"] == made["kept_modules"]
    # The fresh search replaced the damaged entry.
    assert entry.usable(4, BUDGET) is not None


def test_the_key_covers_package_source_and_backbone_files(tmp_path):
    cfg = compose_config(["+experiment=smoke"])
    assert search_key(cfg, "inputs-a") != search_key(cfg, "inputs-b")

    package = tmp_path / "diffora_lab"
    shutil.copytree(REPO / "src" / "diffora_lab", package)
    before = source_fingerprint(package)
    assert before == source_fingerprint()  # the copy is this package's source
    dam = package / "dam.py"
    dam.write_text(dam.read_text() + "\n# an edit\n")
    assert source_fingerprint(package) != before

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    cfg = compose_config(["+experiment=smoke", "backbone=minilm_l6", f"backbone.path={model}"])
    cfg.backbone.package = None
    first = backbone_fingerprint(cfg.backbone)
    assert first == "files:" + folder_fingerprint(model)
    (model / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert backbone_fingerprint(cfg.backbone) != first
