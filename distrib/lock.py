"""One run per output directory: an exclusive lock on ``<output_dir>/.lock``, held for the whole run.

A POSIX record lock (``fcntl.lockf``): the kernel drops it when the holding process dies, however it
dies, so a crashed run never leaves the directory locked; NFS (v3 through lockd, v4 natively) and
Lustre or GPFS mounted with lock support honour it across nodes. The file itself names the holder
(host, pid, start time) for the message the second run prints; its presence means nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from distrib.errors import ConfigError

#: Set in the workers of a run whose launching process holds the lock (they must not take it again).
HELD_ENV = "DISTRIB_RUN_LOCK_HELD"


class RunLock:
    """Exclusive, process-lifetime lock of one output directory."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or refuse in one line.

        Raises:
            ConfigError: another live process holds it (named from the file's contents).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raw = os.read(fd, 4096)
            os.close(fd)
            raise ConfigError(self._in_use(raw)) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        os.environ[HELD_ENV] = str(self.dir.resolve())
        return self

    def check_free(self) -> None:
        """Refuse now if another run holds the lock, creating nothing (the lock is taken later).

        Call it from one process per job (it takes the lock for an instant).

        Raises:
            ConfigError: as :meth:`acquire`.
        """
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(self._in_use(os.read(fd, 4096))) from None
        finally:
            os.close(fd)

    def _in_use(self, raw: bytes) -> str:
        return (f"output_dir={str(self.dir)!r} is in use by another run ({_describe(raw)}); wait for it to finish, "
                "stop it, or choose another output_dir")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None
            os.environ.pop(HELD_ENV, None)


def held_by_launcher(output_dir: str | Path) -> bool:
    """True in a worker whose launching process took the lock of ``output_dir`` for it."""
    return os.environ.get(HELD_ENV) == str(Path(output_dir).resolve())


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"
