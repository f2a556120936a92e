"""Writing where a crash can strike: one way to publish a file or a directory whole, and to make it durable;
and a full disk recognised whichever writer hit it.

Checkpoints, exports, the data cache and the metrics log all write under a temporary name beside the final
one and rename it into place, so a reader sees the old version or the new one, never a half-written one.

A write that runs out of space fails differently in each library (measured on a full tmpfs,
``tests/unit/test_full_disk.py``): Python's own writes (json and text files, a tokenizer's
``save_pretrained``, TensorBoard's event files) raise ``OSError`` with ``errno.ENOSPC`` (``EDQUOT`` over a
quota); safetensors raises ``SafetensorError("... No space left on device (os error 28)")``; and
``torch.save`` to a path, so every DeepSpeed checkpoint file, raises a ``RuntimeError`` from its zip writer
("[enforce fail at inline_container.cc:672] . unexpected pos ...", after "basic_ios::clear: iostream error")
that has lost the errno. :func:`full_disk` recognises all of them; the last only when the file system is
indeed (nearly) full, so that no other RuntimeError passes for a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path


def fsync_files(paths: Iterable[Path]) -> None:
    """Make the contents of ``paths`` durable (a rename is not, by itself, a write to disk)."""
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a file's fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every directory under ``root`` and ``root`` itself, deepest first."""
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_dir(d)
    fsync_dir(root)


def replace(tmp: Path, final: Path, durable: bool = False) -> None:
    """Put ``tmp`` (a file or a directory) in the place of ``final``; an existing ``final`` stays whole until then.

    A directory cannot be renamed over a non-empty one, so an old ``final`` directory is first renamed aside
    and removed after the swap: at every instant ``final`` is the old version, absent for the one rename, or new.
    """
    aside = None
    if final.is_dir() and not final.is_symlink():
        aside = final.with_name(f"{final.name}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    if durable:
        fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """``path`` holds ``text`` whole, or keeps what it held: written beside it, synced, renamed into place."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        replace(tmp, path, durable=durable)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def publishing(final: Path, tmp: Path | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` to write; on success it replaces ``final``, on failure it is removed.

    Args:
        final: the file or directory readers look for.
        tmp: where to write (default ``<final>.tmp``, emptied first); give one already being written by
            several processes to publish their work.
        durable: fsync the parent directory after the rename.
    """
    if tmp is None:
        tmp = final.with_name(final.name + ".tmp")
        _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    replace(tmp, final, durable=durable)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
