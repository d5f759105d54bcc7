"""Tests for tus concatenation and creation-defer-length: the sans-IO core (``filedock.httpupload``),
the metadata stores' hidden parts and deferred lengths (SQLite and PostgreSQL alike) and the
concatenation of blobs (``filedock.store.concat``)."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filedock import httpupload
from filedock.digest import ContentHasher
from filedock.errors import ErrorCode, FiledockError
from filedock.store.blobs import BlobStore
from filedock.store.concat import PartSource, concatenate
from filedock.store.model import FILE_COMPLETE, JOB_COMPLETE, JOB_OPEN, part_name
from filedock.store.sqlite import SQLiteStore

KEY_A = "0b1f6a1e-3c1d-4b7e-9a53-2f0d6c1e8a01"
KEY_B = "7c2e9d40-1a2b-4c3d-8e4f-5a6b7c8d9e0f"
TUS = {"tus-resumable": "1.0.0"}
MAX = 1 << 40


def create(headers: dict[str, str]):
    """Parse a tus creation request with ``headers`` added."""
    return httpupload.parse_request("POST", "/files/", {**TUS, **headers}, MAX)


# ------------------------------------------------------------ the sans-IO core


def test_options_advertise_concatenation_and_deferred_length():
    """OPTIONS lists both extensions in Tus-Extension."""
    _, headers = httpupload.options_response(MAX)
    extensions = headers["Tus-Extension"].split(",")
    assert "concatenation" in extensions and "creation-defer-length" in extensions


def test_partial_creation():
    """``Upload-Concat: partial`` with a length is a part's creation."""
    event = create({"upload-concat": "partial", "upload-length": "10"})
    assert event.partial and event.final is None and event.length == 10


def test_final_creation_names_parts_in_order():
    """``final;<url> <url>``: absolute URLs and paths alike give the parts' keys, in order."""
    event = create({"upload-concat": f"final;http://h:1/files/{KEY_A} /files/{KEY_B.upper()}"})
    assert event.final == (KEY_A, KEY_B) and event.length is None and not event.partial


@pytest.mark.parametrize("value", ["final;", "final", "partial;x", "other", f"final;/v1/files/{KEY_A}",
                                   f"final;/files/{KEY_A} /files/{KEY_A}", "final;/files/../../etc"])
def test_bad_concat_is_a_400(value):
    """A malformed Upload-Concat, a URL not of an upload, a part twice: 400 bad-request."""
    with pytest.raises(httpupload.HttpUploadError) as info:
        create({"upload-concat": value, "upload-length": "1"})
    assert (info.value.status, info.value.code) == (400, "bad-request")


def test_final_with_a_body_is_a_400():
    """A final upload has no body of its own."""
    with pytest.raises(httpupload.HttpUploadError) as info:
        create({"upload-concat": f"final;/files/{KEY_A}", "content-length": "3",
                "content-type": httpupload.TUS_CONTENT_TYPE})
    assert info.value.status == 400


def test_deferred_length_creation():
    """``Upload-Defer-Length: 1`` creates an upload of unknown length; other values, or both headers: 400."""
    assert create({"upload-defer-length": "1"}).deferred
    for headers in ({"upload-defer-length": "2"}, {"upload-defer-length": "1", "upload-length": "5"}, {}):
        with pytest.raises(httpupload.HttpUploadError) as info:
            create(headers)
        assert info.value.status == 400


def test_head_of_a_deferred_upload_has_no_length():
    """HEAD while the length is unknown: no Upload-Length, Upload-Defer-Length: 1 instead."""
    _, headers = httpupload.probe_response(httpupload.Speaker(httpupload.Dialect.TUS),
                                           httpupload.UploadState(5, None))
    assert "Upload-Length" not in headers and headers["Upload-Defer-Length"] == "1"
    assert headers["Upload-Offset"] == "5"


def test_head_of_a_final_reports_concat():
    """HEAD of a final upload reports its Upload-Concat and its offset."""
    concat = f"final;/files/{KEY_A} /files/{KEY_B}"
    _, headers = httpupload.probe_response(httpupload.Speaker(httpupload.Dialect.TUS),
                                           httpupload.UploadState(9, 9, digest="blake3-4m=00", concat=concat))
    assert headers["Upload-Concat"] == concat and headers["Upload-Offset"] == "9"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.uuids(version=4).map(str), min_size=1, max_size=20, unique=True),
       st.sampled_from(["", "http://127.0.0.1:7480", "https://files.example"]), st.sampled_from([" ", "  "]))
def test_final_round_trip(keys, base, sep):
    """Any list of distinct upload URLs in a final's Upload-Concat parses back to the same keys, in order."""
    value = "final;" + sep.join(f"{base}/files/{k}" for k in keys)
    assert create({"upload-concat": value}).final == tuple(keys)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_concat_value_is_parsed_or_refused_cleanly(value):
    """Whatever Upload-Concat holds, the parser answers an event or a 400, never another exception."""
    try:
        create({"upload-concat": value, "upload-length": "1"})
    except httpupload.HttpUploadError as err:
        assert err.status == 400


# ------------------------------------------------------------ the stores


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """A fresh metadata store: SQLite in tmp_path, or PostgreSQL in a fresh database."""
    clock = Clock()
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "filedock.sqlite3", clock=clock)
    else:
        from filedock.store.postgres import PostgresStore

        s = PostgresStore(request.getfixturevalue("postgres_dsn"), clock=clock,
                          secret_path=tmp_path / "filedock.secret")
    s.test_clock = clock
    yield s
    s.close()


def test_parts_are_hidden_and_never_complete_their_job(store):
    """Parts are not listed, not counted, never reopen nor complete their job; the final completes it once,
    its event lists the final alone, and the parts then go."""
    job = store.create_job("j", {})
    parts = [store.add_file(job.id, part_name(f"p{i}"), 5, quota=100) for i in range(2)]
    assert store.list_files(job.id) == [] and store.files_page(job.id, 10) == []
    assert store.job_counts(job.id) == (0, 0, 0, 0)
    for part in parts:
        assert store.record_complete(part.key, 0, "d") is False
    assert store.find_job(job.id).state != JOB_COMPLETE
    assert store.pending_events(10) == []
    final = store.add_file(job.id, "final.bin", 10)
    assert store.find_job(job.id).state == JOB_OPEN
    assert store.record_complete(final.key, 7, "dd") is True
    events = store.pending_events(10)
    assert len(events) == 1 and [f["name"] for f in events[0].payload["files"]] == ["final.bin"]
    assert store.delete_parts([p.key for p in parts] + [final.key]) == 2
    assert store.get_file(final.key).state == FILE_COMPLETE  # never a plain file
    assert [f.name for f in store.list_files(job.id)] == ["final.bin"]
    assert store.job_counts(job.id) == (1, 1, 10, 10)


def test_stale_parts_and_deleted_with_their_job(store):
    """The sweeper's query finds abandoned parts (complete or not), not plain files; a job's deletion
    takes its parts."""
    job = store.create_job("j", {})
    part = store.add_file(job.id, part_name("p"), 5)
    plain = store.add_file(job.id, "plain", 5)
    store.record_progress(part.key, 3, 0, None)
    store.record_progress(plain.key, 3, 0, None)
    store.test_clock.now += 100
    assert [r.key for r in store.stale_parts(1050)] == [part.key]
    assert [r.key for r in store.stale_partials(1050)] == [plain.key]
    deleted = store.delete_job(job.id)
    assert part.key in {r.key for r in deleted} and store.get_file(part.key) is None


def test_deferred_length_is_quota_checked_when_known(store):
    """A deferred file has size 0 until declared; the quota is checked then; the info round-trips."""
    job = store.create_job("j", {})
    store.add_file(job.id, "other", 60, quota=100)
    record = store.add_file(job.id, "later", 0, quota=100)
    store.set_upload_info(record.key, True, None)
    assert store.upload_info(record.key) == (True, None)
    with pytest.raises(FiledockError) as info:
        store.declare_length(record.key, 41, quota=100)
    assert info.value.code is ErrorCode.QUOTA_EXCEEDED
    assert store.get_file(record.key).size == 0 and store.upload_info(record.key)[0]
    assert store.declare_length(record.key, 40, quota=100).size == 40
    assert store.upload_info(record.key) == (False, None) and store.get_file(record.key).size == 40
    assert store.declare_length(record.key, 40, quota=100).size == 40
    with pytest.raises(FiledockError) as info:
        store.declare_length(record.key, 39)
    assert info.value.code is ErrorCode.SIZE_MISMATCH
    store.set_upload_info(record.key, False, "final;/files/x")
    assert store.upload_info(record.key) == (False, "final;/files/x")


# ------------------------------------------------------------ concatenating blobs


def _complete_blob(blobs: BlobStore, job_id: str, key: str, data: bytes) -> PartSource:
    writer = blobs.open_partial(job_id, key, 0, 0, None)
    writer.write(data)
    writer.finish()
    return PartSource(key, len(data), zlib.crc32(data))


JOB = "5d1f6a1e-3c1d-4b7e-9a53-2f0d6c1e8a99"


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 5 << 20), min_size=1, max_size=4), st.integers(0, 2 ** 32))
def test_concatenate_is_the_parts_in_order(sizes, seed):
    """The final's bytes are the parts' in order; its CRC-32 and blake3-4m digest are the whole's."""
    import tempfile

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as root:
        blobs = BlobStore(root)
        try:
            datas = [rng.randbytes(n) for n in sizes]
            keys = [str(__import__("uuid").UUID(int=rng.getrandbits(128), version=4)) for _ in sizes]
            parts = [_complete_blob(blobs, JOB, k, d) for k, d in zip(keys, datas)]
            final = str(__import__("uuid").uuid4())
            crc, digest = concatenate(blobs, JOB, final, parts)
            whole = b"".join(datas)
            expected = ContentHasher()
            expected.update(whole)
            assert blobs.final_path(JOB, final).read_bytes() == whole
            assert (crc, digest) == (zlib.crc32(whole), expected.hexdigest())
            assert not blobs.part_path(JOB, final).exists()
        finally:
            blobs.close()


def test_concatenate_refuses_a_part_that_changed(tmp_path: Path):
    """A part whose bytes are not the ones its record's CRC-32 describes: digest-mismatch, nothing kept."""
    blobs = BlobStore(tmp_path)
    a = _complete_blob(blobs, JOB, KEY_A, b"a" * 1000)
    b = _complete_blob(blobs, JOB, KEY_B, b"b" * 1000)
    with open(blobs.final_path(JOB, KEY_B), "r+b") as f:  # flipped behind the server's back
        f.write(b"c")
    final = "9d1f6a1e-3c1d-4b7e-9a53-2f0d6c1e8a99"
    with pytest.raises(FiledockError) as info:
        concatenate(blobs, JOB, final, [a, b])
    assert info.value.code is ErrorCode.DIGEST_MISMATCH
    assert not blobs.part_path(JOB, final).exists() and not blobs.final_path(JOB, final).exists()
    blobs.close()
    assert os.path.exists(blobs.final_path(JOB, KEY_A))
