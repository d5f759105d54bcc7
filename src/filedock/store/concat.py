"""Concatenating complete files into a new one (tus ``concatenation``): the final's bytes are its parts' in order.

In the data dir the parts are copied by the kernel (``copy_file_range``, else
``os.sendfile``) into the final's partial, which is fsync'd and then read back
once: each part's stretch must have the CRC-32 its record holds, and the CRC-32
and ``blake3-4m`` digest of the whole are computed over what is on disk, not
assumed. Only then is the partial renamed into place (durably), as any upload's.

Any other blob store (S3) gets its bytes copied through a partial writer, which
hashes them as they pass, checks each part's CRC-32 the same way, and finishes
the final like any upload (for S3: a multipart upload completed).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from filedock import durability
from filedock.digest import ContentHasher, crc32 as crc32_of
from filedock.errors import ErrorCode, FiledockError

CHUNK = 1 << 20


@dataclass(frozen=True)
class PartSource:
    """One complete part: its blobs' name, its size and the CRC-32 its record holds."""

    blob_name: str
    size: int
    crc32: int


def concatenate(blobs: Any, job_id: str, final_blob: str, parts: list[PartSource]) -> tuple[int, str]:
    """Make ``final_blob`` of job ``job_id`` the parts' bytes in order, durably; returns its (CRC-32, digest).

    Blocks on disk (or the network): call it off the reactor. Raises
    ``FiledockError(digest-mismatch)`` (nothing published) if a part's bytes are not
    the ones its record describes.
    """
    if getattr(blobs, "remote", False) or not hasattr(blobs, "part_path"):
        return _copy_through(blobs, job_id, final_blob, parts)
    return _copy_in_kernel(blobs, job_id, final_blob, parts)


def _mismatch(index: int) -> FiledockError:
    return FiledockError(ErrorCode.DIGEST_MISMATCH,
                         f"part {index + 1} does not hold the bytes its record describes; nothing was kept")


def _kernel_copy(src: int, dst: int, length: int) -> None:
    """``length`` bytes from ``src`` (at 0) to ``dst`` (at its end), in the kernel."""
    offset = 0
    while offset < length:
        try:
            n = os.copy_file_range(src, dst, length - offset, offset)
        except (AttributeError, OSError):  # an old kernel or a file system without it
            n = os.sendfile(dst, src, offset, length - offset)
        if n <= 0:
            raise FiledockError(ErrorCode.DIGEST_MISMATCH, "a part is shorter than its record; nothing was kept")
        offset += n


def _copy_in_kernel(blobs: Any, job_id: str, final_blob: str, parts: list[PartSource]) -> tuple[int, str]:
    part_path = blobs.part_path(job_id, final_blob)
    blobs.job_dir(job_id).mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(part_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            for part in parts:
                with blobs.open_complete(job_id, part.blob_name) as source:
                    _kernel_copy(source.fileno(), fd, part.size)
            os.fsync(fd)
            hasher = _verify(fd, parts)
        except OSError as exc:
            raise (FiledockError(ErrorCode.NO_SPACE, "the server's disk is full; nothing was kept")
                   if exc.errno in (28, 122) else exc) from exc
    except BaseException:
        os.close(fd)
        part_path.unlink(missing_ok=True)
        raise
    os.close(fd)
    blobs.job_dir_made_durable(blobs.job_dir(job_id))
    durability.publish(part_path, blobs.final_path(job_id, final_blob))
    return hasher.crc32, hasher.hexdigest()


def _verify(fd: int, parts: list[PartSource]) -> ContentHasher:
    """Read the concatenation back: each part's stretch has its CRC-32; the whole is hashed."""
    hasher = ContentHasher()
    position = 0
    for index, part in enumerate(parts):
        crc, left = 0, part.size
        while left:
            data = os.pread(fd, min(CHUNK, left), position)
            if not data:
                raise _mismatch(index)
            crc = crc32_of(data, crc)
            hasher.update(data)
            position += len(data)
            left -= len(data)
        if crc != part.crc32:
            raise _mismatch(index)
    if os.fstat(fd).st_size != position:
        raise _mismatch(len(parts) - 1)
    return hasher


def _copy_through(blobs: Any, job_id: str, final_blob: str, parts: list[PartSource]) -> tuple[int, str]:
    writer = blobs.open_partial(job_id, final_blob, 0, 0, None, recover=False)
    drained = threading.Event()
    writer.on_drain = drained.set
    try:
        for index, part in enumerate(parts):
            crc, left = 0, part.size
            with blobs.open_complete(job_id, part.blob_name) as source:
                while left:
                    data = source.read(min(CHUNK, left))
                    if not data:
                        raise _mismatch(index)
                    crc = crc32_of(data, crc)
                    left -= len(data)
                    drained.clear()
                    if writer.write(data):
                        drained.wait()  # the writer's queue is behind: bounded memory
            if crc != part.crc32:
                raise _mismatch(index)
        return writer.finish()
    except BaseException:
        writer.close()
        blobs.discard(job_id, final_blob)
        raise


__all__ = ["PartSource", "concatenate"]
