"""Tests for the job store: the metadata store on both backends (``SQLiteStore`` on a real SQLite
file, ``PostgresStore`` on a real private PostgreSQL) and ``BlobStore`` (real files)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import sqlite3
import tempfile
import uuid
import zlib
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filedock.digest import BLOCK_HASH_SIZE, BLOCK_SIZE, ContentHasher
from filedock.errors import ErrorCode, FiledockError
from filedock.store.blobs import BlobStore, PartialWriter, PrefixLost
from filedock.store.model import FILE_COMPLETE, FILE_PARTIAL, FILE_PENDING, JOB_COMPLETE, JOB_OPEN
from filedock.store.sqlite import MIGRATIONS, SQLiteStore, hash_token

MiB = 1 << 20
_SOURCE = random.Random(1729).randbytes(9 * MiB + 100)
"""Deterministic random bytes; tests take slices of it."""

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Clock:
    """A settable clock for the store."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A clock starting at t=1000."""
    return Clock()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path, clock):
    """A fresh metadata store on the test's clock: SQLite in tmp_path, or PostgreSQL in a fresh database."""
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "filedock.sqlite3", clock=clock)
    else:
        from filedock.store.postgres import PostgresStore

        s = PostgresStore(request.getfixturevalue("postgres_dsn"), clock=clock,
                          secret_path=tmp_path / "filedock.secret")
    yield s
    try:
        s.close()
    except sqlite3.ProgrammingError:  # closed by the test already
        pass


@pytest.fixture
def sqlite_store(tmp_path, clock):
    """A fresh SQLiteStore in tmp_path (for what only SQLite has: its file, its pragmas)."""
    s = SQLiteStore(tmp_path / "filedock.sqlite3", clock=clock)
    yield s
    s.close()


def raw_rows(store, sql: str, args: tuple = ()) -> list[tuple]:
    """``sql`` (``?`` placeholders) straight on either backend's database, past the store's methods."""
    if isinstance(store, SQLiteStore):
        return store._db.execute(sql, args).fetchall()
    import psycopg

    with psycopg.connect(store.url) as conn:
        return conn.execute(sql.replace("?", "%s"), args).fetchall()


def reference_digest(data: bytes) -> str:
    """blake3-4m computed independently of filedock."""
    blocks = [blake3.blake3(data[i:i + BLOCK_SIZE]).digest() for i in range(0, len(data), BLOCK_SIZE)]
    return blake3.blake3(b"".join(blocks)).hexdigest()


def reference_blocks(data: bytes) -> bytes:
    """Hashes of the whole 4 MiB blocks of ``data``, concatenated."""
    return b"".join(blake3.blake3(data[i:i + BLOCK_SIZE]).digest()
                    for i in range(0, len(data) // BLOCK_SIZE * BLOCK_SIZE, BLOCK_SIZE))


# ================================================================ SQLiteStore


def test_migrations_are_idempotent(tmp_path):
    """Opening a store twice applies each migration once: schema_version stays at the number of migrations."""
    path = tmp_path / "db"
    first = SQLiteStore(path)
    assert first.schema_version() == len(MIGRATIONS)
    job = first.create_job("j", {})
    first.close()
    second = SQLiteStore(path)
    assert second.schema_version() == len(MIGRATIONS)
    assert second.migrate() == len(MIGRATIONS)
    assert second.find_job("j") == job
    second.close()
    with sqlite3.connect(path) as db:
        versions = [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_database_settings(sqlite_store):
    """The store runs in WAL mode with full synchronous writes and foreign keys on."""
    db = sqlite_store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


# ---------------------------------------------------------------- tokens


def test_tokens_are_stored_hashed(tmp_path):
    """A token's plaintext never reaches the database files; its SHA-256 does."""
    path = tmp_path / "db"
    s = SQLiteStore(path)
    token = s.create_token("admin")
    assert s.check_token(token)
    raw_while_open = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    s.close()
    raw_closed = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for raw in (raw_while_open, raw_closed):
        assert token.encode() not in raw
        assert token[4:].encode() not in raw  # not even without the fdk_ prefix
    assert hash_token(token).encode() in raw_while_open + raw_closed
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()


def test_token_check_and_delete(store):
    """Tokens check true until their label is deleted; unknown tokens never check."""
    a1, a2, b = store.create_token("a"), store.create_token("a"), store.create_token("b")
    assert a1.startswith("fdk_") and len({a1, a2, b}) == 3
    assert all(map(store.check_token, (a1, a2, b)))
    assert not store.check_token("fdk_" + "x" * 43)
    assert not store.check_token("")
    assert store.delete_tokens("a") == 2
    assert not store.check_token(a1) and not store.check_token(a2)
    assert store.check_token(b)
    assert store.delete_tokens("a") == 0


# ---------------------------------------------------------------- jobs


def test_job_crud(store, clock):
    """Jobs are created open, found by id or name, updated and listed in creation order."""
    job = store.create_job("alpha", {"k": [1, 2]})
    assert UUID_RE.fullmatch(job.id)
    assert (job.name, job.metadata, job.created, job.updated, job.state) == ("alpha", {"k": [1, 2]}, 1000.0,
                                                                            1000.0, JOB_OPEN)
    clock.now = 1001.0
    beta = store.create_job("beta", {})
    assert store.find_job(job.id) == job
    assert store.find_job("alpha") == job
    assert store.find_job("nope") is None
    assert store.list_jobs() == [job, beta]
    clock.now = 1005.0
    renamed = store.update_job(job.id, "gamma", None)
    assert (renamed.name, renamed.metadata, renamed.updated) == ("gamma", {"k": [1, 2]}, 1005.0)
    assert store.find_job("alpha") is None
    remeta = store.update_job(job.id, None, {"x": "y"})
    assert (remeta.name, remeta.metadata) == ("gamma", {"x": "y"})
    assert store.find_job(job.id) == remeta


def test_job_names_are_unique(store):
    """Creating or renaming to a name in use is FiledockError(conflict), and nothing changes."""
    a = store.create_job("a", {})
    b = store.create_job("b", {})
    with pytest.raises(FiledockError) as exc:
        store.create_job("a", {"other": True})
    assert exc.value.code is ErrorCode.CONFLICT
    with pytest.raises(FiledockError) as exc:
        store.update_job(b.id, "a", {"changed": True})
    assert exc.value.code is ErrorCode.CONFLICT
    assert store.list_jobs() == [a, b]


def test_update_unknown_job_is_not_found(store):
    """Updating a job that does not exist is FiledockError(not-found)."""
    with pytest.raises(FiledockError) as exc:
        store.update_job(str(uuid.uuid4()), "x", None)
    assert exc.value.code is ErrorCode.NOT_FOUND


def test_delete_job_cascades(store):
    """Deleting a job returns its files and removes them and its sessions."""
    job = store.create_job("j", {})
    f1, f2 = store.add_file(job.id, "a", 1), store.add_file(job.id, "b", 2)
    session = store.open_session(job.id, 60)
    other = store.create_job("other", {})
    kept = store.add_file(other.id, "a", 1)
    assert sorted(store.delete_job(job.id), key=lambda f: f.name) == [f1, f2]
    assert store.find_job(job.id) is None
    assert store.get_file(f1.key) is None and store.get_file(f2.key) is None
    assert store.get_session(session.key) is None
    assert store.get_file(kept.key) == kept
    assert store.delete_job(job.id) == []


@given(name=st.text(min_size=1, max_size=50), metadata=st.dictionaries(
    st.text(max_size=10), st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
    max_size=4))
@settings(max_examples=50, deadline=None)
def test_job_names_and_metadata_round_trip(name, metadata):
    """Any name (quotes, unicode, SQL) and JSON metadata come back exactly as given."""
    with tempfile.TemporaryDirectory() as d:
        s = SQLiteStore(Path(d) / "db")
        try:
            job = s.create_job(name, metadata)
            assert s.find_job(name) == job
            assert s.find_job(job.id).metadata == metadata
        finally:
            s.close()


# ---------------------------------------------------------------- files


def test_file_crud(store, clock):
    """Files are added pending with a fresh key and listed by name."""
    job = store.create_job("j", {})
    b = store.add_file(job.id, "b.bin", 10)
    a = store.add_file(job.id, "a.bin", 0)
    assert UUID_RE.fullmatch(b.key) and b.key != a.key
    assert (b.job_id, b.name, b.size, b.received, b.state, b.crc32, b.digest, b.uploaded_at, b.updated,
            b.part_stamp) == (job.id, "b.bin", 10, 0, FILE_PENDING, 0, None, None, 1000.0, None)
    assert store.get_file(b.key) == b
    assert store.get_file(str(uuid.uuid4())) is None
    assert store.list_files(job.id) == [a, b]


def test_file_names_are_unique_per_job(store):
    """A second file of the same name in a job is conflict; another job may use the name."""
    job, other = store.create_job("j", {}), store.create_job("k", {})
    store.add_file(job.id, "x", 1)
    with pytest.raises(FiledockError) as exc:
        store.add_file(job.id, "x", 2)
    assert exc.value.code is ErrorCode.CONFLICT
    assert store.add_file(other.id, "x", 3).size == 3
    assert [f.size for f in store.list_files(job.id)] == [1]


def test_add_file_to_missing_job_is_not_found(store):
    """Adding a file to a job that does not exist (e.g. deleted meanwhile) is not-found, not conflict."""
    with pytest.raises(FiledockError) as exc:
        store.add_file(str(uuid.uuid4()), "x", 1)
    assert exc.value.code is ErrorCode.NOT_FOUND


def test_quota(store):
    """Declared sizes may add up to the quota exactly; one byte more is quota-exceeded and adds nothing."""
    job = store.create_job("j", {})
    store.add_file(job.id, "a", 60, quota=100)
    store.add_file(job.id, "b", 40, quota=100)
    with pytest.raises(FiledockError) as exc:
        store.add_file(job.id, "c", 1, quota=100)
    assert exc.value.code is ErrorCode.QUOTA_EXCEEDED
    assert "100" in exc.value.message
    assert [f.name for f in store.list_files(job.id)] == ["a", "b"]
    assert store.add_file(job.id, "d", 10**15).size == 10**15  # no quota given: none applied


def test_record_progress(store, clock):
    """Progress sets the durable offset, CRC and stamp; offset 0 means pending again."""
    job = store.create_job("j", {})
    f = store.add_file(job.id, "a", 100)
    clock.now = 1010.0
    store.record_progress(f.key, 40, 0xABCD, "1:40:5")
    got = store.get_file(f.key)
    assert (got.received, got.crc32, got.part_stamp, got.state, got.updated) == (40, 0xABCD, "1:40:5",
                                                                                FILE_PARTIAL, 1010.0)
    store.record_progress(f.key, 0, 0, None)
    assert store.get_file(f.key).state == FILE_PENDING


def test_record_complete_completes_the_job_exactly_once(store, clock):
    """The last file to complete makes the job complete once, with exactly one outbox event."""
    job = store.create_job("j", {"team": "x"})
    a, b = store.add_file(job.id, "a", 3), store.add_file(job.id, "b", 5)
    store.record_progress(a.key, 2, 1, "s")
    clock.now = 2000.0
    assert store.record_complete(a.key, 0x11, "1" * 64) is False
    assert store.find_job(job.id).state == JOB_OPEN
    assert store.pending_events() == []
    got = store.get_file(a.key)
    assert (got.state, got.received, got.crc32, got.digest, got.uploaded_at, got.part_stamp) == (
        FILE_COMPLETE, 3, 0x11, "1" * 64, 2000.0, None)
    clock.now = 2001.0
    assert store.record_complete(b.key, 0xFFFFFFFF, "2" * 64) is True
    assert store.find_job(job.id).state == JOB_COMPLETE
    assert store.record_complete(b.key, 0xFFFFFFFF, "2" * 64) is False  # a repeat changes nothing
    events = store.pending_events()
    assert len(events) == 1
    ev = events[0]
    assert (ev.job_id, ev.kind, ev.created, ev.attempts, ev.delivered) == (job.id, "job.complete", 2001.0, 0, None)
    assert ev.payload == {
        "id": ev.id, "type": "job.complete", "job": {"id": job.id, "name": "j"}, "time": 2001.0,
        "files": [{"name": "a", "key": a.key, "size": 3, "crc32": "00000011", "digest": "1" * 64},
                  {"name": "b", "key": b.key, "size": 5, "crc32": "ffffffff", "digest": "2" * 64}],
    }


def test_record_complete_unknown_file(store):
    """Completing a file that was deleted is gone (the upload's job went while it ran)."""
    with pytest.raises(FiledockError) as exc:
        store.record_complete(str(uuid.uuid4()), 0, "0" * 64)
    assert exc.value.code is ErrorCode.GONE


def test_adding_a_file_reopens_a_complete_job(store):
    """A file added to a complete job reopens it; completing that file emits one more event."""
    job = store.create_job("j", {})
    a = store.add_file(job.id, "a", 1)
    assert store.record_complete(a.key, 0, "0" * 64)
    b = store.add_file(job.id, "b", 1)
    assert store.find_job(job.id).state == JOB_OPEN
    assert store.record_complete(b.key, 0, "0" * 64)
    assert len(store.pending_events()) == 2


def test_complete_files_ignore_progress_and_reset(store):
    """Neither record_progress nor reset_file touches a complete file."""
    job = store.create_job("j", {})
    f = store.add_file(job.id, "a", 4)
    store.record_complete(f.key, 9, "9" * 64)
    before = store.get_file(f.key)
    store.record_progress(f.key, 1, 1, "x")
    store.reset_file(f.key)
    assert store.get_file(f.key) == before


def test_reset_file(store, clock):
    """reset_file makes a partial pending again from byte 0."""
    job = store.create_job("j", {})
    f = store.add_file(job.id, "a", 100)
    store.record_progress(f.key, 50, 123, "1:50:1")
    clock.now = 1500.0
    store.reset_file(f.key)
    got = store.get_file(f.key)
    assert (got.received, got.crc32, got.part_stamp, got.state, got.updated) == (0, 0, None, FILE_PENDING, 1500.0)


def test_stale_partials(store, clock):
    """stale_partials lists partials last updated before the cutoff, and nothing else."""
    job = store.create_job("j", {})
    old, new, pending, done = (store.add_file(job.id, n, 10) for n in "abcd")
    clock.now = 100.0
    store.record_progress(old.key, 5, 1, "s")
    store.record_progress(done.key, 5, 1, "s")
    store.record_complete(done.key, 1, "0" * 64)
    clock.now = 200.0
    store.record_progress(new.key, 5, 1, "s")
    assert [f.key for f in store.stale_partials(150.0)] == [old.key]
    assert sorted(f.key for f in store.stale_partials(201.0)) == sorted([old.key, new.key])
    assert store.stale_partials(100.0) == []
    assert pending.key not in {f.key for f in store.stale_partials(10**12)}


# ---------------------------------------------------------------- sessions and outbox


def test_sessions(store, clock):
    """Sessions open with an expiry, are found by key and close once (the first close time stays)."""
    job = store.create_job("j", {})
    s = store.open_session(job.id, 60.0)
    assert UUID_RE.fullmatch(s.key)
    assert (s.job_id, s.created, s.expires, s.closed) == (job.id, 1000.0, 1060.0, None)
    assert store.get_session(s.key) == s
    clock.now = 1010.0
    closed = store.close_session(s.key)
    assert closed.closed == 1010.0
    clock.now = 1020.0
    assert store.close_session(s.key).closed == 1010.0
    assert store.get_session(str(uuid.uuid4())) is None
    assert store.close_session(str(uuid.uuid4())) is None


def test_session_for_missing_job_is_not_found(store):
    """Opening a session on a job that does not exist is FiledockError(not-found), not a raw SQL error."""
    with pytest.raises(FiledockError) as exc:
        store.open_session(str(uuid.uuid4()), 60.0)
    assert exc.value.code is ErrorCode.NOT_FOUND


def test_outbox_delivery(store, clock):
    """A failed delivery counts an attempt and stays pending; a delivered event leaves the outbox."""
    job = store.create_job("j", {})
    f = store.add_file(job.id, "a", 1)
    store.record_complete(f.key, 0, "0" * 64)
    (ev,) = store.pending_events()
    store.mark_event(ev.id, delivered=False)
    store.mark_event(ev.id, delivered=False)
    (again,) = store.pending_events()
    assert (again.id, again.attempts, again.delivered) == (ev.id, 2, None)
    clock.now = 3000.0
    store.mark_event(ev.id, delivered=True)
    assert store.pending_events() == []
    (row,) = raw_rows(store, "SELECT attempts, delivered FROM events WHERE id = ?", (ev.id,))
    assert row == (3, 3000.0)


def test_pending_events_limit_and_order(store, clock):
    """pending_events returns the oldest first, at most ``limit``."""
    ids = []
    for i in range(3):
        clock.now = 100.0 + i
        job = store.create_job(f"j{i}", {})
        f = store.add_file(job.id, "a", 1)
        store.record_complete(f.key, 0, "0" * 64)
        ids.append(job.id)
    assert [e.job_id for e in store.pending_events(2)] == ids[:2]
    assert [e.job_id for e in store.pending_events()] == ids


def test_writes_survive_reopening(tmp_path):
    """What a method wrote is there after the store is closed and opened again."""
    path = tmp_path / "db"
    s = SQLiteStore(path)
    job = s.create_job("j", {"a": 1})
    f = s.add_file(job.id, "x", 9)
    s.record_progress(f.key, 4, 7, "st")
    session = s.open_session(job.id, 5)
    token = s.create_token("t")
    s.close()
    s = SQLiteStore(path)
    try:
        assert (s.find_job(job.id).name, s.find_job(job.id).metadata) == ("j", {"a": 1})
        assert s.get_file(f.key).received == 4
        assert s.get_session(session.key) == session
        assert s.check_token(token)
    finally:
        s.close()


# ================================================================ BlobStore


def new_key() -> str:
    """A fresh key, as the metadata store makes them."""
    return str(uuid.uuid4())


def write_chunks(writer: PartialWriter, data: bytes, cuts: list[int]) -> None:
    """Write ``data`` split at ``cuts``."""
    view = memoryview(data)
    points = sorted({c for c in cuts if 0 < c < len(data)})
    for a, b in zip([0, *points], [*points, len(data)]):
        writer.write(view[a:b])


@pytest.fixture
def blobs(tmp_path) -> BlobStore:
    """A BlobStore rooted in tmp_path."""
    return BlobStore(tmp_path / "data")


def test_one_pass_seal_and_publish(blobs):
    """Writing a file in one go, sealing and publishing gives the reference digest and the bytes in place."""
    job, key = new_key(), new_key()
    data = _SOURCE[:BLOCK_SIZE + 10]
    w = blobs.open_partial(job, key, 0, 0, None)
    assert w.part == blobs.part_path(job, key) and w.part.exists()
    w.write(data)
    assert w.offset == len(data)
    assert w.seal() == (zlib.crc32(data), reference_digest(data))
    assert w.closed
    assert blobs.blocks_path(job, key).read_bytes() == reference_blocks(data)
    w.publish()
    final = blobs.final_path(job, key)
    assert final.read_bytes() == data
    assert not w.part.exists() and not blobs.blocks_path(job, key).exists()
    with blobs.open_complete(job, key) as f:
        assert f.read() == data
    assert sorted(p.name for p in blobs.job_dir(job).iterdir()) == [key]


@given(data=st.data())
@settings(max_examples=12, deadline=None)
def test_resume_at_checkpoint_equals_one_pass(data):
    """Write, checkpoint, close, reopen at the checkpoint and finish: seal() equals a one-pass hash."""
    size = data.draw(st.sampled_from([0, 1, BLOCK_SIZE, BLOCK_SIZE + 1, 9 * MiB]) | st.integers(0, 9 * MiB),
                     label="size")
    point = data.draw(st.integers(0, size) | st.sampled_from([BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1])
                      .filter(lambda p: p <= size), label="checkpoint")
    payload = _SOURCE[:size]
    cuts = st.lists(st.integers(0, 9 * MiB), max_size=8)
    with tempfile.TemporaryDirectory() as d:
        blobs = BlobStore(d)
        job, key = new_key(), new_key()
        w = blobs.open_partial(job, key, 0, 0, None)
        write_chunks(w, payload[:point], data.draw(cuts, label="first cuts"))
        cp = w.checkpoint()
        assert (cp.offset, cp.crc32) == (point, zlib.crc32(payload[:point]))
        blocks = blobs.blocks_path(job, key)  # made only once a whole block is hashed
        assert (blocks.read_bytes() if blocks.exists() else b"") == reference_blocks(payload[:point])
        w.close()

        w = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
        assert w.offset == point
        write_chunks(w, payload[point:], [c - point for c in data.draw(cuts, label="rest cuts")])
        assert w.seal() == (zlib.crc32(payload), reference_digest(payload))
        w.publish()
        assert blobs.final_path(job, key).read_bytes() == payload
        assert not blobs.part_path(job, key).exists() and not blobs.blocks_path(job, key).exists()


def test_several_resumes(blobs):
    """Three connections, each resuming at the last checkpoint, end with the one-pass digest."""
    job, key = new_key(), new_key()
    payload = _SOURCE[:9 * MiB]
    cp_offset, crc, stamp = 0, 0, None
    for end in (3 * MiB, 7 * MiB, 9 * MiB):
        w = blobs.open_partial(job, key, cp_offset, crc, stamp)
        assert w.offset == cp_offset
        w.write(payload[cp_offset:end])
        if end < len(payload):
            cp = w.checkpoint()
            cp_offset, crc, stamp = cp.offset, cp.crc32, cp.stamp
            w.close()
    assert w.seal() == (zlib.crc32(payload), reference_digest(payload))


@pytest.mark.parametrize("durable,lost", [(100, 50), (BLOCK_SIZE - 10, 20), (BLOCK_SIZE + 5, MiB)],
                         ids=["in-block", "across-boundary", "after-boundary"])
def test_bytes_after_the_checkpoint_are_cut_off(blobs, durable, lost):
    """Bytes written after the last checkpoint are truncated on reopen; the result hashes as if never sent."""
    job, key = new_key(), new_key()
    a, b, c = _SOURCE[:durable], _SOURCE[-lost:], _SOURCE[durable:durable + 300]
    w = blobs.open_partial(job, key, 0, 0, None)
    w.write(a)
    cp = w.checkpoint()
    w.write(b)  # never checkpointed
    w.close()
    assert blobs.part_path(job, key).stat().st_size == durable + lost

    w = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    assert w.offset == durable
    assert blobs.part_path(job, key).stat().st_size == durable
    assert blobs.blocks_path(job, key).stat().st_size == durable // BLOCK_SIZE * BLOCK_HASH_SIZE
    w.write(c)
    assert w.seal() == (zlib.crc32(a + c), reference_digest(a + c))
    assert blobs.part_path(job, key).read_bytes() == a + c


def _tamper(path: Path, pos: int, keep_stamp: bool) -> None:
    """Flip one byte in place; keep the stamp (size, mtime) if asked, else make sure it changes."""
    st0 = path.stat()
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ 0xFF]))
    if keep_stamp:
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    elif path.stat().st_mtime_ns == st0.st_mtime_ns:  # coarse clock: the change must still show
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("pos", [10, BLOCK_SIZE + 10], ids=["whole-block", "tail"])
def test_modified_partial_is_rehashed_from_disk(blobs, pos):
    """A .part changed behind the store's back (stamp mismatch) is re-hashed: CRC and digest follow the disk."""
    job, key = new_key(), new_key()
    a = _SOURCE[:BLOCK_SIZE + 1000]
    w = blobs.open_partial(job, key, 0, 0, None)
    w.write(a)
    cp = w.checkpoint()
    w.close()
    _tamper(blobs.part_path(job, key), pos, keep_stamp=False)
    on_disk = blobs.part_path(job, key).read_bytes()
    assert on_disk != a

    w = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    assert w.offset == len(a)
    w.write(b"tail")
    crc, digest = w.seal()
    assert (crc, digest) == (zlib.crc32(on_disk + b"tail"), reference_digest(on_disk + b"tail"))
    assert digest != reference_digest(a + b"tail")
    assert blobs.blocks_path(job, key).read_bytes() == reference_blocks(on_disk)


def test_matching_stamp_reads_only_the_unfinished_block(blobs):
    """With a matching stamp, whole blocks come from the recorded block list and the CRC from the checkpoint."""
    job, key = new_key(), new_key()
    a = _SOURCE[:BLOCK_SIZE + 1000]
    w = blobs.open_partial(job, key, 0, 0, None)
    w.write(a)
    cp = w.checkpoint()
    w.close()
    _tamper(blobs.part_path(job, key), 10, keep_stamp=True)  # invisible to the stamp, inside block 0

    w = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    # the untouched recorded state wins: proof that the prefix was not read again
    assert w.seal() == (zlib.crc32(a), reference_digest(a))


def test_missing_block_list_falls_back_to_rehash(blobs):
    """If the .blocks file is gone, the prefix is hashed again from disk and the digest is still right."""
    job, key = new_key(), new_key()
    a = _SOURCE[:2 * BLOCK_SIZE + 7]
    w = blobs.open_partial(job, key, 0, 0, None)
    w.write(a)
    cp = w.checkpoint()
    w.close()
    blobs.blocks_path(job, key).unlink()
    w = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    w.write(b"!")
    assert w.seal() == (zlib.crc32(a + b"!"), reference_digest(a + b"!"))


def test_reopen_when_the_prefix_is_gone_starts_again(blobs):
    """A recorded offset beyond what the .part holds raises PrefixLost and changes nothing; once the
    caller recorded the reset, it opens from 0 (the record never claims bytes the disk does not hold)."""
    job, key = new_key(), new_key()
    w = blobs.open_partial(job, key, 0, 0, None)
    w.write(b"abc")
    cp = w.checkpoint()
    w.close()
    with pytest.raises(PrefixLost):
        blobs.open_partial(job, key, 10, 99, cp.stamp)
    assert blobs.part_path(job, key).read_bytes() == b"abc"
    w = blobs.open_partial(job, key, 0, 0, None)
    assert w.offset == 0
    assert w.hasher.crc32 == 0
    assert blobs.part_path(job, key).stat().st_size == 0
    w.write(b"xyz")
    assert w.seal() == (zlib.crc32(b"xyz"), reference_digest(b"xyz"))


def test_reopen_at_zero_discards_old_bytes(blobs):
    """Opening at offset 0 truncates whatever the partial held."""
    job, key = new_key(), new_key()
    w = blobs.open_partial(job, key, 0, 0, None)
    w.write(_SOURCE[:BLOCK_SIZE + 1])
    w.close()
    w = blobs.open_partial(job, key, 0, 0, None)
    assert blobs.part_path(job, key).stat().st_size == 0
    new = _SOURCE[7:7 + BLOCK_SIZE + 3]
    w.write(new)
    cp = w.checkpoint()
    assert blobs.blocks_path(job, key).read_bytes() == reference_blocks(new)  # no stale hashes
    w.close()
    w = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    assert w.seal() == (zlib.crc32(new), reference_digest(new))


def test_published_but_unrecorded_file_resumes(blobs):
    """A file renamed into place but never recorded complete is taken back whole as the partial (it was
    fsync'd before its rename), hashed again from disk, and flagged to be recorded before any byte."""
    job, key = new_key(), new_key()
    a = _SOURCE[:BLOCK_SIZE + 3]
    w = blobs.open_partial(job, key, 0, 0, None)
    w.write(a[:100])
    cp = w.checkpoint()
    w.write(a[100:])
    w.seal()
    w.publish()
    assert blobs.final_path(job, key).exists()

    w = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    assert not blobs.final_path(job, key).exists()
    assert w.offset == len(a)
    assert w.needs_record
    assert w.seal() == (zlib.crc32(a), reference_digest(a))
    w.publish()
    assert blobs.final_path(job, key).read_bytes() == a


def test_discard_and_delete(blobs):
    """discard removes the partial and its block list; delete_file and delete_job remove the rest."""
    job, k1, k2 = new_key(), new_key(), new_key()
    w = blobs.open_partial(job, k1, 0, 0, None)
    w.write(b"x")
    w.close()
    blobs.discard(job, k1)
    assert not blobs.part_path(job, k1).exists() and not blobs.blocks_path(job, k1).exists()
    blobs.discard(job, k1)  # twice is fine
    w = blobs.open_partial(job, k2, 0, 0, None)
    w.write(b"y")
    w.seal()
    w.publish()
    blobs.delete_file(job, k2)
    assert not blobs.final_path(job, k2).exists()
    blobs.open_partial(job, k1, 0, 0, None).close()
    blobs.delete_job(job)
    assert not blobs.job_dir(job).exists()
    blobs.delete_job(job)  # twice is fine


def test_write_on_a_full_disk_is_no_space(blobs, tmp_path):
    """ENOSPC while writing becomes FiledockError(no-space)."""
    full = os.open("/dev/full", os.O_WRONLY)
    blocks = os.open(tmp_path / "blocks", os.O_RDWR | os.O_CREAT)
    w = PartialWriter(tmp_path / "p", tmp_path / "blocks", tmp_path / "f", full, blocks, ContentHasher())
    try:
        with pytest.raises(FiledockError) as exc:
            w.write(b"data")
        assert exc.value.code is ErrorCode.NO_SPACE
    finally:
        w.close()


def test_free_bytes(blobs):
    """free_bytes reports a positive byte count for the data dir's filesystem."""
    assert isinstance(blobs.free_bytes(), int) and blobs.free_bytes() > 0


_K = str(uuid.UUID(int=5))
BAD_KEYS = ["", "job", "../x", "/etc/passwd", "a/b", ".", "F47AC10B-58CC-4372-A567-0E02B2C3D479",
            _K + "\n", _K + ".part", "../" + _K, _K[:-1], " " + _K, _K.replace("-", "/")]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_non_keys_never_become_paths(blobs, bad):
    """Every method refuses a string that is not a lowercase UUID key (as job id or file key) with ValueError."""
    good = new_key()
    before = sorted(blobs.root.rglob("*"))
    calls = [
        lambda j, k: blobs.job_dir(j), lambda j, k: blobs.final_path(j, k), lambda j, k: blobs.part_path(j, k),
        lambda j, k: blobs.blocks_path(j, k), lambda j, k: blobs.open_partial(j, k, 0, 0, None),
        lambda j, k: blobs.discard(j, k), lambda j, k: blobs.delete_file(j, k),
        lambda j, k: blobs.delete_job(j), lambda j, k: blobs.open_complete(j, k),
    ]
    for call in calls:
        for job, key in ((bad, good), (good, bad)):
            if call is calls[0] or call is calls[7]:
                if job == good:
                    continue
            with pytest.raises(ValueError):
                call(job, key)
    assert sorted(blobs.root.rglob("*")) == before


@given(text=st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_is_not_a_key(text):
    """Any text that is not exactly a lowercase UUID is refused as a key; a lowercase UUID maps under jobs/."""
    with tempfile.TemporaryDirectory() as d:
        blobs = BlobStore(d)
        job = new_key()
        if UUID_RE.fullmatch(text) and "\n" not in text:
            assert blobs.part_path(job, text) == Path(d) / "jobs" / job / f"{text}.part"
        else:
            with pytest.raises(ValueError):
                blobs.part_path(job, text)
            with pytest.raises(ValueError):
                blobs.job_dir(text)
