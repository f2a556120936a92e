"""How a run ends in one line: :class:`TrainingError`, and a full disk recognised whichever writer hit it.

A write that runs out of space fails differently in each library (measured on a full tmpfs,
``tests/unit/test_full_disk.py``): Python's own writes (json and text files, a tokenizer's
``save_pretrained``, TensorBoard's event files) raise ``OSError`` with ``errno.ENOSPC`` (``EDQUOT`` over a
quota); safetensors raises ``SafetensorError("... No space left on device (os error 28)")``; and
``torch.save`` to a path, so every DeepSpeed checkpoint file, raises a ``RuntimeError`` from its zip writer
("[enforce fail at inline_container.cc:672] . unexpected pos ...", after "basic_ios::clear: iostream error")
that has lost the errno. :func:`full_disk` recognises all of them; the last only when the file system is
indeed (nearly) full, so that no other RuntimeError passes for a full disk.

Ranks that write their own shares, or rank 0 writing the files they share, learn of each other's failures
through :func:`first_failure`, so that every rank stops together instead of waiting in the next collective
for a rank that has gone.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from distrib.topology import Topology


class TrainingError(RuntimeError):
    """A run that cannot go on, said in one line (the CLI prints it and exits 1).

    Every rank raises it together, and rank 0 speaks; ``from_this_rank`` marks what only the raising
    rank knows (which rank did not arrive at a collective), so that it speaks too.
    """

    def __init__(self, msg: str, from_this_rank: bool = False):
        super().__init__(msg)
        self.from_this_rank = from_this_rank


#: What the errors of a full disk say where they carry no errno (safetensors' Rust I/O errors, tracebacks
#: of a subprocess).
_FULL_TEXTS = ("No space left on device", "os error 28")
_QUOTA_TEXTS = ("Disk quota exceeded", "os error 122")
#: What torch's zip writer says when a write of its file fails, whatever the reason: a full disk only when
#: the file system is full.
_TORCH_WRITER_TEXTS = ("inline_container.cc", "iostream error", "PytorchStreamWriter failed", "file write failed")


def full_disk(error: BaseException, path: str | Path) -> str | None:
    """What is full, when ``error`` is a write that failed because the file system holding ``path`` has no room.

    Args:
        error: what the writer raised (its ``__cause__`` and ``__context__`` are looked at too).
        path: the file or directory being written (it need not exist any more).

    Returns:
        e.g. ``"the file system at /scratch (tmpfs, 64 MiB) is full"``, or ``"the disk quota on ... is used
        up"``; None for any other error.
    """
    chain = _chain(error)
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    text = " ".join(str(e) for e in chain)
    if errno.EDQUOT in codes or any(t in text for t in _QUOTA_TEXTS):
        return f"the disk quota on {file_system(path)} is used up"
    if errno.ENOSPC in codes or any(t in text for t in _FULL_TEXTS):
        return f"{file_system(path)} is full"
    if any(t in text for t in _TORCH_WRITER_TEXTS) and nearly_full(path):
        return f"{file_system(path)} is full"
    return None


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and all(error is not e for e in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _existing(path: str | Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def nearly_full(path: str | Path) -> bool:
    """Whether the file system holding ``path`` has less than 1% (at least 1 MiB, at most 64 MiB) left.

    Root may fill the blocks a file system reserves for it, so for root those count as free.
    """
    st = os.statvfs(_existing(path))
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return free < min(64 << 20, max(1 << 20, st.f_blocks * st.f_frsize // 100))


def file_system(path: str | Path) -> str:
    """``"the file system at MOUNT (TYPE, SIZE)"`` for the file system that holds ``path``."""
    where = _existing(path)
    mount = where
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    st = os.statvfs(where)
    kind = _mount_types().get(str(mount))
    return f"the file system at {mount} ({kind + ', ' if kind else ''}{_size(st.f_blocks * st.f_frsize)})"


def _mount_types() -> dict[str, str]:
    """Mount point -> file system type, from ``/proc/self/mounts`` (empty where there is none)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return {}
    types = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:  # the last mount of a point is the one in use
            types[re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])] = fields[2]  # \040: a space
    return types


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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
    import torch.distributed as dist  # not at import: the command line imports this module before it needs torch

    if topo is None:
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
