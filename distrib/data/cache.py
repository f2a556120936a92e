"""The cached pipeline: :func:`prepare_data` builds the packed blocks of a data configuration once.

The cache key hashes what defines the data; a build goes to a temporary directory renamed into place
whole, under a file lock, while the processes waiting for it help tokenize (:mod:`distrib.data.team`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import tokenizers
from datasets import Dataset, load_from_disk
from filelock import FileLock, Timeout
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distrib import fs
from distrib.config import ConfigError, DataConfig
from distrib.data.packing import _pack, _pack_examples
from distrib.data.pages import _mapped_files
from distrib.data.readers import expand, names
from distrib.data.team import _HELP_POLL_SECONDS, _Board, _help, _launched_processes, _num_proc, _tokenize
from distrib.data.text import _cache_root, _format, load_text
from distrib.data.tokenizer import _check_tokenizer_dir, _iter_text, load_or_train_tokenizer

logger = logging.getLogger("distrib.data")  # one logger for the data package, whatever the module

#: Bump when the cache layout or the packing changes, so that old caches are not reused.
_CACHE_FORMAT = 1

#: A process waiting this long for the cache lock says so; shorter waits (ranks racing for a lock
#: whose holder finds the cache complete, or a quick build) are not worth a log line.
_QUIET_WAIT_SECONDS = 3.0


@dataclass
class PreparedData:
    """Packed, tokenized data ready for training.

    Attributes:
        train: blocks of ``seq_len`` token ids, column ``input_ids``, numpy format; prompt/response
            data also has ``labels`` (``-100`` on prompt and padding positions).
        validation: same, for evaluation.
        tokenizer: the tokenizer that produced them.
        fingerprint: the cache key; identical for identical data.
        cache_path: the cache directory holding ``tokenizer/``, ``train/``, ``validation/``.
    """

    train: Dataset
    validation: Dataset
    tokenizer: PreTrainedTokenizerFast
    fingerprint: str
    cache_path: Path


def prepare_data(cfg: DataConfig, seed: int) -> PreparedData:
    """Load, tokenize and pack ``cfg``'s data, or reuse the disk cache built by an earlier call.

    The cache key hashes every field that defines the data (and the files' sizes and mtimes, and
    for the built-in corpus the Python version). Concurrent callers (the ranks of one run, or
    separate runs) serialise on a file lock: the first builds, the others tokenize pieces it posts
    while they wait (see :func:`_tokenize`), and then load. A
    build goes to a temporary directory renamed into place only when complete, so a crash never
    leaves a half-written cache. The lock relies on the file system honouring ``flock``; on a
    shared network file system prefer a node-local ``data.cache_dir``.

    Bad data is refused with a :class:`ConfigError` of one line naming the key, the file (and
    line) and the fix, meant for the launching process to report before any worker starts. A
    failed call leaves nothing behind in the cache root: no build directory, no lock file it
    created, no ``datasets`` cache (that lives inside the build), and no cache root it created.

    Args:
        cfg: the data section.
        seed: the run seed. The data does not depend on it (shuffling is the sampler's job), so
            runs that differ only in seed share one cache.

    Raises:
        ConfigError: bad paths or file contents (see :func:`load_text`), a bad ``data.tokenizer``,
            an unusable ``data.cache_dir``, or too little data for one validation/train block.
    """
    del seed  # see docstring: the prepared data is seed-independent by design
    key, spec = _cache_key(cfg)
    root = _cache_root(cfg)
    final = root / key
    if final.is_dir():  # fast path: a completed cache needs no lock, it only ever appears whole
        return _load(final, key)
    if cfg.tokenizer:
        _check_tokenizer_dir(cfg.tokenizer)  # before anything is read or written
    created = _missing_dirs(root)
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"data.cache_dir: cannot create {str(root)!r} ({e.strerror or e}); "
                "set data.cache_dir to a writable directory"
            ) from None
        if not os.access(root, os.W_OK | os.X_OK):  # else the lock file fails with a traceback
            raise ConfigError(
                f"data.cache_dir: {str(root)!r} is not writable; set data.cache_dir to a writable directory"
            )
        _build_under_lock(cfg, spec, root, key)
    except BaseException:
        for directory in created:  # deepest first; rmdir leaves alone what another process has filled meanwhile
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    return _load(final, key)


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing, path = [], path.absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _build_under_lock(cfg: DataConfig, spec: dict, root: Path, key: str) -> None:
    """Build ``root/key`` unless another process has, holding ``root/key.lock`` meanwhile.

    While another process holds the lock, this one helps it tokenize (:func:`_wait_helping`).

    A failed build deletes the lock file while still holding it. That is safe for processes
    waiting on it: ``filelock`` notices that the file it locked has been unlinked and starts over
    with a new one (and then, finding no cache, builds itself).
    """
    final, lock_path = root / key, root / f"{key}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _wait_helping(lock, _Board(root, key), cfg.num_proc, final)
    try:
        if not final.is_dir():
            try:
                _build_atomically(cfg, spec, root, key)
            except BaseException:
                lock_path.unlink(missing_ok=True)
                raise
            # Registrations left by waiters that died; the living ones find the cache and leave.
            shutil.rmtree(_Board(root, key).waiting, ignore_errors=True)
    finally:
        lock.release()


def _wait_helping(lock: FileLock, board: _Board, workers: int, final: Path) -> None:
    """Wait for ``lock``, meanwhile registered on ``board`` and doing the tokenizing tasks posted there."""
    me = board.register()
    started, said, helped = time.monotonic(), False, set()
    try:
        while True:
            try:
                lock.acquire(timeout=_HELP_POLL_SECONDS)
                return
            except Timeout:
                pass
            if not said and time.monotonic() - started >= _QUIET_WAIT_SECONDS:
                logger.info("waiting for another process to build the data cache %s", final)
                said = True
            _help(board, workers, helped)
    finally:
        board.unregister(me)


def _cache_key(cfg: DataConfig) -> tuple[str, dict]:
    """The cache key (16 hex digits of a sha256) and the spec it hashes."""
    spec = {
        "format": _CACHE_FORMAT,
        "tokenizers": tokenizers.__version__,  # BPE training may change across versions
        "source": cfg.source,
        "name": cfg.name,
        "hub_config": cfg.hub_config,
        "train_files": _file_stamps(cfg.train_files, "data.train_files"),
        "validation_files": _file_stamps(cfg.validation_files, "data.validation_files"),
        "text_field": cfg.text_field,
        "validation_fraction": cfg.validation_fraction,
        "max_documents": cfg.max_documents,
        "seq_len": cfg.seq_len,
        "tokenizer": _tokenizer_stamp(cfg.tokenizer),
        "vocab_size": cfg.vocab_size,
    }
    if _format(cfg) == "prompt_response":
        # Added only here, so that the keys of text data (and the caches built under them) stay as they were.
        spec["data_format"] = "prompt_response"
        if cfg.source != "builtin":  # the built-in instruct corpus names its fields itself
            spec["prompt_field"], spec["response_field"] = cfg.prompt_field, cfg.response_field
    if cfg.source == "builtin":
        spec["python"] = sys.version  # the corpus is this Python's library
    if cfg.source == "hub":  # streamed, validation held out by a hash of the position (see distrib.data.hub)
        spec["hub_reader"] = "stream"
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return digest[:16], spec


def _file_stamps(patterns: list[str], key: str) -> list[list]:
    stamps = []
    for path in expand(patterns, key, warn=False):  # load_text says which files were matched again
        st = os.stat(path)
        stamps.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return stamps


def _tokenizer_stamp(tokenizer: str | None) -> list | None:
    """Path plus its files' sizes and mtimes, so a re-saved tokenizer invalidates the cache."""
    if not tokenizer:
        return None
    path = Path(tokenizer).expanduser()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return [str(path.absolute()), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]


def _build_atomically(cfg: DataConfig, spec: dict, root: Path, key: str) -> None:
    # Only the lock holder builds, so any temporary directory of this key is a crashed build's leftover.
    for stale in root.glob(f"{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    board = _Board(root, key)
    board.withdraw()  # a crashed build's posting
    with fs.publishing(root / key, tmp=root / f"{key}.tmp-{os.getpid()}") as tmp:
        _build(cfg, spec, tmp, board)


def _build(cfg: DataConfig, spec: dict, out: Path, board: _Board | None = None) -> None:
    """Run the whole pipeline into ``out``: tokenizer/, train/, validation/, meta.json.

    With a ``board``, the processes waiting for this cache when a split starts tokenizing share
    that work (see :func:`_tokenize`); the blocks are the same whoever tokenizes.

    Raises:
        ConfigError: bad data (see :func:`load_text`), or a split too small for one block.
    """
    logger.info("building data cache %s", out)
    # datasets' cache of the parsed files lives in the build, not beside it: a failed build
    # takes it along, and a finished one drops it below, as the packed blocks replace it.
    hf_cache = out / "hf_datasets"
    texts = load_text(cfg, hf_cache=hf_cache)
    pairs = _format(cfg) == "prompt_response"
    tokenizer = load_or_train_tokenizer(cfg, _iter_text(texts["train"]))
    tokenizer.save_pretrained(out / "tokenizer")
    scratch = out / "tokenized"
    meta = {"spec": spec, "documents": {}, "blocks": {}, "tokens": {}, "tokenized_by": {}}
    for split in ("train", "validation"):
        docs = texts[split]
        logger.info("tokenizing the %s split: %d documents", split, len(docs))
        shared = board if board is not None and (board.has_helpers() or _launched_processes() > 1) else None
        tokenized, by = _tokenize(docs, tokenizer, pairs, scratch, split, _num_proc(len(docs), cfg.num_proc) or 1, shared)
        meta["tokenized_by"][split] = by
        if len(by) > 1:
            logger.info("the %s split was tokenized by %d processes on %d hosts", split, len(by),
                        len({who.rsplit(":", 1)[0] for who in by}))
        blocks_file = scratch / f"{split}-packed.arrow"
        if pairs:
            packed, stats = _pack_examples(tokenized, tokenizer.pad_token_id, cfg.seq_len, blocks_file)
            if len(packed) == 0:
                raise ConfigError(_no_examples(cfg, split, stats))
            _log_cut_examples(split, stats, cfg.seq_len)
            num_tokens = stats["tokens"]
            meta.setdefault("examples", {})[split] = stats
        else:
            packed, num_tokens = _pack(tokenized, tokenizer.eos_token_id, cfg.seq_len, blocks_file)
            if len(packed) == 0:
                raise ConfigError(_too_little_data(cfg, split, num_tokens))
        _save_blocks(packed, out / split)
        meta["documents"][split], meta["blocks"][split], meta["tokens"][split] = len(docs), len(packed), num_tokens
        del tokenized, packed  # the blocks are memory-mapped from scratch, deleted next
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(hf_cache, ignore_errors=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


#: Rows per record batch of a saved split, as ``save_to_disk`` writes them. A training rank reads
#: single rows at random; larger batches make each read map more of the file around it.
_ROWS_PER_BATCH = 1000


def _save_blocks(blocks: Dataset, directory: Path) -> None:
    """Save the blocks, memory-mapped from one Arrow file, where ``load_from_disk`` reads them.

    What ``blocks.save_to_disk(directory)`` writes (the ``state.json`` and ``dataset_info.json`` of
    the same features, one Arrow stream of ``_ROWS_PER_BATCH``-row record batches), but read from
    the blocks' file with plain reads, a record batch at a time, rather than through its memory
    map, whose pages would stay resident to the end: memory is bounded by a batch of the file.
    """
    files = _mapped_files(blocks)
    if len(files) != 1 or blocks._indices is not None or not len(blocks):  # not one plain file
        blocks.save_to_disk(str(directory))
        return
    blocks.select(range(1)).save_to_disk(str(directory))
    (data_file,) = json.loads((directory / "state.json").read_text())["_data_files"]
    target = directory / data_file["filename"]
    schema = blocks.features.arrow_schema
    with pa.OSFile(files[0]) as source, pa.ipc.open_stream(source) as reader, pa.ipc.new_stream(str(target), schema) as sink:
        pending: list[pa.RecordBatch] = []
        rows = 0
        for batch in reader:
            pending.append(batch)
            rows += batch.num_rows
            if rows >= _ROWS_PER_BATCH:
                table = pa.Table.from_batches(pending).combine_chunks()
                whole = rows // _ROWS_PER_BATCH * _ROWS_PER_BATCH
                sink.write_table(table.slice(0, whole).cast(schema), max_chunksize=_ROWS_PER_BATCH)
                pending, rows = table.slice(whole).to_batches(), rows - whole
        if rows:
            sink.write_table(pa.Table.from_batches(pending).combine_chunks().cast(schema), max_chunksize=_ROWS_PER_BATCH)


def _no_examples(cfg: DataConfig, split: str, stats: dict) -> str:
    """The one-line error for a prompt/response ``split`` that yields no block at all."""
    if stats["examples"]:  # every example's prompt fills a whole block
        return (
            f"data.seq_len={cfg.seq_len}: all {stats['examples']} examples of the {split} split have a prompt of "
            "data.seq_len tokens or more, leaving no room for a response; raise data.seq_len or shorten the prompts"
        )
    return f"data.seq_len={cfg.seq_len}: the {split} split has no examples; add examples"


def _log_cut_examples(split: str, stats: dict, seq_len: int) -> None:
    """One warning per split for the examples that did not fit a block (see :func:`_pack_examples`)."""
    if stats["truncated"] or stats["dropped"]:
        logger.warning(
            "%s split: %d of %d examples are longer than data.seq_len=%d: %d were truncated to it (their "
            "response cut short), %d dropped (the prompt alone fills a block); raise data.seq_len to keep them whole",
            split, stats["truncated"] + stats["dropped"], stats["examples"], seq_len, stats["truncated"],
            stats["dropped"],
        )


def _too_little_data(cfg: DataConfig, split: str, num_tokens: int) -> str:
    """The one-line error for a ``split`` with fewer than ``cfg.seq_len`` tokens, naming what to change."""
    block = f"has {num_tokens} tokens, fewer than one block of data.seq_len={cfg.seq_len}"
    if split == "train":
        capped = cfg.max_documents is not None
        if cfg.source == "files":
            return (
                f"data.train_files: the train split from {names(cfg.train_files)} {block}; "
                f"add text{', raise data.max_documents' if capped else ''} or lower data.seq_len"
            )
        return (
            f"data.seq_len={cfg.seq_len}: the train split of data.name={cfg.name!r} {block}; "
            f"lower data.seq_len{' or raise data.max_documents' if capped else ''}"
        )
    if cfg.source == "files" and cfg.validation_files:
        return (
            f"data.validation_files: the validation split from {names(cfg.validation_files)} {block}; "
            "add text or lower data.seq_len"
        )
    if cfg.source == "hub":
        return f"data.seq_len={cfg.seq_len}: the validation split of data.name={cfg.name!r} {block}; lower data.seq_len"
    files = ", set data.validation_files" if cfg.source == "files" else ""
    return (
        f"data.validation_fraction={cfg.validation_fraction}: the validation split held out of the train data {block}; "
        f"raise data.validation_fraction{files} or lower data.seq_len"
    )


def _load(path: Path, key: str) -> PreparedData:
    return PreparedData(
        train=load_from_disk(str(path / "train")).with_format("numpy"),
        validation=load_from_disk(str(path / "validation")).with_format("numpy"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        fingerprint=key,
        cache_path=path,
    )

