"""Bad data is refused by ``prepare_data`` with one line naming the key, the file (and line) and the fix,
and a failed preparation leaves nothing behind: no build directory, lock file, ``datasets`` cache or
cache root.

Every test builds its config the way the CLI does (``load_config`` on the tiny config plus
overrides) and calls ``prepare_data``, which the CLI runs in the launching process before any
worker starts.
"""

from __future__ import annotations

import bz2
import fcntl
import gzip
import json
import lzma
import logging
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distrib import data
from distrib.data import readers
from distrib.config import ConfigError, load_config
from tests.conftest import ROOT

TINY = str(ROOT / "configs/pretrain/tiny.yaml")

#: Small enough that a good build takes about a second.
FAST = ["data.seq_len=32", "data.vocab_size=300"]

#: A PNG header (its IHDR chunk length starts with NULs), as a picture renamed to .txt would begin.
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00"


def snapshot(root: Path) -> set[str]:
    """Every path under ``root``, files and directories, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def good_text(path: Path, paragraphs: int = 300) -> Path:
    path.write_text("\n\n".join(f"Paragraph {i} holds a few plain words." for i in range(paragraphs)))
    return path


def config(tmp_path: Path, train: list[Path], *overrides: str):
    """The data section of the tiny config reading ``train`` from files, cached under ``tmp_path/cache``."""
    cfg = load_config(TINY, [
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.source=files",
        f"data.train_files=[{','.join(str(p) for p in train)}]",
        *FAST,
        *overrides,
    ])
    return cfg.data


def refused(tmp_path: Path, train: list[Path], *overrides: str) -> str:
    """The one-line message this data is refused with, as a user meets it.

    Asserts it twice: ``prepare_data`` raises it, and ``distrib pretrain ... --nproc-per-node 2`` prints it as
    its one line on stderr and exits 2 before any worker starts; and that nothing was written either time.
    """
    from distrib.commands.cli import main

    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        data.prepare_data(config(tmp_path, train, *overrides), seed=0)
    message = str(err.value)
    assert "\n" not in message, message
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "cache").exists()
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["pretrain", TINY, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                     "data.source=files", f"data.train_files=[{','.join(str(p) for p in train)}]", *FAST, *overrides,
                     "--nproc-per-node", "2"])
    assert code == 2
    # the one error line ends the output (datasets may draw its progress bars first), with no traceback
    assert stderr.getvalue().endswith(f"\ndistrib: error: {message}\n") or stderr.getvalue() == f"distrib: error: {message}\n"
    assert stderr.getvalue().count("distrib: error:") == 1 and "Traceback" not in stderr.getvalue()
    assert snapshot(tmp_path) == before
    return message


# -- empty and non-text files ---------------------------------------------------------------------


def test_empty_train_file(tmp_path):
    bad = tmp_path / "empty.txt"
    bad.write_bytes(b"")
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' is empty; put text in it or remove it from data.train_files"
    )


@pytest.mark.parametrize("name", ["blank.txt", "blank.jsonl"])
def test_whitespace_only_file(tmp_path, name):
    bad = tmp_path / name
    bad.write_text(" \n\n\t  \n\n")
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' holds only whitespace; put text in it or remove it from data.train_files"
    )


@pytest.mark.parametrize("name", ["picture.txt", "picture.jsonl"])
def test_binary_file_is_called_binary(tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(PNG + bytes(range(256)) * 4)
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' is a binary file (it holds NUL bytes), not text; "
        "give UTF-8 .txt/.jsonl/.json/.csv or .parquet files"
    )


def test_utf16_text_is_named_as_such(tmp_path):
    bad = tmp_path / "wide.txt"
    bad.write_text("some text\n", encoding="utf-16")
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' is UTF-16 text; convert it to UTF-8, e.g. with iconv -f UTF-16 -t UTF-8"
    )


def test_non_utf8_text_names_file_and_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"first line\n\nsecond paragraph\ncaf\xe9 au lait\n")
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' line 4 is not valid UTF-8 (byte 0xe9); "
        "convert the file to UTF-8, e.g. with iconv -f <its encoding> -t UTF-8"
    )


def test_non_utf8_line_is_counted_across_read_chunks(tmp_path, monkeypatch):
    # Tiny chunks split the two-byte "é"s of the good lines between reads: they must not be
    # mistaken for errors, and the newlines of every earlier chunk must count.
    monkeypatch.setattr(readers, "_READ_CHUNK", 7)
    bad = tmp_path / "mixed.txt"
    bad.write_bytes("été\n".encode() * 20 + b"caf\xe9\n")
    assert " line 21 is not valid UTF-8 (byte 0xe9)" in refused(tmp_path, [bad])


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert refused(tmp_path, [bad]).startswith(f"data.train_files: '{bad}' line 2 is not valid UTF-8 (byte 0xe9)")


# -- malformed JSON -------------------------------------------------------------------------------


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "one"}\n\n{"text": "two"}\nthis is not json\n{"text": "four"}\n')
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' line 4 is not valid JSON (Expecting value at column 1); "
        "fix the line: a .jsonl file holds one JSON object per line"
    )


@pytest.mark.parametrize(
    "line,problem",
    [
        ('["a", "list"]', "line 2 is a JSON array, not an object; write one object per line with the text in 'text'"
                          " (data.text_field)"),
        ('"just a string"', "line 2 is a JSON string, not an object; write one object per line with the text in"
                            " 'text' (data.text_field)"),
        ('{"body": "x", "id": 2}', "line 2 has no 'text' field (data.text_field); its fields are ['body', 'id'];"
                                   " set data.text_field or fix the line"),
    ],
    ids=["array", "string", "missing-field"],
)
def test_jsonl_line_without_text_object_names_file_line_and_field(tmp_path, line, problem):
    bad = tmp_path / "docs.jsonl"
    bad.write_text(f'{{"text": "one"}}\n{line}\n')
    assert refused(tmp_path, [bad]) == f"data.train_files: '{bad}' {problem}"


@pytest.mark.parametrize("value,kind", [("5", "number"), ("true", "boolean"), ('{"a": "b"}', "object")])
def test_jsonl_text_field_that_is_not_a_string(tmp_path, value, kind):
    bad = tmp_path / "docs.jsonl"
    bad.write_text(json.dumps({"body": "one"}) + "\n" + f'{{"body": {value}}}\n')
    assert refused(tmp_path, [bad], "data.text_field=body") == (
        f"data.train_files: '{bad}' line 2: 'body' (data.text_field) is a {kind}, not a string; "
        "store the text as a JSON string"
    )


def test_json_array_item_without_text_field(tmp_path):
    bad = tmp_path / "docs.json"
    bad.write_text(json.dumps([{"text": "one"}, {"txt": "two"}], indent=1))
    assert refused(tmp_path, [bad]).startswith(f"data.train_files: '{bad}' array item 2 has no 'text' field")


# -- null texts -----------------------------------------------------------------------------------


def test_null_jsonl_text_names_file_and_line(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "one"}\n{"text": null}\n{"text": "three"}\n')
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' line 2: 'text' (data.text_field) is null, not a string; "
        "store the text as a JSON string (an empty one if there is none)"
    )


def test_null_json_array_text_names_the_item(tmp_path):
    bad = tmp_path / "docs.json"
    bad.write_text(json.dumps([{"text": "one"}, {"text": None}]))
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' array item 2: 'text' (data.text_field) is null, not a string; "
        "store the text as a JSON string (an empty one if there is none)"
    )


@pytest.mark.parametrize("statistics", [True, False], ids=["counted-in-footer", "no-statistics"])
def test_null_parquet_text_is_refused(tmp_path, statistics):
    bad = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["one", None, "three", None]}), bad, write_statistics=statistics)
    if statistics:
        expected = (f"data.train_files: '{bad}' column 'text' (data.text_field) is null in 2 rows; "
                    "store every text as a string (an empty one if there is none)")
    else:  # found once loaded
        expected = (f"data.text_field='text' is null in 2 rows of '{bad}' (the first is row 2); "
                    "store every text as a string (an empty one if there is none)")
    assert refused(tmp_path, [bad]) == expected


# -- compressed files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,detail", [
    ("cut.txt.gz", gzip.compress(b"some text\n" * 1000)[:-12],
     "gzip (Compressed file ended before the end-of-stream marker was reached); compress it again with gzip"),
    ("plain.jsonl.gz", b'{"text": "not compressed at all"}\n', "gzip (Not a gzipped file (b'{\"')); "),
    ("noise.csv.bz2", bytes(range(200)) * 3, "bzip2 (Invalid data stream); "),
    ("noise.txt.xz", b"not xz data" * 10, "xz (Input format not supported by decoder); "),
], ids=["truncated-gzip", "not-gzip", "bad-bzip2", "bad-xz"])
def test_file_that_cannot_be_decompressed(tmp_path, name, content, detail):
    bad = tmp_path / name
    bad.write_bytes(content)
    message = refused(tmp_path, [bad])
    assert message.startswith(f"data.train_files: '{bad}' cannot be decompressed as {detail}")
    assert message.endswith(", give it the extension of its real format, or remove it")


@pytest.mark.parametrize("content", [b"", gzip.compress(b"")], ids=["no-bytes", "nothing-compressed"])
def test_empty_compressed_file(tmp_path, content):
    bad = tmp_path / "docs.jsonl.gz"
    bad.write_bytes(content)
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' is empty; put text in it or remove it from data.train_files"
    )


@pytest.mark.parametrize("name,compress", [("latin1.txt.gz", gzip.compress), ("latin1.jsonl.xz", lzma.compress),
                                           ("latin1.csv.bz2", bz2.compress)])
def test_non_utf8_inside_a_compressed_file_names_the_line(tmp_path, name, compress):
    bad = tmp_path / name
    lines = {".txt": b"fine\n\ncaf\xe9\n", ".jsonl": b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
             ".csv": b"text\ncaf\xe9\n"}
    bad.write_bytes(compress(lines[readers.file_format(str(bad), "k")[0]]))
    line = 3 if name.startswith("latin1.txt") else 2
    assert refused(tmp_path, [bad]).startswith(f"data.train_files: '{bad}' line {line} is not valid UTF-8 (byte 0xe9)")


def test_binary_inside_a_compressed_file(tmp_path):
    bad = tmp_path / "picture.txt.gz"
    bad.write_bytes(gzip.compress(PNG))
    assert refused(tmp_path, [bad]).startswith(f"data.train_files: '{bad}' is a binary file (it holds NUL bytes)")


@pytest.mark.parametrize("name,problem", [
    ("docs.txt.zst", "is zstd-compressed, which is not read here; decompress it, or recompress it with gzip, "
                     "bzip2 or xz (.gz/.bz2/.xz)"),
    ("docs.parquet.gz", "is a compressed Parquet file; Parquet compresses its own pages, so give it uncompressed"),
    ("docs.gz", "is compressed, but its name does not say what it holds; name it after its contents, "
                "e.g. docs.txt.gz or docs.jsonl.gz"),
], ids=["zstd", "parquet-gz", "no-inner-suffix"])
def test_compressed_file_of_no_readable_kind(tmp_path, name, problem):
    bad = tmp_path / name
    bad.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(20))
    assert refused(tmp_path, [bad]) == f"data.train_files: '{bad}' {problem}"


# -- CSV --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,problem", [
    ("rows.csv", "body,id\none,1\n", "has no column 'text' (data.text_field); its header names ['body', 'id']; "
                                      "set data.text_field, or give the file a header row"),
    ("rows.csv.gz", "body,id\none,1\n", "has no column 'text' (data.text_field); its header names ['body', 'id']; "
                                         "set data.text_field, or give the file a header row"),
    ("rows.csv", "id,other,text\n1,a,one\n2,b\n3,c,three\n",
     "line 3 has 2 fields, too few to hold 'text' (data.text_field); fix the line"),
    ("rows.csv", 'id,text\n1,one\n2,"two\nlines\n3,three\n',
     'line 3: a quoted field is not closed before the end of the file; add the closing quote (a quote inside a quoted '
     'field is written twice)'),
    ("rows.csv", "text,id\n", "has a header but no rows; put text in it or remove it from data.train_files"),
    ("rows.csv", "text,id\n ,1\n,2\n", "has no non-empty 'text' (data.text_field) value; put text in it or remove it "
                                        "from data.train_files"),
], ids=["missing-column", "missing-column-gz", "short-row", "unclosed-quote", "header-only", "no-text"])
def test_bad_csv_names_file_line_and_column(tmp_path, name, content, problem):
    bad = tmp_path / name
    bad.write_bytes(gzip.compress(content.encode()) if name.endswith(".gz") else content.encode())
    assert refused(tmp_path, [bad]) == f"data.train_files: '{bad}' {problem}"


def test_csv_prompt_response_without_the_response_column(tmp_path):
    bad = tmp_path / "pairs.csv"
    bad.write_text("prompt,answer\nSay hi.,hi\n")
    assert refused(tmp_path, [bad], "data.format=prompt_response") == (
        f"data.train_files: '{bad}' has no column 'response' (data.response_field); its header names ['prompt', "
        "'answer']; set data.response_field, or give the file a header row"
    )


# -- the wrong kind of path -----------------------------------------------------------------------


def test_empty_validation_file(tmp_path):
    bad = tmp_path / "val.txt"
    bad.write_bytes(b"")
    message = refused(tmp_path, [good_text(tmp_path / "train.txt")], f"data.validation_files=[{bad}]")
    assert message == (
        f"data.validation_files: '{bad}' is empty; put text in it or remove it from data.validation_files"
    )


def test_directory_as_data_file_suggests_a_glob(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one"}\n')
    (corpus / "b.jsonl").write_text('{"text": "two"}\n')
    assert refused(tmp_path, [corpus]) == (
        f"data.train_files: '{corpus}' is a directory, not a file; "
        f"name its files with a glob such as '{corpus}/*.jsonl'"
    )


def test_unsupported_extension(tmp_path):
    bad = tmp_path / "notes.md"
    bad.write_text("# text\nhello\n")
    assert refused(tmp_path, [bad]) == (
        f"data.train_files: '{bad}' is not .txt/.jsonl/.json/.csv/.parquet (the first four also compressed as "
        ".gz/.bz2/.xz); convert it or remove it"
    )


@pytest.mark.parametrize("contents", [{}, {"config.json": '{"model_type": "llama"}'}], ids=["empty", "config-only"])
def test_tokenizer_dir_without_a_tokenizer(tmp_path, contents):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name, text in contents.items():
        (tokenizer / name).write_text(text)
    message = refused(tmp_path, [good_text(tmp_path / "train.txt")], f"data.tokenizer={tokenizer}")
    assert message == (
        f"data.tokenizer='{tokenizer}' holds no tokenizer "
        "(no tokenizer.json, tokenizer_config.json or vocabulary file); "
        "point it at a directory written by save_pretrained, or unset it to train one"
    )


def test_tokenizer_that_fails_to_load(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{not json")
    message = refused(tmp_path, [good_text(tmp_path / "train.txt")], f"data.tokenizer={tokenizer}")
    assert message.startswith(f"data.tokenizer='{tokenizer}' cannot be loaded (")
    assert message.endswith("; point it at a directory written by save_pretrained, or unset it to train one")


def test_cache_dir_that_is_a_file(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        data.prepare_data(config(tmp_path, [good_text(tmp_path / "train.txt")]), seed=0)
    assert str(err.value) == (
        f"data.cache_dir: cannot create '{cache}' (File exists); set data.cache_dir to a writable directory"
    )
    assert snapshot(tmp_path) == before | {"train.txt"}


# -- too little data --------------------------------------------------------------------------------


def test_train_data_smaller_than_one_block(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello\n\nworld")
    message = refused(tmp_path, [tiny], f"data.validation_files=[{good_text(tmp_path / 'val.txt')}]")
    assert message.startswith(f"data.train_files: the train split from '{tiny}' has ")
    assert message.endswith(" tokens, fewer than one block of data.seq_len=32; add text or lower data.seq_len")


def test_validation_data_smaller_than_one_block(tmp_path):
    tiny = tmp_path / "val.txt"
    tiny.write_text("a short validation text")
    message = refused(tmp_path, [good_text(tmp_path / "train.txt")], f"data.validation_files=[{tiny}]")
    assert message.startswith(f"data.validation_files: the validation split from '{tiny}' has ")
    assert message.endswith(" tokens, fewer than one block of data.seq_len=32; add text or lower data.seq_len")


def test_single_document_cannot_be_split_for_validation(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("one paragraph\nwithout any blank line")
    assert refused(tmp_path, [one]) == (
        f"data.train_files: '{one}' holds 1 document(s), too few to split off validation; "
        "add data.validation_files or more documents (in .txt files a blank line separates documents)"
    )


# -- repeated failures, existing caches, the good path --------------------------------------------------


def test_same_bad_file_twice_gives_the_same_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "one"}\n{oops}\n')
    first = refused(tmp_path, [bad])
    assert refused(tmp_path, [bad]) == first
    assert first.startswith(f"data.train_files: '{bad}' line 2 is not valid JSON")


def test_failure_in_an_existing_cache_leaves_only_the_earlier_build(tmp_path):
    good = good_text(tmp_path / "good.txt")
    data.prepare_data(config(tmp_path, [good]), seed=0)
    before = snapshot(tmp_path)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too\n\nlittle")
    with pytest.raises(ConfigError, match="fewer than one block"):
        data.prepare_data(config(tmp_path, [tiny], f"data.validation_files=[{good}]"), seed=0)
    assert snapshot(tmp_path) - before == {"tiny.txt"}  # no <key>.lock, .tmp-* or datasets cache of the failure


def test_good_file_builds_then_hits_the_cache(tmp_path, monkeypatch, caplog):
    cfg = config(tmp_path, [good_text(tmp_path / "train.txt")])
    with caplog.at_level(logging.INFO, logger=data.__name__):
        first = data.prepare_data(cfg, seed=0)
    assert len(first.train) > 0 and len(first.validation) > 0
    assert first.train[:]["input_ids"].shape[1] == 32
    assert not (first.cache_path / "hf_datasets").exists()  # the parsed files went with the build
    assert "waiting for another process" not in caplog.text  # nobody else was building

    def no_build(*args, **kwargs):
        raise AssertionError("cache miss: data was rebuilt")

    monkeypatch.setattr(data.cache, "_build", no_build)
    second = data.prepare_data(cfg, seed=1)
    assert second.fingerprint == first.fingerprint and second.cache_path == first.cache_path
    assert (second.train[:]["input_ids"] == first.train[:]["input_ids"]).all()


def test_waiting_for_a_build_elsewhere_is_logged_only_when_it_takes_a_while(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(data.cache, "_QUIET_WAIT_SECONDS", 0.2)
    cfg = config(tmp_path, [good_text(tmp_path / "train.txt")])
    root = data.text._cache_root(cfg)
    root.mkdir()
    # Another process's build: a flock on a descriptor of its own, released after a second.
    other = os.open(root / f"{data.cache._cache_key(cfg)[0]}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    releaser = threading.Timer(1.0, os.close, [other])
    releaser.start()
    try:
        with caplog.at_level(logging.INFO, logger=data.__name__):
            start = time.monotonic()
            data.prepare_data(cfg, seed=0)
        assert time.monotonic() - start >= 0.9
    finally:
        releaser.join()
    assert "waiting for another process to build the data cache" in caplog.text


# -- through the command line, as a user meets it ---------------------------------------------------


@pytest.mark.parametrize("content,expected", [
    (b"caf\xe9 au lait\n", "line 1 is not valid UTF-8 (byte 0xe9)"),
    (b"", "is empty; put text in it or remove it from data.train_files"),
    (PNG, "is a binary file (it holds NUL bytes), not text"),
], ids=["latin-1", "empty", "binary"])
def test_cli_refuses_bad_data_in_one_line_exit_2_before_any_worker_or_file(tmp_path, capsys, content, expected):
    from distrib.commands.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    before = snapshot(tmp_path)
    code = main(["pretrain", TINY, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.source=files", f"data.train_files=[{bad}]", *FAST, "--nproc-per-node", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"distrib: error: data.train_files: '{bad}' ") and expected in err
    assert len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before  # no run directory, no cache, no lock
