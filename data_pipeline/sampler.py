"""Distributed sampler over GLOBAL sample numbers: resume at any world size.

    sampler = DistributedSampler(len(ds), rank, world_size, micro_batch_size,
                                 consumed_samples=state.consumed_samples)
    for indices in sampler:            # this rank's micro batch: a list of global indices
        batch = ds.get_batch(indices)

Micro step k (counted from the resume point c = consumed_samples) covers the global
samples [c + k*mb*W, c + (k+1)*mb*W); rank r takes [r*mb, (r+1)*mb) of that range. The
global order does not depend on the world size, so a run checkpointed on 4 ranks and
resumed on 2 (with consumed_samples from the checkpoint) sees the same samples in the
same order.
"""

from __future__ import annotations

from collections.abc import Iterator

from train.errors import ZeroLLMError


class DistributedSampler:
    def __init__(
        self,
        dataset_len: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        consumed_samples: int = 0,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ZeroLLMError(f"sampler: rank {rank} is not in [0, world_size={world_size}).")
        if micro_batch_size < 1:
            raise ZeroLLMError(f"sampler: micro_batch_size {micro_batch_size} must be >= 1.")
        if not 0 <= consumed_samples <= dataset_len:
            raise ZeroLLMError(
                f"sampler: consumed_samples {consumed_samples} is outside the dataset "
                f"(0..{dataset_len} samples); build the dataset with more samples."
            )
        self.dataset_len = int(dataset_len)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.micro_batch_size = int(micro_batch_size)
        self.consumed_samples = int(consumed_samples)

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    def __len__(self) -> int:
        """Micro steps left before the dataset runs out."""
        return (self.dataset_len - self.consumed_samples) // self.global_micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while True:
            end = start + self.global_micro_batch
            if end > self.dataset_len:
                raise ZeroLLMError(
                    f"dataset exhausted: micro batch [{start}, {end}) needs more than its "
                    f"{self.dataset_len} samples; build it with a larger num_samples."
                )
            lo = start + self.rank * self.micro_batch_size
            yield list(range(lo, lo + self.micro_batch_size))
            start = end
