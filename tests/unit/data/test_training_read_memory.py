"""Training reads its blocks memory-mapped: a rank's memory does not grow with the prepared data."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset

PROBE = """
import sys
from datasets import load_from_disk
from distrib.data import GlobalBatchSampler, collate
blocks = load_from_disk(sys.argv[1]).with_format("numpy")  # as distrib.data loads a prepared split
sampler = GlobalBatchSampler(len(blocks), global_batch=16, micro_batch=8, dp_size=2, dp_rank=0, seed=0)
for step in range(300):  # 2,400 blocks read at random positions, as a rank of a 2-process run does
    for indices in sampler.micro_batches(step):
        collate(blocks, indices)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's across exec)
print([int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""

SEQ = 256


def _prepared(path, n_blocks: int) -> str:
    """A prepared split of ``n_blocks`` blocks in the cache's layout (a fixed-size list column of int32 ids)."""
    ids = np.random.default_rng(0).integers(0, 8192, n_blocks * SEQ, dtype=np.int32)
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), SEQ)})
    Dataset(table).save_to_disk(str(path))
    return str(path)


def _peak_while_reading(path: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_8x_the_blocks_peaks_within_10_percent(tmp_path):
    small = _prepared(tmp_path / "1x", 16_384)         # 16 MiB of blocks
    large = _prepared(tmp_path / "8x", 8 * 16_384)     # 128 MiB: read whole, it would show at once
    assert _peak_while_reading(large) <= 1.10 * _peak_while_reading(small)
