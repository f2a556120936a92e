"""Small helpers shared across the package: rank-aware logging."""

from __future__ import annotations

import logging
import os
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
