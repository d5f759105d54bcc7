"""Appending a partial through ``O_DIRECT``: bytes go from two reused, aligned buffers to the disk.

A buffered ``write`` copies every byte into a freshly allocated page-cache page, which the
kernel writes back later and which pushes other data out of the cache. For an upload, whose
bytes arrive once and are rarely read soon, that copy was the server's largest cost per byte:
``perf`` across a 1 GiB ``filedock upload`` on loopback put the kernel's copy into the page
cache (``copy_folio_from_iter_atomic``) at 15 % of all samples of both cores, ahead of BLAKE3
on both ends together (11 %). With ``O_DIRECT`` the device takes the buffer's pages itself;
the only copy left is into these buffers, the same 8 MiB every time.

``O_DIRECT`` wants the buffer's address, the file offset and the length to be multiples of the
device's logical block; ``ALIGN`` (4096) covers 512- and 4096-byte sectors. So the buffer being
filled always starts at an aligned file offset (``base``): a full buffer is written as it is,
and ``settle`` (whenever the writer has caught up with what arrived) hands the aligned part to
the disk without waiting for it, so that while the disk keeps up, bytes reach the file as they
arrive; when it does not, they go in whole buffers. ``flush`` (before a checkpoint or the seal) writes the aligned part
directly and the rest, under ``ALIGN`` bytes, through the ordinary descriptor, keeping that
rest at the buffer's front: the next direct write rewrites those bytes, unchanged, from the
aligned offset.

Where the filesystem refuses ``O_DIRECT`` (tmpfs before Linux 6.6, some FUSE and network
filesystems; not Linux at all) ``open`` returns None and the caller writes as before; a
direct write refused with ``EINVAL`` (an alignment this device does not take) is made
through the ordinary descriptor instead, and so is everything after it.

Three buffers per upload: while two are being written (on a small shared pool of threads: a
direct write waits for the device, 2-3 ms per 4 MiB here), the writer copies into and hashes the
third. With one write in flight the device idled between writes (the thread's wake-up, the next
submission); two in flight kept it busy: the server alone took a 1 GiB upload in 0.81-0.89 s
instead of 0.99-1.01 (medians of 10 interleaved pairs, 1.11-1.18x by pairs), and three were no
faster. Two writes may complete out of order, so the file can briefly hold bytes past a range
not yet written; ``written`` is the (offset, CRC-32) of the longest prefix whose writes have all
completed, which is what a checkpoint records and what a writer that met an error (a full disk)
reports. A resume truncates the partial to the recorded offset, so nothing past it, and no hole,
is ever trusted. The hasher may be up to two buffers ahead of the file.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from filedock.digest import ContentHasher

ALIGN = 4096

DEPTH = 2
"""Direct writes one upload keeps in flight (each its own buffer, plus the one being filled)."""

DISK_THREADS = 8
"""Threads shared by every upload's direct writes (each upload has at most ``DEPTH`` in flight)."""

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _disk_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DISK_THREADS, thread_name_prefix="filedock-disk")
        return _pool


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
    """Each buffer: one direct write per ``SIZE`` bytes while the writer is behind (4 MiB wrote 1 GiB in
    0.63-0.86 s here, at 0.30 CPU-s with the copy and the hashing; 16 MiB was no faster)."""

    @classmethod
    def open(cls, path: Path, fd: int, offset: int, crc32: int) -> "DirectAppender | None":
        """An appender writing at ``offset`` (a multiple of ``ALIGN``; the file's CRC-32 up to there:
        ``crc32``) of ``path``, whose ordinary descriptor ``fd`` takes the unaligned rests; None where
        ``O_DIRECT`` cannot be had."""
        if offset % ALIGN:
            raise ValueError(f"a direct append starts on a multiple of {ALIGN}, not at {offset}")
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            direct_fd = os.open(path, os.O_WRONLY | flag)
        except OSError:  # EINVAL: this filesystem has no direct I/O
            return None
        return cls(direct_fd, fd, offset, crc32)

    def __init__(self, direct_fd: int, fd: int, offset: int, crc32: int) -> None:
        self._direct_fd = direct_fd
        self._direct_ok = True  # False once a direct write was refused (EINVAL): the ordinary way after
        self._fd = fd
        self._bufs = [mmap.mmap(-1, self.SIZE) for _ in range(DEPTH + 1)]  # anonymous: page-aligned
        self._views = [memoryview(b) for b in self._bufs]
        self._cur = 0  # the buffer being filled; the ones after it (cyclically) may be in flight
        self.base = offset
        """The file offset of the current buffer's first byte (a multiple of ``ALIGN``)."""
        self._fill = 0
        self._hashed = 0  # bytes at the buffer's front already fed to the hasher (a flushed rest)
        self._pending: deque[tuple[Future, tuple[int, int]]] = deque()  # in flight, oldest first, with its end
        self.written = (offset, crc32)
        """(offset, CRC-32) of the bytes known to be in the file, in order: the end of the longest prefix
        whose writes have all completed."""

    def append(self, data: bytes | memoryview, hasher: ContentHasher) -> None:
        """Take ``data`` into the buffers, writing each full one (hashed as it is handed to the disk)."""
        view = memoryview(data)
        while len(view):
            n = min(len(view), self.SIZE - self._fill)
            self._views[self._cur][self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self.SIZE:
                self._write_front(self.SIZE, hasher)

    def settle(self, hasher: ContentHasher) -> None:
        """The writer has nothing more queued: hand the aligned part of what the buffer holds to the disk
        (once fewer than ``DEPTH`` writes are in flight) and return without waiting for it, so that while the
        disk keeps up, bytes reach the file as they arrive (less a rest under ``ALIGN``), and the next
        bytes are copied and hashed while it writes. While the disk is the slower, what arrives during
        the wait goes into the next write: writes grow to the buffer's size instead of one per chunk
        (a direct write of 1 MiB at a time moved 0.9-1.1 GB/s here, of 4 MiB 1.4-1.6)."""
        aligned = self._fill - self._fill % ALIGN
        if aligned > self._hashed:
            self._write_front(aligned, hasher)

    def flush(self, hasher: ContentHasher) -> None:
        """Every byte appended into the file (not fsync'd: the caller does that) and the hasher."""
        aligned = self._fill - self._fill % ALIGN
        if aligned:
            self._write_front(aligned, hasher)
        self._wait()
        if self._fill > self._hashed:  # the rest, under ALIGN bytes: kept, and rewritten directly later
            view = self._views[self._cur]
            _pwrite_all(self._fd, view[:self._fill], self.base)
            hasher.update(view[self._hashed:self._fill])
            self._hashed = self._fill
        self.written = (self.base + self._fill, hasher.crc32)

    def _write_front(self, length: int, hasher: ContentHasher) -> None:
        """Hash the current buffer's first ``length`` bytes (a multiple of ``ALIGN``), hand them to the
        disk at ``base`` (once a buffer is free for what follows), and go on in the next buffer."""
        view = self._views[self._cur]
        if self._hashed < length:
            hasher.update(view[self._hashed:length])
        end = (self.base + length, hasher.crc32)
        while len(self._pending) >= DEPTH:  # the next buffer is the oldest one in flight
            self._wait_oldest()
        nxt = (self._cur + 1) % len(self._views)
        rest = self._fill - length
        if rest:
            self._views[nxt][:rest] = view[length:self._fill]
        self._pending.append((_disk_pool().submit(self._write_out, view, length, self.base), end))
        self._cur = nxt
        self._hashed = max(self._hashed - length, 0)
        self.base += length
        self._fill = rest

    def _write_out(self, view: memoryview, length: int, offset: int) -> None:
        """On a disk thread: ``view[:length]`` at ``offset``, directly while the device takes it."""
        done = 0
        while done < length:
            if self._direct_ok:
                try:
                    n = os.pwrite(self._direct_fd, view[done:length], offset + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # this device wants another alignment: the ordinary way from now on (the descriptor
                    # stays open until ``close``, as the other write in flight may still be using it)
                    self._direct_ok = False
                    continue
                if not n:
                    raise OSError(errno.EIO, "the file took no bytes")
            else:
                n = os.pwrite(self._fd, view[done:length], offset + done)
            done += n

    def _wait_oldest(self) -> None:
        """Until the oldest write in flight is done; raises what it raised (the writes after it are
        still waited for, by ``_wait``, but ``written`` stays below the failed one)."""
        pending, end = self._pending.popleft()
        try:
            pending.result()
        except BaseException:
            self._abandon()
            raise
        self.written = end

    def _abandon(self) -> None:
        """After a failed write: let the ones behind it finish (they hold buffers) without counting them."""
        while self._pending:
            pending, _ = self._pending.popleft()
            try:
                pending.result()
            except BaseException:
                pass

    def _wait(self) -> None:
        """Until every write in flight is done, in order; raises what the first failed one raised."""
        while self._pending:
            self._wait_oldest()

    def close(self) -> None:
        """Wait for the write in flight, close the direct descriptor, free the buffers (unflushed bytes
        are dropped)."""
        try:
            self._wait()
        except OSError:
            pass  # the writer has this error already
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        for view, buf in zip(self._views, self._bufs):
            view.release()
            try:
                buf.close()
            except BufferError:  # a slice still held (by a failed write's traceback): freed with it
                pass
