"""Tests for distrib.data: corpus, tokenizer, packing, cache, sampler.

Small settings (200 documents, 512-token vocabulary, 64-token blocks, a temporary cache) keep
each build to a couple of seconds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from distrib import data
from distrib.config import ConfigError, DataConfig

SMALL = dict(max_documents=200, vocab_size=512, seq_len=64)


def small_cfg(cache_dir, **overrides) -> DataConfig:
    return DataConfig(**{**SMALL, "cache_dir": str(cache_dir), **overrides})


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[DataConfig, data.PreparedData]:
    """One small build shared by the tests that only read it (num_proc is unused at this size)."""
    cfg = small_cfg(tmp_path_factory.mktemp("cache"))
    return cfg, data.prepare_data(cfg, seed=0)


@pytest.fixture(scope="module")
def prepared(small) -> data.PreparedData:
    return small[1]


def _compiles(text: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in prose are not the point
        try:
            compile(text, "<doc>", "exec")
            return True
        except (SyntaxError, ValueError):
            return False


# -- built-in corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_builtin_corpus_is_nonempty_and_deterministic(domain):
    first, second = data.builtin_corpus(domain), data.builtin_corpus(domain)
    assert first == second
    assert len(first["train"]) > 100
    assert len(first["validation"]) >= 4
    assert all(doc.strip() for doc in first["train"] + first["validation"])


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_builtin_corpus_train_and_validation_are_disjoint(domain):
    corpus = data.builtin_corpus(domain)
    assert not set(corpus["train"]) & set(corpus["validation"])


def test_builtin_validation_fraction_controls_held_out_share():
    small, large = data.builtin_corpus("code", 0.02), data.builtin_corpus("code", 0.2)
    assert len(large["validation"]) > 3 * len(small["validation"])
    # Hash-based membership: a document held out at 2% is also held out at 20%.
    assert set(small["validation"]) <= set(large["validation"])


def test_builtin_code_and_prose_are_distinct_domains():
    code, prose = data.builtin_corpus("code"), data.builtin_corpus("prose")
    code_docs, prose_docs = code["train"][::10], prose["train"][::10]
    assert not set(code["train"]) & set(prose["train"])
    assert sum(map(_compiles, code_docs)) / len(code_docs) > 0.95
    assert sum(map(_compiles, prose_docs)) / len(prose_docs) < 0.1


def test_builtin_code_excludes_tests_and_site_packages():
    # Test suites are recognisable by their unittest imports; the library itself rarely has them.
    code = data.builtin_corpus("code")
    docs = code["train"] + code["validation"]
    assert sum("import unittest" in d for d in docs) < 10
    assert len(docs) < 2000  # site-packages would add thousands of files


# -- tokenizer ---------------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_through_save_pretrained(tmp_path):
    texts = data.builtin_corpus("code")["train"][:50]
    tokenizer = data.load_or_train_tokenizer(DataConfig(vocab_size=512), texts)
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == data.EOT
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = "def f(x):\n    return {'a': x ** 2}  # ünïcode ☃\n\n\tpass\n"
    assert reloaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    for text in [sample, *texts[:5]]:
        assert reloaded.decode(reloaded(text)["input_ids"]) == text


def test_tokenizer_training_is_deterministic():
    texts = data.builtin_corpus("prose")["train"][:100]
    cfg = DataConfig(vocab_size=400)
    first = data.load_or_train_tokenizer(cfg, texts)
    second = data.load_or_train_tokenizer(cfg, iter(texts))
    assert first.get_vocab() == second.get_vocab()


def test_missing_tokenizer_dir_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        data.load_or_train_tokenizer(DataConfig(tokenizer=str(tmp_path / "absent")), [])


# -- packing -----------------------------------------------------------------------------------


def test_pack_appends_eos_after_each_document_and_drops_the_remainder():
    tokenized = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [], [5, 6, 7, 8, 9]]})
    blocks, num_tokens = data.packing._pack(tokenized, eos_id=0, seq_len=4)
    # stream: 1 2 3 0 | 4 0 0 5 | 6 7 8 9 | 0  -> the last, partial block is dropped
    assert num_tokens == 13
    assert blocks["input_ids"] == [[1, 2, 3, 0], [4, 0, 0, 5], [6, 7, 8, 9]]


def test_packing_yields_full_blocks_independent_of_num_proc(tmp_path, monkeypatch):
    monkeypatch.setattr(data.team, "_MIN_DOCS_PER_PROC", 1)  # let a small corpus use 2 workers
    cfg = small_cfg(tmp_path, max_documents=50)
    one = data.prepare_data(cfg.model_copy(update={"num_proc": 1, "cache_dir": str(tmp_path / "a")}), seed=0)
    two = data.prepare_data(cfg.model_copy(update={"num_proc": 2, "cache_dir": str(tmp_path / "b")}), seed=0)
    for split in ("train", "validation"):
        a, b = getattr(one, split)[:]["input_ids"], getattr(two, split)[:]["input_ids"]
        assert a.shape == (len(getattr(one, split)), 64)
        assert np.array_equal(a, b)
    assert one.fingerprint == two.fingerprint  # num_proc does not define the data


def test_packed_blocks_decode_to_corpus_text(prepared):
    eos = prepared.tokenizer.eos_token_id
    blocks = prepared.train[:]["input_ids"]
    assert prepared.train.features["input_ids"].feature.dtype == "int32"  # half the disk of int64
    assert (blocks == eos).any()  # documents are separated
    first_doc = data.builtin_corpus("code")["train"][0]
    head = prepared.tokenizer.decode(prepared.train[0]["input_ids"])
    assert first_doc.startswith(head.split(data.EOT)[0])


def test_empty_validation_raises_config_error(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n".join(f"paragraph number {i} of the text" for i in range(400)))
    (tmp_path / "val.txt").write_text("tiny")
    cfg = DataConfig(
        source="files",
        train_files=[str(tmp_path / "train.txt")],
        validation_files=[str(tmp_path / "val.txt")],
        vocab_size=300,
        seq_len=64,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(ConfigError, match=r"^data.validation_files: .*val.txt.* data.seq_len=64; add text or lower"):
        data.prepare_data(cfg, seed=0)
    assert not (tmp_path / "cache").exists()  # a failed build leaves no cache root, lock or datasets cache


@pytest.mark.parametrize(
    "overrides,split,start,fix",
    [
        ({}, "train", "data.seq_len=64: the train split of data.name='code'", "; lower data.seq_len"),
        ({"max_documents": 5}, "train", "data.seq_len=64: ", "; lower data.seq_len or raise data.max_documents"),
        ({}, "validation", "data.validation_fraction=0.02: the validation split held out of the train data",
         "; raise data.validation_fraction or lower data.seq_len"),
        ({"source": "files", "train_files": ["a.txt"]}, "validation", "data.validation_fraction=0.02: ",
         "; raise data.validation_fraction, set data.validation_files or lower data.seq_len"),
        ({"source": "files", "train_files": ["a.txt", "b.txt", "c.txt", "d.txt"], "max_documents": 9}, "train",
         "data.train_files: the train split from 'a.txt', 'b.txt', 'c.txt' and 1 more",
         "; add text, raise data.max_documents or lower data.seq_len"),
    ],
)
def test_too_little_data_message_names_the_key_to_change(overrides, split, start, fix):
    message = data.cache._too_little_data(DataConfig(seq_len=64, **overrides), split, 40)
    assert message.startswith(start) and message.endswith(fix)
    assert "has 40 tokens, fewer than one block of data.seq_len=64" in message


# -- cache -------------------------------------------------------------------------------------


def test_cache_hit_returns_same_data_without_rebuilding(small, monkeypatch):
    cfg, first = small
    built_at = (first.cache_path / "meta.json").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("cache miss: data was rebuilt")

    monkeypatch.setattr(data.cache, "_build", no_build)
    second = data.prepare_data(cfg, seed=1)  # the data does not depend on the seed
    assert second.fingerprint == first.fingerprint
    assert second.cache_path == first.cache_path
    assert (second.cache_path / "meta.json").stat().st_mtime_ns == built_at
    assert np.array_equal(second.train[:]["input_ids"], first.train[:]["input_ids"])
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()


def test_cache_key_changes_with_data_defining_fields(tmp_path):
    base = small_cfg(tmp_path)
    key = data.cache._cache_key(base)[0]
    assert data.cache._cache_key(base.model_copy(update={"seq_len": 128}))[0] != key
    assert data.cache._cache_key(base.model_copy(update={"name": "prose"}))[0] != key
    assert data.cache._cache_key(base.model_copy(update={"num_proc": 7, "cache_dir": "/elsewhere"}))[0] == key


def test_cache_key_follows_file_contents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    cfg = DataConfig(source="files", train_files=[str(path)])
    before = data.cache._cache_key(cfg)[0]
    path.write_text("one two")
    assert data.cache._cache_key(cfg)[0] != before


def _prepare_in_subprocess(cache_dir, counter, barrier, results):
    """Child process: count builds, start together with the sibling, report what it loaded."""
    build = data.cache._build

    def counting_build(*args, **kwargs):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        build(*args, **kwargs)

    data.cache._build = counting_build
    barrier.wait()
    prepared = data.prepare_data(small_cfg(cache_dir, max_documents=20, vocab_size=300), seed=0)
    results.put((prepared.fingerprint, len(prepared.train), int(prepared.train[:]["input_ids"].sum())))


def test_concurrent_prepare_from_two_processes_builds_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    counter, barrier, results = tmp_path / "builds.txt", ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_prepare_in_subprocess, args=(str(tmp_path / "cache"), str(counter), barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(counter.read_text().split()) == 1
    assert outcomes[0] == outcomes[1]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


# -- files source ------------------------------------------------------------------------------


def _write_files(tmp_path):
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(120):
            f.write(json.dumps({"body": f"json document {i}: " + "words and more words " * 8, "id": i}) + "\n")
        f.write(json.dumps({"body": "   ", "id": -1}) + "\n")  # empty documents are dropped
    (tmp_path / "notes.txt").write_text(
        "\n\n".join(f"Text paragraph {i}.\nIt has a second line." for i in range(80)), encoding="utf-8"
    )


def test_files_source_reads_jsonl_and_txt(tmp_path):
    _write_files(tmp_path)
    cfg = DataConfig(
        source="files",
        train_files=[str(tmp_path / "*.jsonl"), str(tmp_path / "notes.txt")],
        text_field="body",
        cache_dir=str(tmp_path / "cache"),
    )
    texts = data.load_text(cfg)
    assert texts["train"].column_names == ["text"]
    every = texts["train"][:]["text"] + texts["validation"][:]["text"]
    assert len(every) == 200  # 120 json rows + 80 paragraphs; the blank row is gone
    assert "Text paragraph 3.\nIt has a second line." in every  # a paragraph keeps its line breaks
    assert 1 <= len(texts["validation"]) < 10
    assert data.load_text(cfg)["validation"][:]["text"] == texts["validation"][:]["text"]  # deterministic split


def test_files_source_with_validation_files_and_max_documents(tmp_path):
    _write_files(tmp_path)
    cfg = DataConfig(
        source="files",
        train_files=[str(tmp_path / "docs.jsonl")],
        validation_files=[str(tmp_path / "notes.txt")],
        text_field="body",
        max_documents=50,
        vocab_size=300,
        seq_len=32,
        cache_dir=str(tmp_path / "cache"),
    )
    texts = data.load_text(cfg)
    assert len(texts["train"]) == 50 and texts["train"][0]["text"].startswith("json document 0:")
    assert len(texts["validation"]) == 80
    prepared = data.prepare_data(cfg, seed=0)
    assert prepared.train[:]["input_ids"].shape[1] == 32 and len(prepared.validation) > 0


@pytest.mark.parametrize("pattern", ["missing.txt", "*.nomatch.jsonl"])
def test_missing_train_file_raises_config_error(tmp_path, pattern):
    path = str(tmp_path / pattern)
    cfg = DataConfig(source="files", train_files=[path], cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.train_files") as err:
        data.load_text(cfg)
    assert path in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.train_files"):
        data.prepare_data(cfg, seed=0)


def test_missing_text_field_raises_config_error(tmp_path):
    _write_files(tmp_path)
    cfg = DataConfig(source="files", train_files=[str(tmp_path / "docs.jsonl")], cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.text_field"):
        data.load_text(cfg)


# -- sampler -----------------------------------------------------------------------------------


def _step_samples(num_samples, global_batch, micro_batch, dp_size, step, seed=0):
    """Every dataset index read at ``step`` over all ranks and micro-steps, in global position order."""
    chunks = {}
    for rank in range(dp_size):
        sampler = data.GlobalBatchSampler(num_samples, global_batch, micro_batch, dp_size, rank, seed)
        for micro_step, indices in enumerate(sampler.micro_batches(step)):
            chunks[micro_step * dp_size + rank] = indices  # the layout the sampler documents
    return [int(i) for k in sorted(chunks) for i in chunks[k]]


def test_sampler_union_over_ranks_and_microsteps_is_the_steps_positions():
    num_samples, global_batch = 100, 16
    for step in (0, 3, 6, 7):  # step 6 straddles the first epoch boundary
        samplers = [data.GlobalBatchSampler(num_samples, global_batch, 2, 4, r, seed=5) for r in range(4)]
        assert all(s.accum_steps == 2 and all(len(mb) == 2 for mb in s.micro_batches(step)) for s in samplers)
        read = _step_samples(num_samples, global_batch, 2, 4, step, seed=5)
        assert read == [samplers[0].dataset_index(p) for p in samplers[0].positions(step)]
        assert samplers[0].positions(step) == range(step * 16, step * 16 + 16)


def test_sampler_dp2_and_dp1_cover_the_same_samples_per_step():
    for step in range(10):
        dp1 = _step_samples(50, 8, 2, 1, step)
        assert set(_step_samples(50, 8, 2, 2, step)) == set(dp1)
        assert _step_samples(50, 8, 4, 2, step) == _step_samples(50, 8, 1, 4, step) == dp1  # same order, too


def test_sampler_epochs_are_permutations_that_differ():
    sampler = data.GlobalBatchSampler(30, 6, 3, 2, 0, seed=1)
    epoch0 = [sampler.dataset_index(p) for p in range(30)]
    epoch1 = [sampler.dataset_index(p) for p in range(30, 60)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(30))
    assert epoch0 != epoch1
    other_seed = data.GlobalBatchSampler(30, 6, 3, 2, 0, seed=2)
    assert epoch0 != [other_seed.dataset_index(p) for p in range(30)]


def test_sampler_resume_with_another_dp_size_neither_repeats_nor_skips_across_an_epoch():
    num_samples, global_batch, stop, total = 40, 12, 2, 6  # 72 samples: epoch 0, then 32 of epoch 1
    before = [i for step in range(stop) for i in _step_samples(num_samples, global_batch, 2, 2, step)]
    after = [i for step in range(stop, total) for i in _step_samples(num_samples, global_batch, 3, 4, step)]
    uninterrupted = [i for step in range(total) for i in _step_samples(num_samples, global_batch, 2, 2, step)]
    seen = before + after
    assert seen == uninterrupted
    assert sorted(seen[:num_samples]) == list(range(num_samples))  # epoch 0: each sample exactly once
    assert len(set(seen[num_samples:])) == len(seen) - num_samples  # epoch 1: no repeats so far


def test_sampler_rejects_indivisible_global_batch():
    with pytest.raises(ValueError, match="global_batch"):
        data.GlobalBatchSampler(100, 10, 4, 2, 0, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        data.GlobalBatchSampler(100, 8, 2, 2, 2, seed=0)


def test_collate_returns_long_input_ids(prepared):
    sampler = data.GlobalBatchSampler(len(prepared.train), 8, 2, 2, 1, seed=0)
    indices = sampler.micro_batches(0)[1]
    batch = data.collate(prepared.train, indices)
    assert set(batch) == {"input_ids"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 64)
    assert torch.equal(batch["input_ids"][0], torch.as_tensor(prepared.train[int(indices[0])]["input_ids"]).long())
