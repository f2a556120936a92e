"""``data.source=hub`` streams: documents in order, ``max_documents`` stops the read, a hash-held-out
validation split, bounded memory, and one-line errors.

``datasets`` reads a local directory as it reads a Hub repository (``train.jsonl``/``validation.jsonl``,
or ``data/train-00000-of-00002.parquet``...), so every test runs offline on such directories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import IterableDataset, IterableDatasetDict

import distrib.data.hub as hub
from distrib import data
from distrib.config import ConfigError, DataConfig

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network, whatever the environment said when ``datasets`` was imported."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def cfg(name: Path | str, tmp_path: Path, **overrides) -> DataConfig:
    return DataConfig(source="hub", name=str(name), cache_dir=str(tmp_path / "cache"), **overrides)


def texts(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix} {i} " + " ".join(f"w{(i * 7 + j) % 31}" for j in range(5 + i % 4)) for i in range(n)]


def load(config: DataConfig, tmp_path: Path, cache: str = "hf") -> tuple[list, list]:
    loaded = data.load_text(config, hf_cache=tmp_path / cache)
    columns = loaded["train"].column_names
    rows = {split: loaded[split].to_list() if columns != ["text"] else loaded[split]["text"] for split in loaded}
    return list(rows["train"]), list(rows["validation"])


# -- documents ----------------------------------------------------------------------------------


def test_jsonl_splits_come_in_order_without_empty_documents(tmp_path):
    train = texts(30)
    rows = [{"text": t, "id": i} for i, t in enumerate(train)]
    rows[3:3] = [{"text": "", "id": -1}, {"text": "  \n ", "id": -2}, {"text": None, "id": -3}]
    write_jsonl(tmp_path / "repo/train.jsonl", rows)
    write_jsonl(tmp_path / "repo/validation.jsonl", [{"text": t, "id": 0} for t in ["v one", "", "v two"]])
    got_train, got_validation = load(cfg(tmp_path / "repo", tmp_path), tmp_path)
    assert got_train == train
    assert got_validation == ["v one", "v two"]


def test_parquet_shards_in_order_with_a_custom_text_field(tmp_path):
    train = texts(50)
    write_parquet(tmp_path / "repo/data/train-00000-of-00002.parquet", [{"body": t} for t in train[:20]])
    write_parquet(tmp_path / "repo/data/train-00001-of-00002.parquet", [{"body": t} for t in train[20:]])
    write_parquet(tmp_path / "repo/data/validation-00000-of-00001.parquet", [{"body": "held out"}])
    loaded = data.load_text(cfg(tmp_path / "repo", tmp_path, text_field="body"), hf_cache=tmp_path / "hf")
    assert loaded["train"].column_names == ["text"]
    assert loaded["train"].features["text"].dtype == "string"
    assert loaded["train"]["text"] == train
    assert loaded["validation"]["text"] == ["held out"]
    # memory-mapped from files in the scratch cache, not held in memory
    assert all(Path(f["filename"]).is_relative_to(tmp_path / "hf") for f in loaded["train"].cache_files)
    assert loaded["train"].cache_files


def test_prompt_response_rows_with_custom_fields_keep_every_row(tmp_path):
    rows = [{"question": f"q{i}", "answer": "" if i == 2 else f"a{i}", "extra": i} for i in range(12)]
    write_jsonl(tmp_path / "repo/train.jsonl", rows)
    write_jsonl(tmp_path / "repo/validation.jsonl", rows[:2])
    config = cfg(tmp_path / "repo", tmp_path, format="prompt_response", prompt_field="question",
                 response_field="answer")
    train, validation = load(config, tmp_path)
    assert train == [{"prompt": r["question"], "response": r["answer"]} for r in rows]
    assert validation == train[:2]


def test_swapped_prompt_and_response_fields_are_read_as_named(tmp_path):
    write_jsonl(tmp_path / "repo/train.jsonl", [{"prompt": f"r{i}", "response": f"p{i}"} for i in range(5)])
    write_jsonl(tmp_path / "repo/validation.jsonl", [{"prompt": "r", "response": "p"}])
    config = cfg(tmp_path / "repo", tmp_path, format="prompt_response", prompt_field="response",
                 response_field="prompt")
    train, _ = load(config, tmp_path)
    assert train[0] == {"prompt": "p0", "response": "r0"}


# -- max_documents ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_validation", [True, False])
def test_max_documents_stops_reading_the_train_split(tmp_path, monkeypatch, with_validation):
    """The second shard is not JSON: reading the whole split fails, so the capped read must stop before it."""
    monkeypatch.setattr(hub, "_STREAM_BATCH", 16)
    train = texts(200)
    write_jsonl(tmp_path / "repo/data/train-00000-of-00002.jsonl", [{"text": t} for t in train])
    (tmp_path / "repo/data/train-00001-of-00002.jsonl").write_text("this is not json\n" * 100)
    if with_validation:
        write_jsonl(tmp_path / "repo/data/validation-00000-of-00001.jsonl", [{"text": "v"}] * 3)
    got, validation = load(cfg(tmp_path / "repo", tmp_path, max_documents=50, validation_fraction=0.1), tmp_path)
    assert len(got) == 50
    if with_validation:
        assert got == train[:50] and validation == ["v"] * 3
    else:
        assert got == [t for t in train if t not in validation][:50]
        assert len(validation) >= data.builtin._MIN_VALIDATION_DOCS
    with pytest.raises(ConfigError) as err:  # the uncapped read does reach the broken shard
        load(cfg(tmp_path / "repo", tmp_path, validation_fraction=0.1), tmp_path)
    message = str(err.value)
    assert message.startswith(f"data.name={str(tmp_path / 'repo')!r}: the train split could not be read after ")
    assert "ArrowInvalid" in message and "\n" not in message


def _counting_stream(monkeypatch, rows: int, validation: bool) -> list[int]:
    """Make ``load_dataset`` return a generator-backed split of ``rows`` rows; the list counts rows pulled."""
    pulled = [0]

    def generate():
        for i in range(rows):
            pulled[0] += 1
            yield {"text": f"document number {i}"}

    def fake_load_dataset(name, config, streaming, cache_dir):
        assert streaming
        splits = {"train": IterableDataset.from_generator(generate)}
        if validation:
            splits["validation"] = IterableDataset.from_generator(lambda: iter([{"text": "v"}] * 5))
        return IterableDatasetDict(splits)

    monkeypatch.setattr(hub, "load_dataset", fake_load_dataset)
    return pulled


@pytest.mark.parametrize("with_validation", [True, False])
def test_max_documents_pulls_only_about_that_many_rows(tmp_path, monkeypatch, with_validation):
    monkeypatch.setattr(hub, "_STREAM_BATCH", 64)
    pulled = _counting_stream(monkeypatch, 1_000_000, with_validation)
    train, validation = load(cfg("some/corpus", tmp_path, max_documents=300, validation_fraction=0.05), tmp_path)
    held = set() if with_validation else {int(v.split()[-1]) for v in validation}
    assert train == [f"document number {i}" for i in range(400) if i not in held][:300]
    # the rows kept (train, and without a validation split the rows held out), and the rest of one batch
    assert pulled[0] <= 300 + (0 if with_validation else len(validation)) + 64


# -- validation held out by hash ----------------------------------------------------------------


def test_hash_split_is_deterministic_about_the_fraction_and_independent_of_batches(tmp_path, monkeypatch):
    docs = texts(3000)
    rows = [{"text": t} for t in docs]
    rows[10:10] = [{"text": ""}] * 5  # empty rows still count as positions
    write_jsonl(tmp_path / "repo/train.jsonl", rows)
    config = cfg(tmp_path / "repo", tmp_path, validation_fraction=0.1)
    train, validation = load(config, tmp_path, "a")
    assert (train, validation) == load(config, tmp_path, "b")
    monkeypatch.setattr(hub, "_STREAM_BATCH", 7)
    monkeypatch.setattr(hub, "_WRITE_BYTES", 100)
    assert (train, validation) == load(config, tmp_path, "c")
    expected = [r["text"] for p, r in enumerate(rows) if r["text"] and data.builtin._stable_unit(str(p)) < 0.1]
    assert validation == expected
    assert 0.08 < len(validation) / len(docs) < 0.12
    assert train == [t for t in docs if t not in set(validation)]
    # with a cap: the first train documents of the same split, and the validation rows read until then
    capped_train, capped_validation = load(cfg(tmp_path / "repo", tmp_path, validation_fraction=0.1,
                                               max_documents=1000), tmp_path, "d")
    assert capped_train == train[:1000]
    assert capped_validation == validation[: len(capped_validation)] and len(capped_validation) > 50


def test_a_small_dataset_still_holds_out_the_lowest_hashes(tmp_path):
    docs = texts(37)
    write_jsonl(tmp_path / "repo/train.jsonl", [{"text": t} for t in docs])
    train, validation = load(cfg(tmp_path / "repo", tmp_path, validation_fraction=0.001), tmp_path)
    lowest = sorted(range(len(docs)), key=lambda p: data.builtin._stable_unit(str(p)))[: data.builtin._MIN_VALIDATION_DOCS]
    assert validation == [docs[p] for p in sorted(lowest)]
    assert train == [d for p, d in enumerate(docs) if p not in lowest]


def test_prompt_response_without_validation_split_is_held_out_by_hash(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(400)]
    write_parquet(tmp_path / "repo/data/train-00000-of-00001.parquet", rows)
    train, validation = load(cfg(tmp_path / "repo", tmp_path, format="prompt_response", validation_fraction=0.05),
                             tmp_path)
    assert validation == [r for p, r in enumerate(rows) if data.builtin._stable_unit(str(p)) < 0.05]
    assert len(train) + len(validation) == 400 and validation


def test_a_single_document_is_too_few_to_hold_out_validation(tmp_path):
    write_jsonl(tmp_path / "repo/train.jsonl", [{"text": "only one"}, {"text": ""}])
    with pytest.raises(ConfigError) as err:
        load(cfg(tmp_path / "repo", tmp_path), tmp_path)
    message = str(err.value)
    assert message.startswith(f"data.name={str(tmp_path / 'repo')!r} holds 1 document(s)") and "\n" not in message


# -- the whole pipeline -------------------------------------------------------------------------


def test_prepare_data_builds_blocks_from_a_hub_dataset_and_reuses_the_cache(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "repo/train.jsonl", [{"text": t} for t in texts(600)])
    config = cfg(tmp_path / "repo", tmp_path, vocab_size=512, seq_len=64, max_documents=500)
    prepared = data.prepare_data(config, seed=0)
    assert len(prepared.train) > 10 and len(prepared.validation) > 0
    meta = json.loads((prepared.cache_path / "meta.json").read_text())
    assert meta["documents"]["train"] == 500
    assert not (prepared.cache_path / "hf_datasets").exists()  # the streamed text went with the build

    def must_not_read(*args, **kwargs):
        raise AssertionError("the second call must load the cache")

    monkeypatch.setattr(hub, "load_hub", must_not_read)
    again = data.prepare_data(config, seed=1)
    assert again.fingerprint == prepared.fingerprint
    assert np.array_equal(again.train["input_ids"], prepared.train["input_ids"])


# -- memory -------------------------------------------------------------------------------------

PROBE = """
import sys
from distrib.config import DataConfig
from distrib.data import load_text
cfg = DataConfig(source="hub", name=sys.argv[1], cache_dir=sys.argv[2], validation_fraction=0.05)
loaded = load_text(cfg)
assert len(loaded["train"]) > 1000, len(loaded["train"])
# VmHWM: this process's own peak (ru_maxrss would carry the parent's across exec)
print([int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def _repo_of(path: Path, megabytes: int) -> Path:
    """A hub-like directory whose train split holds ``megabytes`` MB of 4 KB documents (no validation split)."""
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     \n", dtype=np.uint8)
    pool = alphabet[rng.integers(0, len(alphabet), 1 << 20)].tobytes().decode()
    path.mkdir(parents=True)
    with open(path / "train.jsonl", "w") as f:
        for i in range(megabytes * 256):
            start = (i * 4099) % (len(pool) - 4096)
            f.write(json.dumps({"text": pool[start : start + 4096]}) + "\n")
    return path


def _peak_while_streaming(repo: Path, cache: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(repo), str(cache)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_8x_the_text_peaks_within_10_percent(tmp_path):
    """32 MB against 256 MB of text, both without a validation split (so the hash split runs too).

    The readers' buffers and the allocators' caches grow over the first few tens of megabytes and
    then stay (16 MB would still be warming up); a split read whole would add 256 MB at once (1.5x).
    """
    small = _peak_while_streaming(_repo_of(tmp_path / "1x", 32), tmp_path / "cache1")
    large = _peak_while_streaming(_repo_of(tmp_path / "8x", 256), tmp_path / "cache8")
    print(f"peak resident memory streaming 32 MB: {small / 2**20:.0f} MiB, 256 MB: {large / 2**20:.0f} MiB, "
          f"ratio {large / small:.3f}")
    assert large <= 1.10 * small


# -- one-line errors ----------------------------------------------------------------------------


def _error(config: DataConfig, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        data.load_text(config, hf_cache=tmp_path / "hf")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_dataset_id_that_does_not_exist_is_one_line_naming_data_name(tmp_path):
    message = _error(cfg("no-such-user/no-such-dataset", tmp_path), tmp_path)
    assert message.startswith("data.name='no-such-user/no-such-dataset' cannot be loaded")
    assert "set data.name" in message
    message = _error(cfg(tmp_path / "nowhere", tmp_path), tmp_path)
    assert message.startswith(f"data.name={str(tmp_path / 'nowhere')!r} cannot be loaded")
    (tmp_path / "scripted").mkdir()
    (tmp_path / "scripted/scripted.py").write_text("# a loading script\n")
    message = _error(cfg(tmp_path / "scripted", tmp_path), tmp_path)
    assert message.startswith(f"data.name={str(tmp_path / 'scripted')!r} cannot be loaded (RuntimeError: ")
    assert "scripts are no longer supported" in message


def test_missing_or_unknown_hub_config_names_data_hub_config(tmp_path):
    write_jsonl(tmp_path / "repo/x/train.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "repo/y/train.jsonl", [{"text": "y"}])
    (tmp_path / "repo/README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: cx\n  data_files:\n  - split: train\n    path: x/train.jsonl\n"
        "- config_name: cy\n  data_files:\n  - split: train\n    path: y/train.jsonl\n---\n"
    )
    message = _error(cfg(tmp_path / "repo", tmp_path), tmp_path)
    assert message.startswith("data.hub_config is not set") and "['cx', 'cy']" in message
    message = _error(cfg(tmp_path / "repo", tmp_path, hub_config="cz"), tmp_path)
    assert message.startswith("data.hub_config='cz' is not a config") and "['cx', 'cy']" in message


def test_a_dataset_without_a_train_split_names_its_splits(tmp_path):
    write_jsonl(tmp_path / "repo/test.jsonl", [{"text": "t"}])
    message = _error(cfg(tmp_path / "repo", tmp_path), tmp_path)
    assert "has no 'train' split (its splits are ['test'])" in message and message.startswith("data.name=")


def test_missing_and_non_string_fields_name_the_key_and_the_dataset(tmp_path):
    write_jsonl(tmp_path / "repo/train.jsonl", [{"body": "text", "n": i} for i in range(5)])
    repo = str(tmp_path / "repo")
    message = _error(cfg(repo, tmp_path), tmp_path)
    assert message == (f"data.text_field='text' is not a column of the train split of data.name={repo!r}; "
                       "its columns are ['body', 'n']; set data.text_field")
    message = _error(cfg(repo, tmp_path, text_field="n"), tmp_path)
    assert message.startswith(f"data.text_field='n' of the train split of data.name={repo!r} holds int64, not strings")
    write_parquet(tmp_path / "pq/data/train-00000-of-00001.parquet", [{"prompt": "p", "response": 3}])
    message = _error(cfg(tmp_path / "pq", tmp_path, format="prompt_response"), tmp_path)
    assert message.startswith("data.response_field='response' of the train split") and "holds int64" in message


def test_a_null_response_is_refused_naming_the_row(tmp_path):
    rows = [{"prompt": "p", "response": "r"}] * 3 + [{"prompt": "p", "response": None}]
    write_jsonl(tmp_path / "repo/train.jsonl", rows)
    message = _error(cfg(tmp_path / "repo", tmp_path, format="prompt_response"), tmp_path)
    assert message.startswith("data.response_field='response' is null in row 4 of the train split")
