"""Rank-sharded, epoch-seeded sampling with multi-scale batches.

Every random choice of the data is a function of the seed and the position in training, never of a process's
RNG state: the order of every epoch is a function of (seed, epoch); the square size of every batch of
(seed, epoch, batch // every), so all DDP ranks resize to the same size at the same step without communicating;
and each sample's augmentation seed of (seed, epoch, index). A resumed run, at an epoch boundary or mid-epoch,
therefore sees exactly the batches it would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler


class SampleKey(NamedTuple):
    """What a dataset is asked for: sample `index`, letterboxed to `size` x `size`, augmented from `seed`."""

    index: int
    size: int
    seed: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch`: independent streams per (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ShardedSampler(Sampler[int]):
    """Indices of one rank: shuffled from (seed, epoch) when `shuffle`, padded so every rank gets as many."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.size:
            total = math.ceil(self.size / self.world_size) * self.world_size
            order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))


class MultiScaleBatchSampler(Sampler[list[SampleKey]]):
    """Batches of sample keys; the size changes every `every` batches, drawn from `sizes`.

    `resume_at(epoch, batches)` makes the next iteration over that epoch start after its first `batches` batches
    (a mid-epoch checkpoint's position); later epochs start from their first batch.
    """

    def __init__(self, sampler: ShardedSampler, batch_size: int, sizes: Sequence[int], every: int, drop_last: bool):
        if not sizes:
            raise ValueError("multi-scale training needs at least one size")
        self.sampler, self.batch_size, self.sizes = sampler, batch_size, list(sizes)
        self.every, self.drop_last = max(1, every), drop_last
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches: int) -> None:
        """Skip the first `batches` batches of `epoch` (once): they were trained before the checkpoint."""
        self._resume = (epoch, batches)

    def size_at(self, batch_index: int) -> int:
        """The square size of batch `batch_index` in the current epoch."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        block = batch_index // self.every
        generator = torch.Generator().manual_seed((self.sampler.seed * 100_003 + self.sampler.epoch) * 7919 + block)
        return self.sizes[int(torch.randint(len(self.sizes), (1,), generator=generator))]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, seed = self.sampler.epoch, self.sampler.seed
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start, self._resume = self._resume[1], None
        indices = list(self.sampler)
        for b in range(start, len(self)):
            size = self.size_at(b)
            batch = indices[b * self.batch_size : (b + 1) * self.batch_size]
            yield [SampleKey(i, size, sample_seed(seed, epoch, i)) for i in batch]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
