"""Which files ``data.train_files`` names, and the formats they may have: each file read once however many
links and globs lead to it, ``.txt`` paragraphs as ``datasets`` makes them, CSV and compressed files.

The bad inputs of these formats are refused in ``tests/unit/data/test_bad_data.py``.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from distrib import data
from distrib.data import readers
from distrib.config import DataConfig, load_config
from tests.conftest import ROOT

TINY = str(ROOT / "configs/pretrain/tiny.yaml")

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def paragraphs(path, count: int, tag: str = "Paragraph"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(f"{tag} {i} holds a few plain words." for i in range(count)))
    return path


def files_cfg(tmp_path, train: list, validation: list | None = None, **overrides) -> DataConfig:
    """Files data whose validation comes from its own file, so that ``train`` holds every train document."""
    validation = validation or [paragraphs(tmp_path / "held" / "val.txt", 20, "Held")]
    return DataConfig(source="files", train_files=[str(p) for p in train],
                      validation_files=[str(p) for p in validation], cache_dir=str(tmp_path / "cache"), vocab_size=300,
                      seq_len=32, **overrides)


def train_texts(cfg: DataConfig) -> list[str]:
    return data.load_text(cfg)["train"]["text"]


# -- each file once ---------------------------------------------------------------------------------


def test_recursive_glob_over_a_symlink_loop_reads_the_file_once(tmp_path):
    corpus = tmp_path / "corpus"
    paragraphs(corpus / "good.txt", 30)
    os.symlink(".", corpus / "loop")  # corpus/loop/loop/.../good.txt: glob.glob found the file 41 times
    texts = train_texts(files_cfg(tmp_path, [corpus / "**" / "*.txt"]))
    assert len(texts) == 30 and len(set(texts)) == 30
    assert readers.expand([str(corpus / "**" / "*.txt")], "data.train_files") == [str(corpus / "good.txt")]


def test_two_loops_do_not_multiply_the_walk(tmp_path):
    # Two links back up at every level: glob.glob(recursive=True) walks 2**40 paths before giving up.
    corpus = tmp_path / "corpus"
    paragraphs(corpus / "sub" / "good.txt", 30)
    os.symlink("..", corpus / "sub" / "up")
    os.symlink(".", corpus / "self")
    script = ("import sys; from distrib import data; from distrib.config import DataConfig; "
              "cfg = DataConfig(source='files', train_files=[sys.argv[1]], validation_files=[sys.argv[2]], "
              "cache_dir=sys.argv[3]); print(len(data.load_text(cfg)['train']))")
    out = subprocess.run([sys.executable, "-c", script, str(corpus / "**" / "*.txt"),
                          str(paragraphs(tmp_path / "val.txt", 10)), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "30"


def test_files_are_told_apart_by_path_not_content(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    paragraphs(corpus / "a.txt", 25)
    paragraphs(corpus / "b.txt", 25)  # the same text in another file: both are read
    os.symlink("a.txt", corpus / "c.txt")  # a.txt again: read once
    texts = train_texts(files_cfg(tmp_path, [corpus / "a.txt", corpus / "*.txt"]))
    assert len(texts) == 50 and len(set(texts)) == 25
    assert readers.expand([str(corpus / "a.txt"), str(corpus / "*.txt")], "k") == [str(corpus / "a.txt"),
                                                                                   str(corpus / "b.txt")]
    assert "2 matches are files matched before" in caplog.text


def test_recursive_glob_matches_as_glob_does_without_loops(tmp_path):
    root = tmp_path / "tree"
    for name in ["top.txt", "a/one.txt", "a/b/two.txt", "a/b/skip.md", ".hidden/three.txt", "c/.four.txt"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    os.symlink(root / "a" / "b", root / "linked")  # another way into a/b: its files are matched once
    for pattern in ["**/*.txt", "a/**/*.txt", "**/b/*.txt", "*/**", "**", "a/*/*.txt"]:
        expected = [p for p in glob.glob(str(root / pattern), recursive=True) if os.path.isfile(p)]
        got = readers._glob(str(root / pattern))
        assert {os.path.realpath(p) for p in got} == {os.path.realpath(p) for p in expected}, pattern
        assert len({os.path.realpath(p) for p in got}) == len(got), pattern  # a/b entered once
    os.chdir(root)  # a relative pattern gives relative paths, as glob does
    assert readers._glob("**/*.txt") == ["a/b/two.txt", "a/one.txt", "top.txt"]


def test_directory_entry_suggests_a_glob_reaching_its_files(tmp_path):
    nested = tmp_path / "nested"
    for name in ["2024/a.jsonl.gz", "2024/b.jsonl.gz", "2025/c.jsonl.gz", "2025/notes.md"]:
        (nested / name).parent.mkdir(parents=True, exist_ok=True)
        (nested / name).write_bytes(b"")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "rows.csv").write_text("text\nx\n")
    assert readers._glob_hint(str(nested)) == f"{nested}/**/*.jsonl.gz"
    assert readers._glob_hint(str(flat)) == f"{flat}/*.csv"
    assert readers._glob_hint(str(tmp_path / "flat" / "..")).endswith("/**/*.jsonl.gz")


def test_config_check_accepts_a_recursive_glob_and_a_home_path(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    paragraphs(corpus / "good.txt", 30)
    monkeypatch.setenv("HOME", str(tmp_path))
    for pattern in [f"{corpus}/**/*.txt", "~/corpus/*.txt", "~/corpus/good.txt"]:  # both were "matches no file"
        overrides = [f"output_dir={tmp_path / 'run'}", "data.source=files", f"data.train_files=[{pattern}]"]
        load_config(TINY, overrides).check_paths()
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", "data.source=files", "data.train_files=[~/nope/*.txt]"])
    with pytest.raises(ValueError, match=f"data.train_files: '{tmp_path}/nope/\\*.txt' matches no file"):
        cfg.check_paths()


# -- .txt paragraphs -------------------------------------------------------------------------------


def test_paragraphs_are_those_of_the_datasets_text_loader_for_any_chunk_size(tmp_path, monkeypatch):
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\n", "\r", "\r\n", "é", "\n\n"]
    path = tmp_path / "p.txt"
    for trial in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        path.write_bytes(text.encode())
        expected = [p for p in open(path, encoding="utf-8").read().split("\n\n") if p]
        if trial < 10:  # what load_text read .txt files with before
            loaded = load_dataset("text", data_files=str(path), split="train", sample_by="paragraph",
                                  cache_dir=str(tmp_path / "hf"))
            assert loaded["text"] == expected, text
        for chunk in (1, 2, 3, 7, 1 << 20):
            monkeypatch.setattr(readers, "_READ_CHUNK", chunk)
            assert list(readers._paragraphs(str(path))) == expected, (text, chunk)


# -- CSV and compressed files ----------------------------------------------------------------------


def test_csv_rows_are_documents_with_every_cell_read_as_text(tmp_path):
    table = tmp_path / "table.csv"
    table.write_text('id,body,other\r\n1,first text,x\r\n2,NA,y\r\n3,,z\r\n4,"multi\nline, with a comma",w\r\n'
                     '5,None,v\r\n6,123,u\r\n\r\n7,"say ""hi""",t\r\n')
    texts = train_texts(files_cfg(tmp_path, [table], text_field="body"))
    # NA, None and 123 are texts (pandas' default would make the first two missing and the column numbers);
    # the empty cell is an empty document, dropped like an empty string.
    assert texts == ["first text", "NA", "multi\nline, with a comma", "None", "123", 'say "hi"']


def test_csv_prompt_response_columns_in_any_order(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text('answer,question,id\n"def f():\n    return 1\n",Write f.,1\n,Say nothing.,2\n')
    cfg = files_cfg(tmp_path, [table], [table], format="prompt_response", prompt_field="question",
                    response_field="answer")
    rows = data.load_text(cfg)["train"]
    assert rows.column_names == ["prompt", "response"]
    assert rows[:] == {"prompt": ["Write f.", "Say nothing."], "response": ["def f():\n    return 1\n", ""]}


def _write(path, raw: bytes):
    suffix = path.suffix if path.suffix in COMPRESS else ""
    path.write_bytes(COMPRESS[suffix](raw) if suffix else raw)
    return path


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz"])
def test_compressed_files_read_as_their_plain_selves(tmp_path, compression):
    jsonl = "".join(json.dumps({"text": f"json row {i}"}) + "\n" for i in range(40)).encode()
    array = json.dumps([{"text": f"array item {i}"} for i in range(30)]).encode()
    csv_text = ("text\n" + "".join(f"csv row {i}\n" for i in range(20))).encode()
    txt = "\n\n".join(f"paragraph {i}" for i in range(10)).encode()
    contents = {"a.jsonl": jsonl, "b.json": array, "c.csv": csv_text, "d.txt": txt}
    (tmp_path / "plain").mkdir()
    (tmp_path / "packed").mkdir()
    plain = [_write(tmp_path / "plain" / name, raw) for name, raw in contents.items()]
    packed = [_write(tmp_path / "packed" / (name + compression), raw) for name, raw in contents.items()]
    expected = train_texts(files_cfg(tmp_path, plain))
    assert len(expected) == 100
    assert train_texts(files_cfg(tmp_path, packed)) == expected
    assert readers.expand([str(tmp_path / "packed" / "*")], "data.train_files") == [str(p) for p in packed]


def test_cache_key_tells_a_compressed_file_from_its_plain_self(tmp_path):
    plain = paragraphs(tmp_path / "a.txt", 5)
    packed = _write(tmp_path / "a.txt.gz", plain.read_bytes())
    keys = {data.cache._cache_key(files_cfg(tmp_path, [p]))[0] for p in (plain, packed)}
    assert len(keys) == 2


def test_parquet_still_reads(tmp_path):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(12)], "n": list(range(12))}), table)
    assert train_texts(files_cfg(tmp_path, [table])) == [f"parquet row {i}" for i in range(12)]
