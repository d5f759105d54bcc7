"""CRC-32 and the content digest: one implementation for the server and the client.

CRC-32 is the 2007 design's checksum (zlib's polynomial). The content digest is
``blake3-4m``: BLAKE3 of each 4 MiB block, then BLAKE3 of the concatenated block
hashes (the last block may be shorter; an empty file has no blocks). Because the
state between blocks is just the list of finished block hashes, a receiver can
checkpoint it next to the durable offset and resume without reading the prefix
again.
"""

from __future__ import annotations

import functools
import os
from typing import BinaryIO

import blake3

try:  # ISA-L's CRC-32 runs about 5x zlib's here, with the same results
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a declared dependency
    from zlib import crc32 as _crc32

BLOCK_SIZE = 4 * 1024 * 1024
"""Bytes per content-digest block."""

BLOCK_HASH_SIZE = 32
"""Bytes per block hash."""

SCHEME = "blake3-4m"
"""The content digest's name in docs, JSON and logs."""


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """Running CRC-32, compatible with ``zlib.crc32``."""
    return _crc32(data, value)


_CRC_POLY = 0xEDB88320  # zlib's polynomial, reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial (reflected bit order, as zlib's ``multmodp``)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod p(x), k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=64)
def _x8nmodp(n: int) -> int:
    """x^(8n) mod p(x): the operator that shifts a CRC over ``n`` zero bytes (cached: ranges repeat lengths)."""
    p, k = 1 << 31, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's ``crc32_combine``):
    ranges of a file hashed apart give the whole file's CRC without reading it again."""
    return _multmodp(_x8nmodp(len2), crc1 & 0xFFFFFFFF) ^ (crc2 & 0xFFFFFFFF)


def format_crc(crc32: int) -> str:
    """CRC-32 as it appears on the wire, in JSON and in the records: 8 lowercase hex digits."""
    return f"{crc32 & 0xFFFFFFFF:08x}"


def block_hash(block: bytes | memoryview) -> bytes:
    """BLAKE3-256 of one block."""
    return blake3.blake3(block).digest()


def combine(block_hashes: bytes) -> str:
    """The content digest, as 64 hex digits, from the concatenated block hashes."""
    return blake3.blake3(block_hashes).hexdigest()


class ContentHasher:
    """CRC-32 and ``blake3-4m`` over a stream fed in order, in chunks of any size.

    ``finished_blocks`` holds hashes of whole blocks not yet collected with
    ``take_finished_blocks``: a receiver appends them to its checkpoint.
    """

    def __init__(self, crc: int = 0, block_hashes: bytes = b"") -> None:
        if len(block_hashes) % BLOCK_HASH_SIZE:
            raise ValueError("block hashes must be a multiple of 32 bytes")
        self.crc32 = crc
        self.offset = len(block_hashes) // BLOCK_HASH_SIZE * BLOCK_SIZE
        self._outer = blake3.blake3(block_hashes)
        self._block = blake3.blake3()
        self._in_block = 0
        self._finished = bytearray()

    def update(self, data: bytes | memoryview, *, crc: bool = True) -> None:
        """Feed the next bytes. ``crc=False`` re-feeds bytes whose CRC is already counted."""
        if crc:
            self.crc32 = _crc32(data, self.crc32)
        view = memoryview(data)
        while len(view):
            room = BLOCK_SIZE - self._in_block
            part = view[:room]
            self._block.update(part)
            self._in_block += len(part)
            self.offset += len(part)
            view = view[room:]
            if self._in_block == BLOCK_SIZE:
                self._finish_block()

    def _finish_block(self) -> None:
        digest = self._block.digest()
        self._outer.update(digest)
        self._finished += digest
        self._block = blake3.blake3()
        self._in_block = 0

    def take_finished_blocks(self) -> bytes:
        """Hashes of the blocks finished since the last call, concatenated."""
        out = bytes(self._finished)
        self._finished.clear()
        return out

    def hexdigest(self) -> str:
        """The content digest of everything fed so far (the hasher stays usable)."""
        outer = self._outer.copy()
        if self._in_block:
            outer.update(self._block.digest())
        return outer.hexdigest()


def hash_stream(stream: BinaryIO, length: int | None = None, chunk_size: int = 1 << 20,
                hasher: ContentHasher | None = None, *, crc: bool = True) -> ContentHasher:
    """Feed ``length`` bytes (or all) of a binary stream to a hasher, in bounded memory.

    ``crc=False`` re-feeds bytes whose CRC-32 the hasher already counts (a resumed tail).
    """
    hasher = hasher or ContentHasher()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    remaining = length
    while remaining is None or remaining > 0:
        want = chunk_size if remaining is None else min(chunk_size, remaining)
        n = stream.readinto(view[:want])
        if not n:
            break
        hasher.update(view[:n], crc=crc)
        if remaining is not None:
            remaining -= n
    return hasher


def hash_file(path: str | os.PathLike, length: int | None = None) -> ContentHasher:
    """CRC-32 and content digest of a file (or of its first ``length`` bytes)."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f, length)
