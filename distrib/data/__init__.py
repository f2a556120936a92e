"""Text in, fixed-length token blocks out: corpora, tokenizer, packing, disk cache, and the sampler.

The pipeline is ``load_text`` -> ``load_or_train_tokenizer`` -> tokenize (:func:`_tokenize`) -> pack into
blocks of exactly ``seq_len`` tokens. :func:`prepare_data` runs it once per data-defining configuration
and caches the result on disk, so repeated runs and the ranks of one run share the work.

Preparation runs in memory bounded by constants, not by the corpus: text files are parsed in 1 MB
chunks, tokenized a batch of documents at a time into an Arrow file (a long document in pieces of
``_TOKENIZE_CHARS`` characters, see :func:`_token_ids`), packed as a stream, and the
pages of every memory-mapped file a pass reads are released behind it (:func:`_release_pages`);
``distrib prepare-data`` runs it alone, e.g. on a login node before a job. The processes that want the
same cache while it is built (the ranks of a job) tokenize it together (:func:`_tokenize`).

Two formats (``data.format``): ``text`` packs documents back to back into ``input_ids`` blocks, every
token a target (pretraining); ``prompt_response`` packs whole prompt/response examples into padded
blocks with ``input_ids`` and ``labels``, where ``labels`` is ``-100`` on prompt and padding positions
so that only the responses (and their eos) are learned (fine-tuning). See :func:`_pack_examples`.

Data files are checked before ``datasets`` reads them (:mod:`distrib.data.readers`), so bad data (an empty,
binary, non-UTF-8, malformed or corrupt compressed file, a ``null`` text, a directory, a wrong
``data.tokenizer``) is refused with a one-line :class:`~distrib.config.ConfigError` naming the key, the
file and line, and the fix.

Training reads the blocks through :class:`GlobalBatchSampler`, whose position in the data is a single
*global sample index*: a run resumed with a different data-parallel size continues exactly where it
stopped, seeing every sample of an epoch once.
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import dataclasses
import fcntl
import hashlib
import inspect
import io
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import sysconfig
import time
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tokenizers
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets, load_from_disk
from datasets.table import InMemoryTable
from filelock import FileLock, Timeout
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distrib import faults
from distrib.config import ConfigError, DataConfig
from distrib.data.readers import Fields, check_file, expand, is_string_type, load_files, loader, names
from distrib.launch.local import die_with_parent

logger = logging.getLogger(__name__)

#: The one special token of a trained tokenizer; it separates documents and doubles as bos/pad/unk.
EOT = "<|endoftext|>"

#: Bump when the cache layout or the packing changes, so that old caches are not reused.
_CACHE_FORMAT = 1

#: Documents per tokenizing batch (:func:`_tokenize`). The pages of the text a batch reads are
#: released after it; when the split was shuffled (validation held out of the train files) its rows
#: lie all over the file, and each maps some 64 KiB around it, so this bounds the resident text to
#: about 16 MB.
_TOKENIZE_BATCH = 256

#: Characters of text the tokenizer is given at once (:func:`_token_ids`): a longer document is cut
#: into pieces (:func:`_pieces`), shorter ones go together. A fast tokenizer holds some 200 bytes per
#: token while it works (offsets, alignments, token strings), and BPE training as much per word, so
#: this keeps both to some tens of MB however long a document is (a 30 MB one-line corpus took 6 GB).
_TOKENIZE_CHARS = 1 << 16

#: Where a long text may be cut between two tokenizer calls: a space, tab or newline after a
#: non-space character. Byte-level BPE's pre-tokenizer (GPT-2's pattern) splits every text there: no
#: pre-token holds a whitespace character after a non-space one, and the pre-tokens from there on
#: do not depend on what came before; so the pieces' tokens are the whole text's.
_CUT = re.compile(r"(?<=\S)[ \t\n]")

#: Below this many documents per worker, starting tokenizing processes costs more than it saves.
_MIN_DOCS_PER_PROC = 1000

#: The tokenizer is trained on at most this many characters of the train split: BPE statistics
#: settle long before a hub-sized corpus is exhausted, and training time grows with the text.
_TOKENIZER_TRAIN_CHARS = 100_000_000

#: Small corpora still get a few validation documents, or evaluation would measure nothing.
_MIN_VALIDATION_DOCS = 4

#: Built-in instruct examples longer than this many characters (prompt plus response) are left out:
#: at a fine-tuning ``seq_len`` of a few hundred tokens they would mostly be truncated, and the long
#: functions are the least self-contained. 2,000 characters of code are about 600 tokens of a
#: 4,096-token BPE.
_INSTRUCT_MAX_CHARS = 2000

#: Standard-library directories that are not ordinary library code: installed third-party
#: packages, test suites (some deliberately broken or Python 2), bytecode, the pydoc topic data
#: (that is the prose corpus) and the build configuration (``config-3.x-<platform>``).
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}

#: Files of which a ``save_pretrained`` tokenizer directory holds at least one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

#: A process waiting this long for the cache lock says so; shorter waits (ranks racing for a lock
#: whose holder finds the cache complete, or a quick build) are not worth a log line.
_QUIET_WAIT_SECONDS = 3.0

#: The label of positions without loss (prompt, padding), as in ``transformers``; the one definition (the
#: trainer and the losses import it from here, this module needs neither them nor DeepSpeed).
IGNORE_INDEX = -100

#: A document of a built-in corpus: a text, or a prompt/response dict.
_Doc = TypeVar("_Doc")


# -- memory-mapped files ----------------------------------------------------------------------

#: ``madvise(2)`` where there is one (Linux, the BSDs, macOS), else None.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if os.name == "posix" else None
_MADVISE = getattr(_LIBC, "madvise", None)
if _MADVISE is not None:
    _MADVISE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_DONTNEED = 4


def _release_pages(files: Iterable[str]) -> None:
    """Drop the resident pages of this process's read-only memory maps of ``files``.

    ``datasets`` memory-maps its Arrow files, and every page a pass reads stays mapped, counted
    in the process's resident memory, until the file is closed: a pass over a corpus's text or
    tokens would make the memory of a preparing process (and of a training rank, over an epoch
    of random reads) grow with the data, though the pages are only the kernel's file cache. For
    read-only file mappings ``MADV_DONTNEED`` unmaps them at no risk: the next read faults them
    back from the file (or the cache, if the kernel kept them). Only mappings without write
    permission are touched; where ``/proc/self/maps`` or ``madvise`` is missing this does nothing.
    """
    names = {os.path.realpath(f) for f in files}
    if _MADVISE is None or not names:
        return
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names and "w" not in fields[1]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            _MADVISE(start, end - start, _MADV_DONTNEED)


def _mapped_files(ds: Dataset) -> list[str]:
    """The Arrow files ``ds`` reads its rows from (none for an in-memory dataset)."""
    return [f["filename"] for f in ds.cache_files]


# -- built-in corpus -------------------------------------------------------------------------


def builtin_corpus(domain: str, validation_fraction: float = 0.02) -> dict[str, list]:
    """An offline corpus made from this Python's standard library.

    ``code`` is the library's ``.py`` sources, one document per file. ``prose`` is English
    documentation: the language-reference topics shipped in ``pydoc_data`` and the module
    docstrings of the library, one document per topic or module. ``instruct`` is instruction data
    for fine-tuning: one ``{"prompt": ..., "response": ...}`` example per documented public function
    or method, the prompt asking for the function by its signature and docstring, the response its
    code without the docstring (see :func:`_stdlib_instructions`). Test suites, installed packages
    and the machine-specific ``_sysconfigdata`` are left out, so the corpus depends on the Python
    version only.

    Args:
        domain: ``"code"``, ``"prose"`` or ``"instruct"``.
        validation_fraction: share of documents held out, chosen by a stable hash of each
            document's key (at least a few documents are always held out).

    Returns:
        ``{"train": [...], "validation": [...]}``, each in sorted key order: strings for ``code``
        and ``prose``, ``{"prompt", "response"}`` dicts for ``instruct``.

    Raises:
        ConfigError: for an unknown domain.
    """
    if domain == "code":
        docs = _stdlib_sources()
    elif domain == "prose":
        docs = _stdlib_prose()
    elif domain == "instruct":
        docs = _stdlib_instructions()
    else:
        raise ConfigError(
            f"data.name={domain!r} is not a built-in corpus; use data.name=code, data.name=prose or data.name=instruct"
        )
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


def _stdlib_instructions() -> dict[str, dict[str, str]]:
    """``module:qualname`` -> ``{"prompt", "response"}`` for the library's documented public functions.

    Every module-level function and method (of classes at any depth, also those defined under a
    module- or class-level ``if``/``try``) whose name path has no ``_``-prefixed part and that has
    a docstring becomes one example::

        prompt:   Write a Python function `name(args) -> ret` (module `pkg.mod`) that does the following:
                  <the docstring, cleaned as inspect.cleandoc does>
        response: def name(args) -> ret:
                      <the body without the docstring>

    (``method `Class.name(self, ...)``` for methods). The response is the function's own source
    lines from ``def`` to its end, dedented, with the docstring's lines cut out; decorators are
    left out (they often name module internals the prompt does not show). Functions nested in
    functions are skipped (they depend on their closure), and so are functions whose remaining
    body is trivial (``pass``, ``...``, ``raise NotImplementedError``, a bare ``return``), whose
    docstring shares a line with code, whose source cannot be cut cleanly (a multi-line string
    less indented than the ``def``), and examples longer than ``_INSTRUCT_MAX_CHARS``. Of two
    definitions with one qualified name (per-platform variants) the first is kept.

    Everything is derived from the sorted file walk of :func:`_stdlib_sources` and ``ast``, so the
    result is the same on every run and machine with the same Python version. Parsing the whole
    library with ``ast`` is the cost (about 2-5 seconds on one core); it is paid once per cache build.
    """
    examples: dict[str, dict[str, str]] = {}
    for path, source in _stdlib_sources().items():
        module = _module_name(path)
        for qualname, prompt, response in _function_examples(source, module):
            examples.setdefault(f"{module}:{qualname}", {"prompt": prompt, "response": response})
    return examples


def _module_name(path: str) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _function_examples(source: str, module: str) -> Iterator[tuple[str, str, str]]:
    """``(qualname, prompt, response)`` for each documented public function of one module's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file of another Python version, or a NUL byte
        return
    # Split on "\n" only: ast counts lines so, while str.splitlines also breaks at form feeds,
    # which some library files contain.
    lines = source.split("\n")
    for node, qualname, is_method in _public_functions(tree.body, ""):
        docstring = ast.get_docstring(node, clean=True)
        if not docstring or not docstring.strip():
            continue
        response = _code_without_docstring(node, lines)
        if response is None:
            continue
        signature = f"{qualname}({ast.unparse(node.args)})"
        if node.returns is not None:
            signature += f" -> {ast.unparse(node.returns)}"
        kind = "method" if is_method else "function"
        prompt = f"Write a Python {kind} `{signature}` (module `{module}`) that does the following:\n{docstring}\n"
        if len(prompt) + len(response) <= _INSTRUCT_MAX_CHARS:
            yield qualname, prompt, response


def _public_functions(body: list[ast.stmt], prefix: str, in_class: bool = False) -> Iterator[tuple[ast.AST, str, bool]]:
    """``(node, qualname, is_method)`` for the public functions of a module or class body, in source order."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            if not node.name.startswith("_"):
                yield from _public_functions(node.body, f"{prefix}{node.name}.", in_class=True)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not node.name.startswith("_"):
                yield node, prefix + node.name, in_class
        elif isinstance(node, ast.If):  # per-platform or per-version definitions
            yield from _public_functions(node.body, prefix, in_class)
            yield from _public_functions(node.orelse, prefix, in_class)
        elif isinstance(node, ast.Try):  # "try: import fast; except ImportError: def slow(...)"
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _public_functions(block, prefix, in_class)


def _code_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The source of ``node`` from ``def`` to its end, dedented, without its docstring; None if unusable."""
    doc, rest = node.body[0], node.body[1:]
    if not rest or all(_is_trivial(stmt) for stmt in rest):
        return None
    # ast columns count UTF-8 bytes; only the docstring's own lines may be cut out, so it must
    # start on a line of its own and leave nothing but a comment after it.
    before = lines[doc.lineno - 1].encode()[: doc.col_offset]
    after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset :].strip()
    if doc.lineno == node.lineno or before.strip() or (after and not after.startswith(b"#")):
        return None
    indent = lines[node.lineno - 1][: node.col_offset]  # leading whitespace: bytes == characters
    kept = lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    out = []
    for line in kept:
        if line.startswith(indent):
            out.append(line[len(indent) :])
        elif not line.strip():
            out.append("")
        else:  # a multi-line string reaching left of the def: dedenting would change it
            return None
    return "\n".join(out).rstrip() + "\n"


def _is_trivial(stmt: ast.stmt) -> bool:
    """``pass``, ``...``, a bare ``return`` or ``raise NotImplementedError``: a stub, nothing to learn."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
        return True
    if isinstance(stmt, ast.Return):
        return stmt.value is None or (isinstance(stmt.value, ast.Constant) and stmt.value.value is None)
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _stable_unit(key: str) -> float:
    """A hash of ``key`` in [0, 1) that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _split_by_hash(docs: dict[str, _Doc], fraction: float) -> dict[str, list[_Doc]]:
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


def _format(cfg: DataConfig) -> str:
    """The effective ``data.format``: the built-in ``instruct`` corpus is prompt/response whatever it says."""
    return "prompt_response" if cfg.source == "builtin" and cfg.name == "instruct" else cfg.format


def _fields(cfg: DataConfig) -> Fields:
    if _format(cfg) == "prompt_response":
        return Fields(
            (("prompt", cfg.prompt_field, "data.prompt_field"), ("response", cfg.response_field, "data.response_field"))
        )
    return Fields((("text", cfg.text_field, "data.text_field"),))


def load_text(cfg: DataConfig, hf_cache: str | Path | None = None) -> DatasetDict:
    """The raw documents of ``cfg``: splits ``train`` and ``validation``.

    With ``data.format=text`` (and the built-in ``code``/``prose``) each split has one column
    ``text``; with ``prompt_response`` (and the built-in ``instruct``) the columns ``prompt`` and
    ``response``, read from ``cfg.prompt_field`` and ``cfg.response_field``.

    Empty documents are dropped (prompt/response rows are all kept, an empty response still
    teaches where a response ends). For ``files`` (:mod:`distrib.data.readers`), ``.txt`` files are read
    one paragraph (blank-line separated block) per document, so line breaks inside a paragraph
    survive and a single text file can still be split; jsonl/json/csv/parquet rows are documents,
    their text in ``cfg.text_field`` (a ``null`` text is refused, as a non-string one is). Each file
    is read once however many paths or globs lead to it, and checked before any is loaded (see
    :func:`distrib.data.readers.check_file`). Without validation files,
    ``cfg.validation_fraction`` of the train documents is split off with a fixed seed.
    ``cfg.max_documents`` then caps the train split (first N in that deterministic order),
    leaving validation unchanged so evaluations stay comparable. A hub dataset is streamed
    (:func:`distrib.data.hub.load_hub`): the cap stops its download, and without a validation split the
    documents are held out by a stable hash of their position.

    Args:
        cfg: the data section.
        hf_cache: where ``datasets`` caches the parsed files; by default ``hf_datasets`` under
            the cache root. :func:`prepare_data` passes a directory inside its build, so the
            parsed copy goes away with the build.

    Raises:
        ConfigError: one line naming the file (and line) for a missing, empty, binary,
            non-UTF-8, malformed or corrupt compressed file, a directory, a glob matching nothing, a
            missing, ``null`` or non-string text (prompt, response) field, a ``.txt`` file for
            prompt/response data, or too few documents to split off validation.
    """
    fields = _fields(cfg)
    if cfg.source == "builtin":
        corpus = builtin_corpus(cfg.name, cfg.validation_fraction)
        if fields.pairs:
            train, validation = (Dataset.from_list(corpus[split]) for split in ("train", "validation"))
        else:
            train = Dataset.from_dict({"text": corpus["train"]})
            validation = Dataset.from_dict({"text": corpus["validation"]})
    elif cfg.source == "files":
        hf_cache = str(hf_cache if hf_cache is not None else _cache_root(cfg) / "hf_datasets")
        train = _load_files(expand(cfg.train_files, "data.train_files"), cfg, hf_cache, "data.train_files")
        if cfg.validation_files:
            validation = _load_files(
                expand(cfg.validation_files, "data.validation_files"), cfg, hf_cache, "data.validation_files"
            )
        else:
            train, validation = _split_off(
                train, cfg.validation_fraction, f"data.train_files: {names(cfg.train_files)}"
            )
    else:  # hub: streamed, so max_documents stops the download (see distrib.data.hub)
        from distrib.data.hub import load_hub

        hf_cache = str(hf_cache if hf_cache is not None else _cache_root(cfg) / "hf_datasets")
        train, validation = load_hub(cfg, fields, hf_cache)
    if cfg.max_documents is not None and len(train) > cfg.max_documents:
        train = train.select(range(cfg.max_documents))
    return DatasetDict({"train": train, "validation": validation})


def _load_files(files: list[str], cfg: DataConfig, hf_cache: str, key: str) -> Dataset:
    """Load files of possibly mixed formats: one loader per format, formats in order of first appearance.

    Every file is checked first, so that ``datasets`` only ever sees files it can read; should
    it still fail, its error becomes one line too.

    Raises:
        ConfigError: a bad file (see :func:`distrib.data.readers.check_file`), naming ``key``.
    """
    fields = _fields(cfg)
    for path in files:
        check_file(path, key, fields)
    groups: dict[str, list[str]] = {}
    for path in files:
        groups.setdefault(loader(path), []).append(path)
    parts = []
    for builder, paths in groups.items():
        ds = load_files(paths, fields, hf_cache, key)
        # Paragraphs come as a "text" column (and prompt/response data has no .txt files).
        read = Fields((("text", "text", "data.text_field"),)) if builder == "text" else fields
        parts.append(_rows(ds, read, names(paths)))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _rows(ds: Dataset, fields: Fields, where: str) -> Dataset:
    """``ds`` reduced to the string columns of the format: ``text`` without empty texts, or ``prompt`` and ``response``.

    Raises:
        ConfigError: a field is not a string column of ``ds``, or holds nulls (files were checked
            row by row before; this catches a Parquet file whose footer does not count them).
    """
    for role, field, config_key in fields.roles:
        if field not in ds.column_names:
            raise ConfigError(
                f"{config_key}={field!r} is not a column of {where}; its columns are {ds.column_names}; "
                f"set {config_key}"
            )
        column = ds.data.column(field)
        if not is_string_type(column.type):
            raise ConfigError(
                f"{config_key}={field!r} of {where} holds {column.type}, not strings; "
                f"set {config_key} to the {role} column"
            )
        if column.null_count:
            first = pc.indices_nonzero(pc.is_null(column))[0].as_py()
            raise ConfigError(
                f"{config_key}={field!r} is null in {column.null_count} rows of {where} "
                f"(the first is row {first + 1}); "
                f"store every {role} as a string (an empty one if there is none)"
            )
    if not fields.pairs:
        field = fields.roles[0][1]
        ds = ds.select_columns([field])
        ds = ds.filter(_non_empty, batched=True, fn_kwargs={"field": field, "release": _mapped_files(ds)})
        return ds.rename_column(field, "text") if field != "text" else ds
    (_, prompt, _), (_, response, _) = fields.roles
    ds = ds.select_columns([prompt, response])
    if (prompt, response) != ("prompt", "response"):  # via unique names, so that swapped names work too
        ds = ds.rename_columns({prompt: "\0prompt", response: "\0response"})
        ds = ds.rename_columns({"\0prompt": "prompt", "\0response": "response"})
    return ds


def _non_empty(batch: dict, field: str, release: list[str] = ()) -> list[bool]:
    """Which texts of ``batch[field]`` are non-empty strings; releases the pages read (see :func:`_release_pages`)."""
    _release_pages(release)
    return [isinstance(t, str) and bool(t.strip()) for t in batch[field]]


def _split_off(train: Dataset, fraction: float, source: str) -> tuple[Dataset, Dataset]:
    """Hold out ``fraction`` of ``train`` for validation; ``source`` starts the error message."""
    if len(train) < 2:
        raise ConfigError(
            f"{source} holds {len(train)} document(s), too few to split off validation; "
            "add data.validation_files or more documents (in .txt files a blank line separates documents)"
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
        ConfigError: ``cfg.tokenizer`` is not a tokenizer directory, fails to load, or has no eos token.
    """
    if cfg.tokenizer:
        path = _check_tokenizer_dir(cfg.tokenizer)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # tokenizers raises bare Exception; the directory is the only input here
            logger.debug("loading the tokenizer %s failed", path, exc_info=True)
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"data.tokenizer={cfg.tokenizer!r} cannot be loaded ({type(e).__name__}: {detail}); "
                "point it at a directory written by save_pretrained, or unset it to train one"
            ) from None
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
    # In pieces, as they are tokenized: the same words to count, and bounded memory for a long document.
    texts = _first_chars(train_texts, _TOKENIZER_TRAIN_CHARS)
    bpe.train_from_iterator((piece for text in texts for piece in _pieces(text, _TOKENIZE_CHARS)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        clean_up_tokenization_spaces=False,  # the cleanup rewrites " ." and friends, breaking code
    )


def _check_tokenizer_dir(tokenizer: str) -> Path:
    """``data.tokenizer`` as a path, refused unless it is a directory holding tokenizer files.

    A cheap look at the names only, so :func:`prepare_data` can refuse a wrong directory (say a
    model directory with only ``config.json``) before it reads any data.

    Raises:
        ConfigError: not a directory, or none of the files ``save_pretrained`` writes.
    """
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"data.tokenizer={tokenizer!r} is not a directory; "
            "point it at a save_pretrained directory or unset it to train one"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"data.tokenizer={tokenizer!r} holds no tokenizer "
            "(no tokenizer.json, tokenizer_config.json or vocabulary file); "
            "point it at a directory written by save_pretrained, or unset it to train one"
        )
    return path


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
    tmp = root / f"{key}.tmp-{os.getpid()}"
    try:
        _build(cfg, spec, tmp, board)
        os.replace(tmp, root / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def _iter_text(ds: Dataset) -> Iterator[str]:
    """The texts of ``ds`` to train a tokenizer on: the ``text`` column, or each prompt and response."""
    # Batched iteration: never materialises a hub-sized split as one Python list.
    columns = ["prompt", "response"] if "prompt" in ds.column_names else ["text"]
    files = _mapped_files(ds)
    for batch in ds.iter(batch_size=1000):
        for row in zip(*(batch[c] for c in columns)):
            yield from row
        _release_pages(files)


def _num_proc(num_docs: int, num_proc: int) -> int | None:
    return num_proc if num_proc > 1 and num_docs >= num_proc * _MIN_DOCS_PER_PROC else None


def _tokenize(docs: Dataset, tokenizer: PreTrainedTokenizerFast, pairs: bool, scratch: Path, split: str,
              workers: int, board: _Board | None = None) -> tuple[Dataset, dict[str, int]]:
    """Tokenize ``docs`` into Arrow files under ``scratch`` (one per task), memory-mapped back in order.

    What ``docs.map(encode, batched=True, num_proc=n)`` does, in bounded memory and shareable.
    The documents are cut into contiguous tasks, each tokenized into its own file, and the files
    are read back in task order: the concatenation, and the blocks packed from it, are the same for
    any number of tasks and of processes doing them. ``workers`` processes here claim tasks in
    turn (:func:`_work`); with a ``board``, the documents are saved where the processes waiting for
    this cache can read them, the tasks are posted, and those processes claim tasks too
    (:func:`_help`): a job's ranks, on one node or on several sharing the cache, tokenize together.
    Unlike ``map``, which writes one record batch per batch read, the ids are written in record
    batches of about ``_STREAM_CHUNK_TOKENS`` tokens: memory-mapping a file reads every batch's
    header, and the kernel maps some 64 KiB around each, so small batches would make the whole
    file resident. The text is read ``_TOKENIZE_BATCH`` documents at a time, its pages released
    after each.

    Returns:
        the tokenized documents, and how many tasks each process (``host:pid``) did.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    count = min(_MAX_TASKS, max(1, len(docs) // _MIN_DOCS_PER_PROC)) if board is not None else workers
    bounds = [len(docs) * i // count for i in range(count + 1)]
    job = _Job(str(scratch), split, list(zip(bounds[:-1], bounds[1:])), pairs)
    if board is not None:
        docs.save_to_disk(job.docs_dir)  # what the helpers read: the rows in this order, indices applied
        board.post(job, str(scratch.parent / "tokenizer"))
    try:
        _run_workers(job, docs, tokenizer, workers)
        _collect(job, docs, tokenizer)
    finally:
        if board is not None:
            board.withdraw()
    parts = [Dataset.from_file(job.output(i)) for i in range(len(job.tasks))]
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), _tokenized_by(job)


#: At most this many tokenizing tasks when other processes help (each of at least
#: ``_MIN_DOCS_PER_PROC`` documents): enough to share among the ranks of a job, few enough files.
_MAX_TASKS = 256

#: A process waiting for another's build looks for tokenizing tasks this often.
_HELP_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class _Job:
    """A split's tokenizing tasks: contiguous ``[start, end)`` document ranges, files under ``scratch``.

    A task is claimed by creating its ``.claim`` file (``O_EXCL``: one process wins) and holding an
    exclusive ``flock`` on it while working; its output appears, complete, by a rename. A claim whose
    lock is free but whose output is missing belongs to a process that died: the builder redoes it.
    """

    scratch: str
    split: str
    tasks: list[tuple[int, int]]
    pairs: bool

    def output(self, i: int) -> str:
        return os.path.join(self.scratch, f"{self.split}-{i:05d}-of-{len(self.tasks):05d}.arrow")

    def claim(self, i: int) -> str:
        return self.output(i)[: -len(".arrow")] + ".claim"

    @property
    def docs_dir(self) -> str:
        return os.path.join(self.scratch, f"{self.split}-docs")


def _launched_processes() -> int:
    """How many processes the launcher of this one started (torchrun, srun, mpirun), 1 if none did.

    Each of them prepares the data too (every rank of a job calls :func:`prepare_data`), so a build
    in one of them posts its tasks even before the others register as waiting: they are on their way.
    """
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _run_workers(job: _Job, docs: Dataset, tokenizer: PreTrainedTokenizerFast, workers: int, helping: bool = False) -> None:
    """Claim and tokenize ``job``'s tasks in ``workers`` processes (this one alone if 1) until none is left."""
    workers = min(workers, len(job.tasks))
    if workers <= 1:
        _work(job, docs, tokenizer, helping)
        return
    import multiprocess  # datasets' own dependency (its map uses it): pickles what multiprocessing cannot

    # the pool's processes end with this one (a kill -9 of the launcher would leave them tokenizing)
    with multiprocess.Pool(workers, initializer=die_with_parent) as pool:
        pool.starmap(_work, [(job, docs, tokenizer, helping)] * workers)


def _work(job: _Job, docs: Dataset, tokenizer: PreTrainedTokenizerFast, helping: bool = False) -> int:
    """Tokenize every task of ``job`` this process can claim; returns how many it did.

    ``helping``: this process helps another's build (the fault point ``tokenize`` tells them apart).
    """
    done = 0
    for i in range(len(job.tasks)):
        try:
            fd = os.open(job.claim(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, _worker_id().encode())
            faults.at("tokenize", int(helping), done)
            _do_task(job, i, docs, tokenizer)
        finally:
            os.close(fd)  # releases the claim's lock, after the output is in place
        done += 1
    return done


def _do_task(job: _Job, i: int, docs: Dataset, tokenizer: PreTrainedTokenizerFast) -> None:
    start, end = job.tasks[i]
    tmp = f"{job.output(i)}.tmp-{socket.gethostname()}-{os.getpid()}"
    _tokenize_shard(docs.select(range(start, end)), tokenizer, job.pairs, tmp)
    os.replace(tmp, job.output(i))


def _collect(job: _Job, docs: Dataset, tokenizer: PreTrainedTokenizerFast) -> None:
    """Wait for every task's output; redo the tasks of claimers that died (their claim lock is free)."""
    for i in range(len(job.tasks)):
        while not os.path.exists(job.output(i)):
            fd = os.open(job.claim(i), os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its claimer is at work
                    time.sleep(0.1)
                    continue
                if not os.path.exists(job.output(i)):
                    logger.info("tokenizing task %d of the %s split again: the process that claimed it is gone",
                                i, job.split)
                    os.ftruncate(fd, 0)
                    os.write(fd, _worker_id().encode())
                    _do_task(job, i, docs, tokenizer)
            finally:
                os.close(fd)


def _tokenized_by(job: _Job) -> dict[str, int]:
    """How many of ``job``'s tasks each process (``host:pid``) tokenized, read from the claims."""
    counts: dict[str, int] = {}
    for i in range(len(job.tasks)):
        who = Path(job.claim(i)).read_text()
        counts[who] = counts.get(who, 0) + 1
    return counts


@dataclass(frozen=True)
class _Board:
    """Where the process building a cache offers its tokenizing to the processes waiting for that cache.

    A waiting process registers a file in ``waiting`` (``root/KEY.waiting/``); the builder, finding one
    there when it starts a split, posts the split's :class:`_Job` as ``root/KEY.tasks.json`` and takes
    it down when the split is tokenized. Everything lives beside the cache, so the processes that
    help are those that share its file system: the ranks of a node with a node-local cache, every
    rank of a job with a shared one.
    """

    root: Path
    key: str

    @property
    def waiting(self) -> Path:
        return self.root / f"{self.key}.waiting"

    @property
    def posted(self) -> Path:
        return self.root / f"{self.key}.tasks.json"

    def has_helpers(self) -> bool:
        try:
            return any(self.waiting.iterdir())
        except OSError:
            return False

    def register(self) -> Path:
        me = self.waiting / f"{socket.gethostname()}-{os.getpid()}"
        for _ in range(10):  # the last one out may remove the directory between the two calls
            try:
                self.waiting.mkdir(exist_ok=True)
                me.touch()
                return me
            except FileNotFoundError:
                continue
        return me

    def unregister(self, me: Path) -> None:
        me.unlink(missing_ok=True)
        try:
            self.waiting.rmdir()
        except OSError:  # others still waiting
            pass

    def post(self, job: _Job, tokenizer_dir: str) -> None:
        tmp = self.posted.with_name(f"{self.posted.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"job": dataclasses.asdict(job), "tokenizer": tokenizer_dir}))
        os.replace(tmp, self.posted)

    def withdraw(self) -> None:
        self.posted.unlink(missing_ok=True)

    def read(self) -> tuple[_Job, str] | None:
        try:
            posted = json.loads(self.posted.read_text())
        except (OSError, ValueError):
            return None
        job = posted["job"]
        return _Job(job["scratch"], job["split"], [tuple(t) for t in job["tasks"]], job["pairs"]), posted["tokenizer"]


def _help(board: _Board, workers: int, helped: set) -> None:
    """Do tasks of the job posted on ``board``, if there is one this process has not helped with yet.

    Best effort: whatever goes wrong (the build failed and was removed meanwhile) is left to the
    builder, which redoes the tasks whose claimer is gone.
    """
    posted = board.read()
    if posted is None or (posted[0].scratch, posted[0].split) in helped:
        return
    job, tokenizer_dir = posted
    helped.add((job.scratch, job.split))
    try:
        docs = load_from_disk(job.docs_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        _run_workers(job, docs, tokenizer, workers, helping=True)
    except Exception:  # noqa: BLE001 (see the docstring)
        logger.debug("could not help tokenizing %s", job.scratch, exc_info=True)


def _tokenize_shard(docs: Dataset, tokenizer: PreTrainedTokenizerFast, pairs: bool, path: str) -> None:
    """Tokenize ``docs`` into an Arrow stream file at ``path``, in large record batches (see :func:`_tokenize`)."""
    schema = _PAIR_FEATURES.arrow_schema if pairs else pa.schema([("input_ids", pa.list_(pa.int32()))])
    encode = _encode_pairs if pairs else _encode
    files = _mapped_files(docs)
    pending: list[pa.Table] = []
    pending_tokens = 0
    with pa.ipc.new_stream(path, schema) as sink:
        for batch in docs.iter(batch_size=_TOKENIZE_BATCH):
            _release_pages(files)  # the text this batch was read from
            table = pa.Table.from_pydict(encode(batch, tokenizer), schema=schema)
            pending.append(table)
            pending_tokens += sum(len(chunk.values) for chunk in table.column("input_ids").chunks)
            if pending_tokens >= _STREAM_CHUNK_TOKENS:
                sink.write_table(pa.concat_tables(pending).combine_chunks())
                pending, pending_tokens = [], 0
        if pending:
            sink.write_table(pa.concat_tables(pending).combine_chunks())


def _encode(batch: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    return {"input_ids": _token_ids(batch["text"], tokenizer)}


def _token_ids(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> pa.ListArray:
    """The ids of each of ``texts`` as a ``list<int32>`` array, the tokenizer given ``_TOKENIZE_CHARS`` at a time.

    A text longer than that is tokenized in pieces (:func:`_pieces`), cut where the trained byte-level
    BPE gives the same ids as for the whole text; another tokenizer (``data.tokenizer``) does too
    unless it treats the start of a text specially (a prefix space), and then at most the tokens
    next to a cut differ. The ids go to numpy as each call returns, not into lists of Python ints.
    """
    counts = np.zeros(len(texts), dtype=np.int64)
    values = [np.zeros(0, dtype=np.int32)]
    for owners, group in _piece_groups(texts, _TOKENIZE_CHARS):
        # No special tokens: packing adds the single eos after each document itself. verbose=False
        # silences the "longer than model_max_length" warning, which is meaningless before packing.
        ids = tokenizer(group, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        np.add.at(counts, owners, lengths)
        values.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())))
    offsets = np.zeros(len(texts) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(counts)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(values)))


def _piece_groups(texts: list[str], limit: int) -> Iterator[tuple[list[int], list[str]]]:
    """``(owners, pieces)``: the pieces of ``texts`` in order, gathered up to ``limit`` characters, each with its text's index."""
    owners: list[int] = []
    group: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        for piece in _pieces(text, limit):
            if group and size + len(piece) > limit:
                yield owners, group
                owners, group, size = [], [], 0
            owners.append(i)
            group.append(piece)
            size += len(piece)
    if group:
        yield owners, group


def _pieces(text: str, limit: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters (at least half that, but the last).

    Each cut is the last place of the piece's second half where ``_CUT`` matches; a piece without
    one (a run of ``limit / 2`` characters without a space, tab or newline) is cut at ``limit``.
    """
    start = 0
    while len(text) - start > limit:
        lo, hi = start + limit // 2 + 1, start + limit + 1  # the cut, the next piece's first character, in [lo, hi)
        cut, end, span = hi - 1, hi, 256  # a hard cut, unless a match is found searching back from hi
        while end > lo:
            begin = max(lo, end - span)
            found = [m.start() for m in _CUT.finditer(text, begin, end)]
            if found:
                cut = found[-1]
                break
            end, span = begin, span * 4
        yield text[start:cut]
        start = cut
    yield text[start:]


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
    sink = pa.ipc.new_stream(str(path), schema) if path is not None else None
    batches = []
    # The stream not yet cut: the tokens after the last whole block, then the pieces read since.
    # Pieces are gathered up to _STREAM_CHUNK_TOKENS before cutting, so that the file's record
    # batches are large whatever the documents per tokenized chunk: a reader's pass over the
    # batch headers then touches few of the file's pages.
    pending: list[np.ndarray] = []
    pending_tokens = 0
    num_tokens = 0
    files = _mapped_files(tokenized)

    def cut() -> None:
        nonlocal pending, pending_tokens
        stream = np.concatenate(pending) if len(pending) > 1 else pending[0]
        usable = len(stream) // seq_len * seq_len
        if usable:
            blocks = pa.FixedSizeListArray.from_arrays(pa.array(stream[:usable]), seq_len)
            batch = pa.RecordBatch.from_arrays([blocks], schema=schema)
            if sink is not None:
                sink.write_batch(batch)
            else:
                batches.append(batch)
        pending = [stream[usable:].copy()]  # a copy, so that the pieces can be freed
        pending_tokens = len(pending[0])

    try:
        for piece in _stream_pieces(tokenized, eos_id, _STREAM_CHUNK_TOKENS):
            _release_pages(files)  # the pages of the ids just read (the piece is a copy)
            num_tokens += len(piece)
            pending.append(piece)
            pending_tokens += len(piece)
            if pending_tokens >= _STREAM_CHUNK_TOKENS:
                cut()
        if pending:
            cut()
    finally:
        if sink is not None:
            sink.close()
    if path is not None:
        return Dataset.from_file(str(path)), num_tokens
    return Dataset(InMemoryTable(pa.Table.from_batches(batches, schema=schema))), num_tokens


#: The tokenized prompt/response examples: the ids of prompt, response and eos, and the prompt's length.
_PAIR_FEATURES = Features({"input_ids": List(Value("int32")), "prompt_len": Value("int32")})

#: Tokens per chunk of :func:`_pack_examples` (at most: a chunk holds this // seq_len examples, each
#: of at most seq_len tokens once truncated). Its working arrays take about 40 bytes a token, so
#: memory stays near 200 MB whatever the corpus size.
_PACK_CHUNK_TOKENS = 1 << 22


def _encode_pairs(batch: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    # Prompt and response are tokenized apart, so the boundary between them (where the labels
    # start) falls between tokens; joint tokenization could merge its two sides into one token.
    prompts, responses = _token_ids(batch["prompt"], tokenizer), _token_ids(batch["response"], tokenizer)
    p, r = prompts.offsets.to_numpy(), responses.offsets.to_numpy()
    p_ids, r_ids = prompts.values.to_numpy(), responses.values.to_numpy()
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    examples = [np.concatenate([p_ids[p[i] : p[i + 1]], r_ids[r[i] : r[i + 1]], eos]) for i in range(len(prompts))]
    offsets = np.zeros(len(examples) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(e) for e in examples])
    flat = np.concatenate(examples) if examples else np.zeros(0, dtype=np.int32)
    return {
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "prompt_len": pa.array(np.diff(p), type=pa.int32()),
    }


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
    sink = pa.ipc.new_stream(str(path), schema) if path is not None else None
    batches = []
    # The open block: its ids and labels so far (padding and -100 beyond ``fill``).
    open_ids = np.full(seq_len, pad_id, dtype=np.int32)
    open_labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int32)
    fill = 0

    def emit(ids: np.ndarray, labels: np.ndarray) -> None:
        columns = [pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), seq_len) for a in (ids, labels)]
        batch = pa.RecordBatch.from_arrays(columns, schema=schema)
        stats["padding"] += len(ids) * seq_len  # minus the tokens, at the end
        if sink is not None:
            sink.write_batch(batch)
        else:
            batches.append(batch)

    files = _mapped_files(tokenized)
    try:
        for record in tokenized.data.to_batches(max_chunksize=max(1, _PACK_CHUNK_TOKENS // seq_len)):
            _release_pages(files)  # those of the chunks before (see _release_pages)
            column = record.column("input_ids")
            offsets = column.offsets.to_numpy().astype(np.int64)  # into column.values, also for a slice
            values = column.values.to_numpy()
            lengths = np.diff(offsets)
            prompt_lens = record.column("prompt_len").to_numpy().astype(np.int64)
            kept = np.minimum(lengths, seq_len)
            prompts = np.minimum(prompt_lens, kept)
            # Placement: where in this chunk's blocks each example starts (row-major over
            # [open block, new blocks...]), -1 for dropped ones. Inherently sequential.
            starts = np.full(len(lengths), -1, dtype=np.int64)
            block = 0
            for i, (size, prompt) in enumerate(zip(kept.tolist(), prompts.tolist())):
                if prompt >= size:
                    continue
                if fill + size > seq_len:
                    block, fill = block + 1, 0
                starts[i] = block * seq_len + fill
                fill += size
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
            tokens = values[source]
            ids.reshape(-1)[target] = tokens
            labels.reshape(-1)[target] = np.where(within >= np.repeat(prompts[placed], sizes), tokens, IGNORE_INDEX)
            stats["tokens"] += len(tokens)
            stats["targets"] += int((within >= np.repeat(prompts[placed], sizes)).sum())
            if block:  # every block but the last is closed: nothing placed later can go into it
                emit(ids[:block], labels[:block])
            open_ids, open_labels = ids[block].copy(), labels[block].copy()
        if fill:
            emit(open_ids[None], open_labels[None])
    finally:
        if sink is not None:
            sink.close()
    stats["padding"] -= stats["tokens"]
    if path is not None:
        return Dataset.from_file(str(path)), stats
    table = pa.Table.from_batches(batches, schema=schema)
    return Dataset(InMemoryTable(table)), stats


def _load(path: Path, key: str) -> PreparedData:
    return PreparedData(
        train=load_from_disk(str(path / "train")).with_format("numpy"),
        validation=load_from_disk(str(path / "validation")).with_format("numpy"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        fingerprint=key,
        cache_path=path,
    )


# -- sampling ----------------------------------------------------------------------------------


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
