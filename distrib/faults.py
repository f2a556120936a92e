"""Fault injection for the reliability tests: a crash, a hang or a full disk at a named point.

Inactive unless ``DISTRIB_FAULT`` is set, as ``POINT:ACTION:RANK:STEP``; the tests set it to show that
a run survives what clusters do to it. Points: ``step`` (in each micro-step of optimizer step STEP, after
the forward), ``save`` (inside a checkpoint save at STEP, after this rank's shards are written, before the
checkpoint is published), ``data`` (STEP 0: when the ranks compare the data they prepared), ``compile``
(STEP 0: when the model is compiled). Actions: ``kill`` (SIGKILL this process), ``hang`` (sleep for an hour),
``enospc`` (raise the OS error of a full disk), ``nan`` (only at ``step``: the caller poisons the loss),
``differ`` (only at ``data``: the caller alters this rank's description of its data), ``fail`` (only at
``compile``: the caller compiles with a backend that fails, as a broken toolchain would).
RANK ``*`` means every rank. Each fault fires once per process, and once per job when
``DISTRIB_FAULT_MARK`` names a file (created when it fires), so that a restarted worker goes on.
"""

from __future__ import annotations

import errno
import os
import signal
import time

_fired: set[tuple] = set()


def _spec() -> tuple[str, str, str, int] | None:
    raw = os.environ.get("DISTRIB_FAULT")
    if not raw:
        return None
    point, action, rank, step = raw.split(":")
    return point, action, rank, int(step)


def at(point: str, rank: int, step: int) -> str | None:
    """Fire the configured fault if it names this point, rank and step; returns the action for callers
    that carry it out themselves (``nan``), else None."""
    spec = _spec()
    if spec is None:
        return None
    p, action, r, s = spec
    if p != point or s != step or r not in ("*", str(rank)) or spec in _fired:
        return None
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
    return action
