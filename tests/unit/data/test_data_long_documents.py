"""A long document (a corpus that is one line of many megabytes) is tokenized in pieces: in memory like
the same text in many documents, and into exactly the tokens of the whole document.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from distrib import data
from distrib.config import DataConfig
from tests.conftest import ROOT


def long_text(chars: int, seed: int = 0) -> str:
    """Words of varied kinds joined by varied whitespace: runs of spaces, tabs, newlines, blank lines."""
    rng = random.Random(seed)
    words = ["the", "tokenizer", "fn(x)", "x+1", "2024", "l'été", "naïve", "über", "日本語", "—", "'s", "...",
             "def", "return", "0x1F", "end."]
    gaps = [" "] * 20 + ["  ", "\t", "\n", "\n\n", " \n ", "   \t", ""]
    out, size = [], 0
    while size < chars:
        piece = rng.choice(words) + rng.choice(gaps)
        out.append(piece)
        size += len(piece)
    return "".join(out)[:chars]


def test_pieces_cut_after_text_at_whitespace_and_join_back():
    text = long_text(200_000) + "x" * 5000 + long_text(3000, seed=1)  # a run with no whitespace at all
    pieces = list(data.tokenizer._pieces(text, 1000))
    assert "".join(pieces) == text
    assert all(500 < len(p) <= 1000 for p in pieces[:-1])
    hard = 0
    for before, after in zip(pieces, pieces[1:]):
        if after[0] in " \t\n" and not before[-1].isspace():
            continue
        hard += 1
        assert "x" * 500 in before + after[:1]  # a hard cut only where no whitespace follows text
    assert 1 <= hard <= 6
    assert list(data.tokenizer._pieces("short", 1000)) == ["short"] and list(data.tokenizer._pieces("", 10)) == [""]


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_or_train_tokenizer(DataConfig(vocab_size=400), [long_text(300_000, seed=2)])


def test_a_document_in_pieces_has_the_ids_of_the_whole(tokenizer, monkeypatch):
    text = long_text(2_000_000)  # 2 MB; some 1,000 pieces of at most 2,048 characters
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(data.tokenizer, "_TOKENIZE_CHARS", 2048)
    texts = ["a short one", text, "", "another short one"]
    ids = data.tokenizer._token_ids(texts, tokenizer)
    assert ids.to_pylist()[1] == whole
    assert ids.to_pylist()[0] == tokenizer("a short one", add_special_tokens=False)["input_ids"]
    assert ids.to_pylist()[2] == []


def test_tokenizer_trained_on_pieces_is_the_one_trained_on_the_whole(monkeypatch):
    text = long_text(1_000_000, seed=3)
    cfg = DataConfig(vocab_size=400)
    monkeypatch.setattr(data.tokenizer, "_TOKENIZE_CHARS", 1 << 30)
    whole = data.load_or_train_tokenizer(cfg, [text]).get_vocab()
    monkeypatch.setattr(data.tokenizer, "_TOKENIZE_CHARS", 4096)
    assert data.load_or_train_tokenizer(cfg, [text]).get_vocab() == whole


def test_prepared_blocks_of_a_one_line_corpus_are_its_whole_tokenization(tmp_path, monkeypatch):
    text = long_text(2_000_000, seed=4).replace("\n", " ")  # one line, one document
    (tmp_path / "one-line.txt").write_text(text)
    (tmp_path / "val.txt").write_text(long_text(20_000, seed=5))
    monkeypatch.setattr(data.tokenizer, "_TOKENIZE_CHARS", 1 << 14)  # some 120 pieces
    cfg = DataConfig(source="files", train_files=[str(tmp_path / "one-line.txt")],
                     validation_files=[str(tmp_path / "val.txt")], vocab_size=400, seq_len=128,
                     cache_dir=str(tmp_path / "cache"), num_proc=1)
    prepared = data.prepare_data(cfg, seed=0)
    stream = prepared.tokenizer(text, add_special_tokens=False)["input_ids"] + [prepared.tokenizer.eos_token_id]
    usable = len(stream) // 128 * 128
    assert np.array_equal(prepared.train[:]["input_ids"], np.array(stream[:usable]).reshape(-1, 128))


PEAK = """
import sys
from distrib.config import DataConfig
from distrib.data import prepare_data
cfg = DataConfig(source="files", train_files=[sys.argv[1]], validation_files=[sys.argv[2]], vocab_size=300,
                 seq_len=64, cache_dir=sys.argv[3], num_proc=1)
prepare_data(cfg, seed=0)
print([int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def _peak_preparing(train, validation, cache) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK, str(train), str(validation), str(cache)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_one_line_corpus_prepares_in_about_the_memory_of_many_paragraphs(tmp_path):
    # Words of random letters: some 0.5 tokens a character for a small vocabulary, and a tokenizer's
    # memory goes with the tokens of what it is given at once.
    rng = random.Random(6)
    vocabulary = ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(1, 9))) for _ in range(3000)]
    words = rng.choices(vocabulary, k=340_000)
    (tmp_path / "line.txt").write_text(" ".join(words))  # 2 MB in one line: one document
    (tmp_path / "paragraphs.txt").write_text(  # the same words in some 25,000 documents
        "\n\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)))
    (tmp_path / "val.txt").write_text(" ".join(words[:5000]))
    many = _peak_preparing(tmp_path / "paragraphs.txt", tmp_path / "val.txt", tmp_path / "cache-many")
    one = _peak_preparing(tmp_path / "line.txt", tmp_path / "val.txt", tmp_path / "cache-one")
    # Tokenized whole, the line took some 200 bytes of memory per byte: 2.2 times the peak of the paragraphs here.
    assert one < 1.5 * many, (one >> 20, many >> 20)
