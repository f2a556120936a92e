"""`kill -9` of the launching process alone, as a scheduler or the OOM killer does it: its workers end with it.

The workers (and, under ``distrib run``, the stage's own launcher) are found before the kill from the
process table, so the test sees exactly the processes the launcher had started; they are checked by pid and
start time after it, and killed by the test if they survived so a failure leaves no orphan training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, SMALL, TINY, metrics

pytestmark = pytest.mark.slow

#: configs/pretrain/tiny.yaml at the tests' small size, with a checkpoint every 5 steps: after the first one
#: there are still seconds of training left to interrupt, even on an idle machine.
MAX_STEPS = 60
SHORT = [*SMALL, f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=5", "eval.every_steps=30"]
NPROC = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One data cache for both tests: the same corpus, prepared once."""
    return tmp_path_factory.mktemp("cache")


def _table() -> dict[int, tuple[int, str, str]]:
    """Every process: pid -> (parent pid, state, start time in clock ticks since boot)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:  # ended while we looked
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
            table[int(name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(root: int) -> dict[int, str]:
    """The processes below ``root`` (children, their children, ...): pid -> start time."""
    table, found, todo = _table(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def _alive(procs: dict[int, str]) -> list[int]:
    """Those of ``procs`` still running: the same pid with the same start time, not a zombie."""
    table = _table()
    return [pid for pid, start in procs.items()
            if pid in table and table[pid][2] == start and table[pid][1] not in "ZX"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # Output to a file: a pipe nobody reads after the kill could fill and stall the workers, hiding an orphan.
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "distrib", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_training(launcher: subprocess.Popen, run: Path, log: Path) -> None:
    """Until ``run`` has logged a training step and holds a checkpoint, with the launcher still running."""
    deadline = time.monotonic() + 600
    while not ((run / "checkpoints/latest").is_file() and (run / "metrics.jsonl").is_file()
               and '"loss"' in (run / "metrics.jsonl").read_text()):
        assert launcher.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def _kill_alone_and_check(launcher: subprocess.Popen, run: Path, stage_launchers: int) -> int:
    """SIGKILL ``launcher`` alone; assert everything it started ends within 5 s and writes nothing after.

    Below ``launcher`` there must be ``stage_launchers`` ``distrib pretrain ... --nproc-per-node`` processes
    (the stage's own command under ``distrib run``) and NPROC workers. Returns the step of the run's latest
    checkpoint once all is quiet.
    """
    procs = _descendants(launcher.pid)
    commands = {pid: _cmdline(pid) for pid in procs}
    ours = [c for c in commands.values() if " -m distrib pretrain " in c]
    described = "\n".join(f"{pid}: {c}" for pid, c in commands.items())
    try:
        assert sum("--nproc-per-node" in c for c in ours) == stage_launchers, described
        assert sum("--nproc-per-node" not in c for c in ours) == NPROC, described
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 5
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = _alive(procs)
        assert not survivors, "alive 5 s after the launcher's kill -9:\n" + "\n".join(
            f"{pid}: {_cmdline(pid)}" for pid in survivors)
    finally:  # a failed check must not leave anything training on a shared machine
        launcher.kill()
        launcher.wait()
        for pid in _alive(procs):
            os.kill(pid, signal.SIGKILL)

    def written():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())

    before = written()
    time.sleep(2.5)
    assert written() == before, "the run directory still changes after its processes were reported dead"
    return int((run / "checkpoints/latest").read_text().strip().rsplit("_", 1)[1])


def _assert_resumed_and_finished(log: str, run: Path, step: int) -> None:
    assert f"at step {step} (saved with" in log, log[-6000:]  # "resumed from .../step_N at step N (...)"
    assert 0 < step < MAX_STEPS
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS
    assert (run / "hf/config.json").is_file()


def test_kill_9_of_the_nproc_per_node_launcher_ends_its_workers_and_the_run_resumes(tmp_path, cache):
    out = tmp_path / "run"
    args = ["pretrain", TINY, f"output_dir={out}", f"data.cache_dir={cache}", *SHORT, "--nproc-per-node", str(NPROC)]
    launcher = _start(args, tmp_path / "first.log")
    _wait_training(launcher, out, tmp_path / "first.log")
    step = _kill_alone_and_check(launcher, out, stage_launchers=0)

    second = _start(args, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-6000:]
    _assert_resumed_and_finished((tmp_path / "second.log").read_text(), out, step)


def test_kill_9_of_distrib_run_ends_the_stage_launcher_and_its_workers_and_the_pipeline_finishes(tmp_path, cache):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"output_dir: {tmp_path / 'pipe'}\nnproc_per_node: {NPROC}\ndownstream: false\n"
                        f"pretrain: {{config: {TINY}}}\n")
    stage = tmp_path / "pipe/pretrain"
    args = ["run", str(pipeline), f"data.cache_dir={cache}", *SHORT]
    pipe = _start(args, tmp_path / "first.log")
    _wait_training(pipe, stage, tmp_path / "first.log")
    step = _kill_alone_and_check(pipe, stage, stage_launchers=1)

    second = _start(args, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-6000:]
    _assert_resumed_and_finished((tmp_path / "second.log").read_text(), stage, step)
    assert (tmp_path / "pipe/summary.json").is_file()
