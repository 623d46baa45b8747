"""DistributedSampler: global order independent of world size; exact resume."""

from __future__ import annotations

import itertools

import pytest

from data_pipeline.sampler import DistributedSampler
from train.errors import ZeroLLMError


def global_order(n, world, mb, consumed, steps):
    """Samples in the order the ranks consume them, step by step, rank by rank."""
    its = [iter(DistributedSampler(n, r, world, mb, consumed)) for r in range(world)]
    out = []
    for _ in range(steps):
        for it in its:
            out += next(it)
    return out


def test_rank_slices_of_each_micro_step():
    s = [list(itertools.islice(DistributedSampler(100, r, 2, 3, 6), 2)) for r in range(2)]
    assert s[0] == [[6, 7, 8], [12, 13, 14]]
    assert s[1] == [[9, 10, 11], [15, 16, 17]]


def test_resume_on_a_different_world_size_continues_the_global_order():
    n = 1000
    reference = global_order(n, 1, 8, 0, 40)  # 320 samples on one rank
    first = global_order(n, 4, 2, 0, 10)  # 4 ranks x mb 2: 80 samples, then checkpoint
    second = global_order(n, 2, 4, 80, 30)  # resume on 2 ranks x mb 4: 240 more
    assert first + second == reference == list(range(320))


def test_exhausted_dataset_is_a_clear_error():
    it = iter(DistributedSampler(10, 0, 2, 2, 4))
    assert next(it) == [4, 5]
    with pytest.raises(ZeroLLMError, match="exhausted"):
        next(it)
    with pytest.raises(ZeroLLMError, match="consumed_samples"):
        DistributedSampler(10, 0, 1, 1, 11)
    with pytest.raises(ZeroLLMError, match="rank"):
        DistributedSampler(10, 2, 2, 1)
