"""Processes waiting for a data cache tokenize it together, and the blocks do not depend on who did.

A job's ranks all call ``prepare_data`` (under srun or mpirun every task is a worker); the one holding
the cache lock builds, and the others, instead of idling on the lock, claim tokenizing tasks it posts.
These tests start real processes on one cache directory and compare the result with a build by one
process, byte for byte, including when a helper is killed in the middle of its task.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from distrib import data
from distrib.config import DataConfig

_CHILD = """
import json, logging, sys
from distrib import data
from distrib.config import DataConfig
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
cfg = DataConfig.model_validate(json.loads(sys.argv[1]))
prepared = data.prepare_data(cfg, seed=0)
print(json.dumps({"path": str(prepared.cache_path), "blocks": len(prepared.train)}))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """12,000 documents of varied text (11 tokenizing tasks of the train split when shared) in one JSON Lines file."""
    rng = np.random.default_rng(0)
    words = [f"w{i}{chr(97 + i % 26)}" for i in range(600)]
    path = tmp_path_factory.mktemp("team") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(12_000):
            text = " ".join(rng.choice(words, size=int(rng.integers(20, 80))))
            f.write(json.dumps({"text": f"doc {i}: {text}"}) + "\n")
    return path


def _cfg(corpus: Path, cache: Path) -> DataConfig:
    return DataConfig(source="files", train_files=[str(corpus)], seq_len=64, vocab_size=400, num_proc=1,
                      cache_dir=str(cache))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The cache built by this process alone."""
    return data.prepare_data(_cfg(corpus, tmp_path_factory.mktemp("alone")), seed=0).cache_path


def _start_team(cfg: DataConfig, n: int, fault: str) -> list[subprocess.Popen]:
    """``n`` processes preparing ``cfg``, all registered as waiting before any of them can build."""
    key = data.cache._cache_key(cfg)[0]
    root = Path(cfg.cache_dir)
    root.mkdir(parents=True)
    env = {**os.environ, "DISTRIB_FAULT": fault}
    with FileLock(str(root / f"{key}.lock")):
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD, cfg.model_dump_json()], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
        waiting = root / f"{key}.waiting"
        deadline = time.monotonic() + 120
        while not (waiting.is_dir() and len(list(waiting.iterdir())) == n):
            assert time.monotonic() < deadline, "the processes never registered as waiting"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.1)
    return procs


def _same_files(a: Path, b: Path) -> None:
    for split in ("train", "validation"):
        (fa,), (fb,) = sorted((a / split).glob("*.arrow")), sorted((b / split).glob("*.arrow"))
        assert fa.read_bytes() == fb.read_bytes(), split
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (b / "tokenizer" / "tokenizer.json").read_bytes()


def _leftovers(root: Path, key: str) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in (key, f"{key}.lock"))


def test_waiting_processes_tokenize_with_the_builder_and_the_blocks_are_the_same(corpus, reference, tmp_path):
    cfg = _cfg(corpus, tmp_path / "cache")
    # The builder pauses in its first task, so the helpers surely find work left when they look.
    procs = _start_team(cfg, 3, "tokenize:pause:0:0")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    results = [json.loads(out) for out, _ in outs]
    assert len({r["path"] for r in results}) == 1
    built = Path(results[0]["path"])
    meta = json.loads((built / "meta.json").read_text())
    by = meta["tokenized_by"]["train"]
    assert sum(by.values()) == meta["documents"]["train"] // 1000 and len(by) >= 2, by  # the builder and a helper
    assert {who.rsplit(":", 1)[1] for who in by} <= {str(p.pid) for p in procs}
    assert sum("tokenized by" in err for _, err in outs) == 1  # the builder says so, once
    _same_files(built, reference)
    assert _leftovers(built.parent, built.name) == []  # no posting, registrations or build left beside it


def test_a_helper_killed_in_its_task_is_replaced_by_the_builder(corpus, reference, tmp_path):
    cfg = _cfg(corpus, tmp_path / "cache")
    procs = _start_team(cfg, 2, "tokenize:pause:0:0,tokenize:kill:1:0")
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [-signal.SIGKILL, 0], [err[-2000:] for _, err in outs]
    (builder_out, builder_err), = [o for o, p in zip(outs, procs) if p.returncode == 0]
    assert "again: the process that claimed it is gone" in builder_err
    built = Path(json.loads(builder_out)["path"])
    _same_files(built, reference)
    assert _leftovers(built.parent, built.name) == []


def test_a_build_alone_posts_no_tasks(corpus, tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    posted = []
    monkeypatch.setattr(data.team._Board, "post", lambda self, *a: posted.append(a))
    prepared = data.prepare_data(_cfg(corpus, tmp_path / "cache"), seed=0)
    assert posted == []
    meta = json.loads((prepared.cache_path / "meta.json").read_text())
    assert list(meta["tokenized_by"]["train"].values()) == [1]  # num_proc=1: one task, done here


def test_a_rank_of_a_job_posts_its_tasks_before_anyone_waits(corpus, tmp_path, monkeypatch):
    """Under a launcher the other ranks are on their way: the builder posts without waiting to see them."""
    monkeypatch.setenv("SLURM_NTASKS", "2")
    posted = []
    monkeypatch.setattr(data.team._Board, "post", lambda self, job, tokenizer: posted.append(job))
    data.prepare_data(_cfg(corpus, tmp_path / "cache"), seed=0)
    assert [(job.split, len(job.tasks)) for job in posted] == [("train", 11), ("validation", 1)]
