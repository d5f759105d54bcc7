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


def _load_syncfs():
    import ctypes

    release = os.uname().release.split(".")
    try:
        if (int(release[0]), int(release[1].split("-")[0])) < (5, 17):
            # syncfs(2) reports data write errors since 5.8 and the filesystem's own (journal
            # commit, cache flush) since 5.17: before that, an fsync per file instead
            return None
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (ValueError, IndexError, OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs: Any = _load_syncfs


def sync_filesystem(fd: int) -> bool:
    """Make everything written on ``fd``'s filesystem durable with one ``syncfs(2)``.

    ``fd`` must have been opened before the files it is to cover were written: the
    kernel reports the write errors seen on the filesystem since ``fd`` was opened.
    Returns False where that is not possible (not Linux, or a kernel before 5.17,
    whose syncfs missed some errors): the caller then fsyncs its files one by one.
    Raises ``OSError`` if the kernel reports a write error. For many small new files
    this is one journal commit and one cache flush instead of one per file. It also
    waits for whatever else is dirty on that filesystem: on a data dir of its own,
    uploads in progress (their writeback is started every 8 MiB as they arrive, so
    while the disk keeps up that is their last few MiB; when it does not, more).
    """
    global _syncfs
    if _syncfs is _load_syncfs:
        _syncfs = _load_syncfs()
    if _syncfs is None:
        return False
    if _syncfs(fd) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


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
