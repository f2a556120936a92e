"""Data files in: which files a config lists, whether they hold usable data, and reading them.

``data.train_files`` and ``data.validation_files`` list paths and globs (:func:`expand`): each file is
``.txt``, ``.jsonl``, ``.json``, ``.csv`` or ``.parquet``, the first four also compressed as ``.gz``,
``.bz2`` or ``.xz``. Every file is checked (:func:`check_file`) before any is loaded, in one streaming
pass of bounded memory, so that bad data is refused with a one-line :class:`~distrib.config.ConfigError`
naming the key, the file (and line) and the fix, rather than a traceback from inside ``datasets``.
:func:`load_files` then reads them: ``.txt`` files by :func:`_paragraphs`, in bounded pieces whatever
their line lengths; JSON, CSV and Parquet by the ``datasets`` loaders, which decompress by the suffix.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Features, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

from distrib.config import DATA_FILE_TYPES, ConfigError

logger = logging.getLogger(__name__)

#: The ``datasets`` loader of each data file format (``.txt`` files are read by :func:`_paragraphs`).
_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

#: The compressions read, by suffix: the standard library's, which ``datasets`` reads too.
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

#: Compressed and archive formats known but not read here, by suffix: the name a refusal gives them.
_UNREAD = {".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4", ".zip": "zip", ".7z": "7z", ".br": "brotli",
           ".lzma": "lzma", ".z": "compress", ".tar": "tar", ".tgz": "tar"}

#: Data files are checked and read in chunks of this size, so a multi-GB file (or line) never sits
#: in memory whole.
_READ_CHUNK = 1 << 20

#: A NUL byte this close to the start marks a binary file (the test ``grep`` and ``git`` make);
#: UTF-8 text practically never holds one, and most binary formats have one in their header.
_SNIFF_BYTES = 8192

#: Byte-order marks of the encodings whose text is full of NULs, checked before the NUL test so
#: that such a file is named for what it is; UTF-32 first, its LE mark starts with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)

#: What a compressed file that cannot be decompressed raises: ``gzip.BadGzipFile`` and ``bz2``'s
#: "Invalid data stream" are ``OSError`` without an errno; a file cut short ends in ``EOFError``.
_CORRUPT = (EOFError, zlib.error, lzma.LZMAError)

#: The CSV reader's limit on one field while checking (the standard library's default is 128 KiB, a
#: few pages of text); pandas, which loads the file, has none.
_CSV_FIELD_LIMIT = (1 << 31) - 1


@dataclass(frozen=True)
class Fields:
    """What a row of a JSON, CSV or Parquet file must hold under ``data.format``.

    Attributes:
        roles: ``(role, field, config key)`` per field: one for ``text`` (the text), two for
            ``prompt_response`` (prompt, response).
    """

    roles: tuple[tuple[str, str, str], ...]

    @property
    def pairs(self) -> bool:
        """Prompt/response rows, of which every one is kept (an empty response still teaches where one ends)."""
        return len(self.roles) == 2

    def described(self) -> str:
        """``the text in 'text' (data.text_field)``, or the prompt and response fields alike."""
        return " and ".join(f"the {role} in {field!r} ({config_key})" for role, field, config_key in self.roles)


def names(paths: list[str]) -> str:
    """The first few of ``paths`` for a one-line message."""
    shown = ", ".join(repr(p) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def is_string_type(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


# -- which files -----------------------------------------------------------------------------------


def expand(patterns: list[str], key: str, warn: bool = True) -> list[str]:
    """Paths and globs -> existing data files, in the listed order (each glob's matches sorted), each file once.

    A ``**`` matches directories at any depth, as in ``glob.glob(recursive=True)``, but a directory is
    entered once however many links lead to it: a link back up the tree (a loop) is not followed
    around and around. A file matched again (through a link, or by a second pattern) is read once,
    under the first of its paths; files are told apart by their real path, not their content, so two
    copies of a text are two files. With ``warn``, the files matched again are logged.

    Raises:
        ConfigError: a path that does not exist or is a directory, a glob matching no file, or
            a file of an unsupported format.
    """
    files, seen, again = [], set(), []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = _glob(pattern)
            if not matches:
                raise ConfigError(f"{key}: {pattern!r} matches no file; fix the glob or the path")
        elif os.path.isfile(pattern):
            matches = [pattern]
        elif os.path.isdir(pattern):
            raise ConfigError(
                f"{key}: {pattern!r} is a directory, not a file; "
                f"name its files with a glob such as {_glob_hint(pattern)!r}"
            )
        else:
            raise ConfigError(f"{key}: {pattern!r} does not exist; fix the path")
        for path in matches:
            file_format(path, key)
            real = os.path.realpath(path)
            if real in seen:
                again.append(path)
                continue
            seen.add(real)
            files.append(path)
    if again and warn:
        logger.warning("%s: %d matches are files matched before (through links or by another pattern), read once: %s",
                       key, len(again), names(again))
    return files


def _glob(pattern: str) -> list[str]:
    """The files ``pattern`` matches, sorted, as ``glob.glob(recursive=True)``; ``**`` enters a directory once."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if parts[-1] == "**":  # every file below, as "**/*" (the directories it matches too are no files)
        parts.append("*")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = os.sep.join(parts[:first]) or ("" if first == 0 else os.sep)
    return sorted(p for p in _match(base, parts[first:], set()) if os.path.isfile(p))


def _match(base: str, parts: list[str], entered: set[tuple[str, int]]) -> Iterator[str]:
    """The paths under ``base`` that the pattern components ``parts`` match.

    ``entered``: ``(real directory, components left)`` for each directory a ``**`` has matched from,
    so that each ``**`` matches from a directory once, however many links lead to it.
    """
    if not parts:
        yield base
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        here = (os.path.realpath(base or os.curdir), len(parts))
        if here in entered:  # reached again: through a loop, or another link to it
            return
        entered.add(here)
        yield from _match(base, rest, entered)  # no directory at all
        for name in _listdir(base, "*", directories=True):
            yield from _match(os.path.join(base, name) if base else name, parts, entered)
    elif glob.has_magic(part):
        for name in _listdir(base, part):
            yield from _match(os.path.join(base, name) if base else name, rest, entered)
    else:
        yield from _match(os.path.join(base, part) if base else part, rest, entered)


def _listdir(directory: str, pattern: str, directories: bool = False) -> list[str]:
    """The names in ``directory`` that ``pattern`` matches; hidden ones only if it starts with a dot, as in glob."""
    try:
        with os.scandir(directory or os.curdir) as entries:
            found = [e.name for e in entries if not directories or e.is_dir()]
    except OSError:
        return []
    if not pattern.startswith("."):
        found = [name for name in found if not name.startswith(".")]
    return sorted(fnmatch.filter(found, pattern))


def _glob_hint(directory: str) -> str:
    """A glob for the data files of ``directory``: ``*`` and the most common data suffix at its top, else ``**/*``."""
    for depth, pattern in ((0, "*"), (1, os.path.join("**", "*"))):
        counts: dict[str, int] = {}
        looked = 0
        # A look at the first entries is enough for a hint; os.walk follows no link, so no loop.
        for _, subdirs, files in os.walk(directory):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if depth else []
            for name in sorted(files)[:1000]:
                suffix = data_suffix(name)
                if suffix:
                    counts[suffix] = counts.get(suffix, 0) + 1
            looked += len(files) + 1
            if looked >= 10_000:
                break
        if counts:
            return os.path.join(directory.rstrip("/") or "/", pattern + max(counts, key=counts.get))
    return os.path.join(directory.rstrip("/") or "/", "*.txt")


def data_suffix(path: str) -> str | None:
    """The suffix that makes ``path`` a data file (``.csv``, ``.txt.gz``...), or None if it is not one."""
    name = Path(path).name.lower()
    for suffix in _LOADERS:
        for compression in ("", *_OPENERS):
            if name.endswith(suffix + compression) and not (suffix == ".parquet" and compression):
                return suffix + compression
    return None


def file_format(path: str, key: str) -> tuple[str, str]:
    """``(format, compression)`` of a data file by its name: ``(".jsonl", ".gz")``, ``(".txt", "")``.

    Raises:
        ConfigError: a suffix of no supported format, a compression not read here, a compressed
            Parquet file.
    """
    last = Path(path).suffix.lower()
    if last in _OPENERS:
        inner = Path(path[: -len(last)]).suffix.lower()
        if inner == ".parquet":
            raise ConfigError(
                f"{key}: {path!r} is a compressed Parquet file; "
                "Parquet compresses its own pages, so give it uncompressed"
            )
        if inner not in _LOADERS:
            raise ConfigError(
                f"{key}: {path!r} is compressed, but its name does not say what it holds; "
                f"name it after its contents, e.g. {Path(path).stem}.txt{last} or {Path(path).stem}.jsonl{last}"
            )
        return inner, last
    if last in _LOADERS:
        return last, ""
    if last in _UNREAD:
        raise ConfigError(
            f"{key}: {path!r} is {_UNREAD[last]}-compressed, which is not read here; "
            "decompress it, or recompress it with gzip, bzip2 or xz (.gz/.bz2/.xz)"
        )
    raise ConfigError(f"{key}: {path!r} is not {DATA_FILE_TYPES}; convert it or remove it")


def loader(path: str) -> str:
    """The ``datasets`` loader of a data file (``text`` for ``.txt``, read by :func:`_paragraphs`)."""
    return _LOADERS[file_format(path, "")[0]]


def _open(path: str) -> IO[bytes]:
    """``path`` for reading its bytes, decompressed as its suffix says."""
    compression = file_format(path, "")[1]
    return _OPENERS[compression](path, "rb") if compression else open(path, "rb")


# -- checking --------------------------------------------------------------------------------------


def check_file(path: str, key: str, fields: Fields) -> None:
    """Refuse a data file that ``datasets`` would choke on or that holds no text.

    Runs before ``load_dataset`` sees the file, so a bad file fails with one line naming it (and
    the line, for decoding, JSON and CSV errors) instead of a traceback from inside ``datasets``, and
    leaves no half-written ``datasets`` cache behind. One streaming pass with bounded memory over the
    decompressed bytes: a chunk at a time for text, a line at a time for JSON Lines and CSV (a line
    is one document, which ``datasets`` holds whole too), the footer only for Parquet. A ``.json``
    file holding one array is parsed whole, as ``datasets`` parses it.

    Args:
        path: the file.
        key: the config key that listed it, which every message starts with.
        fields: what a JSON, CSV or Parquet row must hold: its text in ``data.text_field``, or
            its prompt and response in ``data.prompt_field`` and ``data.response_field``.

    Raises:
        ConfigError: the file is empty or only whitespace, unreadable, not decompressible (not of
            its compression, or cut short), binary, not UTF-8, not valid JSON Lines / a JSON array
            of objects / CSV with a header, lacks a string field of ``fields`` (a ``null`` counts as
            lacking it), is not a Parquet file with a string column per field, or is a ``.txt``
            file where prompt/response rows are needed.
    """
    kind, compression = file_format(path, key)
    try:
        if os.path.getsize(path) == 0:
            raise _empty(path, key)
        if kind == ".parquet":
            _check_parquet(path, key, fields)
            return
        if kind == ".txt" and fields.pairs:
            raise ConfigError(
                f"{key}: {path!r} is plain text, which has no prompt and response (data.format=prompt_response); "
                f"give .jsonl/.json/.csv/.parquet rows with {fields.described()}"
            )
        with _open(path) as f:
            if not f.read(1):  # a compressed file of nothing
                raise _empty(path, key)
            f.seek(0)
            check = {".txt": _check_text, ".csv": _check_csv}.get(kind, _check_json)
            check(f, path, key, fields)
    except _CORRUPT as e:
        raise _corrupt(path, key, compression, e) from None
    except OSError as e:
        if compression and e.errno is None:
            raise _corrupt(path, key, compression, e) from None
        raise ConfigError(
            f"{key}: {path!r} cannot be read ({e.strerror or e}); fix its permissions or remove it"
        ) from None


def _empty(path: str, key: str) -> ConfigError:
    return ConfigError(f"{key}: {path!r} is empty; put text in it or remove it from {key}")


def _corrupt(path: str, key: str, compression: str, e: BaseException) -> ConfigError:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    tool = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}[compression]
    return ConfigError(
        f"{key}: {path!r} cannot be decompressed as {tool} ({detail}); "
        f"compress it again with {tool}, give it the extension of its real format, or remove it"
    )


def _check_not_binary(head: bytes, path: str, key: str) -> None:
    """Refuse a file whose first bytes say it is UTF-16/32 or binary rather than UTF-8 text."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            raise ConfigError(
                f"{key}: {path!r} is {encoding} text; convert it to UTF-8, e.g. with iconv -f {encoding} -t UTF-8"
            )
    if b"\0" in head[:_SNIFF_BYTES]:
        raise ConfigError(
            f"{key}: {path!r} is a binary file (it holds NUL bytes), not text; "
            "give UTF-8 .txt/.jsonl/.json/.csv or .parquet files"
        )


def _not_utf8(path: str, key: str, line: int, data: bytes, pos: int) -> ConfigError:
    """The error for the undecodable byte ``data[pos]``; ``line`` is the line ``data`` starts on."""
    line += data[:pos].count(b"\n")
    byte = f"byte 0x{data[pos]:02x}" if pos < len(data) else "a truncated character at the end"
    return ConfigError(
        f"{key}: {path!r} line {line} is not valid UTF-8 ({byte}); "
        "convert the file to UTF-8, e.g. with iconv -f <its encoding> -t UTF-8"
    )


def _check_text(f: IO[bytes], path: str, key: str, fields: Fields) -> None:
    """A ``.txt`` file must be UTF-8 with some non-whitespace text; decoded in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, has_text = 1, False
    _check_not_binary(f.read(_SNIFF_BYTES), path, key)
    f.seek(0)
    while True:
        chunk = f.read(_READ_CHUNK)
        # The decoder keeps the first bytes of a character split across two chunks; an error
        # position counts from them, and they hold no newline (a newline is one ASCII byte).
        pending = decoder.getstate()[0]
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise _not_utf8(path, key, line, pending + chunk, e.start) from None
        if not chunk:
            break
        has_text = has_text or (bool(text) and not text.isspace())
        line += chunk.count(b"\n")
    if not has_text:
        raise ConfigError(f"{key}: {path!r} holds only whitespace; put text in it or remove it from {key}")


def _check_json(f: IO[bytes], path: str, key: str, fields: Fields) -> None:
    """A ``.jsonl``/``.json`` file must be JSON Lines of objects (or one array of them) holding ``fields``.

    These are the two layouts the ``datasets`` JSON loader reads without being told a field.
    Blank lines are skipped, as the loader skips them.
    """
    rows, has_text = 0, False
    head = f.read(_SNIFF_BYTES)
    _check_not_binary(head, path, key)
    f.seek(0)
    if head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
        _check_json_array(f.read().removeprefix(codecs.BOM_UTF8), path, key, fields)
        return
    for number, raw in enumerate(f, start=1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # the loader strips it too
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, key, number, raw, e.start) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line.rstrip("\r\n"))  # an error at the end then points into the line, not past it
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{key}: {path!r} line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                "fix the line: a .jsonl file holds one JSON object per line"
            ) from None
        rows += 1
        has_text = _row_has_text(row, fields, path, key, f"line {number}") or has_text
    if not rows:
        raise ConfigError(f"{key}: {path!r} holds only whitespace; put text in it or remove it from {key}")
    if not has_text:
        raise _no_text(path, key, fields)


def _check_json_array(raw: bytes, path: str, key: str, fields: Fields) -> None:
    """A JSON file holding one array: of objects holding ``fields``, or of strings (a ``text`` column)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, key, 1, raw, e.start) from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{key}: {path!r} line {e.lineno} is not valid JSON ({e.msg} at column {e.colno}); fix the file"
        ) from None
    has_text = False
    for number, item in enumerate(items, start=1):
        if isinstance(item, str) and not fields.pairs:  # the loader reads an array of strings as a "text" column
            has_text = has_text or bool(item.strip())
        else:
            has_text = _row_has_text(item, fields, path, key, f"array item {number}") or has_text
    if not has_text:
        raise _no_text(path, key, fields)


def _no_text(path: str, key: str, fields: Fields) -> ConfigError:
    values = " or ".join(f"{field!r} ({config_key})" for _, field, config_key in fields.roles)
    return ConfigError(f"{key}: {path!r} has no non-empty {values} value; put text in it or remove it from {key}")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _row_has_text(row: object, fields: Fields, path: str, key: str, where: str) -> bool:
    """Whether one JSON row has non-empty text in a field of ``fields``; a row that cannot be a document is refused.

    Anything but a string is refused, ``null`` too: ``datasets`` would fail on the others or turn the
    column into non-text, and a ``null`` text (prompt, response) is a row broken on the way, which
    dropping or reading as empty would hide. An empty string is an empty document, dropped.
    """
    if not isinstance(row, dict):
        raise ConfigError(
            f"{key}: {path!r} {where} is a JSON {_json_kind(row)}, not an object; "
            f"write one object per line with {fields.described()}"
        )
    has_text = False
    for role, field, config_key in fields.roles:
        if field not in row:
            raise ConfigError(
                f"{key}: {path!r} {where} has no {field!r} field ({config_key}); "
                f"its fields are {list(row)[:10]}; set {config_key} or fix the line"
            )
        value = row[field]
        if not isinstance(value, str):
            what = "null" if value is None else f"a {_json_kind(value)}"
            fix = " (an empty one if there is none)" if value is None else ""
            raise ConfigError(
                f"{key}: {path!r} {where}: {field!r} ({config_key}) is {what}, not a string; "
                f"store the {role} as a JSON string{fix}"
            )
        has_text = has_text or bool(value.strip())
    return has_text


class _Lines:
    """The decoded lines of a binary stream, for :mod:`csv`: each ends in a newline (the last is given one).

    ``number`` is the lines read so far; ``ended`` turns true when a line is asked for past the
    last, which a CSV record that ends properly never does (see :func:`_check_csv`).
    """

    def __init__(self, f: IO[bytes], path: str, key: str):
        self.f, self.path, self.key = f, path, key
        self.number, self.ended = 0, False

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            self.ended = True
            raise StopIteration
        self.number += 1
        if self.number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # pandas strips it too
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(self.path, self.key, self.number, raw, e.start) from None
        return line if line.endswith("\n") else line + "\n"


def _check_csv(f: IO[bytes], path: str, key: str, fields: Fields) -> None:
    """A ``.csv`` file must be UTF-8, its first row a header naming ``fields``, every row reaching their columns.

    Parsed as pandas (the ``datasets`` loader) parses it: blank lines skipped, fields quoted with
    ``"``. Two things pandas lets through are refused: a row too short to have a field's column
    (pandas would make it an empty text, hiding a broken row), and a quoted field still open at
    the end of the file (pandas fails on it without naming a line). A CSV cell has no ``null``: an
    empty one is an empty text.
    """
    _check_not_binary(f.read(_SNIFF_BYTES), path, key)
    f.seek(0)
    lines = _Lines(f, path, key)
    reader = csv.reader(lines)
    columns: list[int] = []
    rows, has_text, start = 0, False, 1
    limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        for row in reader:
            if lines.ended:
                raise ConfigError(
                    f"{key}: {path!r} line {start}: a quoted field is not closed before the end of the file; "
                    "add the closing quote (a quote inside a quoted field is written twice)"
                )
            here, start = start, lines.number + 1
            if not row:
                continue
            if not columns:
                columns = [_csv_column(row, field, config_key, path, key) for _, field, config_key in fields.roles]
                continue
            rows += 1
            if len(row) <= max(columns):
                field, config_key = next((f, k) for (_, f, k), c in zip(fields.roles, columns) if c >= len(row))
                raise ConfigError(
                    f"{key}: {path!r} line {here} has {len(row)} fields, too few to hold {field!r} ({config_key}); "
                    "fix the line"
                )
            has_text = has_text or any(row[c].strip() for c in columns)
    except csv.Error as e:
        raise ConfigError(f"{key}: {path!r} line {lines.number} is not valid CSV ({e}); fix the line") from None
    finally:
        csv.field_size_limit(limit)
    if not columns:
        raise ConfigError(f"{key}: {path!r} holds only whitespace; put text in it or remove it from {key}")
    if not rows:
        raise ConfigError(f"{key}: {path!r} has a header but no rows; put text in it or remove it from {key}")
    if not has_text and not fields.pairs:
        raise _no_text(path, key, fields)


def _csv_column(header: list[str], field: str, config_key: str, path: str, key: str) -> int:
    if field not in header:
        raise ConfigError(
            f"{key}: {path!r} has no column {field!r} ({config_key}); its header names {header[:10]}; "
            f"set {config_key}, or give the file a header row"
        )
    return header.index(field)


def _check_parquet(path: str, key: str, fields: Fields) -> None:
    """A Parquet file must have rows and a string column per field of ``fields``; only its footer is read.

    ``null`` values are refused by the footer's null counts; a writer may leave those out, so
    :func:`distrib.data._rows` counts again after loading.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, os.path.getsize(path) - 4))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise ConfigError(
            f"{key}: {path!r} is not a Parquet file (no PAR1 markers); convert it, or give it its real extension"
        )
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except pa.ArrowException as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}: {path!r} is not a readable Parquet file ({detail}); rewrite it") from None
    for role, field, config_key in fields.roles:
        if field not in schema.names:
            raise ConfigError(
                f"{key}: {path!r} has no column {field!r} ({config_key}); its columns are {schema.names[:10]}; "
                f"set {config_key}"
            )
        kind = schema.field(field).type
        if not is_string_type(kind):
            raise ConfigError(
                f"{key}: {path!r} column {field!r} ({config_key}) holds {kind}, not strings; "
                f"set {config_key} to the {role} column"
            )
        nulls = _parquet_nulls(meta, field)
        if nulls:
            raise ConfigError(
                f"{key}: {path!r} column {field!r} ({config_key}) is null in {nulls} rows; "
                f"store every {role} as a string (an empty one if there is none)"
            )
    if meta.num_rows == 0:
        raise ConfigError(f"{key}: {path!r} has no rows; put text in it or remove it from {key}")


def _parquet_nulls(meta: pq.FileMetaData, field: str) -> int:
    """The nulls of the top-level column ``field`` by the row groups' statistics (0 where there are none)."""
    leaves = [i for i in range(meta.num_columns) if meta.schema.column(i).path == field]
    nulls = 0
    for group in range(meta.num_row_groups):
        for leaf in leaves:
            stats = meta.row_group(group).column(leaf).statistics
            if stats is not None and stats.has_null_count:
                nulls += stats.null_count
    return nulls


# -- reading ---------------------------------------------------------------------------------------


def load_files(paths: list[str], fields: Fields, hf_cache: str, key: str) -> Dataset:
    """The rows of ``paths``, files of one loader (see :func:`loader`) that :func:`check_file` passed.

    ``.txt`` files give a ``text`` column of paragraphs (:func:`_paragraphs`); the others their
    columns, CSV files only those of ``fields``, as strings (``NA`` and empty cells too: a CSV cell
    is text, never a missing value). ``datasets`` caches what it parses in ``hf_cache``.

    Raises:
        ConfigError: ``datasets`` failing to read a file all the same, naming ``key``.
    """
    builder = loader(paths[0])
    if builder == "text":
        return _load_paragraphs(paths, hf_cache)
    extra = {}
    if builder == "csv":
        columns = [field for _, field, _ in fields.roles]
        extra = dict(usecols=columns, features=Features({c: Value("string") for c in columns}),
                     keep_default_na=False, na_filter=False)
    try:
        return load_dataset(builder, data_files=paths, split="train", cache_dir=hf_cache, **extra)
    except (DatasetGenerationError, pa.ArrowException, ValueError, OSError, EOFError) as e:
        # The checks should leave nothing for this; keep the full story for --debug readers.
        logger.debug("datasets failed to load %s", paths, exc_info=True)
        cause = e.__cause__ or e
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ConfigError(
            f"{key}: datasets could not read {names(paths)} ({type(cause).__name__}: {detail}); "
            "fix or remove the file"
        ) from None


def _load_paragraphs(paths: list[str], hf_cache: str) -> Dataset:
    """The paragraphs of ``.txt`` files as a ``text`` column, memory-mapped from an Arrow file in ``hf_cache``.

    Written in record batches of about ``_READ_CHUNK`` characters, under a name made from the files'
    paths, sizes and times (a reading of the same files replaces it), by way of a temporary name.
    """
    stamps = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]
    name = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]
    out = Path(hf_cache) / "text" / f"{name}.arrow"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    schema = pa.schema([("text", pa.string())])
    try:
        with pa.ipc.new_stream(str(tmp), schema) as sink:
            batch: list[str] = []
            size = 0
            for path in paths:
                for paragraph in _paragraphs(path):
                    batch.append(paragraph)
                    size += len(paragraph)
                    if size >= _READ_CHUNK:
                        sink.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
                        batch, size = [], 0
            if batch:
                sink.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Dataset.from_file(str(out))


def _paragraphs(path: str) -> Iterator[str]:
    """The paragraphs of a ``.txt`` file: its text split at every blank line (``"\\n\\n"``), empty ones left out.

    The documents of ``datasets``' text loader with ``sample_by="paragraph"``: the text decoded as
    UTF-8 with universal newlines (``"\\r\\n"`` and ``"\\r"`` read as ``"\\n"``), split as
    ``text.split("\\n\\n")`` splits it. Unlike that loader, which ends every chunk it reads with
    ``readline()``, this reads ``_READ_CHUNK`` characters at a time whatever the lines, so a file of
    one long line costs its paragraph, not several copies of it.
    """
    pending: list[str] = []  # the paragraph so far
    carry = ""  # a newline at the end of the text read, which may start a "\n\n" with the next chunk
    with io.TextIOWrapper(_open(path), encoding="utf-8", newline=None) as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                break
            parts = (carry + chunk).split("\n\n")
            if len(parts) > 1:
                first = "".join(pending) + parts[0]
                if first:
                    yield first
                pending = []
                yield from (p for p in parts[1:-1] if p)
            last = parts[-1]
            carry = "\n" if last.endswith("\n") else ""
            pending.append(last[:-1] if carry else last)
    rest = "".join(pending) + carry
    if rest:
        yield rest
