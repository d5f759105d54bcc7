"""Making renames durable: the one place that knows a rename needs its directory fsync'd."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range; do not wait for it


def _load_sync_file_range():
    import ctypes  # here, not at import: clients that never start writeback need not load it

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # the C library Python already uses
    except (OSError, AttributeError):  # not Linux: the final fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range: Any = _load_sync_file_range


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting.

    Without it, a file written faster than the disk sits dirty in the page cache until
    the final fsync, which then writes it all while nothing else happens; with it the
    disk works while the network does, and the fsync finds little left to do.
    """
    global _sync_file_range
    if _sync_file_range is _load_sync_file_range:
        _sync_file_range = _load_sync_file_range()
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a create or rename in directory ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename a fully fsync'd file into place, durably (rename, then fsync the directory)."""
    os.replace(src, dst)
    fsync_dir(Path(dst).absolute().parent)
