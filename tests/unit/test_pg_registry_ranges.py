"""Range claims of the PostgreSQL registry (ranged uploads, ``PUTR``, across servers).

Two registries on one database stand for two servers, as in test_pg_registry.py: ranges
that do not overlap are held at once, overlapping ones are taken over across servers,
a plain upload of the file and its ranges exclude each other, a dead server's range
claims are free at once, and one server at a time completes a ranged file.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from zope.interface.verify import verifyObject

from filedock.server.registry import IUploadClaim
from filedock.store import pg_claims
from tests.unit.test_pg_registry import FILE, SESSION, Holder, acquire, in_reactor, two_servers  # noqa: F401

MiB = 1 << 20


def acquire_range(reactor, registry, holder, start, end, file_key=FILE, session=SESSION, limit=8, timeout=30.0):
    claim = in_reactor(reactor, registry.acquire_range, file_key, start, end, session, limit, holder.request_release,
                       timeout=timeout)
    holder.claim = claim
    return claim


def range_rows(dsn: str) -> list[tuple[int, int, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT range_start, range_end, s.label FROM upload_range_claims "
                            "JOIN registry_servers s USING (server_id) ORDER BY range_start").fetchall()


def wait_until(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_ranges_that_do_not_overlap_are_held_at_once_on_two_servers(reactor_thread, postgres_dsn, two_servers):
    """A holds [0, 8M) and B holds [8M, 16M) of one file at once: nobody is asked to let go; each is a
    row of its own, keyed by its start."""
    a, b = two_servers
    first, second = Holder(reactor_thread, a, let_go=False), Holder(reactor_thread, b, let_go=False)
    claim_a = acquire_range(reactor_thread, a, first, 0, 8 * MiB)
    claim_b = acquire_range(reactor_thread, b, second, 8 * MiB, 16 * MiB)
    assert verifyObject(IUploadClaim, claim_b)
    assert (claim_a.took_over, claim_b.took_over) == (False, False)
    assert first.asked_at is None and second.asked_at is None and b.takeovers_asked == 0
    assert range_rows(postgres_dsn) == [(0, 8 * MiB, "server-a"), (8 * MiB, 16 * MiB, "server-b")]
    assert in_reactor(reactor_thread, b.is_held, FILE) is True  # the sweeper leaves the partial alone
    in_reactor(reactor_thread, a.release, claim_a)
    assert wait_until(lambda: range_rows(postgres_dsn) == [(8 * MiB, 16 * MiB, "server-b")])


def test_an_overlapping_range_is_taken_over_across_servers(reactor_thread, postgres_dsn, two_servers):
    """A holds [0, 8M) and [8M, 16M); B's claim of [8M, 16M) (the client came back through B) asks A to
    let go of that range only, well under the lease; A keeps [0, 8M)."""
    a, b = two_servers
    keep, stall = Holder(reactor_thread, a, let_go=False), Holder(reactor_thread, a)
    acquire_range(reactor_thread, a, keep, 0, 8 * MiB)
    acquire_range(reactor_thread, a, stall, 8 * MiB, 16 * MiB)
    began = time.monotonic()
    claim = acquire_range(reactor_thread, b, Holder(reactor_thread, b), 8 * MiB, 16 * MiB)
    waited = time.monotonic() - began
    assert claim.took_over is True and stall.asked_at is not None
    assert keep.asked_at is None, "a range that does not overlap was asked to let go"
    assert waited < 1.0 < b.LEASE_SECONDS, f"takeover took {waited:.2f} s"
    assert range_rows(postgres_dsn) == [(0, 8 * MiB, "server-a"), (8 * MiB, 16 * MiB, "server-b")]


def test_a_put_takes_over_every_range_held_on_another_server(reactor_thread, postgres_dsn, two_servers):
    """A plain upload (``acquire`` of the whole file) on B while A holds two ranges: B's ``try_acquire``
    (the sweeper, a batch) finds the file held; ``acquire`` asks A to let go of both ranges and is
    granted once they are gone; then A's new range claim has to take the PUT over in turn."""
    a, b = two_servers
    ranges = [Holder(reactor_thread, a), Holder(reactor_thread, a)]
    acquire_range(reactor_thread, a, ranges[0], 0, 8 * MiB)
    acquire_range(reactor_thread, a, ranges[1], 8 * MiB, 16 * MiB)
    assert in_reactor(reactor_thread, b.try_acquire, FILE) is None
    assert in_reactor(reactor_thread, b.try_acquire_many, [FILE]) == {FILE: None}
    put = Holder(reactor_thread, b)
    claim = acquire(reactor_thread, b, put)
    assert claim.took_over is True and all(h.asked_at is not None for h in ranges)
    assert range_rows(postgres_dsn) == []
    assert in_reactor(reactor_thread, a.try_acquire, FILE) is None  # B holds the file for A too
    again = acquire_range(reactor_thread, a, Holder(reactor_thread, a), 0, 8 * MiB)
    assert again.took_over is True and put.asked_at is not None
    assert range_rows(postgres_dsn) == [(0, 8 * MiB, "server-a")]


def test_a_range_waits_while_a_put_elsewhere_does_not_let_go(reactor_thread, postgres_dsn, two_servers):
    """A PUT on A that is finishing (does not let go yet) keeps the file: B's range claim waits rather
    than writing beside it, and is granted as soon as A releases."""
    a, b = two_servers
    put = Holder(reactor_thread, a, let_go=False)
    claim = acquire(reactor_thread, a, put)
    waiting = []
    reactor_thread.callFromThread(lambda: b.acquire_range(FILE, 0, 8 * MiB, SESSION, 8, lambda: None)
                                  .addBoth(waiting.append))
    time.sleep(1.5)
    assert waiting == [] and put.asked_at is not None
    assert range_rows(postgres_dsn) == []
    in_reactor(reactor_thread, a.release, claim)
    assert wait_until(lambda: bool(waiting), 3.0)
    assert getattr(waiting[0], "took_over", None) is True


def test_a_dead_servers_range_claims_are_free_at_once(reactor_thread, postgres_dsn, two_servers):
    """A holds two ranges and dies (its connections close, as with a SIGKILL): B claims an overlapping
    range and the whole file well under the lease, without A answering; A's rows are gone."""
    a, b = two_servers
    for start in (0, 8 * MiB):
        acquire_range(reactor_thread, a, Holder(reactor_thread, a, let_go=False), start, start + 8 * MiB)
    a._stopping.set()
    a._listener.join(5)
    in_reactor(reactor_thread, a._query, a._close_connection)
    began = time.monotonic()
    claim = acquire_range(reactor_thread, b, Holder(reactor_thread, b), 4 * MiB, 12 * MiB)
    assert time.monotonic() - began < a.LEASE_SECONDS - 1.0
    assert claim.took_over is True  # the dead holder may have recorded more: the upload asks again
    assert range_rows(postgres_dsn) == [(4 * MiB, 12 * MiB, "server-b")]
    # and nothing of the dead server keeps the file from a plain upload elsewhere either
    in_reactor(reactor_thread, b.release, claim)
    assert wait_until(lambda: range_rows(postgres_dsn) == [])
    assert in_reactor(reactor_thread, b.try_acquire, FILE) is not None


def test_a_put_and_a_range_claimed_at_the_same_moment_are_never_both_granted(reactor_thread, postgres_dsn,
                                                                            two_servers):
    """The exclusion holds under a race: server A's whole-file claim and server B's range claim of the
    same file, sent at once from two connections, 40 times; never both granted (the per-file advisory
    lock serialises the two tables' checks)."""
    a, b = two_servers
    conns = [pg_claims.connect(postgres_dsn) for _ in range(2)]
    both = 0
    try:
        for n in range(40):
            hashed = pg_claims.file_hash(f"{n:032d}")
            barrier = threading.Barrier(2)
            results: list = [None, None]

            def whole() -> None:
                barrier.wait()
                results[0] = pg_claims.take_claim(conns[0], hashed, a.server_id, pg_claims.new_claim_id())[0]

            def ranged() -> None:
                barrier.wait()
                results[1] = pg_claims.take_range_claim(conns[1], hashed, 0, MiB, b.server_id,
                                                        pg_claims.new_claim_id())[0]

            threads = [threading.Thread(target=whole), threading.Thread(target=ranged)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert results[0] is not None and results[1] is not None
            assert results[0] or results[1], "neither was granted"
            both += results[0] and results[1]
    finally:
        for conn in conns:
            conn.close()
    assert both == 0, f"{both} of 40 files held whole by A and in part by B at once"


def test_one_server_at_a_time_completes_a_ranged_file(reactor_thread, two_servers):
    """``lock_completion``: while A completes a file, B's completion of the same file waits (it would
    otherwise find every block durable too and publish the partial a second time); another file's
    does not."""
    a, b = two_servers
    unlock_a = in_reactor(reactor_thread, a.lock_completion, FILE)
    waiting = []
    reactor_thread.callFromThread(lambda: b.lock_completion(FILE).addBoth(waiting.append))
    unlock_other = in_reactor(reactor_thread, b.lock_completion, "o" * 32, timeout=5)
    time.sleep(0.5)
    assert waiting == []
    reactor_thread.callFromThread(unlock_a)
    assert wait_until(lambda: bool(waiting), 3.0)
    assert callable(waiting[0])
    reactor_thread.callFromThread(waiting[0])
    reactor_thread.callFromThread(unlock_other)


@pytest.mark.parametrize("whole", [False, True])
def test_the_heartbeat_drops_rows_no_claim_holds(reactor_thread, postgres_dsn, two_servers, whole):
    """A row whose release never reached PostgreSQL (its DELETE failed) goes with a later heartbeat,
    for range claims as for file claims."""
    a, _ = two_servers
    table = "upload_claims" if whole else "upload_range_claims"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        if whole:
            conn.execute("INSERT INTO upload_claims (file_hash, server_id, claim_id, claimed_at) "
                         "VALUES ('x', %s, 7, now() - interval '1 minute')", (a.server_id,))
        else:
            conn.execute("INSERT INTO upload_range_claims (file_hash, range_start, range_end, server_id, claim_id, "
                         "claimed_at) VALUES ('x', 0, 10, %s, 7, now() - interval '1 minute')", (a.server_id,))

    def rows() -> int:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    assert wait_until(lambda: rows() == 0, 5.0)
