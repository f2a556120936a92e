"""The pages of memory-mapped Arrow files a pass has read, given back as it goes.

``datasets`` memory-maps its Arrow files and every page read stays resident until the file is closed;
each pass of the data pipeline (and a training rank's reads) releases them behind it, so memory does
not grow with the corpus.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable

from datasets import Dataset

#: ``madvise(2)`` where there is one (Linux, the BSDs, macOS), else None.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if os.name == "posix" else None
_MADVISE = getattr(_LIBC, "madvise", None)
if _MADVISE is not None:
    _MADVISE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_DONTNEED = 4


def _release_pages(files: Iterable[str]) -> None:
    """Drop the resident pages of this process's read-only memory maps of ``files``.

    ``datasets`` memory-maps its Arrow files, and every page a pass reads stays mapped, counted
    in the process's resident memory, until the file is closed: a pass over a corpus's text or
    tokens would make the memory of a preparing process (and of a training rank, over an epoch
    of random reads) grow with the data, though the pages are only the kernel's file cache. For
    read-only file mappings ``MADV_DONTNEED`` unmaps them at no risk: the next read faults them
    back from the file (or the cache, if the kernel kept them). Only mappings without write
    permission are touched; where ``/proc/self/maps`` or ``madvise`` is missing this does nothing.
    """
    names = {os.path.realpath(f) for f in files}
    if _MADVISE is None or not names:
        return
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names and "w" not in fields[1]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            _MADVISE(start, end - start, _MADV_DONTNEED)


def _mapped_files(ds: Dataset) -> list[str]:
    """The Arrow files ``ds`` reads its rows from (none for an in-memory dataset)."""
    return [f["filename"] for f in ds.cache_files]
