"""What each rank reads at each step: :class:`GlobalBatchSampler`, and :func:`collate` to stack the blocks.

The position in the data is a single global sample index, so a run resumed with another data-parallel
size continues exactly where it stopped, seeing every sample of an epoch once.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from datasets import Dataset

from distrib.data.pages import _mapped_files, _release_pages

#: Datasets of at most this many blocks are shuffled by numpy's exact permutation (8 bytes a block,
#: 128 MiB here); larger ones by a keyed bijection computed per index (:class:`GlobalBatchSampler`).
_EXACT_PERMUTATION_MAX = 1 << 24

#: Rounds of the Feistel network of the large-data shuffle: four make a keyed pseudo-random permutation.
_FEISTEL_ROUNDS = 4


class GlobalBatchSampler:
    """Which samples each rank reads at each optimizer step, from a global sample position.

    Optimizer step ``s`` consumes the global positions ``[s*G, (s+1)*G)``. Position ``p`` maps
    to dataset index ``permutation(seed, epoch)[p % num_samples]`` with ``epoch = p // num_samples``,
    so the position alone says where training is: resuming at step ``k`` with any data-parallel
    size continues with position ``k*G``, never repeating or skipping a sample of the epoch.

    Within a step, micro-step ``a`` on data-parallel rank ``r`` reads the ``micro_batch``
    positions starting at ``s*G + (a*dp_size + r)*micro_batch``; over all ranks and micro-steps
    that is exactly the step's positions.

    The permutation of an epoch depends on ``(seed, epoch, num_samples)`` only, in one of two ways:

    - up to ``_EXACT_PERMUTATION_MAX`` samples (2**24, some 4e9 tokens of 256-token blocks) it is
      ``numpy.random.default_rng([seed, epoch]).permutation(num_samples)``, held for the current
      epoch (8 bytes a sample, at most 128 MiB);
    - above, holding it would take gigabytes per rank, so it is a keyed bijection of
      ``[0, num_samples)`` evaluated per index in constant memory: a 4-round Feistel network over
      the smallest even power of two >= ``num_samples``, whose round keys come from
      ``default_rng([seed, epoch])``, with cycle walking (an output outside the range is encrypted
      again until it falls inside, on average fewer than four times) so that it stays a
      permutation of exactly ``num_samples``.

    Both are permutations, so the contract above holds either way; the threshold only decides the
    order, and every dataset that existed below it keeps its order.

    Args:
        num_samples: dataset length.
        global_batch: samples per optimizer step, ``G``.
        micro_batch: samples per rank per forward pass.
        dp_size: data-parallel world size.
        dp_rank: this rank's data-parallel index.
        seed: seeds the per-epoch permutations.

    Raises:
        ValueError: ``global_batch`` is not a multiple of ``micro_batch * dp_size``, or bad sizes.
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_size: int, dp_rank: int, seed: int):
        if num_samples <= 0 or micro_batch <= 0 or dp_size <= 0:
            raise ValueError(f"num_samples={num_samples}, micro_batch={micro_batch}, dp_size={dp_size} must be > 0")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if global_batch <= 0 or global_batch % (micro_batch * dp_size):
            raise ValueError(
                f"global_batch={global_batch} is not a multiple of micro_batch x dp_size = {micro_batch} x {dp_size}"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.accum_steps = global_batch // (micro_batch * dp_size)
        self.exact = num_samples <= _EXACT_PERMUTATION_MAX
        self._epoch: int | None = None  # only the current epoch's permutation (or round keys) is kept
        self._perm: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        half_bits = (max(1, (int(num_samples) - 1).bit_length()) + 1) // 2  # each half of an even power of two
        self._half_bits = np.uint64(half_bits)
        self._half_mask = np.uint64((1 << half_bits) - 1)

    def positions(self, step: int) -> range:
        """The global sample positions of optimizer step ``step``."""
        return range(step * self.global_batch, (step + 1) * self.global_batch)

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This rank's dataset indices for ``step``: one array of ``micro_batch`` per micro-step."""
        start = step * self.global_batch
        batches = []
        for a in range(self.accum_steps):
            first = start + (a * self.dp_size + self.dp_rank) * self.micro_batch
            if self.exact:
                positions = range(first, first + self.micro_batch)
                batches.append(np.array([self.dataset_index(p) for p in positions], dtype=np.int64))
            else:
                batches.append(self._indices(first, self.micro_batch))
        return batches

    def dataset_index(self, position: int) -> int:
        """The dataset index read at global sample ``position``."""
        if not self.exact:
            return int(self._indices(position, 1)[0])
        epoch, offset = divmod(position, self.num_samples)
        return int(self._permutation(epoch)[offset])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return self._perm

    def _indices(self, first: int, count: int) -> np.ndarray:
        """The dataset indices of the positions ``[first, first + count)`` on the large-data path."""
        out = np.empty(count, dtype=np.int64)
        position = first
        while position < first + count:  # an epoch at a time (a micro-batch may straddle two)
            epoch, offset = divmod(position, self.num_samples)
            n = min(first + count - position, self.num_samples - offset)
            offsets = np.arange(offset, offset + n, dtype=np.uint64)
            out[position - first : position - first + n] = self._bijection(offsets, self._round_keys(epoch))
            position += n
        return out

    def _round_keys(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._keys = np.random.default_rng([self.seed, epoch]).integers(
                0, np.iinfo(np.uint64).max, size=_FEISTEL_ROUNDS, dtype=np.uint64, endpoint=True
            )
            self._epoch = epoch
        return self._keys

    def _bijection(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The permutation of ``[0, num_samples)`` at the (uint64) offsets ``x``: Feistel rounds, cycle walking."""
        x = self._feistel(x, keys)
        outside = x >= np.uint64(self.num_samples)
        while outside.any():  # terminates: the cycle through x of a permutation returns into the range
            x[outside] = self._feistel(x[outside], keys)
            outside = x >= np.uint64(self.num_samples)
        return x.astype(np.int64)

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """A keyed bijection of ``[0, 4**half_bits)``: balanced Feistel rounds on its two halves."""
        left, right = x >> self._half_bits, x & self._half_mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._half_mask)
        return (left << self._half_bits) | right


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping): a fast, well-mixing round function."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


#: :func:`collate` releases the pages it has read every this many calls: reading the process's
#: memory map takes about a millisecond, and the pages between two releases are few (a batch's
#: blocks, and what the kernel maps around each, some 64 KiB).
_RELEASE_EVERY_BATCHES = 16
_collated = 0


def collate(dataset: Dataset, indices: Iterable[int]) -> dict[str, torch.Tensor]:
    """Stack the blocks at ``indices`` into ``{"input_ids": LongTensor[B, seq_len]}``, plus ``labels`` if any.

    Packed text has no ``labels`` column: every next token is a target, so the caller passes
    ``labels=input_ids`` (the model shifts them itself). Prompt/response blocks have one, ``-100``
    on the positions without loss. The pages of the memory-mapped blocks read are released every
    ``_RELEASE_EVERY_BATCHES`` calls (:func:`_release_pages`), so a rank's resident memory does not
    grow with the dataset over an epoch.
    """
    rows = dataset[[int(i) for i in indices]]
    global _collated
    _collated += 1
    if _collated % _RELEASE_EVERY_BATCHES == 0:  # or an epoch of random reads keeps the whole file resident
        _release_pages(_mapped_files(dataset))
    columns = ("input_ids", "labels") if "labels" in dataset.column_names else ("input_ids",)
    return {c: torch.as_tensor(np.asarray(rows[c]), dtype=torch.long) for c in columns}
