"""launch.local.die_with_launcher: a process started by distrib ends when its starter is killed alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

#: A starter that names itself to the worker it starts, prints the worker's pid, then waits (or exits at once).
STARTER = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[3:]],
                          env={**os.environ, "DISTRIB_LAUNCHER_PID": str(os.getpid())})
print(worker.pid, flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
"""
#: A worker that watches its starter (through the kernel, only the thread as the kernel cannot, or "late":
#: once the starter is already gone, as when it dies during the worker's imports), then works.
WORKER = """
import os, sys, time
import distrib.launch.local as local
if sys.argv[1] == "thread":
    local.die_with_parent = lambda: False
while sys.argv[1] == "late" and os.getppid() == int(os.environ["DISTRIB_LAUNCHER_PID"]):
    time.sleep(0.01)
local.die_with_launcher(poll_seconds=0.1)
with open(sys.argv[2], "w") as f:
    f.write(str("DISTRIB_LAUNCHER_PID" in os.environ))  # leaves the environment: not passed further down
while True:
    sum(range(10**5))
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _start(*args: str) -> tuple[subprocess.Popen, int]:
    starter = subprocess.Popen([sys.executable, "-c", STARTER, WORKER, *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    return starter, int(starter.stdout.readline())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _running(pid)


@pytest.mark.parametrize("watch", ["kernel", "thread"])
def test_a_worker_ends_when_its_starter_is_killed_alone(tmp_path, watch):
    ready = tmp_path / "ready"
    starter, worker = _start("wait", watch, str(ready))
    try:
        deadline = time.monotonic() + 60
        while not ready.is_file() or not ready.read_text():
            assert time.monotonic() < deadline and _running(worker)
            time.sleep(0.05)
        assert ready.read_text() == "False"
        assert _running(worker)  # watching does not end it while the starter lives
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait()
        assert _gone_within(worker, 3)
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)
        starter.kill()


def test_a_worker_whose_starter_died_before_it_looked_stops_at_once(tmp_path):
    ready = tmp_path / "ready"
    starter, worker = _start("exit", "late", str(ready))
    try:
        assert starter.wait(timeout=60) == 0  # exits right after starting the worker
        assert _gone_within(worker, 60)
        assert not ready.is_file()
        said = starter.stderr.read()
        assert f"the launcher (pid {starter.pid}) is gone; stopping this process (pid {worker})" in said
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)


#: A cache build with two tokenizing processes whose tasks hang (DISTRIB_FAULT), as a long build would run.
BUILD = """
import json, sys
from distrib import data
from distrib.config import DataConfig
data.prepare_data(DataConfig.model_validate(json.loads(sys.argv[1])), seed=0)
"""


def test_the_tokenizing_processes_of_a_data_build_end_when_the_building_process_is_killed(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(f'{{"text": "document {i}: {" ".join(["word"] * (i % 50 + 5))}"}}\n'
                              for i in range(2400)))  # enough for two processes (1,000 documents each at least)
    cfg = {"source": "files", "train_files": [str(corpus)], "seq_len": 32, "vocab_size": 300, "num_proc": 2,
           "cache_dir": str(tmp_path / "cache")}
    build = subprocess.Popen([sys.executable, "-c", BUILD, json.dumps(cfg)], cwd=ROOT, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "DISTRIB_FAULT": "tokenize:hang:0:0"})
    pool = []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("cache/**/*.claim"))) < 2:  # both processes hold a task
            assert build.poll() is None, build.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        pool = [pid for pid in _children(build.pid) if _running(pid)]
        assert len(pool) == 2
        os.kill(build.pid, signal.SIGKILL)
        build.wait()
        assert all(_gone_within(pid, 3) for pid in pool), "a tokenizing process outlived its builder"
    finally:
        for pid in pool:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        build.kill()


def _children(parent: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(name))
        except OSError:
            continue
    return found
