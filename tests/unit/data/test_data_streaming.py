"""Preparing text data in bounded memory: the streaming packer, and ``distrib prepare-data``.

The packer must cut exactly the blocks of the plain definition (every document's ids then eos,
back to back, cut into ``seq_len`` blocks, the short remainder dropped) whatever the size of the
pieces it streams in; tiny piece sizes force every boundary case into a few dozen tokens.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets, load_from_disk

from distrib import data
from tests.helpers import TINY


def reference_blocks(docs: list[list[int]], eos: int, seq_len: int) -> tuple[list[list[int]], int]:
    stream = [t for doc in docs for t in [*doc, eos]]
    usable = len(stream) // seq_len * seq_len
    return [stream[i : i + seq_len] for i in range(0, usable, seq_len)], len(stream)


def tokenized(docs: list[list[int]]) -> Dataset:
    return Dataset.from_dict({"input_ids": docs}, features=Features({"input_ids": List(Value("int32"))}))


AWKWARD = {
    "empty documents": [[], [1, 2], [], [], [3]],
    "a document longer than several blocks": [[1], list(range(10, 47)), [2, 3]],
    "only a long document": [list(range(5, 30))],
    "shorter than one block": [[1], [2]],
    "no documents": [],
    "exact fit": [[1, 2, 3], [4, 5, 6]],
}


@pytest.mark.parametrize("piece", [1, 3, 8, 1 << 20])
@pytest.mark.parametrize("docs_per_slice", [1, 1 << 16])
@pytest.mark.parametrize("name", list(AWKWARD))
def test_streaming_pack_equals_the_reference_for_any_piece_size(name, piece, docs_per_slice, monkeypatch, tmp_path):
    monkeypatch.setattr(data.packing, "_STREAM_CHUNK_TOKENS", piece)
    monkeypatch.setattr(data.packing, "_STREAM_CHUNK_DOCS", docs_per_slice)
    docs = AWKWARD[name]
    expected, expected_tokens = reference_blocks(docs, eos=0, seq_len=4)
    for path in (None, tmp_path / "blocks.arrow"):
        blocks, num_tokens = data.packing._pack(tokenized(docs), eos_id=0, seq_len=4, path=path)
        assert [list(b) for b in blocks["input_ids"]] == expected
        assert num_tokens == expected_tokens
        assert blocks.features["input_ids"].feature.dtype == "int32"


def test_streaming_pack_equals_the_reference_on_random_documents(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.choice([0, 1, 3, 7, 30, 200], size=300)
    docs = [rng.integers(1, 1000, size=int(n)).tolist() for n in lengths]
    expected, expected_tokens = reference_blocks(docs, eos=0, seq_len=16)
    monkeypatch.setattr(data.packing, "_STREAM_CHUNK_TOKENS", 37)  # piece boundaries inside blocks and documents
    monkeypatch.setattr(data.packing, "_STREAM_CHUNK_DOCS", 11)
    # Several Arrow chunks, as map writes them, and a sliced column (offsets not starting at 0).
    chunked = concatenate_datasets([tokenized(docs[:100]), tokenized(docs[100:250]), tokenized(docs[250:])])
    for ds in (chunked, tokenized([[9, 9]] + docs).select(range(1, len(docs) + 1))):
        blocks, num_tokens = data.packing._pack(ds, eos_id=0, seq_len=16, path=tmp_path / "blocks.arrow")
        assert [list(b) for b in blocks["input_ids"]] == expected
        assert num_tokens == expected_tokens


# -- distrib prepare-data ------------------------------------------------------------------------


def test_prepare_data_builds_the_cache_training_finds(tmp_path, capsys):
    from distrib.commands.cli import main
    from distrib.config import load_config

    paragraphs = [" ".join(f"word{(i * 7 + j) % 23}" for j in range(12 + i % 5)) for i in range(40)]
    (tmp_path / "train.txt").write_text("\n\n".join(paragraphs))
    args = [TINY, "data.source=files", f"data.train_files=[{tmp_path / 'train.txt'}]",
            f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "data.vocab_size=300", "data.num_proc=2"]
    assert main(["prepare-data", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    prepared = data.prepare_data(load_config(args[0], args[1:]).data, seed=0)  # what a training run loads
    assert lines[0] == str(prepared.cache_path)
    assert lines[1].startswith(f"train: {len(prepared.train)} blocks of 16 tokens (")
    assert lines[2].startswith(f"validation: {len(prepared.validation)} blocks of 16 tokens (")


def test_prepare_data_refuses_a_bad_key_in_one_line(tmp_path, capsys):
    from distrib.commands.cli import main

    assert main(["prepare-data", TINY, f"data.cache_dir={tmp_path}", "data.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distrib: error:") and "data.no_such_key" in err[0]
    assert not any(tmp_path.iterdir())


# -- resident pages of memory-mapped files ---------------------------------------------------------


def _resident_kib(path) -> int:
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == str(path):
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps")
def test_reading_blocks_does_not_keep_the_file_resident(tmp_path, monkeypatch):
    rows = np.arange(4096 * 1024, dtype=np.int32).reshape(-1, 1024)  # 16 MiB of blocks
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "blocks"))
    blocks = load_from_disk(str(tmp_path / "blocks")).with_format("numpy")
    (path,) = [os.path.realpath(f) for f in data.pages._mapped_files(blocks)]
    assert blocks[:]["input_ids"].sum() == rows.sum()  # a whole pass: every page read
    assert _resident_kib(path) > 8 << 10
    monkeypatch.setattr(data.sampler, "_RELEASE_EVERY_BATCHES", 4)
    monkeypatch.setattr(data.sampler, "_collated", 0)  # the 4th call releases
    batches = [data.collate(blocks, range(i, 4096, 512)) for i in range(4)]
    assert _resident_kib(path) < 2 << 10  # released, and the data still reads right
    assert all(torch.equal(b["input_ids"], torch.as_tensor(rows[i::512], dtype=torch.long)) for i, b in enumerate(batches))


def test_saved_blocks_are_the_packed_blocks_in_batches_of_1000_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(data.packing, "_STREAM_CHUNK_TOKENS", 997)  # many small record batches in the packed file
    docs = [list(range(1, 1 + n % 50)) for n in range(3000)]
    packed, _ = data.packing._pack(tokenized(docs), eos_id=0, seq_len=8, path=tmp_path / "packed.arrow")
    expected = packed[:]["input_ids"]
    data.cache._save_blocks(packed, tmp_path / "train")
    saved = load_from_disk(str(tmp_path / "train"))
    assert saved.features == packed.features and saved[:]["input_ids"] == expected
    sizes = [b.num_rows for b in saved.data.to_batches()]
    assert sizes[:-1] == [1000] * (len(sizes) - 1) and 0 < sizes[-1] <= 1000  # as save_to_disk writes them
