"""``GlobalBatchSampler``: the rank-independent order of global batches, and each rank's share."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's share of each global batch.

    The order of the global batches depends only on (seed, epoch), and a resumed run starts at a batch
    offset, so the sample order is independent of the number of ranks and of the micro-batch size.
    Rank ``r`` takes the ``r``-th contiguous slice of every global batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {world_size} ranks")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        full, rest = divmod(num_samples, global_batch_size)
        self.batches_per_epoch = full + (1 if rest and not drop_last else 0)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        for b in range(self.start_batch, self.batches_per_epoch):
            batch = order[b * self.global_batch_size : (b + 1) * self.global_batch_size]
            per_rank = math.ceil(len(batch) / self.world_size)
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]
