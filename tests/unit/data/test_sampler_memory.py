"""The sampler's memory does not grow with the dataset: above ``_EXACT_PERMUTATION_MAX`` blocks it
shuffles with a keyed bijection computed per index, with the same contract as the exact permutation
(global position -> dataset index, each sample once per epoch, resumable at any data-parallel size).

The large path is exercised on small datasets by lowering the threshold, so whole epochs can be checked.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from distrib import data


def step_samples(num_samples, global_batch, micro_batch, dp_size, step, seed=0):
    """Every dataset index read at ``step`` over all ranks and micro-steps, in global position order."""
    chunks = {}
    for rank in range(dp_size):
        sampler = data.GlobalBatchSampler(num_samples, global_batch, micro_batch, dp_size, rank, seed)
        for micro_step, indices in enumerate(sampler.micro_batches(step)):
            chunks[micro_step * dp_size + rank] = indices
    return [int(i) for k in sorted(chunks) for i in chunks[k]]


@pytest.fixture
def large_path(monkeypatch):
    monkeypatch.setattr(data.sampler, "_EXACT_PERMUTATION_MAX", 0)


def test_ten_billion_blocks_take_no_memory_per_block():
    num_samples, global_batch, micro, dp = 10**10, 256, 8, 4
    tracemalloc.start()
    try:
        samplers = [data.GlobalBatchSampler(num_samples, global_batch, micro, dp, r, seed=7) for r in range(dp)]
        steps = {step: [i for s in samplers for mb in s.micro_batches(step) for i in mb.tolist()] for step in (0, 1, 10**6)}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"peak {peak} bytes"
    assert not samplers[0].exact
    for indices in steps.values():
        assert len(indices) == global_batch == len(set(indices))  # distinct within a step
        assert all(0 <= i < num_samples for i in indices)
    assert steps[0] != steps[1]


def test_small_datasets_keep_numpy_s_exact_permutation():
    sampler = data.GlobalBatchSampler(50, 10, 5, 2, 0, seed=3)
    assert sampler.exact
    for epoch in (0, 1):
        expected = np.random.default_rng([3, epoch]).permutation(50).tolist()
        assert [sampler.dataset_index(p) for p in range(50 * epoch, 50 * (epoch + 1))] == expected


@pytest.mark.parametrize("num_samples", [1, 2, 7, 64, 65, 1000])
def test_large_path_epochs_visit_every_index_once(large_path, num_samples):
    sampler = data.GlobalBatchSampler(num_samples, 1, 1, 1, 0, seed=11)
    assert not sampler.exact
    epochs = [[sampler.dataset_index(p) for p in range(e * num_samples, (e + 1) * num_samples)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(num_samples))
    if num_samples >= 64:
        assert epochs[0] != epochs[1] != epochs[2]
        other = data.GlobalBatchSampler(num_samples, 1, 1, 1, 0, seed=12)
        assert epochs[0] != [other.dataset_index(p) for p in range(num_samples)]
        # not the identity or a rotation: neighbours land far apart
        assert np.mean(np.abs(np.diff(epochs[0]))) > num_samples / 10


def test_large_path_micro_batches_match_dataset_index_across_an_epoch_boundary(large_path):
    sampler = data.GlobalBatchSampler(37, 12, 3, 2, 1, seed=0)
    for step in range(8):  # 96 positions: two epoch boundaries, some inside a micro-batch
        first = step * 12
        expected = [[sampler.dataset_index(first + (a * 2 + 1) * 3 + k) for k in range(3)] for a in range(2)]
        assert [mb.tolist() for mb in sampler.micro_batches(step)] == expected


def test_large_path_dp1_and_dp2_read_the_same_positions(large_path):
    for step in range(12):  # 96 samples of 40: crosses two epochs
        dp1 = step_samples(40, 8, 2, 1, step)
        assert step_samples(40, 8, 2, 2, step) == step_samples(40, 8, 1, 4, step) == dp1


def test_large_path_resume_with_another_dp_size_neither_repeats_nor_skips(large_path):
    num_samples, global_batch, stop, total = 40, 12, 2, 6
    before = [i for step in range(stop) for i in step_samples(num_samples, global_batch, 2, 2, step)]
    after = [i for step in range(stop, total) for i in step_samples(num_samples, global_batch, 3, 4, step)]
    uninterrupted = [i for step in range(total) for i in step_samples(num_samples, global_batch, 2, 2, step)]
    assert before + after == uninterrupted
    assert sorted(uninterrupted[:num_samples]) == list(range(num_samples))
    assert len(set(uninterrupted[num_samples:])) == len(uninterrupted) - num_samples
