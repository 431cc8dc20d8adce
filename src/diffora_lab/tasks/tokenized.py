"""Token ids of a split (what a task kind's tokenization produces) and their disk cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


class TokenizedSplit(Dataset):
    """Token ids of one split, held as Python lists (fast indexing, small).

    Columns are parallel lists; ``input_ids`` is one list of ids per row.
    """

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns
        self._length = len(columns["input_ids"])

    def __len__(self) -> int:
        return self._length

    def lengths(self) -> list[int]:
        """Tokens per example."""
        return [len(ids) for ids in self.columns["input_ids"]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: values[index] for key, values in self.columns.items()}

    def subset(self, indices: list[int]) -> TokenizedSplit:
        return TokenizedSplit({k: [v[i] for i in indices] for k, v in self.columns.items()})


def padded_length(length: int, multiple: int, max_length: int | None = None) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (0: unchanged), at most max_length."""
    if multiple <= 0:
        return length
    rounded = -(-length // multiple) * multiple
    return min(rounded, max_length) if max_length else rounded


def tokenizer_identity(tokenizer) -> list:
    """What a tokenization cache key records of the tokenizer (name, vocabulary size, class)."""
    return [getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__]


def cached_columns(
    key_parts: list, cache_dir: str | Path | None, build: Callable[[], dict[str, list]]
) -> dict[str, list]:
    """``build()``'s columns, read from ``cache_dir`` when a file for ``key_parts`` exists.

    The key is the SHA-1 of ``key_parts`` (JSON): callers put in it everything the columns depend
    on (texts, tokenizer, lengths, settings), so a changed input never reads a stale file. Files
    are written to a temporary name and renamed, and read with ``weights_only=True``.
    """
    key = hashlib.sha1(json.dumps(key_parts).encode()).hexdigest()
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    columns = build()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(columns, tmp)
        os.replace(tmp, path)
    return columns
