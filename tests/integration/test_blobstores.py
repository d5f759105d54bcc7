"""The blob-store interface's behaviours, on every backend: the data dir and S3-compatible object storage.

Each test gets ``blob_store_factory``: a function making a NEW store instance over the
same place each time it is called (as another server would open it). Backends are
the parameters; an S3 engine is one line in ``S3_ENGINES`` (its fixture yields an
``S3Target``: endpoint, keys, a fresh bucket).
"""

from __future__ import annotations

import os
import uuid

import pytest

from filedock.digest import ContentHasher
from filedock.errors import ErrorCode, FiledockError
from filedock.store.blobs import BlobStore, PrefixLost
from filedock.store.s3 import S3_MIN_PART, S3BlobStore, S3ReadStream, part_size_for
from tests.engines.seaweedfs import S3Target

MiB = 1 << 20
S3_ENGINES = {
    "seaweedfs": "s3_bucket",
}
"""Backend name -> the fixture that yields an ``S3Target`` for one test."""


@pytest.fixture(params=["local", *S3_ENGINES])
def backend(request, tmp_path):
    """(name, S3Target or the data dir)."""
    if request.param == "local":
        return "local", tmp_path / "data"
    return request.param, request.getfixturevalue(S3_ENGINES[request.param])


@pytest.fixture
def blob_store_factory(backend):
    """Makes a new store over the backend's place on each call; closes them all at the end."""
    name, where = backend
    made = []

    def make():
        if name == "local":
            store = BlobStore(where)
        else:
            store = S3BlobStore(where.client(), where.bucket, "fd-test")
        made.append(store)
        return store
    make.backend = name
    make.where = where
    yield make
    for store in made:
        store.close()


def _key() -> str:
    return str(uuid.uuid4())


def _digest(data: bytes) -> str:
    h = ContentHasher()
    h.update(data)
    return h.hexdigest()


def _write(writer, data: bytes, chunk: int = 1 * MiB + 4099) -> None:
    """In odd-sized pieces, as a socket delivers them."""
    for start in range(0, len(data), chunk):
        writer.write(data[start:start + chunk])


def _read_all(store, job: str, key: str) -> bytes:
    with store.open_complete(job, key) as f:
        out = bytearray()
        while True:
            piece = f.read(1 << 20)
            if not piece:
                return bytes(out)
            out += piece


def _uploads(factory) -> list[dict]:
    if factory.backend == "local":
        return []
    return factory.where.client().list_multipart_uploads(Bucket=factory.where.bucket).get("Uploads", [])


def _objects(factory) -> list[str]:
    if factory.backend == "local":
        return sorted(str(p.relative_to(factory.where)) for p in factory.where.rglob("*") if p.is_file())
    got = factory.where.client().list_objects_v2(Bucket=factory.where.bucket).get("Contents", [])
    return sorted(o["Key"] for o in got)


def test_write_checkpoint_reopen_on_a_new_store_and_finish(blob_store_factory):
    """What a resume on another server does: open at the recorded checkpoint from a new instance."""
    job, key = _key(), _key()
    data = os.urandom(21 * MiB + 12345)  # two full 8 MiB parts and a tail past them
    first = blob_store_factory()
    w = first.open_partial(job, key, 0, 0, None, size=len(data))
    _write(w, data[:19 * MiB + 7])
    cp = w.checkpoint()
    assert cp.offset == 19 * MiB + 7
    w.close()

    second = blob_store_factory()  # another server: nothing shared but the backend
    w2 = second.open_partial(job, key, cp.offset, cp.crc32, cp.stamp, size=len(data))
    assert w2.offset == cp.offset
    assert not w2.needs_record
    _write(w2, data[cp.offset:])
    crc, digest = w2.finish(_digest(data))
    assert digest == _digest(data)
    assert second.complete_size(job, key) == len(data)
    assert _read_all(blob_store_factory(), job, key) == data
    assert _uploads(blob_store_factory) == []
    assert not [o for o in _objects(blob_store_factory) if o.endswith((".part", ".blocks"))]


def test_tail_survives_a_checkpoint_and_resumes_from_it(blob_store_factory):
    """Bytes past the last full part are durable at a checkpoint, readable by any server."""
    job, key = _key(), _key()
    data = os.urandom(9 * MiB + 333)
    w = blob_store_factory().open_partial(job, key, 0, 0, None, size=len(data))
    _write(w, data[:3 * MiB + 5])  # all of it tail: no full part yet
    cp = w.checkpoint()
    w.close()
    if blob_store_factory.backend != "local":
        tail = blob_store_factory.where.client().get_object(Bucket=blob_store_factory.where.bucket,
                                                            Key=f"fd-test/jobs/{job}/{key}.part")
        assert tail["Body"].read() == data[:3 * MiB + 5]
        assert tail["Metadata"]["offset"] == str(cp.offset)
    w2 = blob_store_factory().open_partial(job, key, cp.offset, cp.crc32, cp.stamp, size=len(data))
    assert (w2.offset, w2.needs_record) == (cp.offset, False)
    _write(w2, data[cp.offset:])
    w2.finish(_digest(data))
    assert _read_all(blob_store_factory(), job, key) == data


def test_bytes_after_the_last_checkpoint_are_not_claimed(blob_store_factory):
    """A crash after more bytes (and parts) went out than were checkpointed: the resume starts at the
    recorded checkpoint, and the file comes out right."""
    job, key = _key(), _key()
    data = os.urandom(30 * MiB + 1)
    w = blob_store_factory().open_partial(job, key, 0, 0, None, size=len(data))
    _write(w, data[:5 * MiB])
    cp = w.checkpoint()
    _write(w, data[5 * MiB:27 * MiB])  # three more parts go out, never checkpointed
    w.snapshot()
    w.close()  # as if the server died here
    w2 = blob_store_factory().open_partial(job, key, cp.offset, cp.crc32, cp.stamp, size=len(data))
    assert w2.offset == cp.offset
    _write(w2, data[cp.offset:])
    w2.finish(_digest(data))
    assert _read_all(blob_store_factory(), job, key) == data
    assert _uploads(blob_store_factory) == []


def test_parts_are_never_too_small(blob_store_factory):
    """Every part but the last is at least S3's 5 MiB (no EntityTooSmall), whatever the writes' sizes."""
    if blob_store_factory.backend == "local":
        pytest.skip("the data dir has no parts")
    job, key = _key(), _key()
    data = os.urandom(26 * MiB + 17)
    store = blob_store_factory()
    w = store.open_partial(job, key, 0, 0, None, size=len(data))
    pos = 0
    for size in (1, 4097, 65536, 3 * MiB + 1, 777_777):  # odd writes, a checkpoint (with a tail) after each kind
        for _ in range(4):
            w.write(data[pos:pos + size])
            pos += size
        w.checkpoint()
    assert pos < len(data)
    cp = w.checkpoint()
    _write(w, data[cp.offset:])
    w.checkpoint()
    name = f"fd-test/jobs/{job}/{key}"
    parts = store.list_parts(name, w.upload_id)
    assert len(parts) == 3
    assert all(p["Size"] == part_size_for(len(data)) >= S3_MIN_PART for p in parts)
    w.finish(_digest(data))  # the tail, 2 MiB, goes as the last part: allowed
    assert _read_all(store, job, key) == data


def test_a_digest_mismatch_never_publishes(blob_store_factory):
    job, key = _key(), _key()
    data = os.urandom(17 * MiB)
    store = blob_store_factory()
    w = store.open_partial(job, key, 0, 0, None, size=len(data))
    _write(w, data)
    with pytest.raises(FiledockError) as err:
        w.finish(_digest(b"other bytes"))
    assert err.value.code is ErrorCode.DIGEST_MISMATCH
    assert store.complete_size(job, key) is None
    assert blob_store_factory().complete_size(job, key) is None
    store.discard(job, key)  # what the server does next
    assert _uploads(blob_store_factory) == []
    assert [o for o in _objects(blob_store_factory) if key in o] == []


def test_discard_leaves_no_multipart_upload_and_no_tail(blob_store_factory):
    job, key = _key(), _key()
    data = os.urandom(18 * MiB)
    store = blob_store_factory()
    w = store.open_partial(job, key, 0, 0, None, size=len(data))
    _write(w, data)
    w.checkpoint()
    w.close()
    if blob_store_factory.backend != "local":
        assert len(_uploads(blob_store_factory)) == 1
    blob_store_factory().discard(job, key)
    assert _uploads(blob_store_factory) == []
    assert [o for o in _objects(blob_store_factory) if key in o] == []
    with pytest.raises(PrefixLost):  # the record must go back to 0 before a resume
        blob_store_factory().open_partial(job, key, 16 * MiB, 0, None, size=len(data))


def test_delete_job_removes_complete_files_and_partials(blob_store_factory):
    job = _key()
    done, partial = _key(), _key()
    store = blob_store_factory()
    w = store.open_partial(job, done, 0, 0, None, size=100)
    w.write(b"x" * 100)
    w.finish()
    w = store.open_partial(job, partial, 0, 0, None, size=20 * MiB)
    _write(w, os.urandom(12 * MiB))
    w.checkpoint()
    w.close()
    store.delete_job(job)
    assert _uploads(blob_store_factory) == []
    assert [o for o in _objects(blob_store_factory) if job in o] == []


def test_a_small_file_is_one_object_without_a_multipart_upload(blob_store_factory):
    job, key = _key(), _key()
    store = blob_store_factory()
    w = store.open_partial(job, key, 0, 0, None, size=1000)
    w.write(b"a" * 1000)
    w.checkpoint()
    assert _uploads(blob_store_factory) == []
    w.finish(_digest(b"a" * 1000))
    assert _read_all(store, job, key) == b"a" * 1000


def test_batch_files_are_published_whole(blob_store_factory):
    job = _key()
    files = {_key(): os.urandom(n) for n in (0, 1, 5000, 300_000)}
    store = blob_store_factory()
    batch = store.open_batch(job)
    for key, data in files.items():
        batch.begin(key, len(data), _digest(data))
        if data:
            batch.write(data)
    entries = batch.seal()
    assert [e.digest for e in entries] == [_digest(d) for d in files.values()]
    batch.publish(entries[1:])  # the first one refused
    other = blob_store_factory()
    keys = list(files)
    assert other.complete_size(job, keys[0]) is None
    for key in keys[1:]:
        assert _read_all(other, job, key) == files[key]


def test_download_streams_from_an_offset_in_bounded_reads(blob_store_factory):
    job, key = _key(), _key()
    data = os.urandom(10 * MiB + 3)
    store = blob_store_factory()
    w = store.open_partial(job, key, 0, 0, None, size=len(data))
    _write(w, data)
    w.finish()
    with blob_store_factory().open_complete(job, key) as f:
        f.seek(7 * MiB + 1)
        got = bytearray()
        while True:
            piece = f.read(4 * MiB)
            if not piece:
                break
            if isinstance(f, S3ReadStream):
                assert len(piece) <= S3ReadStream.CHUNK  # never more than one chunk held per read
            got += piece
    assert bytes(got) == data[7 * MiB + 1:]


def test_unrecorded_complete_file_is_taken_back_whole(blob_store_factory):
    """Published but never recorded (a crash in between): a resume finds it and ends at its size."""
    job, key = _key(), _key()
    data = os.urandom(9 * MiB)
    w = blob_store_factory().open_partial(job, key, 0, 0, None, size=len(data))
    _write(w, data)
    w.finish()
    store = blob_store_factory()
    assert store.unrecorded_size(job, key) == len(data)
    w2 = store.open_partial(job, key, 4 * MiB, 0, None, size=len(data))
    assert w2.offset == len(data) and w2.needs_record
    crc, digest = w2.finish(_digest(data))
    assert digest == _digest(data)
    assert _read_all(store, job, key) == data


def test_publishing_a_file_whose_job_was_deleted_meanwhile_is_file_not_found(blob_store_factory):
    """A job deleted (by another server) between seal and publish: FileNotFoundError, and no object appears.

    S3 answers CompleteMultipartUpload on an aborted upload with NoSuchUpload; Ceph's gateway with
    500 InternalError: both must read as "gone", never as the store being unavailable.
    """
    job, key = _key(), _key()
    data = os.urandom(18 * MiB + 5)  # two full parts and a tail: a real multipart upload
    store = blob_store_factory()
    w = store.open_partial(job, key, 0, 0, None, size=len(data))
    _write(w, data)
    w.seal()
    blob_store_factory().delete_job(job)
    with pytest.raises(FileNotFoundError):
        w.publish()
    w.close()
    assert _uploads(blob_store_factory) == []
    assert [o for o in _objects(blob_store_factory) if key in o] == []
