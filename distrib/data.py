"""Text in, fixed-length token blocks out: corpora, tokenizer, packing, disk cache, and the sampler.

The pipeline is ``load_text`` -> ``load_or_train_tokenizer`` -> tokenize (``datasets.map``) -> pack into
blocks of exactly ``seq_len`` tokens. :func:`prepare_data` runs it once per data-defining configuration
and caches the result on disk, so repeated runs and the ranks of one run share the work.

Training reads the blocks through :class:`GlobalBatchSampler`, whose position in the data is a single
*global sample index*: a run resumed with a different data-parallel size continues exactly where it
stopped, seeing every sample of an epoch once.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import inspect
import io
import json
import logging
import os
import shutil
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tokenizers
import torch
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk
from datasets.table import InMemoryTable
from filelock import FileLock, Timeout
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distrib.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

#: The one special token of a trained tokenizer; it separates documents and doubles as bos/pad/unk.
EOT = "<|endoftext|>"

#: Bump when the cache layout or the packing changes, so that old caches are not reused.
_CACHE_FORMAT = 1

#: Below this many documents per worker, starting ``map`` workers costs more than it saves.
_MIN_DOCS_PER_PROC = 1000

#: The tokenizer is trained on at most this many characters of the train split: BPE statistics
#: settle long before a hub-sized corpus is exhausted, and training time grows with the text.
_TOKENIZER_TRAIN_CHARS = 100_000_000

#: Small corpora still get a few validation documents, or evaluation would measure nothing.
_MIN_VALIDATION_DOCS = 4

#: Standard-library directories that are not ordinary library code: installed third-party
#: packages, test suites (some deliberately broken or Python 2), bytecode, the pydoc topic data
#: (that is the prose corpus) and the build configuration (``config-3.x-<platform>``).
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}

_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# -- built-in corpus -------------------------------------------------------------------------


def builtin_corpus(domain: str, validation_fraction: float = 0.02) -> dict[str, list[str]]:
    """An offline corpus made from this Python's standard library.

    ``code`` is the library's ``.py`` sources, one document per file. ``prose`` is English
    documentation: the language-reference topics shipped in ``pydoc_data`` and the module
    docstrings of the library, one document per topic or module. Test suites, installed packages
    and the machine-specific ``_sysconfigdata`` are left out, so the corpus depends on the Python
    version only.

    Args:
        domain: ``"code"`` or ``"prose"``.
        validation_fraction: share of documents held out, chosen by a stable hash of each
            document's key (at least a few documents are always held out).

    Returns:
        ``{"train": [...], "validation": [...]}``, each in sorted key order.

    Raises:
        ConfigError: for an unknown domain.
    """
    if domain == "code":
        docs = _stdlib_sources()
    elif domain == "prose":
        docs = _stdlib_prose()
    else:
        raise ConfigError(f"data.name={domain!r} is not a built-in corpus; use data.name=code or data.name=prose")
    return _split_by_hash(docs, validation_fraction)


def _stdlib_sources() -> dict[str, str]:
    """Relative posix path -> source text for every readable library ``.py`` file."""
    root = sysconfig.get_paths()["stdlib"]
    docs = {}
    for directory, subdirs, files in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (which can be huge).
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                docs[Path(os.path.relpath(path, root)).as_posix()] = text
    return docs


def _stdlib_prose() -> dict[str, str]:
    """Key -> English text: pydoc topics and module docstrings."""
    docs = {}
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; module docstrings remain
        topics = {}
    for name, text in topics.items():
        if isinstance(text, str) and text.strip():
            docs[f"topics/{name}"] = text.strip() + "\n"
    for path, source in _stdlib_sources().items():
        doc = _module_docstring(source)
        if doc:
            docs[f"modules/{path}"] = doc + "\n"
    return docs


def _module_docstring(source: str) -> str | None:
    """The docstring of a module's source, read from its first tokens only.

    Parsing the whole file with ``ast`` would take seconds for the library; the docstring is the
    first statement, so tokenizing until the first significant token is enough.
    """
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in skip:
                continue
            if tok.type != tokenize.STRING:
                return None
            value = ast.literal_eval(tok.string)
            return inspect.cleandoc(value) if isinstance(value, str) and value.strip() else None
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    return None


def _stable_unit(key: str) -> float:
    """A hash of ``key`` in [0, 1) that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _split_by_hash(docs: dict[str, str], fraction: float) -> dict[str, list[str]]:
    keys = sorted(docs)
    by_hash = sorted(keys, key=_stable_unit)
    held_out = {k for k in by_hash if _stable_unit(k) < fraction}
    minimum = min(_MIN_VALIDATION_DOCS, len(keys) // 2)
    if len(held_out) < minimum:  # too few by chance: take the lowest hashes, still deterministic
        held_out = set(by_hash[:minimum])
    return {
        "train": [docs[k] for k in keys if k not in held_out],
        "validation": [docs[k] for k in keys if k in held_out],
    }


# -- loading text ------------------------------------------------------------------------------


def load_text(cfg: DataConfig) -> DatasetDict:
    """The raw documents of ``cfg``: splits ``train`` and ``validation``, one column ``text``.

    Empty documents are dropped. For ``files``, ``.txt`` files are read one paragraph (blank-line
    separated block) per document, so line breaks inside a paragraph survive and a single text
    file can still be split; jsonl/json/parquet rows are documents, their text in
    ``cfg.text_field``. Without validation files, ``cfg.validation_fraction`` of the train documents
    is split off with a fixed seed. ``cfg.max_documents`` then caps the train split (first N in
    that deterministic order), leaving validation unchanged so evaluations stay comparable.

    Raises:
        ConfigError: a missing file, a glob matching nothing, or a missing text column.
    """
    if cfg.source == "builtin":
        corpus = builtin_corpus(cfg.name, cfg.validation_fraction)
        train = Dataset.from_dict({"text": corpus["train"]})
        validation = Dataset.from_dict({"text": corpus["validation"]})
    elif cfg.source == "files":
        hf_cache = str(_cache_root(cfg) / "hf_datasets")
        train = _load_files(_expand(cfg.train_files, "data.train_files"), cfg, hf_cache)
        if cfg.validation_files:
            validation = _load_files(_expand(cfg.validation_files, "data.validation_files"), cfg, hf_cache)
        else:
            train, validation = _split_off(train, cfg.validation_fraction)
    else:  # hub: for clusters with network access, never exercised offline
        loaded = load_dataset(cfg.name, cfg.hub_config)
        train = _documents(loaded["train"], cfg.text_field, cfg.name)
        if "validation" in loaded:
            validation = _documents(loaded["validation"], cfg.text_field, cfg.name)
        else:
            train, validation = _split_off(train, cfg.validation_fraction)
    if cfg.max_documents is not None and len(train) > cfg.max_documents:
        train = train.select(range(cfg.max_documents))
    return DatasetDict({"train": train, "validation": validation})


def _expand(patterns: list[str], key: str) -> list[str]:
    """Paths and globs -> existing files, in the listed order (each glob sorted)."""
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"{key}: {pattern!r} matches no file; fix the glob or the path")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise ConfigError(f"{key}: {pattern!r} does not exist; fix the path")
        for path in matches:
            if Path(path).suffix.lower() not in _LOADERS:
                raise ConfigError(f"{key}: {path!r} is not .txt/.jsonl/.json/.parquet; convert it or remove it")
        files += matches
    return files


def _load_files(files: list[str], cfg: DataConfig, hf_cache: str) -> Dataset:
    """Load files of possibly mixed formats: one loader per format, formats in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for path in files:
        groups.setdefault(_LOADERS[Path(path).suffix.lower()], []).append(path)
    parts = []
    for builder, paths in groups.items():
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = load_dataset(builder, data_files=paths, split="train", cache_dir=hf_cache, **extra)
        field = "text" if builder == "text" else cfg.text_field  # the text loader always names it "text"
        parts.append(_documents(ds, field, paths))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _documents(ds: Dataset, field: str, where: object) -> Dataset:
    """``ds`` reduced to a ``text`` column from ``field``, without empty or missing texts."""
    if field not in ds.column_names:
        raise ConfigError(
            f"data.text_field={field!r} is not a column of {where}; "
            f"its columns are {ds.column_names}; set data.text_field"
        )
    ds = ds.select_columns([field])
    ds = ds.filter(lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch[field]], batched=True)
    return ds.rename_column(field, "text") if field != "text" else ds


def _split_off(train: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    if len(train) < 2:
        raise ConfigError(
            "the train data holds fewer than 2 documents, too few to split off validation; add data.validation_files"
        )
    parts = train.train_test_split(test_size=fraction, seed=0)
    return parts["train"], parts["test"]


# -- tokenizer ---------------------------------------------------------------------------------


def load_or_train_tokenizer(cfg: DataConfig, train_texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """``cfg.tokenizer`` if set, else a byte-level BPE of ``cfg.vocab_size`` trained on ``train_texts``.

    The trained tokenizer has one special token, ``<|endoftext|>``, used as eos, bos, pad and
    unk; byte-level BPE never needs unk, and eos is what packing puts between documents. Training
    is deterministic for the same texts (at most the first ``_TOKENIZER_TRAIN_CHARS`` characters).

    Raises:
        ConfigError: ``cfg.tokenizer`` is not a directory or has no eos token.
    """
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"data.tokenizer={cfg.tokenizer!r} is not a directory; "
                "point it at a save_pretrained directory or unset it to train one"
            )
        tok = AutoTokenizer.from_pretrained(path)
        if tok.eos_token_id is None:
            raise ConfigError(
                f"data.tokenizer={cfg.tokenizer!r} has no eos token, which packing puts between documents; use another"
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    bpe = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x, which matters for code.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, so no unk
        show_progress=False,
    )
    bpe.train_from_iterator(_first_chars(train_texts, _TOKENIZER_TRAIN_CHARS), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        clean_up_tokenization_spaces=False,  # the cleanup rewrites " ." and friends, breaking code
    )


def _first_chars(texts: Iterable[str], budget: int) -> Iterator[str]:
    for text in texts:
        if budget <= 0:
            return
        budget -= len(text)
        yield text


# -- the cached pipeline -----------------------------------------------------------------------


@dataclass
class PreparedData:
    """Packed, tokenized data ready for training.

    Attributes:
        train: blocks of ``seq_len`` token ids, column ``input_ids``, numpy format.
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
    separate runs) serialise on a file lock: the first builds, the others wait and then load. A
    build goes to a temporary directory renamed into place only when complete, so a crash never
    leaves a half-written cache. The lock relies on the file system honouring ``flock``; on a
    shared network file system prefer a node-local ``data.cache_dir``.

    Args:
        cfg: the data section.
        seed: the run seed. The data does not depend on it (shuffling is the sampler's job), so
            runs that differ only in seed share one cache.

    Raises:
        ConfigError: bad paths, or too little data for one validation/train block.
    """
    del seed  # see docstring: the prepared data is seed-independent by design
    key, spec = _cache_key(cfg)
    root = _cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    if not final.is_dir():  # fast path: a completed cache needs no lock, it only ever appears whole
        lock = FileLock(str(root / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process to build the data cache %s", final)
            lock.acquire()
        try:
            if not final.is_dir():
                _build_atomically(cfg, spec, root, key)
        finally:
            lock.release()
    return _load(final, key)


def _cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("DISTRIB_CACHE") or "~/.cache/distrib"
    return Path(root).expanduser()


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
    if cfg.source == "builtin":
        spec["python"] = sys.version  # the corpus is this Python's library
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return digest[:16], spec


def _file_stamps(patterns: list[str], key: str) -> list[list]:
    stamps = []
    for path in _expand(patterns, key):
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
    tmp = root / f"{key}.tmp-{os.getpid()}"
    try:
        _build(cfg, spec, tmp)
        os.replace(tmp, root / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(cfg: DataConfig, spec: dict, out: Path) -> None:
    """Run the whole pipeline into ``out``: tokenizer/, train/, validation/, meta.json."""
    logger.info("building data cache %s", out)
    texts = load_text(cfg)
    tokenizer = load_or_train_tokenizer(cfg, _iter_text(texts["train"]))
    tokenizer.save_pretrained(out / "tokenizer")
    scratch = out / "tokenized"
    meta = {"spec": spec, "documents": {}, "blocks": {}, "tokens": {}}
    for split in ("train", "validation"):
        docs = texts[split]
        tokenized = docs.map(
            _encode,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer},
            num_proc=_num_proc(len(docs), cfg.num_proc),
            remove_columns=docs.column_names,
            cache_file_name=str(scratch / f"{split}.arrow"),  # keep intermediates inside the build dir
            load_from_cache_file=False,
            new_fingerprint=f"{out.name}-{split}",  # skips hashing the tokenizer, which is slow
            desc=f"tokenizing {split}",
        )
        packed, num_tokens = _pack(tokenized, tokenizer.eos_token_id, cfg.seq_len)
        if len(packed) == 0:
            raise ConfigError(
                f"the {split} split has {num_tokens} tokens, less than one block of data.seq_len={cfg.seq_len}; "
                + (
                    "lower data.seq_len or raise data.validation_fraction"
                    if split == "validation"
                    else "lower data.seq_len or raise data.max_documents"
                )
            )
        packed.save_to_disk(str(out / split))
        meta["documents"][split], meta["blocks"][split], meta["tokens"][split] = len(docs), len(packed), num_tokens
        del tokenized
    shutil.rmtree(scratch, ignore_errors=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def _iter_text(ds: Dataset) -> Iterator[str]:
    # Batched iteration: never materialises a hub-sized split as one Python list.
    for batch in ds.iter(batch_size=1000):
        yield from batch["text"]


def _num_proc(num_docs: int, num_proc: int) -> int | None:
    return num_proc if num_proc > 1 and num_docs >= num_proc * _MIN_DOCS_PER_PROC else None


def _encode(batch: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    # No special tokens: packing adds the single eos after each document itself. verbose=False
    # silences the "longer than model_max_length" warning, which is meaningless before packing.
    ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": ids}


def _pack(tokenized: Dataset, eos_id: int, seq_len: int) -> tuple[Dataset, int]:
    """Concatenate every document's ids followed by eos, cut into blocks of exactly ``seq_len``.

    Packing is one sequential numpy pass over the tokenized column, after (not inside) the
    multi-process ``map``: ``map(num_proc=n)`` splits the data into n contiguous shards, so packing
    per map batch would place block boundaries (and drop remainders) differently for each n.
    A single pass makes the blocks a function of the documents only; the one remainder shorter
    than ``seq_len`` at the end is dropped. The packed stream is held in memory (4 bytes a token).

    Returns:
        the blocks (column ``input_ids``, int32) and the number of tokens in the stream.
    """
    streams = []
    for chunk in tokenized.data.column("input_ids").chunks:
        lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64)
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        stream = np.empty(len(values) + len(lengths), dtype=np.int32)
        is_eos = np.zeros(len(stream), dtype=bool)
        is_eos[np.cumsum(lengths + 1) - 1] = True  # one slot after each document
        stream[is_eos] = eos_id
        stream[~is_eos] = values
        streams.append(stream)
    stream = np.concatenate(streams) if streams else np.empty(0, dtype=np.int32)
    usable = len(stream) // seq_len * seq_len
    blocks = pa.FixedSizeListArray.from_arrays(pa.array(stream[:usable]), seq_len)
    return Dataset(InMemoryTable(pa.table({"input_ids": blocks}))), len(stream)


def _load(path: Path, key: str) -> PreparedData:
    return PreparedData(
        train=load_from_disk(str(path / "train")).with_format("numpy"),
        validation=load_from_disk(str(path / "validation")).with_format("numpy"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        fingerprint=key,
        cache_path=path,
    )


# -- sampling ----------------------------------------------------------------------------------


class GlobalBatchSampler:
    """Which samples each rank reads at each optimizer step, from a global sample position.

    Optimizer step ``s`` consumes the global positions ``[s*G, (s+1)*G)``. Position ``p`` maps
    to dataset index ``permutation(seed, epoch)[p % num_samples]`` with ``epoch = p // num_samples``,
    so the position alone says where training is: resuming at step ``k`` with any data-parallel
    size continues with position ``k*G``, never repeating or skipping a sample of the epoch.

    Within a step, micro-step ``a`` on data-parallel rank ``r`` reads the ``micro_batch``
    positions starting at ``s*G + (a*dp_size + r)*micro_batch``; over all ranks and micro-steps
    that is exactly the step's positions.

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
        self._epoch: int | None = None  # only the current epoch's permutation is kept
        self._perm: np.ndarray | None = None

    def positions(self, step: int) -> range:
        """The global sample positions of optimizer step ``step``."""
        return range(step * self.global_batch, (step + 1) * self.global_batch)

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This rank's dataset indices for ``step``: one array of ``micro_batch`` per micro-step."""
        start = step * self.global_batch
        batches = []
        for a in range(self.accum_steps):
            first = start + (a * self.dp_size + self.dp_rank) * self.micro_batch
            positions = range(first, first + self.micro_batch)
            batches.append(np.array([self.dataset_index(p) for p in positions], dtype=np.int64))
        return batches

    def dataset_index(self, position: int) -> int:
        """The dataset index read at global sample ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        return int(self._permutation(epoch)[offset])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return self._perm


def collate(dataset: Dataset, indices: Iterable[int]) -> dict[str, torch.Tensor]:
    """Stack the blocks at ``indices`` into ``{"input_ids": LongTensor[B, seq_len]}``.

    There is no separate ``labels``: pass ``labels=input_ids`` to the model, which shifts them
    itself to predict each next token.
    """
    rows = dataset[[int(i) for i in indices]]["input_ids"]
    return {"input_ids": torch.as_tensor(np.asarray(rows), dtype=torch.long)}
