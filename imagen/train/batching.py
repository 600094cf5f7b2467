"""Deterministic, resumable batching: a seeded permutation per epoch, started at any batch, sharded over ranks."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from imagen.errors import ConfigError

from .distributed import shard_range
from .rng import epoch_seed


def num_batches(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches in one epoch: the last one may be partial, and is dropped only when it cannot give every rank
    at least one sample."""
    full, rest = divmod(num_samples, batch_size)
    return full + (rest >= world_size)


def check_shares(num_samples: int, batch_size: int, world_size: int) -> None:
    """Refuse a global batch, or a training set, that `world_size` processes cannot share."""
    if batch_size % world_size:
        raise ConfigError(f"batch size {batch_size} is the global batch and must split evenly over {world_size} "
                          f"processes; use a multiple of {world_size}")
    if num_batches(num_samples, batch_size, world_size) == 0:
        raise ConfigError(f"{num_samples} training samples cannot be shared by {world_size} processes; use more data "
                          "or fewer processes")


class EpochBatchSampler(Sampler[list[int]]):
    """Index batches of one epoch: a permutation seeded by (seed, epoch), or in order; skips `start_batch` batches.

    With `world_size` > 1, `batch_size` is the global batch: every rank walks the same permutation and takes its
    contiguous share of each global batch (DistributedSampler's idea, at batch granularity), so the ranks together
    see exactly the batches one process would.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} processes")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation to walk (DistributedSampler's name for it)."""
        self.epoch = epoch

    @property
    def num_batches(self) -> int:
        """Batches in a whole epoch (see `num_batches`)."""
        return num_batches(self.num_samples, self.batch_size, self.world_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        for index in range(self.start_batch, self.num_batches):
            chunk = order[index * self.batch_size : (index + 1) * self.batch_size]
            if self.world_size > 1:
                share = shard_range(len(chunk), self.rank, self.world_size)
                chunk = chunk[share.start : share.stop]
            yield chunk.tolist()

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                collate_fn=None, num_workers: int = 0, pin_memory: bool = False, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """A DataLoader over one epoch of `dataset` (this rank's share of each global batch of `batch_size`),
    deterministic in (seed, epoch) and startable mid-epoch."""
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                start_batch=start_batch, rank=rank, world_size=world_size)
    if hasattr(dataset, "set_epoch"):  # datasets whose per-sample randomness is keyed by the epoch
        dataset.set_epoch(epoch)
    # The loader draws its workers' base seed from this generator instead of the global torch RNG, so creating
    # a loader (e.g. on resume) never shifts the random stream that dropout and augmentation consume.
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch) ^ 0x5EED)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn or default_collate,
        num_workers=num_workers, pin_memory=pin_memory, generator=generator,
    )
