"""Small helpers shared across the package: rank-aware logging."""

from __future__ import annotations

import logging
import os
import signal
import sys

logger = logging.getLogger("distrib")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging() -> None:
    """Rank 0 logs at INFO, other ranks only warnings and errors (each rank reports its own)."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    rank = _rank()
    handler.setFormatter(logging.Formatter(f"[distrib rank{rank}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def log_main(msg: str) -> None:
    """Log on rank 0 only."""
    if _rank() == 0:
        setup_logging()
        logger.info(msg)


class StopRequest:
    """SIGUSR1 (Slurm's warning before preemption) and SIGTERM ask the run for a clean stop.

    Every rank then finishes its step, the ranks agree, a checkpoint is written and the process
    exits 0; the same command resumes. Installed as early as possible in a worker, so a signal that
    arrives during start-up is not fatal.
    """

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
