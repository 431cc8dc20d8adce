"""Batches: tokenization (cached), the search split carved from train, resumable loaders.

METHOD.md, "Phase 1": the search split comes from the task's TRAIN set (seeded, fraction
configurable, indices saved with the run); the dev set is only for reporting.

Every loader draws its order from its own seeded generator and can start at any batch, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffora_lab.tasks import Examples, RawSplits, TaskSpec

log = logging.getLogger(__name__)


class TokenizedSplit(Dataset):
    """Token ids of one split, held as Python lists (fast indexing, small)."""

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns
        self._length = len(columns["input_ids"])

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: values[index] for key, values in self.columns.items()}

    def subset(self, indices: list[int]) -> TokenizedSplit:
        return TokenizedSplit({k: [v[i] for i in indices] for k, v in self.columns.items()})


class PadCollator:
    """Dynamic padding: each batch is padded to its own longest sequence."""

    def __init__(self, pad_token_id: int, regression: bool) -> None:
        self.pad_token_id = pad_token_id
        self.label_dtype = torch.float32 if regression else torch.long

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        has_types = "token_type_ids" in rows[0]
        types = torch.zeros((len(rows), width), dtype=torch.long) if has_types else None
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            attention[i, :n] = 1
            if types is not None:
                types[i, :n] = torch.tensor(row["token_type_ids"])
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if types is not None:
            batch["token_type_ids"] = types
        batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=self.label_dtype)
        return batch


class ResumableBatchSampler(Sampler[list[int]]):
    """An endless stream of shuffled batches, reproducible from ``(seed, start)``.

    Epoch e is a permutation drawn from ``seed`` and e; each epoch yields ``n // global_batch``
    full global batches (the remainder is dropped, so every step has the same batch size). With
    several processes, a global batch is ``batch_size * world_size`` examples and ``rank`` takes
    its own slice. ``start`` skips that many batches, which is how a resumed run continues.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n == 0:
            raise ValueError("cannot sample batches from an empty split")
        self.n = n
        self.batch_size = max(1, min(batch_size, n // world_size))
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.per_epoch = max(1, n // (self.batch_size * world_size))

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            order = self._permutation(epoch)
            for b in range(offset, self.per_epoch):
                first = (b * self.world_size + self.rank) * self.batch_size
                yield order[first : first + self.batch_size].tolist()
            epoch, offset = epoch + 1, 0


class TrainBatchSampler(Sampler[list[int]]):
    """Train batches: from ``first`` until batch ``switch_at``, from ``second`` afterwards.

    ``first`` is train minus the search split; ``second`` (used with
    ``dam.merge_search_split``) is the whole train set. The switch is fixed by the batch index,
    not by when discretization happens to run, so prefetching loaders and resumed runs see the
    same batches as an uninterrupted run.
    """

    def __init__(
        self,
        first: list[int],
        second: list[int] | None,
        switch_at: int | None,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.first, self.second, self.switch_at = first, second, switch_at
        self.args = (batch_size, seed, rank, world_size)
        self.start = start

    def _batches(self, pool: list[int], seed: int, start: int) -> Iterator[list[int]]:
        batch_size, _, rank, world = self.args
        sampler = ResumableBatchSampler(len(pool), batch_size, seed, start, rank, world)
        for batch in sampler:
            yield [pool[i] for i in batch]

    def __iter__(self) -> Iterator[list[int]]:
        seed = self.args[1]
        if self.switch_at is None or self.second is None:
            yield from self._batches(self.first, seed, self.start)
            return
        position = self.start
        if position < self.switch_at:
            for batch in self._batches(self.first, seed, position):
                yield batch
                position += 1
                if position >= self.switch_at:
                    break
        yield from self._batches(self.second, seed + 7, position - self.switch_at)


def carve_search_split(n_train: int, fraction: float, seed: int) -> list[int]:
    """Seeded indices of the train examples that form the search split (sorted)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"dam.search_split={fraction} must be in (0, 1): a fraction of train.")
    n_search = max(1, round(fraction * n_train))
    if n_search >= n_train:
        raise ValueError(f"dam.search_split={fraction} leaves no training examples.")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_train, generator=generator)[:n_search].tolist())


def _fingerprint(examples: Examples) -> str:
    digest = hashlib.sha1()
    for i in range(len(examples)):
        digest.update(examples.text_a[i].encode())
        if examples.text_b is not None:
            digest.update(b"\x00" + examples.text_b[i].encode())
        digest.update(f"\x01{examples.labels[i]}\x02".encode())
    return digest.hexdigest()


def tokenize(
    examples: Examples,
    tokenizer,
    max_length: int,
    cache_dir: str | Path | None,
) -> TokenizedSplit:
    """Tokenizes a split (truncating to ``max_length``), reusing a disk cache when present.

    The cache key covers the texts and labels, the tokenizer (name, vocabulary size, class) and
    ``max_length``, so a changed file or setting never reads a stale cache.
    """
    key = hashlib.sha1(
        json.dumps(
            [
                _fingerprint(examples),
                getattr(tokenizer, "name_or_path", ""),
                len(tokenizer),
                type(tokenizer).__name__,
                max_length,
            ]
        ).encode()
    ).hexdigest()
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return TokenizedSplit(torch.load(path, weights_only=True))
    args = (examples.text_a,) if examples.text_b is None else (examples.text_a, examples.text_b)
    encoded = tokenizer(*args, truncation=True, max_length=max_length)
    columns = {"input_ids": encoded["input_ids"], "labels": list(examples.labels)}
    if "token_type_ids" in encoded:
        columns["token_type_ids"] = encoded["token_type_ids"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(columns, tmp)
        os.replace(tmp, path)
    return TokenizedSplit(columns)


def _private_generator(seed: int) -> torch.Generator:
    # A DataLoader without its own generator draws its worker seed from the global RNG each
    # time an iterator starts, which would shift dropout masks between a resumed run and an
    # uninterrupted one.
    return torch.Generator().manual_seed(seed)


class GlueDataModule(pl.LightningDataModule):
    """Train, search and dev loaders for one task.

    Args:
        spec: The task.
        raw: The task's raw splits (already loaded and checked).
        tokenizer: The backbone's tokenizer.
        max_length: Truncation length in tokens.
        batch_size: Train and search batch size.
        eval_batch_size: Dev batch size.
        seed: Seed of the search split and of the batch order.
        search_split: Fraction of train carved out for architecture steps; 0 for no search.
        cache_dir: Folder of the tokenization cache (None disables it).
        num_workers: DataLoader workers.
        merge_at: Train batch from which the search split joins the train set
            (``dam.merge_search_split``), or None.
    """

    def __init__(
        self,
        spec: TaskSpec,
        raw: RawSplits,
        tokenizer,
        max_length: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        search_split: float = 0.0,
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
        merge_at: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.collate = PadCollator(tokenizer.pad_token_id or 0, spec.is_regression)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_start = 0
        train = tokenize(raw.train, tokenizer, max_length, cache_dir)
        self.dev = {
            name: tokenize(examples, tokenizer, max_length, cache_dir)
            for name, examples in raw.dev.items()
        }
        self.train = train
        self.merge_at = merge_at if search_split > 0 else None
        if search_split > 0:
            self.search_indices = carve_search_split(len(train), search_split, seed)
            chosen = set(self.search_indices)
            self.train_indices = [i for i in range(len(train)) if i not in chosen]
            self.search = train.subset(self.search_indices)
        else:
            self.search_indices = []
            self.train_indices = list(range(len(train)))
            self.search = None

    def _loader(self, split: TokenizedSplit, sampler: Sampler, seed: int) -> DataLoader:
        return DataLoader(
            split,
            batch_sampler=sampler,
            generator=_private_generator(seed),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        everything = list(range(len(self.train)))
        sampler = TrainBatchSampler(
            self.train_indices,
            everything if self.merge_at is not None else None,
            self.merge_at,
            self.batch_size,
            self.seed,
            self.train_start,
            *self._rank(),
        )
        return self._loader(self.train, sampler, self.seed)

    def search_dataloader(self, start: int = 0) -> DataLoader:
        if self.search is None:
            raise RuntimeError("this run has no search split (dam.search_split=0)")
        seed = self.seed + 1
        sampler = ResumableBatchSampler(
            len(self.search), self.batch_size, seed, start, *self._rank()
        )
        return self._loader(self.search, sampler, seed)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                split,
                batch_size=self.eval_batch_size,
                shuffle=False,
                generator=_private_generator(self.seed),
                collate_fn=self.collate,
                num_workers=self.num_workers,
            )
            for split in self.dev.values()
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"search_indices": self.search_indices}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("search_indices", [])
        if saved != self.search_indices:
            raise ValueError(
                "the checkpoint was made with another search split (different seed, data or "
                "dam.search_split); resume with the settings it was made with."
            )
