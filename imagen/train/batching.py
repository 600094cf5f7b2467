"""Deterministic, resumable batching: a seeded permutation per epoch, started at any batch."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from .rng import epoch_seed


class EpochBatchSampler(Sampler[list[int]]):
    """Index batches of one epoch: a permutation seeded by (seed, epoch), or in order; skips `start_batch` batches."""

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                 start_batch: int = 0):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def num_batches(self) -> int:
        """Batches in a whole epoch (the last one may be partial; it is kept)."""
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        for index in range(self.start_batch, self.num_batches):
            yield order[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                collate_fn=None, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over one epoch of `dataset`, deterministic in (seed, epoch) and startable mid-epoch."""
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                start_batch=start_batch)
    # The loader draws its workers' base seed from this generator instead of the global torch RNG, so creating
    # a loader (e.g. on resume) never shifts the random stream that dropout and augmentation consume.
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch) ^ 0x5EED)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn or default_collate,
        num_workers=num_workers, pin_memory=pin_memory, generator=generator,
    )
