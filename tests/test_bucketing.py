"""Length-bucketed batching (data.bucketing): bounded shapes, seeded, rank-sharded, resumable."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from diffora_lab.data import PadCollator, ResumableBatchSampler, TrainBatchSampler, padded_length

BUCKET = 8


def sst2_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Short, varied token counts with a long tail, as SST-2 sentences have (3-64 tokens)."""
    rng = random.Random(seed)
    return [min(64, max(3, int(rng.lognormvariate(2.8, 0.6)))) for _ in range(n)]


def take(sampler, count: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), count))


def test_resumed_bucketed_sampler_yields_the_same_remaining_batches():
    lengths = sst2_like_lengths(203)
    args = dict(n=203, batch_size=16, seed=5, lengths=lengths, bucket=BUCKET)
    whole = take(ResumableBatchSampler(**args), 40)  # 12 batches per epoch: crosses 3 epochs
    for start in (1, 11, 12, 29):
        assert take(ResumableBatchSampler(**args, start=start), 40 - start) == whole[start:]


def test_an_epoch_holds_the_plain_samplers_examples_grouped_by_length():
    n, batch = 300, 16
    lengths = sst2_like_lengths(n, seed=1)
    plain = ResumableBatchSampler(n, batch, seed=3)
    bucketed = ResumableBatchSampler(n, batch, seed=3, lengths=lengths, bucket=BUCKET)
    assert plain.per_epoch == bucketed.per_epoch == n // batch
    for epoch in range(2):
        first = epoch * plain.per_epoch
        plain_epoch = take(ResumableBatchSampler(n, batch, seed=3, start=first), plain.per_epoch)
        bucketed_epoch = take(
            ResumableBatchSampler(n, batch, seed=3, start=first, lengths=lengths, bucket=BUCKET),
            plain.per_epoch,
        )
        # Same examples (the same remainder dropped), in other batches.
        assert sorted(sum(plain_epoch, [])) == sorted(sum(bucketed_epoch, []))
        assert plain_epoch != bucketed_epoch
        buckets_per_batch = [len({-(-lengths[i] // BUCKET) for i in b}) for b in bucketed_epoch]
        n_buckets = len({-(-x // BUCKET) for x in lengths})
        # Batches are cut from one length-sorted sequence: only those holding a bucket boundary
        # mix buckets, and there are n_buckets - 1 boundaries.
        assert sum(k - 1 for k in buckets_per_batch) <= n_buckets - 1
        assert buckets_per_batch.count(1) >= len(bucketed_epoch) - (n_buckets - 1)


def test_batch_order_is_seeded_and_not_sorted_by_length():
    lengths = sst2_like_lengths(400, seed=2)
    make = lambda seed: ResumableBatchSampler(  # noqa: E731
        400, 16, seed=seed, lengths=lengths, bucket=BUCKET
    )
    a, b, other = take(make(7), 25), take(make(7), 25), take(make(8), 25)
    assert a == b and a != other
    widths = [max(lengths[i] for i in batch) for batch in a]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


@pytest.mark.parametrize("start", [0, 9])
def test_ranks_split_each_global_batch_and_share_its_width(start):
    lengths = sst2_like_lengths(257, seed=3)
    common = dict(n=257, batch_size=8, seed=1, start=start, lengths=lengths, bucket=BUCKET)
    single = take(ResumableBatchSampler(**{**common, "batch_size": 16}), 20)
    ranks = [take(ResumableBatchSampler(**common, rank=r, world_size=2), 20) for r in (0, 1)]
    collate = PadCollator(0, regression=False, multiple=BUCKET, max_length=64)
    rows = [{"input_ids": [1] * x, "labels": 0} for x in lengths]
    for whole, part0, part1 in zip(single, *ranks):
        assert part0 + part1 == whole  # one global batch, each rank its slice
        width0 = collate([rows[i] for i in part0])["input_ids"].shape[1]
        width1 = collate([rows[i] for i in part1])["input_ids"].shape[1]
        assert width0 == width1 or max(lengths[i] for i in whole) > padded_length(
            min(lengths[i] for i in whole), BUCKET
        )


def test_train_sampler_buckets_within_its_pool_and_resumes_across_the_switch():
    lengths = sst2_like_lengths(240, seed=4)
    first = list(range(0, 240, 2))
    common = dict(
        first=first,
        second=list(range(240)),
        switch_at=10,
        batch_size=8,
        seed=2,
        lengths=lengths,
        bucket=BUCKET,
    )
    whole = take(TrainBatchSampler(**common), 30)
    assert all(i in set(first) for batch in whole[:10] for i in batch)
    for start in (4, 10, 17):
        assert take(TrainBatchSampler(**common, start=start), 30 - start) == whole[start:]


def test_collator_pads_to_a_bounded_set_of_widths_with_less_padding():
    lengths = sst2_like_lengths(2000, seed=5)
    rows = [{"input_ids": list(range(1, x + 1)), "labels": 1} for x in lengths]
    plain_collate = PadCollator(0, regression=False)
    bucket_collate = PadCollator(0, regression=False, multiple=16, max_length=64)
    waste = {}
    widths = set()
    for name, sampler, collate in (
        ("plain", ResumableBatchSampler(2000, 32, seed=0), plain_collate),
        (
            "bucketed",
            ResumableBatchSampler(2000, 32, seed=0, lengths=lengths, bucket=16),
            bucket_collate,
        ),
    ):
        padded = real = 0
        for batch_indices in take(sampler, 62):
            batch = collate([rows[i] for i in batch_indices])
            padded += batch["input_ids"].numel()
            real += int(batch["attention_mask"].sum())
            if name == "bucketed":
                widths.add(batch["input_ids"].shape[1])
                assert torch.equal(batch["input_ids"].ne(0).sum(1), batch["attention_mask"].sum(1))
        waste[name] = 1 - real / padded
    assert widths <= {16, 32, 48, 64}
    assert waste["bucketed"] < waste["plain"] / 2


def test_padded_length_rounds_up_and_caps():
    assert [padded_length(x, 16, 40) for x in (1, 16, 17, 33, 40)] == [16, 16, 32, 40, 40]
    assert padded_length(13, 0) == 13
