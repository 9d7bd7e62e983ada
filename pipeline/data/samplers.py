"""Rank-sharded, epoch-seeded sampling with multi-scale batches.

The order of every epoch is a function of (seed, epoch), so a resumed run sees exactly the batches it would
have seen, and the square size of every batch is a function of (seed, epoch, batch // every), so all DDP
ranks resize to the same size at the same step without communicating.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


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


class MultiScaleBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, size) pairs; the size changes every `every` batches, drawn from `sizes`."""

    def __init__(self, sampler: ShardedSampler, batch_size: int, sizes: Sequence[int], every: int, drop_last: bool):
        if not sizes:
            raise ValueError("multi-scale training needs at least one size")
        self.sampler, self.batch_size, self.sizes = sampler, batch_size, list(sizes)
        self.every, self.drop_last = max(1, every), drop_last

    def size_at(self, batch_index: int) -> int:
        """The square size of batch `batch_index` in the current epoch."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        block = batch_index // self.every
        generator = torch.Generator().manual_seed((self.sampler.seed * 100_003 + self.sampler.epoch) * 7919 + block)
        return self.sizes[int(torch.randint(len(self.sizes), (1,), generator=generator))]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = list(self.sampler)
        for b in range(len(self)):
            size = self.size_at(b)
            yield [(i, size) for i in indices[b * self.batch_size : (b + 1) * self.batch_size]]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
