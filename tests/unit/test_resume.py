"""Resuming a partial after a crash: trusted, spot-checked or re-hashed, never wrong."""

from __future__ import annotations

import os
import uuid

import pytest

from filedock import digest
from filedock.digest import BLOCK_SIZE, ContentHasher
from filedock.store import blobs as blobs_module
from filedock.store.blobs import BlobStore


def one_pass(data: bytes) -> str:
    h = ContentHasher()
    h.update(data)
    return h.hexdigest()


@pytest.fixture
def setup(tmp_path):
    store = BlobStore(tmp_path)
    job, key = str(uuid.uuid4()), str(uuid.uuid4())
    data = os.urandom(3 * BLOCK_SIZE + 12345)
    w = store.open_partial(job, key, 0, 0, None)
    cut = 3 * BLOCK_SIZE + 1000
    w.write(data[:cut])
    cp = w.checkpoint()
    # a crash after the checkpoint: more bytes reached the file, never recorded
    w.write(b"\xaa" * 5000)
    w.snapshot()
    w.close()
    return store, job, key, data, cp


def count_full_rehash(monkeypatch):
    calls = []
    real = blobs_module.hash_stream

    def spy(f, length=None, *args, **kwargs):
        calls.append(length)
        return real(f, length, *args, **kwargs)
    monkeypatch.setattr(blobs_module, "hash_stream", spy)
    return calls


def test_crash_after_checkpoint_resumes_without_rehashing_the_prefix(setup, monkeypatch):
    """File grew after the checkpoint: spot checks pass, only the tail is read, digest is right."""
    store, job, key, data, cp = setup
    calls = count_full_rehash(monkeypatch)
    w = store.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    assert w.offset == cp.offset
    assert calls == [cp.offset - 3 * BLOCK_SIZE]  # the unfinished block only
    w.write(data[cp.offset:])
    crc, dig = w.seal()
    assert dig == one_pass(data) and crc == digest.crc32(data)
    assert store.part_path(job, key).read_bytes() == data


def test_crash_with_a_corrupted_block_rehashes_from_disk(setup, monkeypatch):
    """A recorded block changed behind the server's back fails the spot check: the digest shows it."""
    store, job, key, data, cp = setup
    with open(store.part_path(job, key), "r+b") as f:
        f.seek(BLOCK_SIZE + 10)
        f.write(b"\x00\x01\x02")
    calls = count_full_rehash(monkeypatch)
    w = store.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    assert calls == [cp.offset]  # the whole prefix, from disk
    w.write(data[cp.offset:])
    _, dig = w.seal()
    assert dig != one_pass(data)
    assert dig == one_pass(store.part_path(job, key).read_bytes())
