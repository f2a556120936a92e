"""Fault injection for the reliability tests: a crash, a hang or a full disk at a named point.

Inactive unless ``DISTRIB_FAULT`` is set, as ``POINT:ACTION:RANK:STEP``; the tests set it to show that
a run survives what clusters do to it. Points: ``step`` (in each micro-step of optimizer step STEP, after
the forward), ``save`` (inside a checkpoint save at STEP, after this rank's shards are written, before the
checkpoint is published), ``metrics`` (rank 0 writing the metrics row of step STEP), ``data`` (STEP 0: when
the ranks compare the data they prepared), ``compile`` (STEP 0: when the model is compiled). Actions:
``kill`` (SIGKILL this process), ``hang`` (sleep for an hour), ``enospc`` (raise the ``OSError`` Python's
own writes raise on a full disk; ``tests/unit/test_full_disk.py`` has what the other writers raise, on a
real one), ``nan`` (only at ``step``: the caller poisons the loss),
``differ`` (only at ``data``: the caller alters this rank's description of its data), ``fail`` (only at
``compile``: the caller compiles with a backend that fails, as a broken toolchain would).
At ``tokenize`` (a data-cache build's tokenizing task, STEP counting the tasks this process has done), RANK
is 0 for the process building the cache and 1 for a process helping it, and ``pause`` sleeps two seconds,
as on a loaded node. Several faults are separated by commas.
RANK ``*`` means every rank. Each fault fires once per process, and once per job when
``DISTRIB_FAULT_MARK`` names a file (created when it fires), so that a restarted worker goes on.
"""

from __future__ import annotations

import errno
import os
import signal
import time

_fired: set[tuple] = set()


def _specs() -> list[tuple[str, str, str, int]]:
    specs = []
    for raw in filter(None, os.environ.get("DISTRIB_FAULT", "").split(",")):
        point, action, rank, step = raw.split(":")
        specs.append((point, action, rank, int(step)))
    return specs


def at(point: str, rank: int, step: int) -> str | None:
    """Fire the configured fault if it names this point, rank and step; returns the action for callers
    that carry it out themselves (``nan``), else None."""
    for spec in _specs():
        p, action, r, s = spec
        if p == point and s == step and r in ("*", str(rank)) and spec not in _fired:
            return _fire(spec, action)
    return None


def _fire(spec: tuple, action: str) -> str | None:
    _fired.add(spec)
    mark = os.environ.get("DISTRIB_FAULT_MARK")
    if mark:
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return None
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's SIGTERM ends the hung process at once
        time.sleep(3600)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "pause":
        time.sleep(2)
    return action
