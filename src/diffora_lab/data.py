"""Batches: the search split carved from train, resumable loaders, the data module.

Tokenization, collation and how dev splits are cut into batches belong to the run's task kind
(:mod:`diffora_lab.tasks.kinds`: classification pads on the right, causal-LM choice on the left,
with an item's choices in one dev batch); the data module asks it.

METHOD.md, "Phase 1": the search split comes from the task's TRAIN set (seeded, fraction
configurable, indices saved with the run); the dev set is only for reporting.

Every loader draws its order from its own seeded generator and can start at any batch, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.

Length bucketing (``data.bucketing=W``, off by default): batches are padded to a multiple of W
tokens (a bounded set of shapes, so less padding and few recompiles) and each batch is drawn from
examples of similar length; the epoch's example set, its seeding, rank sharding and resuming are
those of the plain sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from diffora_lab.tasks import RawSplits, TaskSpec
from diffora_lab.tasks.kinds import TaskKind, get_kind
from diffora_lab.tasks.kinds.classification import PadCollator, tokenize
from diffora_lab.tasks.tokenized import TokenizedSplit, padded_length

__all__ = [
    "PadCollator",
    "ResumableBatchSampler",
    "TaskDataModule",
    "TokenizedSplit",
    "TrainBatchSampler",
    "carve_search_split",
    "padded_length",
    "tokenize",
]

log = logging.getLogger(__name__)


class ResumableBatchSampler(Sampler[list[int]]):
    """An endless stream of shuffled batches, reproducible from ``(seed, start)``.

    Epoch e is a permutation drawn from ``seed`` and e; each epoch yields ``n // global_batch``
    full global batches (the remainder is dropped, so every step has the same batch size). With
    several processes, a global batch is ``batch_size * world_size`` examples and ``rank`` takes
    its own slice. ``start`` skips that many batches, which is how a resumed run continues.

    With ``lengths`` and ``bucket`` > 0 (length bucketing), the epoch keeps the same examples
    (the first ``per_epoch`` global batches' worth of its permutation), orders them by length
    bucket (``ceil(length / bucket)``; within a bucket, permutation order), cuts global batches
    from that order and yields them in a second seeded permutation. A global batch then holds
    examples of one bucket (only the batches holding one of the boundaries between buckets mix
    them), and all ranks' slices of it come from the same bucket.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lengths: list[int] | None = None,
        bucket: int = 0,
    ) -> None:
        if n == 0:
            raise ValueError("cannot sample batches from an empty split")
        if bucket > 0 and (lengths is None or len(lengths) != n):
            raise ValueError("length bucketing needs one length per example")
        self.n = n
        self.batch_size = max(1, min(batch_size, n // world_size))
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.per_epoch = max(1, n // (self.batch_size * world_size))
        self.buckets = [-(-x // bucket) for x in lengths] if bucket > 0 else None

    def _generator(self, epoch: int, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + stream * 7_919)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=self._generator(epoch))

    def _epoch_order(self, epoch: int) -> list[int]:
        """The epoch's examples in the order global batches are cut from."""
        order = self._permutation(epoch).tolist()
        if self.buckets is None:
            return order
        global_batch = self.batch_size * self.world_size
        kept = order[: self.per_epoch * global_batch]
        by_bucket = sorted(kept, key=self.buckets.__getitem__)  # stable: permutation order
        batches = [
            by_bucket[b * global_batch : (b + 1) * global_batch] for b in range(self.per_epoch)
        ]
        # A separate stream, so the batch order is not tied to the example permutation.
        shuffle = torch.randperm(self.per_epoch, generator=self._generator(epoch, stream=1))
        return [i for b in shuffle.tolist() for i in batches[b]]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            order = self._epoch_order(epoch)
            for b in range(offset, self.per_epoch):
                first = (b * self.world_size + self.rank) * self.batch_size
                yield order[first : first + self.batch_size]
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
        lengths: list[int] | None = None,
        bucket: int = 0,
    ) -> None:
        self.first, self.second, self.switch_at = first, second, switch_at
        self.args = (batch_size, seed, rank, world_size)
        self.start = start
        self.lengths, self.bucket = lengths, bucket

    def _batches(self, pool: list[int], seed: int, start: int) -> Iterator[list[int]]:
        batch_size, _, rank, world = self.args
        lengths = [self.lengths[i] for i in pool] if self.bucket > 0 else None
        sampler = ResumableBatchSampler(
            len(pool), batch_size, seed, start, rank, world, lengths, self.bucket
        )
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


def _private_generator(seed: int) -> torch.Generator:
    # A DataLoader without its own generator draws its worker seed from the global RNG each
    # time an iterator starts, which would shift dropout masks between a resumed run and an
    # uninterrupted one.
    return torch.Generator().manual_seed(seed)


class TaskDataModule(pl.LightningDataModule):
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
        bucketing: Length-bucket width in tokens (``data.bucketing``); 0 pads each batch to its
            longest example and draws batches at random (the default).
        kind: The run's task kind (tokenization, collation, dev batches); default: the task's
            first kind (classification for GLUE).
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
        bucketing: int = 0,
        kind: TaskKind | None = None,
    ) -> None:
        super().__init__()
        if bucketing < 0:
            raise ValueError(f"data.bucketing={bucketing}: a width in tokens >= 0 (0: off).")
        self.spec = spec
        self.kind = kind if kind is not None else get_kind(spec.kinds[0])(spec)
        self.bucketing = bucketing
        self.collate = self.kind.collator(tokenizer, bucketing, max_length)
        self.dev_collate = self.kind.collator(tokenizer, bucketing, max_length, dev=True)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_start = 0
        train = self.kind.tokenize(raw.train, tokenizer, max_length, cache_dir)
        self.dev = {
            name: self.kind.tokenize(examples, tokenizer, max_length, cache_dir, dev=True)
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
            lengths=self.train.lengths() if self.bucketing else None,
            bucket=self.bucketing,
        )
        return self._loader(self.train, sampler, self.seed)

    def search_dataloader(self, start: int = 0) -> DataLoader:
        if self.search is None:
            raise RuntimeError("this run has no search split (dam.search_split=0)")
        seed = self.seed + 1
        sampler = ResumableBatchSampler(
            len(self.search),
            self.batch_size,
            seed,
            start,
            *self._rank(),
            lengths=self.search.lengths() if self.bucketing else None,
            bucket=self.bucketing,
        )
        return self._loader(self.search, sampler, seed)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                split,
                generator=_private_generator(self.seed),
                collate_fn=self.dev_collate,
                num_workers=self.num_workers,
                **self.kind.dev_batches(split, self.eval_batch_size, self.bucketing),
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
