"""A batch's claims on the PostgreSQL registry: every file of a batch claimed and let go in one round
trip each (``try_acquire_many``, ``release_many``), with the same answers as one ``try_acquire`` a file.
Before, a BATCH on PostgreSQL metadata cost two round trips per file: 0.34x SQLite's figure."""

from __future__ import annotations

import time

import psycopg

from filedock.server.registry import InProcessUploadRegistry
from filedock.store import pg_claims
from tests.unit.test_pg_registry import FILE, Holder, acquire, in_reactor, two_servers  # noqa: F401 (fixture)

KEYS = [f"{n:x}" * 32 for n in range(1, 6)]


def claimed_hashes(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT file_hash FROM upload_claims").fetchall()}


def test_a_batch_claims_the_free_files_in_one_call_and_leaves_the_held_ones(reactor_thread, two_servers,
                                                                             postgres_dsn):
    a, b = two_servers
    held = acquire(reactor_thread, a, Holder(reactor_thread, a), file_key=KEYS[0])
    queries = []
    real = b._query
    b._query = lambda fn, *args: (queries.append(fn.__name__), real(fn, *args))[1]
    try:
        got = in_reactor(reactor_thread, b.try_acquire_many, KEYS)
    finally:
        b._query = real
    assert got[KEYS[0]] is None  # A holds it, alive: a batch never takes a file over
    assert all(got[k] is not None and got[k].file_key == k for k in KEYS[1:])
    assert queries == ["take_claims"]  # one round trip for the five files
    assert claimed_hashes(postgres_dsn) == {pg_claims.file_hash(k) for k in KEYS}
    # held for A too: its try_acquire of a batch's file finds it taken
    assert in_reactor(reactor_thread, a.try_acquire, KEYS[1]) is None

    in_reactor(reactor_thread, b.release_many, [got[k] for k in KEYS[1:]])
    deadline = time.monotonic() + 10
    while claimed_hashes(postgres_dsn) != {pg_claims.file_hash(KEYS[0])} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert claimed_hashes(postgres_dsn) == {pg_claims.file_hash(KEYS[0])}
    again = in_reactor(reactor_thread, a.try_acquire, KEYS[1])
    assert again is not None
    in_reactor(reactor_thread, a.release, again)
    in_reactor(reactor_thread, a.release, held)


def test_the_in_process_registry_answers_a_batch_as_one_try_acquire_a_file():
    registry = InProcessUploadRegistry()
    first = registry.try_acquire(FILE)
    got = registry.try_acquire_many([FILE, KEYS[1]]).result
    assert got[FILE] is None and got[KEYS[1]] is not None
    registry.release_many([got[KEYS[1]]])
    assert registry.try_acquire(KEYS[1]).result is not None
    assert first.result is not None
