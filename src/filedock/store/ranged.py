"""Ranged uploads into the data dir: several writers, each its own byte range of one partial.

Each range starts on a ``blake3-4m`` block boundary (``wire.RANGE_ALIGN``), so a
writer hashes whole blocks of the file: the block hashes and per-block CRC-32s it
finishes are what the metadata store records once they are fsync'd, and the file's
digest and CRC-32 are built from all blocks at the end (``file_digest``), with no
byte read twice. Bytes are written with ``pwrite`` at their offsets into the same
``<key>.part`` the plain upload uses.
"""

from __future__ import annotations

import os

import blake3

from filedock import durability
from filedock.digest import BLOCK_SIZE, combine, crc32, crc32_combine
from filedock.errors import ErrorCode, FiledockError
from filedock.store.blobs import BlobStore, _no_space


def supports_ranges(blobs) -> bool:
    """Whether ``blobs`` takes ranged uploads: the data dir does; S3 does not (see docs/protocol.md)."""
    return isinstance(blobs, BlobStore) and not blobs.remote


def block_count(size: int) -> int:
    """Blocks of a ``size``-byte file (the last may be short)."""
    return -(-size // BLOCK_SIZE)


def durable_runs(blocks: set[int] | dict, size: int) -> tuple[tuple[int, int], ...]:
    """Byte ranges covered by the durable ``blocks`` (indexes), merged, ascending."""
    out: list[list[int]] = []
    for i in sorted(blocks):
        start, end = i * BLOCK_SIZE, min(size, (i + 1) * BLOCK_SIZE)
        if out and out[-1][1] == start:
            out[-1][1] = end
        else:
            out.append([start, end])
    return tuple((a, b) for a, b in out)


def resume_offset(blocks: set[int] | dict, size: int, start: int, end: int) -> int:
    """Where a range ``[start, end)`` resumes: past the durable blocks it begins with."""
    offset = start
    while offset < end and offset // BLOCK_SIZE in blocks:
        offset = min(end, offset + BLOCK_SIZE)
    return offset


def file_digest(blocks: list[tuple[int, str, int]], size: int) -> tuple[int, str]:
    """The whole file's (CRC-32, ``blake3-4m`` digest) from all its blocks (index, hash hex, CRC-32)."""
    crc, hashes = 0, bytearray()
    for i, digest, block_crc in blocks:
        crc = crc32_combine(crc, block_crc, min(BLOCK_SIZE, size - i * BLOCK_SIZE))
        hashes += bytes.fromhex(digest)
    return crc, combine(bytes(hashes))


class RangeWriter:
    """Writes ``[offset, end)`` of a ``size``-byte file's partial in order, hashing each block.

    ``offset`` starts on a block boundary. ``take_finished`` hands out the blocks
    finished since the last call as (index, hash hex, CRC-32); they are durable once
    ``sync`` returned after the call.
    """

    def __init__(self, blobs: BlobStore, job_id: str, key: str, size: int, offset: int, end: int) -> None:
        if offset % BLOCK_SIZE:
            raise ValueError("a range resumes on a block boundary")
        self.part = blobs.part_path(job_id, key)
        self.size, self.offset, self.end = size, offset, end
        self.closed = False
        self._blobs = blobs
        self._hasher = blake3.blake3()
        self._crc = 0
        self._in_block = 0
        self._finished: list[tuple[int, str, int]] = []
        try:
            try:
                self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)  # never emptied: other ranges' bytes
            except FileNotFoundError:
                self.part.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _no_space(exc) from exc
        self._dir_synced = False

    def write(self, data: bytes | memoryview) -> None:
        """Write the next bytes of the range at their offset and hash them."""
        view = memoryview(data)
        if len(view) > self.end - self.offset:
            raise FiledockError(ErrorCode.EXCESS_DATA, "bytes past the range's end")
        while len(view):
            part = view[:BLOCK_SIZE - self._in_block]
            try:
                done = 0
                while done < len(part):
                    done += os.pwrite(self._fd, part[done:], self.offset + done)
            except OSError as exc:
                raise _no_space(exc) from exc
            self._hasher.update(part)
            self._crc = crc32(part, self._crc)
            self._in_block += len(part)
            self.offset += len(part)
            view = view[len(part):]
            if self._in_block == BLOCK_SIZE or self.offset == self.size:
                index = (self.offset - 1) // BLOCK_SIZE
                self._finished.append((index, self._hasher.hexdigest(), self._crc))
                self._hasher, self._crc, self._in_block = blake3.blake3(), 0, 0

    def take_finished(self) -> list[tuple[int, str, int]]:
        """The blocks finished since the last call (call before ``sync``; record after it)."""
        out, self._finished = self._finished, []
        return out

    def sync(self) -> None:
        """fsync the partial (and, the first time, its directory: the name must survive too)."""
        try:
            os.fsync(self._fd)
            if not self._dir_synced:
                self._blobs.job_dir_made_durable(self.part.parent)
                durability.fsync_dir(self.part.parent)
                self._dir_synced = True
        except OSError as exc:
            raise _no_space(exc) from exc

    def close(self) -> None:
        """Close the file; the partial stays."""
        if not self.closed:
            self.closed = True
            os.close(self._fd)


def publish(blobs: BlobStore, job_id: str, key: str) -> None:
    """Every block is durable: fsync the partial once more, rename it into place, fsync the directory."""
    part, final = blobs.part_path(job_id, key), blobs.final_path(job_id, key)
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    blobs.job_dir_made_durable(final.parent)
    durability.publish(part, final)


__all__ = ["RangeWriter", "block_count", "durable_runs", "file_digest", "publish", "resume_offset", "supports_ranges"]
