"""Tests for ``filedock.digest``: CRC-32 and the ``blake3-4m`` content digest."""

from __future__ import annotations

import io
import random
import zlib

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filedock.digest import (
    BLOCK_HASH_SIZE, BLOCK_SIZE, SCHEME, ContentHasher, block_hash, combine, crc32, hash_file, hash_stream,
)

MiB = 1 << 20
SIZES = [0, 1, BLOCK_SIZE, BLOCK_SIZE + 1, 9 * MiB]
FAST = settings(max_examples=300, deadline=None)
BIG = settings(max_examples=25, deadline=None)

_SOURCE = random.Random(2007).randbytes(9 * MiB + 17)
"""Deterministic random bytes; tests take prefixes of it."""


def reference_blocks(data: bytes) -> list[bytes]:
    """BLAKE3 of each 4 MiB block (the last may be shorter), computed independently of filedock."""
    return [blake3.blake3(data[i:i + BLOCK_SIZE]).digest() for i in range(0, len(data), BLOCK_SIZE)]


def reference_digest(data: bytes) -> str:
    """blake3-4m computed independently: BLAKE3 of the concatenated block hashes."""
    return blake3.blake3(b"".join(reference_blocks(data))).hexdigest()


def split_at(data: bytes | memoryview, cuts: list[int]) -> list[memoryview]:
    """``data`` cut at the given positions, as views (no copies of megabytes)."""
    view = memoryview(data)
    points = sorted({c for c in cuts if 0 < c < len(view)})
    return [view[a:b] for a, b in zip([0, *points], [*points, len(view)])]


def cut_points(size: int) -> st.SearchStrategy[list[int]]:
    """Cut positions anywhere, with a bias to just around block boundaries."""
    near_block = st.builds(lambda k, d: k * BLOCK_SIZE + d, st.integers(0, 3), st.integers(-2, 2))
    return st.lists(st.integers(0, size) | near_block, max_size=40)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
@given(data=st.data())
@BIG
def test_hasher_matches_reference_for_any_chunking(size, data):
    """CRC equals zlib.crc32 and the digest equals the independent blake3-4m, however the bytes are split."""
    payload = _SOURCE[:size]
    hasher = ContentHasher()
    for chunk in split_at(payload, data.draw(cut_points(size))):
        hasher.update(chunk)
    assert hasher.crc32 == zlib.crc32(payload)
    assert hasher.hexdigest() == reference_digest(payload)
    assert hasher.offset == size


@given(payload=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=20))
@FAST
def test_small_inputs_match_reference(payload, cuts):
    """For arbitrary small inputs and splits, CRC and digest match the reference."""
    hasher = ContentHasher()
    for chunk in split_at(payload, cuts):
        hasher.update(bytes(chunk))
    assert (hasher.crc32, hasher.hexdigest()) == (zlib.crc32(payload), reference_digest(payload))


def test_empty_input_has_no_blocks():
    """The digest of nothing is BLAKE3 of the empty string (no block hashes at all)."""
    hasher = ContentHasher()
    assert hasher.hexdigest() == blake3.blake3(b"").hexdigest()
    assert hasher.crc32 == 0
    assert hasher.take_finished_blocks() == b""


def test_exact_block_is_one_block_not_two():
    """Exactly 4 MiB is one block: no empty trailing block is hashed."""
    payload = _SOURCE[:BLOCK_SIZE]
    hasher = ContentHasher()
    hasher.update(payload)
    assert hasher.hexdigest() == blake3.blake3(blake3.blake3(payload).digest()).hexdigest()
    assert hasher.take_finished_blocks() == blake3.blake3(payload).digest()


def test_digest_is_not_plain_blake3():
    """For a one-block file the content digest is BLAKE3 of the block hash, not BLAKE3 of the bytes."""
    hasher = ContentHasher()
    hasher.update(b"abc")
    assert hasher.hexdigest() != blake3.blake3(b"abc").hexdigest()
    assert hasher.hexdigest() == blake3.blake3(blake3.blake3(b"abc").digest()).hexdigest()


def test_hexdigest_midstream_leaves_the_hasher_usable():
    """Asking for the digest part way leaves the final result unchanged."""
    payload = _SOURCE[:BLOCK_SIZE + 100]
    hasher = ContentHasher()
    hasher.update(payload[:50])
    assert hasher.hexdigest() == reference_digest(payload[:50])
    hasher.update(payload[50:BLOCK_SIZE])
    assert hasher.hexdigest() == reference_digest(payload[:BLOCK_SIZE])
    hasher.update(payload[BLOCK_SIZE:])
    assert hasher.hexdigest() == reference_digest(payload)
    assert hasher.hexdigest() == reference_digest(payload)


def test_update_accepts_bytes_bytearray_and_memoryview():
    """Every bytes-like type gives the same result."""
    results = set()
    for kind in (bytes, bytearray, memoryview):
        hasher = ContentHasher()
        hasher.update(kind(b"hello world"))
        results.add((hasher.crc32, hasher.hexdigest()))
    assert results == {(zlib.crc32(b"hello world"), reference_digest(b"hello world"))}


@given(payload=st.binary(max_size=2000), value=st.integers(0, 0xFFFFFFFF))
@FAST
def test_crc32_is_zlibs(payload, value):
    """``crc32`` equals zlib.crc32, including a running value."""
    assert crc32(payload) == zlib.crc32(payload)
    assert crc32(payload, value) == zlib.crc32(payload, value)


def test_helpers_match_reference():
    """block_hash is BLAKE3-256 of a block; combine is BLAKE3 hex of the concatenated hashes."""
    assert block_hash(b"x") == blake3.blake3(b"x").digest()
    assert len(block_hash(b"x")) == BLOCK_HASH_SIZE
    assert combine(b"a" * 64) == blake3.blake3(b"a" * 64).hexdigest()
    assert SCHEME == "blake3-4m"


@pytest.mark.parametrize("length", [1, 31, 33, 64 + 5])
def test_block_hashes_must_be_whole(length):
    """A resume state whose hash list is not a multiple of 32 bytes is refused."""
    with pytest.raises(ValueError):
        ContentHasher(0, b"\0" * length)


@given(data=st.data())
@BIG
def test_resume_from_checkpoint_equals_one_pass(data):
    """A hasher resumed from (crc, finished block hashes) plus the re-fed tail (crc=False) equals one pass."""
    size = data.draw(st.sampled_from(SIZES[1:]) | st.integers(0, 9 * MiB), label="size")
    payload = _SOURCE[:size]
    point = data.draw(st.integers(0, size) | st.sampled_from([BLOCK_SIZE, BLOCK_SIZE - 1, BLOCK_SIZE + 1]).filter(
        lambda p: p <= size), label="checkpoint")

    first = ContentHasher()
    collected = bytearray()
    for chunk in split_at(payload[:point], data.draw(cut_points(point), label="first cuts")):
        first.update(chunk)
        collected += first.take_finished_blocks()
    crc_at_point = first.crc32
    whole = point // BLOCK_SIZE
    assert bytes(collected) == b"".join(reference_blocks(payload[:whole * BLOCK_SIZE]))

    resumed = ContentHasher(crc_at_point, bytes(collected))
    assert resumed.offset == whole * BLOCK_SIZE
    tail = payload[whole * BLOCK_SIZE:point]
    for chunk in split_at(tail, data.draw(st.lists(st.integers(0, len(tail)), max_size=5), label="tail cuts")):
        resumed.update(chunk, crc=False)
    assert resumed.crc32 == crc_at_point
    assert resumed.offset == point
    for chunk in split_at(payload[point:], data.draw(cut_points(size - point), label="rest cuts")):
        resumed.update(chunk)

    assert resumed.crc32 == zlib.crc32(payload)
    assert resumed.hexdigest() == reference_digest(payload)
    assert resumed.offset == size


def test_resume_with_wrong_crc_is_not_corrected():
    """The resumed CRC is taken on trust: the tail fed with crc=False does not change it."""
    resumed = ContentHasher(0x1234)
    resumed.update(b"abc", crc=False)
    assert resumed.crc32 == 0x1234


@given(data=st.data())
@BIG
def test_take_finished_blocks_returns_each_block_once(data):
    """Across any interleaving of updates and takes, every whole block hash comes out exactly once, in order."""
    size = data.draw(st.sampled_from(SIZES), label="size")
    payload = _SOURCE[:size]
    hasher = ContentHasher()
    taken = []
    for chunk in split_at(payload, data.draw(cut_points(size), label="cuts")):
        hasher.update(chunk)
        if data.draw(st.booleans(), label="take now"):
            taken.append(hasher.take_finished_blocks())
    taken.append(hasher.take_finished_blocks())
    assert hasher.take_finished_blocks() == b""
    assert b"".join(taken) == b"".join(reference_blocks(payload[:size // BLOCK_SIZE * BLOCK_SIZE]))
    assert all(len(t) % BLOCK_HASH_SIZE == 0 for t in taken)


def test_partial_last_block_is_never_a_finished_block():
    """A trailing partial block counts in the digest but is not handed out as finished."""
    hasher = ContentHasher()
    hasher.update(_SOURCE[:BLOCK_SIZE + 1])
    assert hasher.take_finished_blocks() == blake3.blake3(_SOURCE[:BLOCK_SIZE]).digest()
    assert hasher.take_finished_blocks() == b""
    assert hasher.hexdigest() == reference_digest(_SOURCE[:BLOCK_SIZE + 1])


@pytest.mark.parametrize("length", [None, 0, 1, BLOCK_SIZE + 3, 9 * MiB])
def test_hash_stream_and_file_match_reference(tmp_path, length):
    """hash_stream and hash_file hash all of a stream, or only its first ``length`` bytes."""
    payload = _SOURCE[:9 * MiB + 17]
    expected = payload if length is None else payload[:length]
    got = hash_stream(io.BytesIO(payload), length, chunk_size=1 << 16 | 7)
    assert (got.crc32, got.hexdigest(), got.offset) == (zlib.crc32(expected), reference_digest(expected),
                                                        len(expected))
    path = tmp_path / "f"
    path.write_bytes(payload)
    got = hash_file(path, length)
    assert (got.crc32, got.hexdigest()) == (zlib.crc32(expected), reference_digest(expected))


def test_hash_stream_stops_at_end_of_a_short_stream():
    """Asking for more bytes than the stream has hashes what there is."""
    got = hash_stream(io.BytesIO(b"abc"), 10)
    assert (got.offset, got.crc32) == (3, zlib.crc32(b"abc"))


def test_hash_stream_continues_a_given_hasher():
    """hash_stream feeds an existing hasher and returns that same hasher."""
    hasher = ContentHasher()
    hasher.update(b"head")
    assert hash_stream(io.BytesIO(b"tail"), hasher=hasher) is hasher
    assert hasher.hexdigest() == reference_digest(b"headtail")
