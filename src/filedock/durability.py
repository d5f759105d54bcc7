"""Making renames durable: the one place that knows a rename needs its directory fsync'd."""

from __future__ import annotations

import os
from pathlib import Path


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
