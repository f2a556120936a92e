"""Tokenized documents into blocks of exactly ``seq_len`` tokens, in one streaming pass.

``text`` data is packed back to back (:func:`_pack`); prompt/response examples whole into padded blocks
whose ``labels`` are ``IGNORE_INDEX`` on prompt and padding (:func:`_pack_examples`). One sequential
pass makes the blocks a function of the documents only, whoever tokenized them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset
from datasets.table import InMemoryTable

from distrib.data.pages import _mapped_files, _release_pages

#: The label of positions without loss (prompt, padding), as in ``transformers``; the one definition (the
#: trainer and the losses import it from here, this module needs neither them nor DeepSpeed).
IGNORE_INDEX = -100


#: Tokens per piece of the packed stream that :func:`_pack` holds at once (its working arrays take
#: about 10 bytes a token, so some 10 MB whatever the corpus size), and documents per slice of the
#: tokenized column whose offsets it reads at once.
_STREAM_CHUNK_TOKENS = 1 << 20
_STREAM_CHUNK_DOCS = 1 << 16


def _stream_pieces(tokenized: Dataset, eos_id: int, limit: int) -> Iterator[np.ndarray]:
    """The packed token stream of ``tokenized`` (each document's ids, then eos) as int32 pieces.

    The pieces concatenate to exactly the stream of the whole column; each holds at most about
    ``limit`` tokens: whole documents while they fit, and a document longer than ``limit`` alone,
    cut into ``limit``-sized pieces (its eos ends the last one). The column is read a slice of
    documents at a time, so neither its ids nor its offsets are ever copied whole.
    """
    limit = max(1, limit)
    for chunk in tokenized.data.column("input_ids").chunks:
        for first in range(0, len(chunk), _STREAM_CHUNK_DOCS):
            part = chunk.slice(first, _STREAM_CHUNK_DOCS)
            offsets = part.offsets.to_numpy().astype(np.int64)  # into part.values, which a slice does not cut
            values = part.values
            ends = offsets[1:] - offsets[0] + np.arange(1, len(part) + 1)  # stream end of each document
            i = 0
            while i < len(part):
                done = ends[i - 1] if i else 0
                j = max(i + 1, int(np.searchsorted(ends, done + limit, side="right")))
                lo, hi = int(offsets[i]), int(offsets[j])
                if j == i + 1 and hi - lo + 1 > limit:  # one long document: its ids in pieces, eos last
                    for start in range(lo, hi, limit):
                        ids = values.slice(start, min(limit, hi - start)).to_numpy(zero_copy_only=False)
                        piece = ids.astype(np.int32)
                        if start + limit >= hi:
                            piece = np.append(piece, np.int32(eos_id))
                        yield piece
                else:
                    ids = values.slice(lo, hi - lo).to_numpy(zero_copy_only=False)
                    piece = np.empty(hi - lo + j - i, dtype=np.int32)
                    is_eos = np.zeros(len(piece), dtype=bool)
                    is_eos[ends[i:j] - done - 1] = True  # one slot after each document
                    piece[is_eos] = eos_id
                    piece[~is_eos] = ids
                    yield piece
                i = j


def _pack(tokenized: Dataset, eos_id: int, seq_len: int, path: Path | None = None) -> tuple[Dataset, int]:
    """Concatenate every document's ids followed by eos, cut into blocks of exactly ``seq_len``.

    Packing is one sequential pass over the tokenized column, after (not inside) the
    tokenization (:func:`_tokenize`), which splits the data into contiguous tasks for the processes
    that share it: packing per task or batch would place block boundaries (and drop remainders)
    differently for each split.
    A single pass makes the blocks a function of the documents only; the one remainder shorter
    than ``seq_len`` at the end is dropped.

    It streams, so memory does not grow with the corpus: the stream comes in pieces of about
    ``_STREAM_CHUNK_TOKENS`` tokens (:func:`_stream_pieces`), the tokens short of a whole block at
    the end of a piece are carried over to the next, and with ``path`` the blocks go to an Arrow
    file there as they are cut (memory mapped back at the end). The pages of the tokenized column
    are released as they are read (:func:`_release_pages`). The blocks are the same for any piece
    size.

    Args:
        tokenized: column ``input_ids``, one list of ids per document.
        eos_id: the id put after each document.
        seq_len: the block length.
        path: where to write the blocks; ``None`` keeps them in memory (for small data and tests).

    Returns:
        the blocks (column ``input_ids``, int32) and the number of tokens in the stream.
    """
    schema = pa.schema([("input_ids", pa.list_(pa.int32(), seq_len))])
    # The stream not yet cut: the tokens after the last whole block, then the pieces read since.
    # Pieces are gathered up to _STREAM_CHUNK_TOKENS before cutting, so that the file's record
    # batches are large whatever the documents per tokenized chunk: a reader's pass over the
    # batch headers then touches few of the file's pages.
    pending: list[np.ndarray] = []
    pending_tokens = 0
    num_tokens = 0
    files = _mapped_files(tokenized)
    with _BlockWriter(path, schema) as blocks:
        for piece in _stream_pieces(tokenized, eos_id, _STREAM_CHUNK_TOKENS):
            _release_pages(files)  # the pages of the ids just read (the piece is a copy)
            num_tokens += len(piece)
            pending.append(piece)
            pending_tokens += len(piece)
            if pending_tokens >= _STREAM_CHUNK_TOKENS:
                pending = [_cut_blocks(pending, seq_len, blocks)]
                pending_tokens = len(pending[0])
        if pending:
            _cut_blocks(pending, seq_len, blocks)
    return blocks.dataset(), num_tokens


def _cut_blocks(pending: list[np.ndarray], seq_len: int, blocks: _BlockWriter) -> np.ndarray:
    """Write the whole blocks of the stream ``pending`` to ``blocks``; returns the tokens left over."""
    stream = np.concatenate(pending) if len(pending) > 1 else pending[0]
    usable = len(stream) // seq_len * seq_len
    if usable:
        column = pa.FixedSizeListArray.from_arrays(pa.array(stream[:usable]), seq_len)
        blocks.write(pa.RecordBatch.from_arrays([column], schema=blocks.schema))
    return stream[usable:].copy()  # a copy, so that the pieces can be freed


class _BlockWriter:
    """Where packing puts its record batches of blocks: an Arrow stream file at ``path``, or memory if None.

    Used as a context manager, which closes the file; :meth:`dataset` then gives the blocks, memory
    mapped from the file or in memory.
    """

    def __init__(self, path: Path | None, schema: pa.Schema):
        self.path, self.schema = path, schema
        self._sink = pa.ipc.new_stream(str(path), schema) if path is not None else None
        self._batches: list[pa.RecordBatch] = []

    def __enter__(self) -> _BlockWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._sink is not None:
            self._sink.close()

    def write(self, batch: pa.RecordBatch) -> None:
        if self._sink is not None:
            self._sink.write_batch(batch)
        else:
            self._batches.append(batch)

    def dataset(self) -> Dataset:
        if self.path is not None:
            return Dataset.from_file(str(self.path))
        return Dataset(InMemoryTable(pa.Table.from_batches(self._batches, schema=self.schema)))


#: Tokens per chunk of :func:`_pack_examples` (at most: a chunk holds this // seq_len examples, each
#: of at most seq_len tokens once truncated). Its working arrays take about 40 bytes a token, so
#: memory stays near 200 MB whatever the corpus size.
_PACK_CHUNK_TOKENS = 1 << 22


def _pack_examples(tokenized: Dataset, pad_id: int, seq_len: int, path: Path | None = None) -> tuple[Dataset, dict]:
    """Pack whole prompt/response examples into blocks of ``seq_len``: ``input_ids`` and ``labels``.

    Each example is its prompt ids, response ids and eos (``tokenized`` holds them in ``input_ids``,
    with ``prompt_len``); its labels are ``-100`` (:data:`IGNORE_INDEX`) on the
    prompt and the ids themselves on the response and eos, so the loss counts response tokens only.

    Greedy next-fit, in dataset order: an example goes into the current block if it fits in the
    room left, else the block is closed (its rest padded: ``pad_id`` in ``input_ids``, ``-100`` in
    ``labels``) and the example starts the next one. No example is split across blocks. An example
    longer than ``seq_len`` is truncated to its first ``seq_len`` tokens (the response is cut short
    and has no eos) and fills a block alone; one whose prompt alone has ``seq_len`` tokens or more
    would have no target left and is dropped. Both are counted in the returned stats, which the
    caller logs once. The last block is padded and kept, so no example is lost to packing.

    Examples packed into one block attend to the earlier examples of the block (the usual packing,
    as TRL's ``packing=True`` without per-example position resets or flash-attention boundaries):
    a response sees its own prompt and, further back, unrelated examples. That noisier context is
    the usual price of packing's throughput (far less padding than one example per block).

    Like :func:`_pack`, this is one sequential pass after the multi-process tokenization, so the blocks
    depend on the examples only, never on ``num_proc``. It streams: ``_PACK_CHUNK_TOKENS // seq_len``
    examples at a time, the placement a loop over their lengths and the copying vectorised, carrying the one
    open block from chunk to chunk; with ``path`` the blocks go to an Arrow file there (memory
    mapped back), so memory is bounded by a chunk, not the corpus.

    Args:
        tokenized: columns ``input_ids`` (prompt + response + eos) and ``prompt_len``.
        pad_id: the id padding positions get in ``input_ids``.
        seq_len: the block length.
        path: where to write the blocks; ``None`` keeps them in memory (for small data and tests).

    Returns:
        the blocks (columns ``input_ids`` and ``labels``, int32) and stats: ``examples``,
        ``truncated``, ``dropped``, ``tokens`` (placed in blocks), ``targets`` (labels that are not
        -100) and ``padding`` (padded positions).
    """
    block_type = pa.list_(pa.int32(), seq_len)
    schema = pa.schema([("input_ids", block_type), ("labels", block_type)])
    stats = dict(examples=0, truncated=0, dropped=0, tokens=0, targets=0, padding=0)
    # The open block: its ids and labels so far (padding and -100 beyond ``fill``).
    open_ids = np.full(seq_len, pad_id, dtype=np.int32)
    open_labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int32)
    fill = 0
    files = _mapped_files(tokenized)
    with _BlockWriter(path, schema) as blocks:
        for record in tokenized.data.to_batches(max_chunksize=max(1, _PACK_CHUNK_TOKENS // seq_len)):
            _release_pages(files)  # those of the chunks before (see _release_pages)
            ids, labels, fill = _pack_chunk(record, open_ids, open_labels, fill, pad_id, stats)
            if len(ids) > 1:  # every block but the last is closed: nothing placed later can go into it
                _write_padded(blocks, ids[:-1], labels[:-1], stats)
            open_ids, open_labels = ids[-1].copy(), labels[-1].copy()
        if fill:
            _write_padded(blocks, open_ids[None], open_labels[None], stats)
    stats["padding"] -= stats["tokens"]
    return blocks.dataset(), stats


def _pack_chunk(record: pa.RecordBatch, open_ids: np.ndarray, open_labels: np.ndarray, fill: int, pad_id: int,
                stats: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """The blocks of one chunk of examples, the open block first: ``(ids, labels, fill of the last block)``.

    Counts the chunk's examples in ``stats``; the last block returned is the new open one.
    """
    seq_len = len(open_ids)
    column = record.column("input_ids")
    offsets = column.offsets.to_numpy().astype(np.int64)  # into column.values, also for a slice
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, seq_len)
    prompts = np.minimum(record.column("prompt_len").to_numpy().astype(np.int64), kept)
    starts, block, fill = _place(kept, prompts, fill, seq_len)
    placed = starts >= 0
    stats["examples"] += len(lengths)
    stats["dropped"] += int((~placed).sum())
    stats["truncated"] += int((placed & (lengths > seq_len)).sum())
    ids = np.full((block + 1, seq_len), pad_id, dtype=np.int32)
    labels = np.full((block + 1, seq_len), IGNORE_INDEX, dtype=np.int32)
    ids[0], labels[0] = open_ids, open_labels
    # Copy every placed token at once: token j of example i goes from values[offsets[i] + j]
    # to the flat position starts[i] + j, and is a target when j >= its prompt length.
    sizes, firsts = kept[placed], starts[placed]
    within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    source = np.repeat(offsets[:-1][placed], sizes) + within
    target = np.repeat(firsts, sizes) + within
    tokens = column.values.to_numpy()[source]
    is_target = within >= np.repeat(prompts[placed], sizes)
    ids.reshape(-1)[target] = tokens
    labels.reshape(-1)[target] = np.where(is_target, tokens, IGNORE_INDEX)
    stats["tokens"] += len(tokens)
    stats["targets"] += int(is_target.sum())
    return ids, labels, fill


def _place(kept: np.ndarray, prompts: np.ndarray, fill: int, seq_len: int) -> tuple[np.ndarray, int, int]:
    """Greedy next-fit: where each example starts, the last block's index and its fill.

    Starts are flat positions in the chunk's blocks (row-major over [open block, new blocks...]) and -1
    for dropped examples (the prompt fills the block). Inherently sequential.
    """
    starts = np.full(len(kept), -1, dtype=np.int64)
    block = 0
    for i, (size, prompt) in enumerate(zip(kept.tolist(), prompts.tolist())):
        if prompt >= size:
            continue
        if fill + size > seq_len:
            block, fill = block + 1, 0
        starts[i] = block * seq_len + fill
        fill += size
    return starts, block, fill


def _write_padded(blocks: _BlockWriter, ids: np.ndarray, labels: np.ndarray, stats: dict) -> None:
    """Write closed blocks of ``ids`` and ``labels``, counting all their positions as padding (minus the tokens, at the end)."""
    seq_len = ids.shape[1]
    columns = [pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), seq_len) for a in (ids, labels)]
    blocks.write(pa.RecordBatch.from_arrays(columns, schema=blocks.schema))
    stats["padding"] += len(ids) * seq_len
