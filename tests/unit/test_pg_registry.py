"""PostgresUploadRegistry against a real PostgreSQL: two registries stand for two servers.

The reactor runs in its own thread (``reactor_thread``); each step is called in it
and waited for here. A "server" that dies is a registry whose listening connection
is terminated by PostgreSQL (as when the kernel closes a SIGKILLed process's
sockets) or whose heartbeats stop (a hung process).
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable

import psycopg
import pytest
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from filedock.errors import ErrorCode, FiledockError
from filedock.server.pg_registry import PostgresUploadRegistry
from filedock.server.registry import IUploadClaim, IUploadRegistry
from filedock.store import pg_claims

FILE, OTHER, SESSION = "f" * 32, "e" * 32, "s" * 32


def in_reactor(reactor: Any, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
    """Call ``fn`` in the reactor thread and wait for its (Deferred's) result; failures raise here."""
    answers: queue.Queue = queue.Queue()
    reactor.callFromThread(lambda: defer.maybeDeferred(fn, *args).addBoth(answers.put))
    result = answers.get(timeout=timeout)
    if isinstance(result, Failure):
        result.raiseException()
    return result


class Holder:
    """What an upload does when asked to let go: note it and release at once (or not)."""

    def __init__(self, reactor: Any, registry: PostgresUploadRegistry, let_go: bool = True) -> None:
        self.reactor, self.registry, self.let_go = reactor, registry, let_go
        self.claim = None
        self.asked_at: float | None = None

    def request_release(self) -> None:
        self.asked_at = time.monotonic()
        if self.let_go and self.claim is not None:
            self.registry.release(self.claim)


@pytest.fixture
def two_servers(reactor_thread, postgres_dsn):
    """Two registries on one database, started, and stopped after the test."""
    registries = [PostgresUploadRegistry(postgres_dsn, reactor_thread, label=f"server-{n}") for n in "ab"]
    for registry in registries:
        in_reactor(reactor_thread, registry.start)
    yield registries
    for registry in registries:
        try:
            in_reactor(reactor_thread, registry.stop)
        except Exception:
            pass  # already stopped by the test


def acquire(reactor, registry, holder, file_key=FILE, session=SESSION, limit=4, timeout=30.0):
    claim = in_reactor(reactor, registry.acquire, file_key, session, limit, holder.request_release, timeout=timeout)
    holder.claim = claim
    return claim


def test_the_registry_provides_the_interface(reactor_thread, two_servers):
    """It is an IUploadRegistry, and its claims are IUploadClaims, like the in-process one."""
    a, _ = two_servers
    holder = Holder(reactor_thread, a)
    claim = acquire(reactor_thread, a, holder)
    assert verifyObject(IUploadRegistry, a)
    assert verifyObject(IUploadClaim, claim)
    assert claim.file_key == FILE and claim.session_key == SESSION and claim.took_over is False


def test_a_file_held_by_one_server_is_held_for_the_other(reactor_thread, two_servers):
    """try_acquire on B finds A's claim (no takeover); after A releases, B gets it; is_held sees A's claim."""
    a, b = two_servers
    holder = Holder(reactor_thread, a, let_go=False)
    claim = acquire(reactor_thread, a, holder)
    assert in_reactor(reactor_thread, b.try_acquire, FILE) is None
    assert in_reactor(reactor_thread, b.is_held, FILE) is True
    assert holder.asked_at is None  # try_acquire never asks the holder
    in_reactor(reactor_thread, a.release, claim)
    deadline = time.monotonic() + 5
    while in_reactor(reactor_thread, b.is_held, FILE) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = in_reactor(reactor_thread, b.try_acquire, FILE)
    assert got is not None and got.file_key == FILE
    assert in_reactor(reactor_thread, a.try_acquire, FILE) is None


def test_takeover_across_servers_asks_the_holder_and_is_granted_at_once(reactor_thread, two_servers):
    """B's acquire makes A's holder let go (NOTIFY on A's channel) and is granted well under the lease."""
    a, b = two_servers
    old = Holder(reactor_thread, a)
    acquire(reactor_thread, a, old)
    new = Holder(reactor_thread, b)
    began = time.monotonic()
    claim = acquire(reactor_thread, b, new)
    waited = time.monotonic() - began
    assert old.asked_at is not None, "the holder on the other server was never asked to let go"
    assert claim.took_over is True
    assert waited < 1.0 < b.LEASE_SECONDS, f"takeover took {waited:.2f} s"
    assert b.takeovers_asked == 1
    assert in_reactor(reactor_thread, a.try_acquire, FILE) is None  # B holds it now, for A too


def test_a_holder_that_does_not_let_go_keeps_the_file_while_its_server_lives(reactor_thread, two_servers):
    """A live holder that has not let go (finishing) keeps the file: B waits rather than sharing it."""
    a, b = two_servers
    old = Holder(reactor_thread, a, let_go=False)
    claim = acquire(reactor_thread, a, old)
    new = Holder(reactor_thread, b)
    waiting = []
    reactor_thread.callFromThread(
        lambda: b.acquire(FILE, SESSION, 4, new.request_release).addBoth(waiting.append))
    time.sleep(b.LEASE_SECONDS + 1.0)  # longer than a lease: A's heartbeat keeps its claim
    assert waiting == [] and old.asked_at is not None
    in_reactor(reactor_thread, a.release, claim)
    deadline = time.monotonic() + 3
    while not waiting and time.monotonic() < deadline:
        time.sleep(0.02)
    assert waiting and getattr(waiting[0], "took_over", False) is True


def test_a_dead_servers_claims_are_free_once_its_connection_is_gone(reactor_thread, postgres_dsn, two_servers):
    """A server whose PostgreSQL connection closes (a SIGKILL closes it) loses its claims at once, not
    after the lease: B's waiting acquire is granted in well under the lease."""
    a, b = two_servers
    acquire(reactor_thread, a, Holder(reactor_thread, a, let_go=False))  # it never answers: "dead"
    # the dead server: its heartbeats stop and its connections close
    a._stopping.set()
    a._listener.join(5)
    in_reactor(reactor_thread, a._query, a._close_connection)
    began = time.monotonic()
    claim = acquire(reactor_thread, b, Holder(reactor_thread, b))
    assert time.monotonic() - began < a.LEASE_SECONDS - 1.0
    assert claim.took_over is True


def test_a_hung_servers_claims_expire_with_its_lease(reactor_thread, postgres_dsn):
    """A server that keeps its connection but stops its heartbeats (hung) loses its claims when its
    lease runs out: B waits about a lease, not forever."""
    lease = 2.0
    a = PostgresUploadRegistry(postgres_dsn, reactor_thread, lease_seconds=lease, heartbeat_seconds=0.5, label="a")
    b = PostgresUploadRegistry(postgres_dsn, reactor_thread, lease_seconds=lease, heartbeat_seconds=0.5, label="b")
    in_reactor(reactor_thread, a.start)
    in_reactor(reactor_thread, b.start)
    try:
        acquire(reactor_thread, a, Holder(reactor_thread, a, let_go=False))
        # a hung process: the heartbeat thread stops renewing (its connection stays open)
        a._beat = lambda conn, lock_id: time.sleep(3600)
        began = time.monotonic()
        acquire(reactor_thread, b, Holder(reactor_thread, b), timeout=lease * 4)
        waited = time.monotonic() - began
        assert 0.5 < waited < lease + 2.0, f"granted after {waited:.2f} s with a {lease} s lease"
    finally:
        in_reactor(reactor_thread, b.stop)
        in_reactor(reactor_thread, a._watch.stop)  # a's listener sleeps on; its database is dropped with force


def test_a_server_that_cannot_renew_its_lease_lets_go_and_refuses_new_claims(reactor_thread, two_servers):
    """When its heartbeats fail, a server asks its holders to let go before the lease can run out, and
    grants nothing until it renews: two servers never write one file at once."""
    a, _ = two_servers
    holder = Holder(reactor_thread, a, let_go=False)
    acquire(reactor_thread, a, holder)
    a._lease_valid_until = time.monotonic() - 1  # what a missed renewal looks like to the watch
    a._beat = lambda conn, lock_id: time.sleep(3600)
    deadline = time.monotonic() + 3
    while holder.asked_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder.asked_at is not None
    with pytest.raises(FiledockError) as err:
        acquire(reactor_thread, a, Holder(reactor_thread, a), file_key=OTHER)
    assert err.value.code is ErrorCode.INTERNAL_ERROR
    assert in_reactor(reactor_thread, a.try_acquire, OTHER) is None  # "held": the sweeper leaves it alone
    assert not in_reactor(reactor_thread, a._local.is_held, OTHER)  # and nothing is left held locally


def test_session_slots_and_batch_shares_are_per_process(reactor_thread, two_servers):
    """A session's upload slots are counted per server (the limit bounds one process's resources)."""
    a, b = two_servers
    acquire(reactor_thread, a, Holder(reactor_thread, a), file_key="1" * 32, limit=1)
    with pytest.raises(FiledockError) as err:
        acquire(reactor_thread, a, Holder(reactor_thread, a), file_key="2" * 32, limit=1)
    assert err.value.code is ErrorCode.TOO_MANY_CONNECTIONS
    acquire(reactor_thread, b, Holder(reactor_thread, b), file_key="2" * 32, limit=1)
    in_reactor(reactor_thread, a.join_batch_share, SESSION, 1)
    in_reactor(reactor_thread, b.join_batch_share, SESSION, 1)


def test_bytes_promised_include_the_other_servers_after_a_heartbeat(reactor_thread, two_servers):
    """Servers sharing a disk do not promise the same free space twice: A's promise reaches B."""
    a, b = two_servers
    reactor_thread.callFromThread(a.promise, "upload", lambda: 123_456_789)
    deadline = time.monotonic() + 5
    while in_reactor(reactor_thread, b.bytes_promised) != 123_456_789 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_reactor(reactor_thread, b.bytes_promised) == 123_456_789
    assert in_reactor(reactor_thread, a.bytes_promised) == 123_456_789  # its own, not counted twice


def test_file_keys_are_never_stored_in_clear(reactor_thread, postgres_dsn, two_servers):
    """The claims table names files by the SHA-256 of their key: a copy of it opens nothing."""
    a, _ = two_servers
    acquire(reactor_thread, a, Holder(reactor_thread, a))
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT file_hash FROM upload_claims").fetchall()
    assert rows == [(pg_claims.file_hash(FILE),)]
    assert FILE not in rows[0][0]


def test_a_clean_stop_frees_every_claim(reactor_thread, two_servers):
    """stop() deletes the server's row and its claims: the other server takes the file with no wait."""
    a, b = two_servers
    acquire(reactor_thread, a, Holder(reactor_thread, a, let_go=False))
    in_reactor(reactor_thread, a.stop)
    assert in_reactor(reactor_thread, b.try_acquire, FILE) is not None


def test_the_metadata_url_picks_the_registry(reactor_thread, postgres_dsn, tmp_path):
    """PostgreSQL metadata: the shared registry; SQLite (or none): the in-process one."""
    from filedock.server.registry import InProcessUploadRegistry
    from filedock.server.service import upload_registry_for

    assert isinstance(upload_registry_for(None, reactor_thread), InProcessUploadRegistry)
    assert isinstance(upload_registry_for(f"sqlite:///{tmp_path}/m.sqlite3", reactor_thread), InProcessUploadRegistry)
    shared = upload_registry_for(postgres_dsn, reactor_thread)
    assert isinstance(shared, PostgresUploadRegistry) and shared.dsn.endswith(postgres_dsn.rsplit("/", 1)[1])


def test_servers_on_postgresql_share_the_data_dir_and_keep_fsck_repair_out(tmp_path):
    """Several servers on PostgreSQL hold the data dir's lock shared; a SQLite server (exclusive) and
    fsck --repair (exclusive) are refused while any of them runs."""
    import os

    from filedock.server.service import data_dir_in_use, lock_data_dir

    first = lock_data_dir(tmp_path, shared=True)
    second = lock_data_dir(tmp_path, shared=True)
    try:
        with pytest.raises(FiledockError) as err:
            lock_data_dir(tmp_path)
        assert err.value.code is ErrorCode.CONFLICT
        assert data_dir_in_use(tmp_path)
    finally:
        os.close(first)
        os.close(second)
    assert not data_dir_in_use(tmp_path)


def test_stop_ends_even_when_postgresql_is_gone(reactor_thread, postgres_server):
    """A server shutting down after its database went away still stops its registry: the threads
    are gone (before, a failed last query left the registry's thread, and the process, alive)."""
    dsn = postgres_server.create_database()
    registry = PostgresUploadRegistry(dsn, reactor_thread)
    in_reactor(reactor_thread, registry.start)
    postgres_server.drop_database(dsn)  # ends its connections too
    began = time.monotonic()
    in_reactor(reactor_thread, registry.stop, timeout=30)
    assert time.monotonic() - began < 10
    assert not any(t.is_alive() for t in registry._pool.threads) and not registry._listener.is_alive()
