"""Small helpers shared across the package: rank-aware logging, warnings, signals and host memory."""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import warnings

from distrib.launch.env import launcher_rank

logger = logging.getLogger("distrib")


def _rank() -> int:
    return launcher_rank()


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


class _ErrorsOnly(logging.Filter):
    """Passes ERROR and above. A filter, not a level: DeepSpeed resets its logger's level on import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_deepspeed() -> None:
    """Keep only DeepSpeed's errors in this process (its accelerator detection warns at import).

    Call before ``deepspeed`` is imported; importing it here would emit the very warnings to hide.
    """
    deepspeed_logger = logging.getLogger("DeepSpeed")  # deepspeed.utils.logger
    if not any(isinstance(f, _ErrorsOnly) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_ErrorsOnly())


def quiet_other_ranks(rank: int | None = None) -> None:
    """On ranks other than 0, keep only errors from the libraries and Python warnings.

    Every rank runs the same code, so every library warning would otherwise appear world-size
    times; rank 0 still shows each once. Call at worker start, once ``RANK`` is set and before
    ``deepspeed`` is imported (its accelerator detection warns at import). Our own ``distrib``
    logger is left alone: :func:`setup_logging` already keeps other ranks at warnings, which are
    then about that rank.

    Args:
        rank: this process's global rank; by default ``RANK`` from the environment.
    """
    if (_rank() if rank is None else rank) == 0:
        return
    quiet_deepspeed()
    import datasets.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


#: What torch says of the collectives DeepSpeed's ZeRO calls on every step: ``deepspeed.comm`` picks
#: ``torch.distributed.all_gather_into_tensor`` (ZeRO-1 and 2) and ``reduce_scatter_tensor`` (ZeRO-3),
#: deprecated in torch 2.13 for ``all_gather_single`` and ``reduce_scatter_single``. The calls are
#: DeepSpeed's to change (distrib makes neither), and the warning would come back with each step.
DEEPSPEED_DEPRECATIONS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated\."


def hide_deepspeed_deprecations() -> None:
    """Hide torch's deprecation of the two collectives DeepSpeed calls every step, on every rank; only those.

    Call at worker start; other FutureWarnings still show (on rank 0, see :func:`quiet_other_ranks`).
    """
    warnings.filterwarnings("ignore", message=DEEPSPEED_DEPRECATIONS, category=FutureWarning)


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


def peak_rss_bytes() -> int:
    """This process's own peak resident memory so far, in bytes.

    On Linux ``VmHWM`` of ``/proc/self/status``: the high-water mark of this process's address
    space, which ``exec`` starts afresh. ``getrusage``'s ``ru_maxrss`` is kept across ``exec``, so a
    worker started by a launcher would report the launcher's peak (its data preparation) whenever
    that is higher than its own; it is only the fallback where there is no ``/proc`` (macOS reports
    it in bytes, other systems in kibibytes).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def keep_freed_host_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in the process; whether it could (glibc only).

    By default glibc serves each allocation above 32 MiB (and, adaptively, smaller ones) with its own
    ``mmap`` and unmaps it on ``free``; the heap's top is trimmed back to the OS too. A training step on
    the CPU allocates and frees the same activation, logit and gradient buffers every step, so every
    step faults in and zeroes them afresh: page faults take about a tenth of a step of a small model.
    With ``mmap`` off for allocations (``M_MMAP_MAX=0``) and no trimming (``M_TRIM_THRESHOLD`` at its
    maximum), freed blocks go back to malloc's free lists and the next step reuses them. Numbers are
    unchanged; the process's resident size stays at its peak instead of breathing with each step.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
