"""What PostgreSQL adds to the metadata store: several stores (servers) on one database at once.

The shared behaviour (the ``MetadataStore`` interface) is tested on both backends in
``test_store.py``; here two real ``PostgresStore`` instances, two connections, race.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from filedock.errors import ErrorCode, FiledockError
from filedock.store.metadata import DeferredStore
from filedock.store.model import JOB_COMPLETE
from filedock.store.postgres import EVENT_LEASE, MIGRATIONS, PostgresStore
from filedock.store.sqlite import load_secret
from tests.engines.postgres import running_postgres


@pytest.fixture
def secret(tmp_path) -> bytes:
    """One file key secret, as every server sharing a database holds it."""
    return load_secret(tmp_path / "filedock.secret")


@pytest.fixture
def two_stores(postgres_dsn, secret):
    """Two stores on one database (two servers' worth: their own connections and claims)."""
    a, b = PostgresStore(postgres_dsn, secret=secret), PostgresStore(postgres_dsn, secret=secret)
    yield a, b
    a.close()
    b.close()


def race(*calls):
    """Run the calls on threads released at the same instant; their results (or exceptions) in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_two_servers_completing_the_last_two_files_make_one_event(two_stores):
    """Two stores completing a job's last two files at the same moment: the job becomes complete
    and exactly one job-complete event is in the outbox, every time (without the job's row lock
    each counted the other's file as unfinished and the job never completed)."""
    a, b = two_stores
    for round_ in range(25):
        job = a.create_job(f"race-{round_}", {})
        first, second = a.add_files(job.id, [("one", 1), ("two", 1)])
        results = race(lambda: a.record_complete(first.key, 1, "a" * 64),
                       lambda: b.record_complete(second.key, 2, "b" * 64))
        assert sorted(results) == [False, True], results
        assert a.find_job(job.id).state == JOB_COMPLETE
        events = [e for e in b.pending_events(1000) if e.job_id == job.id]
        assert len(events) == 1
        assert {f["name"] for f in events[0].payload["files"]} == {"one", "two"}
        b.mark_event(events[0].id, True)


def test_two_servers_completing_batches_of_one_job_make_one_event(two_stores):
    """The same race through ``record_complete_many`` (batches on two servers)."""
    a, b = two_stores
    for round_ in range(10):
        job = a.create_job(f"batch-{round_}", {})
        files = a.add_files(job.id, [(f"f{i}", 1) for i in range(6)])
        results = race(lambda: a.record_complete_many([(f.key, 0, "a" * 64) for f in files[:3]]),
                       lambda: b.record_complete_many([(f.key, 0, "b" * 64) for f in files[3:]]))
        assert sorted(results) == [[], [job.id]], results
        assert len([e for e in a.pending_events(1000) if e.job_id == job.id]) == 1


def test_outbox_events_are_claimed_by_one_server_at_a_time(two_stores):
    """Two servers asking for pending events at once get disjoint sets; one server's claims are
    not handed to the other until its lease lapses, and a delivered event goes to nobody."""
    a, b = two_stores
    for i in range(40):
        job = a.create_job(f"e{i}", {})
        (f,) = a.add_files(job.id, [("x", 1)])
        a.record_complete(f.key, 0, "0" * 64)
    got_a, got_b = race(lambda: a.pending_events(1000), lambda: b.pending_events(1000))
    ids_a, ids_b = {e.id for e in got_a}, {e.id for e in got_b}
    assert not ids_a & ids_b
    assert len(ids_a | ids_b) == 40
    # each keeps its own claims on later passes (a failed delivery is retried by its claimant) ...
    holder, other = (a, b) if ids_a else (b, a)
    held = ids_a or ids_b
    some = next(iter(held))
    holder.mark_event(some, False)
    assert some in {e.id for e in holder.pending_events(1000)}
    assert some not in {e.id for e in other.pending_events(1000)}
    holder.mark_event(some, True)
    assert some not in {e.id for e in holder.pending_events(1000)}


def test_a_dead_servers_claims_expire(postgres_dsn, secret):
    """Events claimed by a server that stopped are handed to another once the lease has lapsed."""
    now = [1000.0]
    a = PostgresStore(postgres_dsn, secret=secret, clock=lambda: now[0])
    b = PostgresStore(postgres_dsn, secret=secret, clock=lambda: now[0])
    job = a.create_job("j", {})
    (f,) = a.add_files(job.id, [("x", 1)])
    a.record_complete(f.key, 0, "0" * 64)
    (event,) = a.pending_events()
    a.close()  # the server died holding the claim
    assert b.pending_events() == []
    now[0] += EVENT_LEASE + 1
    assert [e.id for e in b.pending_events()] == [event.id]
    b.close()


def test_servers_starting_at_once_migrate_once(postgres_dsn, secret):
    """Several stores opening a new database at the same instant: each migration applied once, all open."""
    stores = race(*[lambda: PostgresStore(postgres_dsn, secret=secret) for _ in range(4)])
    assert all(isinstance(s, PostgresStore) for s in stores), stores
    with psycopg.connect(postgres_dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert stores[0].schema_version() == len(MIGRATIONS)
    for s in stores:
        s.close()


def test_a_server_with_another_secret_is_refused(postgres_dsn, secret, tmp_path):
    """A server whose file key secret differs from the one the database's keys were made with is
    refused with a clear error, and the keys the first one handed out keep working."""
    first = PostgresStore(postgres_dsn, secret=secret)
    job = first.create_job("j", {})
    (f,) = first.add_files(job.id, [("x", 1)])
    with pytest.raises(FiledockError) as exc:
        PostgresStore(postgres_dsn, secret_path=tmp_path / "other.secret")
    assert exc.value.code is ErrorCode.CONFLICT and "same secret" in exc.value.message
    assert first.get_file(f.key).id == f.id
    first.close()


def test_a_lost_database_is_store_unavailable_and_comes_back(tmp_path, secret):
    """With PostgreSQL down, a call is FiledockError(store-unavailable), not a driver error; once it
    is back, the next call reconnects by itself."""
    with running_postgres() as server:
        store = PostgresStore(server.create_database("lost"), secret=secret)
        job = store.create_job("j", {})
        server.stop("immediate")
        with pytest.raises(FiledockError) as exc:
            store.find_job(job.id)
        assert exc.value.code is ErrorCode.STORE_UNAVAILABLE
        with pytest.raises(FiledockError) as exc:
            store.add_files(job.id, [("x", 1)])
        assert exc.value.code is ErrorCode.STORE_UNAVAILABLE
        server.start()
        assert store.find_job(job.id) == job
        store.close()


class _Recording:
    """A store that records the order its calls ran in, slowly, on several threads."""

    threads = 4

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def record_progress(self, key: str, n: int) -> None:
        time.sleep(0.001 * (hash(key) % 3))
        with self.lock:
            self.calls.append((key, n))


def test_deferred_store_keeps_each_files_calls_in_order(reactor_thread):
    """On several threads, calls about one file (same first argument) still run in the order made."""
    from twisted.internet import defer
    from twisted.internet.threads import blockingCallFromThread

    inner = _Recording()
    store = blockingCallFromThread(reactor_thread, lambda: DeferredStore(inner, reactor_thread))
    assert len(store._pools) == 4
    keys = [f"file-{i}" for i in range(8)]

    def issue():
        return defer.gatherResults([store.record_progress(k, n) for n in range(20) for k in keys])

    blockingCallFromThread(reactor_thread, issue)
    for k in keys:
        assert [n for key, n in inner.calls if key == k] == list(range(20))


def test_a_database_newer_than_this_filedock_is_refused(postgres_dsn, secret):
    """A database migrated by a newer filedock (a higher schema version) is refused with a clear
    error instead of being used with a schema this code does not know."""
    PostgresStore(postgres_dsn, secret=secret).close()
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("INSERT INTO schema_version VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(FiledockError) as exc:
        PostgresStore(postgres_dsn, secret=secret)
    assert exc.value.code is ErrorCode.CONFLICT and "upgrade" in exc.value.message


@pytest.fixture(params=["sqlite", "postgres"])
def either_store(request, tmp_path, secret):
    """A fresh store on each backend (what both must do alike)."""
    from filedock.store.sqlite import SQLiteStore

    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "filedock.sqlite3", secret=secret)
    else:
        s = PostgresStore(request.getfixturevalue("postgres_dsn"), secret=secret)
    yield s
    s.close()


def test_a_batch_completes_plain_files_and_new_versions_alike(either_store):
    """``record_complete_many`` with plain files and a new version of a file: every one complete with
    its values, the new version in the old one's place, the job complete with one event; a batch
    naming a deleted file is ``gone`` and changes nothing."""
    store = either_store
    job = store.create_job("b", {})
    a, b, old = store.add_files(job.id, [("a", 1), ("b", 2), ("c", 3)])
    store.record_complete(old.key, 3, "c" * 64)
    (new,) = store.add_files(job.id, [("c", 4)], replace=frozenset({"c"}))
    assert new.replaces == old.id
    assert store.record_complete_many([(a.key, 1, "a" * 64), (b.key, 2, "b" * 64), (new.key, 4, "d" * 64)]) \
        == [job.id]
    files = {f.name: f for f in store.list_files(job.id)}
    assert {n: (f.state, f.received, f.crc32, f.digest) for n, f in files.items()} == {
        "a": ("complete", 1, 1, "a" * 64), "b": ("complete", 2, 2, "b" * 64), "c": ("complete", 4, 4, "d" * 64)}
    assert files["c"].id == new.id and store.get_file(old.key) is None
    assert len([e for e in store.pending_events() if e.job_id == job.id]) == 1
    assert store.job_counts(job.id) == (3, 3, 7, 7)
    other = store.create_job("o", {})
    x, y = store.add_files(other.id, [("x", 1), ("y", 1)])
    store.delete_job(job.id)
    with pytest.raises(FiledockError) as exc:
        store.record_complete_many([(x.key, 1, "e" * 64), (a.key, 1, "a" * 64)])
    assert exc.value.code is ErrorCode.GONE
    assert store.get_file(x.key).state == "pending"


def test_job_complete_events_say_the_same_on_both_backends(tmp_path, postgres_dsn, secret):
    """The event PostgreSQL builds (in SQL, ``filedock_complete_file``) is the one SQLite builds (in
    Python): same files in the same order, same CRC text, same time, same keys."""
    from filedock.store.sqlite import SQLiteStore

    def event_of(store):
        job = store.create_job("j", {})
        b, a = store.add_files(job.id, [("b.bin", 5), ("a é.bin", 7)])
        store.record_complete(b.key, 0xABC, "d" * 64)
        store.record_complete(a.key, 0xFFFFFFFE, "e" * 64)
        (event,) = store.pending_events()
        payload = dict(event.payload)
        assert payload.pop("id") == event.id and payload["job"].pop("id") == job.id
        assert [f["key"] for f in payload["files"]] == [a.key, b.key]
        for f in payload["files"]:
            f.pop("key")
        store.close()
        return payload

    on_sqlite = event_of(SQLiteStore(tmp_path / "db.sqlite3", clock=lambda: 1234.5678, secret=secret))
    on_postgres = event_of(PostgresStore(postgres_dsn, clock=lambda: 1234.5678, secret=secret))
    assert on_postgres == on_sqlite
    assert [f["crc32"] for f in on_postgres["files"]] == ["fffffffe", "00000abc"]
