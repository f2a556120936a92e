"""Writing where a crash can strike: one way to publish a file or a directory whole, and to make it durable.

Checkpoints, exports, the data cache and the metrics log all write under a temporary name beside the final
one and rename it into place, so a reader sees the old version or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
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
