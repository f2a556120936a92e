"""The raw documents of a data configuration: the built-in corpus, data files or a hub dataset.

:func:`load_text` returns the ``train`` and ``validation`` splits as ``datasets`` of strings: a ``text``
column, or ``prompt`` and ``response`` for ``data.format=prompt_response``. The files are read by
:mod:`distrib.data.readers`, a hub dataset is streamed by :mod:`distrib.data.hub`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, concatenate_datasets

from distrib.config import ConfigError, DataConfig
from distrib.data import hub
from distrib.data.builtin import builtin_corpus
from distrib.data.pages import _mapped_files, _release_pages
from distrib.data.readers import Fields, check_file, expand, is_string_type, load_files, loader, names


def _cache_root(cfg: DataConfig) -> Path:
    """Where the data caches live (``data.cache_dir``, else ``$DISTRIB_CACHE``, else ``~/.cache/distrib``)."""
    root = cfg.cache_dir or os.environ.get("DISTRIB_CACHE") or "~/.cache/distrib"
    return Path(root).expanduser()


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
        hf_cache = str(hf_cache if hf_cache is not None else _cache_root(cfg) / "hf_datasets")
        train, validation = hub.load_hub(cfg, fields, hf_cache)
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
