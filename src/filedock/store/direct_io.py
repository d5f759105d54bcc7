"""Appending a partial through ``O_DIRECT``: bytes go from one reused, aligned buffer to the disk.

A buffered ``write`` copies every byte into a freshly allocated page-cache page, which the
kernel writes back later and which pushes other data out of the cache. For an upload, whose
bytes arrive once and are rarely read soon, that copy was the server's largest cost per byte:
``perf`` across a 1 GiB ``filedock upload`` on loopback put the kernel's copy into the page
cache (``copy_folio_from_iter_atomic``) at 15 % of all samples of both cores, ahead of BLAKE3
on both ends together (11 %). With ``O_DIRECT`` the device takes the buffer's pages itself;
the only copy left is into this buffer, the same few MiB every time.

``O_DIRECT`` wants the buffer's address, the file offset and the length to be multiples of the
device's logical block; ``ALIGN`` (4096) covers 512- and 4096-byte sectors. So the buffer
always starts at an aligned file offset (``base``): a full buffer is written as it is, and
``settle`` (whenever the writer has caught up with what arrived) writes the aligned part,
so that while the disk keeps up, bytes reach the file as they arrive; when it does not,
they go in whole buffers. ``flush`` (before a checkpoint or the seal) writes the aligned
part directly and the rest,
under ``ALIGN`` bytes, through the ordinary descriptor, keeping that rest at the buffer's
front: the next direct write rewrites those bytes, unchanged, from the aligned offset.

Where the filesystem refuses ``O_DIRECT`` (tmpfs before Linux 6.6, some FUSE and network
filesystems; not Linux at all) ``open`` returns None and the caller writes as before; a
direct write refused with ``EINVAL`` (an alignment this device does not take) is made
through the ordinary descriptor instead, and so is everything after it.

The hasher is fed bytes only once they are in the file, in order: after an error (a full
disk) its offset and CRC-32 still describe what the file holds.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from filedock.digest import ContentHasher

ALIGN = 4096


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if not n:
            raise OSError(errno.EIO, "the file took no bytes")
        done += n


class DirectAppender:
    """Appends to a partial from file offset ``base`` on, through ``O_DIRECT``; made by ``open``.

    Not thread-safe: its owner (a ``PartialWriter``'s strand) calls it from one thread at a time.
    """

    SIZE = 4 << 20
    """The buffer: one direct write per ``SIZE`` bytes (4 MiB wrote 1 GiB in 0.63-0.86 s here, at
    0.30 CPU-s with the copy and the hashing; 16 MiB was no faster)."""

    @classmethod
    def open(cls, path: Path, fd: int, offset: int) -> "DirectAppender | None":
        """An appender writing at ``offset`` (a multiple of ``ALIGN``) of ``path``, whose ordinary
        descriptor ``fd`` takes the unaligned rests; None where ``O_DIRECT`` cannot be had."""
        if offset % ALIGN:
            raise ValueError(f"a direct append starts on a multiple of {ALIGN}, not at {offset}")
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            direct_fd = os.open(path, os.O_WRONLY | flag)
        except OSError:  # EINVAL: this filesystem has no direct I/O
            return None
        return cls(direct_fd, fd, offset)

    def __init__(self, direct_fd: int, fd: int, offset: int) -> None:
        self._direct_fd = direct_fd
        self._fd = fd
        self._buf = mmap.mmap(-1, self.SIZE)  # anonymous: page-aligned
        self._view = memoryview(self._buf)
        self.base = offset
        """The file offset of the buffer's first byte (a multiple of ``ALIGN``)."""
        self._fill = 0
        self._hashed = 0  # bytes at the buffer's front already fed to the hasher (a flushed rest)

    @property
    def direct(self) -> bool:
        """Whether full buffers still go out through ``O_DIRECT``."""
        return self._direct_fd >= 0

    @property
    def direct_fd(self) -> int:
        return self._direct_fd

    def append(self, data: bytes | memoryview, hasher: ContentHasher) -> None:
        """Take ``data`` into the buffer, writing each full buffer (and hashing it once written)."""
        view = memoryview(data)
        while len(view):
            n = min(len(view), self.SIZE - self._fill)
            self._view[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self.SIZE:
                self._write_front(self.SIZE, hasher)

    def settle(self, hasher: ContentHasher) -> None:
        """Write the aligned part of what the buffer holds now (the writer has nothing more queued):
        while the disk keeps up, bytes reach the file as they arrive, less a rest under ``ALIGN``."""
        aligned = self._fill - self._fill % ALIGN
        if aligned > self._hashed:
            self._write_front(aligned, hasher)

    def flush(self, hasher: ContentHasher) -> None:
        """Every byte appended into the file (not fsync'd: the caller does that) and the hasher."""
        aligned = self._fill - self._fill % ALIGN
        if aligned:
            self._write_front(aligned, hasher)
        if self._fill > self._hashed:  # the rest, under ALIGN bytes: kept, and rewritten directly later
            _pwrite_all(self._fd, self._view[:self._fill], self.base)
            hasher.update(self._view[self._hashed:self._fill])
            self._hashed = self._fill

    def _write_front(self, length: int, hasher: ContentHasher) -> None:
        """Write the buffer's first ``length`` bytes (a multiple of ``ALIGN``) at ``base`` and move on."""
        done = 0
        while done < length:
            if self._direct_fd >= 0:
                try:
                    n = os.pwrite(self._direct_fd, self._view[done:length], self.base + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._stop_direct()  # this device wants another alignment: the ordinary way
                    continue
                if not n:
                    raise OSError(errno.EIO, "the file took no bytes")
            else:
                n = os.pwrite(self._fd, self._view[done:length], self.base + done)
            done += n
        if self._hashed < length:
            hasher.update(self._view[self._hashed:length])
        rest = self._fill - length  # < length whenever it is not 0: no overlap
        if rest:
            self._view[:rest] = self._view[length:self._fill]
        self._hashed = max(self._hashed - length, 0)
        self.base += length
        self._fill = rest

    def _stop_direct(self) -> None:
        os.close(self._direct_fd)
        self._direct_fd = -1

    def close(self) -> None:
        """Close the direct descriptor and free the buffer (unflushed bytes are dropped)."""
        if self._direct_fd >= 0:
            self._stop_direct()
        self._view.release()
        try:
            self._buf.close()
        except BufferError:  # a slice still held (by a failed write's traceback): freed with it
            pass
