"""Every rank learns of a failed write together, instead of waiting in its next collective for a rank that has gone.

Ranks that write their own shares (checkpoint shards, export files), or rank 0 writing the files they share
(metrics, the run's config, ``latest``), meet after the write in :func:`settle`: if any rank failed, every rank
stops at the same point with the same one line (a full disk named by its file system, :func:`distrib.fs.full_disk`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch.distributed as dist

from distrib.errors import TrainingError
from distrib.fs import full_disk

if TYPE_CHECKING:
    from distrib.parallel.topology import Topology


class Failure(NamedTuple):
    """Why a write failed somewhere in the job."""

    reason: str  #: one line: the full file system, or the error and where
    kind: str  #: "disk" (a full file system or quota: free space), "os" (another OS error), "bug"


def failure(error: BaseException, path: str | Path) -> Failure:
    """What ``error``, raised writing ``path``, tells a user: a full file system, an OS error and its file, or a bug."""
    disk = full_disk(error, path)
    if disk is not None:
        return Failure(disk, "disk")
    if isinstance(error, OSError):
        return Failure(f"{error.strerror or error} ({error.filename or path})", "os")
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return Failure(f"{type(error).__name__}: {first}", "bug")


def first_failure(topo: Topology | None, mine: Failure | None) -> Failure | None:
    """After every rank has tried its part of a write: why it failed, on every rank; None when no rank failed.

    Every rank must call it at the same point. It costs one all-reduce when nothing failed; only when
    something did are the reasons gathered, so that every rank (rank 0 speaks) knows the first failing
    rank's; a full disk anywhere comes first, as what a user can act on.

    Args:
        topo: the ranks; None for a process on its own.
        mine: why this rank's write failed (:func:`failure`), None if it succeeded.
    """
    if topo is None or topo.world_size == 1:
        return mine
    if not topo.any(mine is not None):
        return None
    every: list = [None] * topo.world_size
    dist.all_gather_object(every, None if mine is None else tuple(mine))
    _, rank, (why, kind) = min((got[1] != "disk", rank, got) for rank, got in enumerate(every) if got is not None)
    return Failure(why if kind == "disk" or topo.world_size == 1 else f"{why} on rank {rank}", kind)


def settle(topo: Topology | None, error: BaseException | None, path: str | Path, doing: str, after, *,
           undo=None, then: str = "run the same command again") -> None:
    """After every rank of ``topo`` (or this process alone) has tried its part of a write: return if it succeeded
    everywhere; else ``undo()`` on rank 0 (remove what was half-written) and raise on every rank.

    Args:
        topo: the ranks; None for a process on its own.
        error: what this rank's write raised, None if it succeeded.
        path: what this rank wrote.
        doing: what failed, for the message ("saving checkpoint step_00000020 of RUN").
        after: what is left as it was, for the message, or a function returning it (called after ``undo``).
        undo: removes the partial output.
        then: how to carry on once fixed.

    Raises:
        TrainingError: on every rank, one line: "{doing} failed: {why}; {after}; {fix} and {then}".
        Exception: this rank's own error, when it is a bug (its traceback is what matters).
    """
    mine = None if error is None else failure(error, path)  # before anything is removed: is the disk full?
    failed = first_failure(topo, mine)
    if failed is None:
        return
    if undo is not None and (topo is None or topo.is_main):
        undo()
    if mine is not None and mine.kind == "bug":
        raise error
    fix = {"disk": f"free space on it and {then}", "os": f"fix that and {then}", "bug": "see that rank's traceback"}
    raise TrainingError(f"{doing} failed: {failed.reason}; {after() if callable(after) else after}; {fix[failed.kind]}")


@contextmanager
def writing(topo: Topology | None, path: str | Path, doing: str, after, *,
            then: str = "run the same command again") -> Iterator[None]:
    """Run the body, a write of ``path`` on some or all ranks (rank 0's shared files, or each rank's own); then
    :func:`settle` it: a failure on any rank stops every rank here, together, in one line."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 (every rank learns of it in settle)
        error = e
    settle(topo, error, path, doing, after, then=then)
