"""Aspect-ratio buckets: every batch holds samples of one bucket, so all its latents share one shape.

    buckets = dataset.buckets                                   # {"1.0": [0, 3, ...], "0.6": [...]}
    sampler = BucketBatchSampler(buckets, batch_size=12, seed=0, rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)

The sampler draws GLOBAL batches of batch_size * world_size indices and hands each rank its slice, so a run
on 2 processes with batch b trains on exactly the samples of a run on 1 process with batch 2b, step by step.
Its position is counted in global batches, so a resume may even change the number of processes.
"""

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from data.folder import DataError
from models.aspect_ratios import aspect_ratio_bins, closest_bin

log = logging.getLogger(__name__)


def assign_buckets(sizes: Sequence[tuple[int, int]], base_size: int, multiple: int) -> list[str]:
    """Bucket key (the aspect_ratio_bins ratio key) of each (height, width)."""
    bins = aspect_ratio_bins(base_size, multiple)
    return [closest_bin(h, w, bins)[0] for h, w in sizes]


def group_by_bucket(keys: Sequence[str]) -> dict[str, list[int]]:
    """{bucket key: indices having it}, indices ascending."""
    buckets: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        buckets.setdefault(key, []).append(i)
    return buckets


class BucketBatchSampler:
    """Infinite, deterministic batches of dataset indices, each drawn from a single bucket.

    Epoch e: shuffle each bucket with a generator seeded by (seed, e), cut it into global batches of
    batch_size * world_size, shuffle the order of all batches, and yield this rank's slice of each.
    The epoch advances by itself. state_dict() is the position of the next batch; load_state_dict() resumes there.
    drop_last=False keeps each bucket's last, short global batch and fills it up with the bucket's first
    indices of the same epoch (some samples are seen twice), so every rank always gets batch_size indices.
    """

    def __init__(self, buckets: dict[str, list[int]], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.global_batch = batch_size * world_size
        nonempty = {k: list(v) for k, v in sorted(buckets.items()) if v}
        if not nonempty:
            raise DataError("BucketBatchSampler got no samples: every bucket is empty")
        if drop_last:
            small = {k: len(v) for k, v in nonempty.items() if len(v) < self.global_batch}
            for key, n in small.items():
                log.warning("bucket %s has %d samples, fewer than one global batch of %d (%d x %d ranks): "
                            "its samples are not used", key, n, self.global_batch, batch_size, world_size)
            self.buckets = {k: v for k, v in nonempty.items() if k not in small}
            if not self.buckets:
                largest = max(nonempty, key=lambda k: len(nonempty[k]))
                raise DataError(f"no bucket can fill one global batch of {self.global_batch} "
                                f"({batch_size} per rank x {world_size} ranks): the largest bucket, {largest}, "
                                f"has {len(nonempty[largest])} samples; lower the batch size or add data")
        else:
            self.buckets = nonempty
        self.epoch = 0
        self.batch_in_epoch = 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank and in every epoch)."""
        per_bucket = (len(v) // self.global_batch if self.drop_last else -(-len(v) // self.global_batch)
                      for v in self.buckets.values())
        return sum(per_bucket)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch, in order, each batch_size * world_size indices of one bucket."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for indices in self.buckets.values():
            order = [indices[j] for j in rng.permutation(len(indices))]
            if not self.drop_last and len(order) % self.global_batch:
                fill = self.global_batch - len(order) % self.global_batch
                order += (order * (fill // len(order) + 1))[:fill]
            for start in range(0, len(order) - self.global_batch + 1, self.global_batch):
                batches.append(order[start:start + self.global_batch])
        return [batches[j] for j in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batch_size indices of each global batch, from the current position, forever."""
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.batch_in_epoch < len(batches):
                batch = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1
                yield batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            self.epoch += 1
            self.batch_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch: {"epoch", "batch_in_epoch"}."""
        if self.batch_in_epoch >= len(self):  # the iterator paused right after an epoch's last batch
            return {"epoch": self.epoch + 1, "batch_in_epoch": 0}
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def state_at(self, num_batches: int) -> dict[str, int]:
        """Position after num_batches batches from the start; for trainers whose DataLoader prefetches ahead."""
        return {"epoch": num_batches // len(self), "batch_in_epoch": num_batches % len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue with the batch that followed when state was taken."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch <= len(self):
            raise DataError(f"sampler state {state} does not fit this data set: an epoch has {len(self)} batches "
                            f"of {self.global_batch}; did the data or the batch size change?")
        self.epoch, self.batch_in_epoch = epoch, batch
