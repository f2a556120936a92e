"""Hugging Face Hub datasets, streamed into memory-mapped Arrow files in bounded memory.

``data.source=hub`` reads ``datasets.load_dataset(data.name, data.hub_config, streaming=True)``: the
rows come over the network (or from a local dataset directory) a batch at a time and only the
columns of ``data.format`` are written, in record batches of about ``_WRITE_BYTES``, to Arrow files
under the build's scratch cache, which are memory-mapped back. Nothing is converted whole into
``datasets``' cache, no split is ever held in memory, and ``data.max_documents`` stops the download of
the train split once that many documents are read: a sample of a multi-terabyte corpus costs what
the sample costs.

A dataset without a ``validation`` split cannot be shuffled before it has been read, so validation
is chosen by a stable hash of each row's position instead (as :func:`distrib.data.builtin.builtin_corpus`
chooses by a hash of each document's key): row ``p`` of the train split is held out when
``_stable_unit(str(p)) < data.validation_fraction``. The split is the same on every run and machine,
needs one pass, and does not depend on the batch sizes the stream is read in.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
from collections.abc import Generator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset, IterableDatasetDict, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError

from distrib.config import ConfigError, DataConfig
from distrib.data.builtin import _MIN_VALIDATION_DOCS, _stable_unit
from distrib.data.pages import _release_pages
from distrib.data.readers import Fields, is_string_type

logger = logging.getLogger(__name__)

#: Rows pulled from the stream at a time. The read stops within one batch of ``data.max_documents``.
_STREAM_BATCH = 1000

#: Bytes of documents gathered before they are written as one record batch. Memory-mapping a file
#: reads every batch's header, and the kernel maps some 64 KiB around each, so large batches keep the
#: resident part of the file small; the pending documents are what this module holds at most.
_WRITE_BYTES = 8 << 20

#: What ``datasets`` raises for a dataset it cannot reach, find or read (``ConfigError`` is a
#: ``ValueError`` too, and is re-raised untouched).
_READ_ERRORS = (OSError, pa.ArrowException, DatasetGenerationError, ValueError)

#: The characters ``str.strip()`` removes (those for which ``str.isspace()`` holds): a text of only
#: these is an empty document, as in :func:`distrib.data.text._non_empty`.
_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())

#: A split's documents as :func:`_read` yields them: ``(positions, table)`` per batch.
_Rows = Generator[tuple[np.ndarray, pa.Table], None, None]


def load_hub(cfg: DataConfig, fields: Fields, hf_cache: str | Path) -> tuple[Dataset, Dataset]:
    """The train and validation documents of the hub dataset ``cfg.name``, streamed to Arrow files.

    Columns are those of :func:`distrib.data.load_text`: ``text`` (empty and ``null`` texts dropped),
    or ``prompt`` and ``response`` (every row kept, a ``null`` refused). With a ``validation`` split,
    ``cfg.max_documents`` caps the train split (its first documents in stream order) and validation
    is read whole. Without one, validation is held out of the train split by the hash of each row's
    position (see the module docstring) in the same pass, which stops once the train side has
    ``cfg.max_documents`` documents and validation at least the minimum below.

    Validation gets at least ``min(_MIN_VALIDATION_DOCS, documents // 2)`` documents: should the hash
    hold out fewer by the end of the stream, the train documents of the lowest hashes are moved
    over, as :func:`distrib.data.builtin.builtin_corpus` does.

    Args:
        cfg: the data section (``source=hub``).
        fields: what a row must hold (:func:`distrib.data.text._fields`).
        hf_cache: where the files go, under ``hub/``; :func:`distrib.data.prepare_data` passes its
            build's scratch directory, deleted with the build. A file is written under a temporary
            name and renamed into place, so a Dataset still mapping an earlier file keeps reading it.

    Returns:
        ``(train, validation)``, memory-mapped.

    Raises:
        ConfigError: one line naming ``data.name`` (or ``data.hub_config``, ``data.text_field``...)
            and the fix: a dataset that cannot be found or reached, a missing or unknown config, no
            ``train`` split, a missing or non-string field, a ``null`` prompt or response, a read
            failing mid-stream, or too few documents to hold out validation.
    """
    where = _dataset(cfg)
    splits = _open(cfg, hf_cache)
    if "train" not in splits:
        raise ConfigError(
            f"{where} has no 'train' split (its splits are {sorted(splits)}); "
            "pick a dataset (or data.hub_config) that has one"
        )
    out = Path(hf_cache) / "hub"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / _file_key(cfg, fields)
    schema = pa.schema([(role, pa.string()) for role, _, _ in fields.roles])
    train_rows = _read(splits["train"], fields, where, "train")
    if "validation" in splits:
        logger.info("streaming %s: train and validation splits", where)
        with _Sink(stem.with_name(stem.name + "-train.arrow"), schema) as train_sink:
            _write_capped(train_rows, train_sink, cfg.max_documents)
        with _Sink(stem.with_name(stem.name + "-validation.arrow"), schema) as validation_sink:
            validation_rows = _read(splits["validation"], fields, where, "validation")
            _write_capped(validation_rows, validation_sink, None)
        train, validation = train_sink.dataset(), validation_sink.dataset()
    else:
        logger.info("streaming %s: no validation split, holding out %g of the train rows by hash",
                    where, cfg.validation_fraction)
        train, validation = _hash_split(train_rows, stem, schema, cfg, where)
    logger.info("%s: %d train and %d validation documents", where, len(train), len(validation))
    return train, validation


def _dataset(cfg: DataConfig) -> str:
    """``data.name='x'``, with ``(data.hub_config='y')`` when one is set: how every message names the dataset."""
    config = f" (data.hub_config={cfg.hub_config!r})" if cfg.hub_config else ""
    return f"data.name={cfg.name!r}{config}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _open(cfg: DataConfig, hf_cache: str | Path) -> IterableDatasetDict:
    """``load_dataset(..., streaming=True)``: the splits, nothing read yet; its failures as one line.

    Raises:
        ConfigError: naming ``data.hub_config`` for a dataset of several configs without one, or
            with one it does not have; naming ``data.name`` for anything else.
    """
    try:
        return load_dataset(cfg.name, cfg.hub_config, streaming=True, cache_dir=str(hf_cache))
    except ConfigError:
        raise
    except ValueError as e:
        message = str(e)
        available = re.search(r"(\[[^\]\n]*\])", message)
        configs = available.group(1) if available else "see the dataset's page"
        if "Config name is missing" in message:
            raise ConfigError(
                f"data.hub_config is not set, but data.name={cfg.name!r} has several configs ({configs}); "
                "set data.hub_config to one of them"
            ) from None
        if "BuilderConfig" in message and "not found" in message:
            raise ConfigError(
                f"data.hub_config={cfg.hub_config!r} is not a config of data.name={cfg.name!r} (it has {configs}); "
                "set data.hub_config to one of them, or unset it"
            ) from None
        logger.debug("load_dataset(%r, %r) failed", cfg.name, cfg.hub_config, exc_info=True)
        raise ConfigError(
            f"{_dataset(cfg)} cannot be loaded ({type(e).__name__}: {_first_line(e)}); fix data.name or data.hub_config"
        ) from None
    except (OSError, RuntimeError, pa.ArrowException, DatasetGenerationError) as e:
        # DatasetNotFoundError (also for a gated dataset without a token), FileNotFoundError (a local
        # path without data files), ConnectionError (no network, or offline mode), RuntimeError (a
        # dataset defined by a loading script, which datasets no longer runs)...
        logger.debug("load_dataset(%r, %r) failed", cfg.name, cfg.hub_config, exc_info=True)
        raise ConfigError(
            f"{_dataset(cfg)} cannot be loaded ({type(e).__name__}: {_first_line(e)}); set data.name to a Hugging Face "
            "dataset id (e.g. 'HuggingFaceFW/fineweb') or a local dataset directory, and check access to the Hub "
            "(network, HF_TOKEN for a gated dataset, HF_HUB_OFFLINE unset)"
        ) from None


def _file_key(cfg: DataConfig, fields: Fields) -> str:
    """A name for this reading's files: equal readings overwrite each other instead of piling up."""
    spec = [cfg.name, cfg.hub_config, fields.roles, cfg.max_documents, cfg.validation_fraction]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _read(split: IterableDataset, fields: Fields, dataset: str, name: str) -> _Rows:
    """The documents of a streamed split, a batch at a time: ``(positions, table)``.

    ``table`` holds the columns of ``fields`` under their role names (``text``, or ``prompt`` and
    ``response``) as Arrow strings; ``positions`` are the rows' positions in the split, counting
    every row (also the empty texts, dropped here), so that they identify a row whatever is dropped.
    Reading stops when the consumer stops pulling; the stream is closed then.

    Raises:
        ConfigError: a field missing from the rows or not strings, a ``null`` prompt or response,
            or ``datasets`` failing to read the split (naming its error).
    """
    where = f"the {name} split of {dataset}"
    batches = split.with_format("arrow").iter(batch_size=_STREAM_BATCH)
    position = 0
    try:
        while True:
            try:
                table = next(batches)
            except StopIteration:
                return
            except ConfigError:
                raise
            except _READ_ERRORS as e:
                logger.debug("reading the %s split of %s failed", name, dataset, exc_info=True)
                raise ConfigError(
                    f"{dataset}: the {name} split could not be read after {position} rows "
                    f"({type(e).__name__}: {_first_line(e)}); "
                    "check access to the Hub and run again, or fix the dataset or data.name"
                ) from None
            columns = [_column(table, role, field, key, fields.pairs, where, position)
                       for role, field, key in fields.roles]
            if fields.pairs:
                kept = np.arange(table.num_rows)
            else:  # the rule of distrib.data.text._non_empty (non-empty after strip()), in Arrow: no Python strings
                rest = pc.utf8_length(pc.utf8_ltrim(columns[0], characters=_WHITESPACE))
                kept = np.flatnonzero(pc.fill_null(pc.greater(rest, 0), False).to_numpy(zero_copy_only=False))
            names = [role for role, _, _ in fields.roles]
            docs = pa.Table.from_arrays(columns, names=names)
            if len(kept) < table.num_rows:
                docs = docs.take(pa.array(kept, type=pa.int64()))
            yield kept + position, docs
            position += table.num_rows
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _column(table: pa.Table, role: str, field: str, key: str, pairs: bool, where: str, position: int) -> pa.Array:
    """``table[field]`` as one Arrow string array, refused unless it can be the ``role`` of a document.

    A column of nulls only (JSON infers that type for a batch without any value) is text to drop,
    or a missing prompt or response.
    """
    if field not in table.column_names:
        raise ConfigError(
            f"{key}={field!r} is not a column of {where}; its columns are {table.column_names[:10]}; set {key}"
        )
    column = table.column(field)
    if not (is_string_type(column.type) or pa.types.is_null(column.type)):
        raise ConfigError(
            f"{key}={field!r} of {where} holds {column.type}, not strings; set {key} to the {role} column"
        )
    if pairs and column.null_count:
        first = position + next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
        raise ConfigError(
            f"{key}={field!r} is null in row {first + 1} of {where}; "
            f"store every {role} as a string (an empty one if there is none)"
        )
    return column.cast(pa.string()).combine_chunks()


class _Sink:
    """An Arrow stream file written in record batches of about ``_WRITE_BYTES``, then memory-mapped back.

    Written under a temporary name and renamed into place on a clean exit (removed on an error),
    so no reader ever maps a half-written file.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None

    def __enter__(self) -> "_Sink":
        self._writer = pa.ipc.new_stream(str(self.tmp), self.schema)
        return self

    def add(self, docs: pa.Table) -> None:
        if not docs.num_rows:
            return
        self._pending.append(docs)
        self._pending_bytes += docs.nbytes
        self.rows += docs.num_rows
        if self._pending_bytes >= _WRITE_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending).combine_chunks())
            self._pending, self._pending_bytes = [], 0

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self._flush()
        finally:
            self._writer.close()
            self._pending = []
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)

    def dataset(self) -> Dataset:
        """The file, memory-mapped; the batch headers read to open it are released (see ``_release_pages``)."""
        ds = Dataset.from_file(str(self.path))
        _release_pages([str(self.path)])
        return ds


def _write_capped(rows: _Rows, sink: _Sink, cap: int | None) -> None:
    """All documents of ``rows`` into ``sink``, or its first ``cap``: then the stream is not read further."""
    try:
        for _, docs in rows:
            if cap is not None and sink.rows + docs.num_rows >= cap:
                sink.add(docs.slice(0, cap - sink.rows))
                return
            sink.add(docs)
    finally:
        rows.close()  # stop the download


def _hash_split(rows: _Rows, stem: Path, schema: pa.Schema, cfg: DataConfig, where: str) -> tuple[Dataset, Dataset]:
    """Train and validation from one pass over the train split, validation chosen by position hash.

    Row by row (vectorised per batch, so the result does not depend on the batch size): a row whose
    hash is below ``cfg.validation_fraction`` goes to validation, any other to train while train has
    fewer than ``cfg.max_documents``. The pass stops at the first row after which train is full and
    validation has its minimum. The (at most ``_MIN_VALIDATION_DOCS``) train documents of the lowest
    hashes, and the first validation positions, are remembered for the top-up at the end.
    """
    cap, fraction = cfg.max_documents, cfg.validation_fraction
    lowest: list[tuple[float, int, int]] = []  # a max-heap by -hash of (-hash, -train index, position)
    held_positions: list[int] = []  # the first _MIN_VALIDATION_DOCS validation positions
    with _Sink(stem.with_name(stem.name + "-train.arrow"), schema) as train_sink, \
            _Sink(stem.with_name(stem.name + "-validation.arrow"), schema) as validation_sink:
        try:
            for positions, docs in rows:
                units = np.array([_stable_unit(str(p)) for p in positions.tolist()], dtype=np.float64)
                held = units < fraction
                n_train = train_sink.rows + np.cumsum(~held)  # train documents seen, before the cap
                n_validation = validation_sink.rows + np.cumsum(held)
                to_train = ~held
                done = np.zeros(len(held), dtype=bool)
                if cap is not None:
                    to_train &= n_train <= cap
                    n_kept = np.minimum(n_train, cap) + n_validation
                    done = (n_train >= cap) & (n_validation >= np.minimum(_MIN_VALIDATION_DOCS, n_kept // 2))
                    if done.any():
                        stop = int(np.argmax(done)) + 1
                        held[stop:], to_train[stop:] = False, False
                train_at, held_at = np.flatnonzero(to_train), np.flatnonzero(held)
                for j in np.argsort(units[train_at], kind="stable")[:_MIN_VALIDATION_DOCS].tolist():
                    i = int(train_at[j])
                    item = (-float(units[i]), -(train_sink.rows + j), int(positions[i]))
                    if len(lowest) < _MIN_VALIDATION_DOCS:
                        heapq.heappush(lowest, item)
                    elif item > lowest[0]:  # a lower hash than the highest one kept
                        heapq.heapreplace(lowest, item)
                held_positions += positions[held_at[: max(0, _MIN_VALIDATION_DOCS - len(held_positions))]].tolist()
                train_sink.add(docs.take(pa.array(train_at, type=pa.int64())))
                validation_sink.add(docs.take(pa.array(held_at, type=pa.int64())))
                if done.any():
                    break
        finally:
            rows.close()  # stop the download
    train, validation = train_sink.dataset(), validation_sink.dataset()
    total = len(train) + len(validation)
    if total < 2:
        raise ConfigError(
            f"{where} holds {total} document(s) and no validation split, too few to hold out validation; "
            "pick a dataset with more documents or a validation split"
        )
    missing = min(_MIN_VALIDATION_DOCS, total // 2) - len(validation)
    if missing > 0:  # too few hashes below the fraction: the lowest train hashes join, still deterministic
        moved = sorted(lowest, reverse=True)[:missing]  # the lowest hashes first
        indices = [-index for _, index, _ in moved]
        order = np.argsort(held_positions[: len(validation)] + [position for _, _, position in moved], kind="stable")
        validation = concatenate_datasets([validation, train.select(indices)]).select(order)
        train = train.select(np.delete(np.arange(len(train)), indices))
    return train, validation
