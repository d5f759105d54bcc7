"""The upload registry of several servers sharing PostgreSQL.

``PostgresUploadRegistry`` implements ``IUploadRegistry`` for servers behind a load
balancer: a file is held by one server at a time, whichever server the client
reaches, and a client that comes back through another server takes its own
upload over at once.

What is global and what stays per process:

- **File claims: global.** A claim is a row of ``upload_claims`` naming the holding
  server. A server is alive while its lease runs (renewed every ``heartbeat``
  seconds, ``lease`` seconds long) and its listening connection holds its advisory
  lock. So a SIGKILLed server's claims are free as soon as PostgreSQL sees its
  connection close (the kernel closes it with the process: well under a second on
  the same host or a live network), and those of a server that hangs, or whose
  machine vanished without closing anything, when its lease runs out (5 s by
  default: a heartbeat a second leaves room for four missed beats on a loaded host).
- **Range claims: global.** A ranged upload (``PUTR``) claims its byte range, a row per
  (file, range start): ranges that do not overlap are held at once, on one server or
  several; a plain upload of the file and its ranges exclude each other, as in the
  in-process registry (a ``PUT`` takes over every range, a range takes over the
  ``PUT``). The same leases, locks and takeover apply. The completion of a ranged file
  (every block durable: verify, publish, record) runs on one server at a time, under a
  PostgreSQL advisory lock on the file.
- **Takeover: global.** When another live server holds the file (or an overlapping
  range), this one asks it to let go (``NOTIFY`` on that server's channel,
  ``filedock_registry_<id>``, naming the range if it is one); it calls the
  ``request_release`` of each of its claims in the way (the upload checkpoints,
  records and closes with ``taken-over``), drops the rows and says so on the asker's
  channel. The asker also looks again every ``retry`` seconds, which covers a holder
  that died meanwhile. Inside one process the in-process registry's takeover is used
  as it is.
- **Bytes promised: global to within one heartbeat.** Each server publishes what its
  uploads have still to write with its heartbeat; ``bytes_promised`` adds the other
  live servers' last figures to this process's own (servers sharing a blob disk must
  not all promise the same free space).
- **Upload slots per session, the 2007 slot wait and batch shares: per process.**
  They bound what one session takes of one process's resources (connections, file
  descriptors, writer threads), which is what each server must protect; a session
  spread by the balancer over N servers may hold N times the limit in all, as N
  servers have N times the resources. Counting them globally would add a round trip
  to PostgreSQL to every request and a shared counter that a dead server's slots
  would have to be recovered from.

If this server cannot renew its lease (PostgreSQL unreachable, its connection lost),
it asks every upload it holds to let go before the lease can run out, and refuses new
claims until the lease is renewed: two servers never write one file at once.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from typing import Any, Callable

import psycopg
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.registry import InProcessUploadRegistry, IUploadClaim, IUploadRegistry
from filedock.store import pg_claims

log = Logger(namespace="filedock.registry")


@implementer(IUploadClaim)
class SharedClaim:
    """A claim held in PostgreSQL and in this process's own registry."""

    __slots__ = ("local", "hashed", "claim_id", "took_over", "wanted_by", "asked_at", "range")

    def __init__(self, local: Any, hashed: str, claim_id: int, took_over: bool,
                 byte_range: tuple[int, int] | None = None) -> None:
        self.local, self.hashed, self.claim_id, self.took_over = local, hashed, claim_id, took_over
        self.range = byte_range  # a ranged upload's [start, end); None: the whole file
        self.wanted_by: set[str] = set()  # servers that asked us to let go: told when we did
        self.asked_at: float | None = None  # when (monotonic) the holder was first asked to let go

    @property
    def file_key(self) -> str:
        return self.local.file_key

    @property
    def session_key(self) -> str | None:
        return self.local.session_key

    def request_release(self) -> None:
        """Ask the holder (an upload, a batch, the sweeper) to let go; once is enough."""
        if self.asked_at is None:
            self.asked_at = time.monotonic()
            self.local.request_release()

    def overlaps(self, byte_range: tuple[int, int] | None) -> bool:
        """Whether a claim of ``byte_range`` (None: the whole file) of the same file must take this one over."""
        return byte_range is None or self.range is None or (
            self.range[0] < byte_range[1] and byte_range[0] < self.range[1])

    def __repr__(self) -> str:
        return f"<shared claim of {short_key(self.local.file_key)}>"


@implementer(IUploadRegistry)
class PostgresUploadRegistry:
    """Upload ownership shared by every server on one PostgreSQL database (see the module)."""

    LEASE_SECONDS = 5.0
    HEARTBEAT_SECONDS = 1.0
    RETRY_SECONDS = 0.5  # a waiting claim looks again this often (a holder that died, a lost notification)
    ASK_AGAIN_SECONDS = 2.0  # and asks the same holder again this often
    FORGET_DEAD_AFTER = 3600.0  # a dead server's row (and claims) are deleted this long after its lease

    def __init__(self, dsn: str, reactor: Any = None, *, lease_seconds: float | None = None,
                 heartbeat_seconds: float | None = None, label: str | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.dsn = dsn
        self.lease = lease_seconds or self.LEASE_SECONDS
        self.heartbeat = heartbeat_seconds or self.HEARTBEAT_SECONDS
        if self.heartbeat * 2 > self.lease:
            raise ValueError("the heartbeat must be at most half the lease")
        self.server_id = secrets.token_hex(8)
        self.label = label if label is not None else f"{socket.gethostname()} pid {os.getpid()}"  # for operators
        self._local = InProcessUploadRegistry()
        self._held: dict[str, SharedClaim] = {}  # file hash -> our claim holding its row
        self._held_ranges: dict[str, list[SharedClaim]] = {}  # file hash -> our range claims of it
        self._claim_ids: set[int] = set()  # ids that may have a row now (the heartbeat keeps only those)
        self._waiting: dict[str, list[defer.Deferred]] = {}  # file hash -> claims waiting for it
        self._others_promised = 0
        self._lease_valid_until = 0.0  # monotonic: new claims only before this
        self._snapshot: tuple[int, list[int]] = (0, [])  # what the heartbeat publishes (made on the reactor)
        self._pool = ThreadPool(1, 1, name="filedock-registry")
        self._conn: psycopg.Connection | None = None  # used by the pool's one thread only
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._watch = task.LoopingCall(self._watch_lease)
        self._watch.clock = reactor
        self.takeovers_asked = 0  # release requests sent to other servers (for tests and status)

    # -- running

    @defer.inlineCallbacks
    def start(self):
        """Make the tables, register this server, listen, and start the heartbeat."""
        self._pool.start()
        try:
            yield self._query(pg_claims.create_schema)
            started = defer.Deferred()
            self._listener = threading.Thread(target=self._listen, args=(started,),
                                              name="filedock-registry-listener", daemon=True)
            self._listener.start()
            yield started
        except BaseException:
            self._stopping.set()
            self._pool.stop()  # its thread would keep a server that cannot start alive
            raise
        self._watch.start(self.heartbeat / 2, now=True)
        log.info("upload registry on PostgreSQL: server {server}, lease {lease:g} s",
                 server=self.server_id, lease=self.lease)

    @defer.inlineCallbacks
    def stop(self):
        """Let go of everything: the server's row and its claims go; threads and connections close.
        With PostgreSQL gone it still ends (the lease runs out by itself): its threads must not
        keep the process alive."""
        if self._stopping.is_set():
            return
        if self._watch.running:
            self._watch.stop()
        self._stopping.set()
        try:
            if self._listener is not None and self._listener.is_alive():
                try:
                    yield self._query(pg_claims.notify, self.server_id, "stop")  # wakes the listener now
                except psycopg.Error:
                    pass  # it wakes at its next heartbeat
                # on our own thread: the reactor's pool may be stopped already at shutdown
                yield threads.deferToThreadPool(self.reactor, self._pool, self._listener.join, self.heartbeat * 3)
            yield self._query(pg_claims.unregister_server, self.server_id)
        except Exception as exc:  # PostgreSQL gone: the lease runs out by itself
            log.warn("upload registry: could not unregister: {error}", error=str(exc))
        finally:
            self._pool.callInThread(self._close_connection)
            self._pool.stop()  # runs what is queued, then joins its thread

    def _close_connection(self, *_: Any) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _query(self, fn: Callable, *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` on the registry's own connection, in its thread."""
        return threads.deferToThreadPool(self.reactor, self._pool, self._in_thread, fn, *args)

    def _in_thread(self, fn: Callable, *args: Any) -> Any:
        for attempt in (1, 2):
            if self._conn is None or self._conn.closed:
                self._conn = pg_claims.connect(self.dsn)
            try:
                return fn(self._conn, *args)
            except psycopg.OperationalError:
                self._conn.close()  # a broken connection: one new one, then give up
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- the listening thread: notifications in, heartbeats out

    def _listen(self, started: defer.Deferred) -> None:
        first = True
        while not self._stopping.is_set():
            try:
                conn = pg_claims.connect(self.dsn)
            except psycopg.Error as exc:
                if first:
                    self.reactor.callFromThread(started.errback, exc)
                    return
                log.warn("upload registry: cannot reach PostgreSQL: {error}", error=str(exc))
                self._stopping.wait(self.heartbeat)
                continue
            try:
                self._serve(conn, started if first else None)
            except psycopg.Error as exc:
                if first and not started.called:
                    self.reactor.callFromThread(started.errback, exc)
                    return
                # our advisory lock went with the connection: to the others we are dead, so our
                # uploads must stop now, before another server takes their files
                self.reactor.callFromThread(self._fence, f"lost its PostgreSQL connection ({exc})")
            finally:
                conn.close()
            first = False

    def _serve(self, conn: psycopg.Connection, started: defer.Deferred | None) -> None:
        lock_id = pg_claims.register_server(conn, self.server_id, self.lease, self.label)
        pg_claims.listen(conn, self.server_id)
        self._beat(conn, lock_id)
        if started is not None:
            self.reactor.callFromThread(started.callback, None)
        next_beat = time.monotonic() + self.heartbeat
        while not self._stopping.is_set():
            wait = max(0.0, next_beat - time.monotonic())
            for note in conn.notifies(timeout=wait):
                self.reactor.callFromThread(self._notified, note.payload)
                if time.monotonic() >= next_beat:
                    break
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat
                self._beat(conn, lock_id)

    def _beat(self, conn: psycopg.Connection, lock_id: int) -> None:
        began = time.monotonic()
        promised, live = self._snapshot
        # the list is made on the reactor every half heartbeat; a beat may come late: three beats' margin
        ok, others = pg_claims.renew_lease(conn, self.server_id, self.lease, promised, live, 3 * self.heartbeat)
        if not ok:
            # the lease ran out before we renewed it (a long stall): whatever we held may be another's now
            self.reactor.callFromThread(self._fence, "its lease ran out before it was renewed")
            pg_claims.register_server(conn, self.server_id, self.lease, self.label, lock_id)
            return
        self.reactor.callFromThread(self._renewed, began, others)
        if secrets.randbelow(60) == 0:  # now and then: rows of servers dead for an hour
            pg_claims.forget_dead_servers(conn, self.FORGET_DEAD_AFTER)

    def _renewed(self, began: float, others_promised: int) -> None:
        # a margin of one heartbeat: claims stop being granted before the lease can end
        self._lease_valid_until = began + self.lease - self.heartbeat
        self._others_promised = others_promised

    def _watch_lease(self) -> None:
        self._snapshot = (self._local.promised_now(), list(self._claim_ids))
        if (self._held or self._held_ranges) and time.monotonic() > self._lease_valid_until:
            self._fence("could not renew its lease in time")

    def _fence(self, why: str) -> None:
        """Our claims may no longer be ours to the other servers: every holder lets go."""
        self._lease_valid_until = 0.0
        claims = [*self._held.values(), *(c for ranged in self._held_ranges.values() for c in ranged)]
        if claims:
            log.warn("upload registry: this server {why}; its {n} uploads let go", why=why, n=len(claims))
        for claim in claims:
            claim.request_release()

    def _notified(self, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        if kind == "release":  # "release <file hash> <asking server>[ <range start> <range end>]"
            hashed, asker, *bounds = rest.split(" ")
            wanted = (int(bounds[0]), int(bounds[1])) if len(bounds) == 2 else None
            mine = [self._held[hashed]] if hashed in self._held else []
            mine += self._held_ranges.get(hashed, [])
            in_the_way = [claim for claim in mine if claim.overlaps(wanted)]
            if not in_the_way:
                self._tell(asker, f"released {hashed}")  # not ours (any more): it may look again now
                return
            for claim in in_the_way:
                claim.wanted_by.add(asker)
                log.info("upload of {key} wanted by server {asker}: letting go", key=short_key(claim.file_key),
                         asker=asker)
                claim.request_release()
        elif kind == "released":  # "released <file hash>"
            self._wake(rest)

    def _tell(self, server_id: str, payload: str) -> None:
        self._query(pg_claims.notify, server_id, payload).addErrback(
            lambda f: log.warn("upload registry: could not notify {server}: {error}", server=server_id,
                               error=f.getErrorMessage()))

    def _wake(self, hashed: str) -> None:
        for waiting in self._waiting.pop(hashed, []):
            if not waiting.called:
                waiting.callback(None)

    def _sleep(self, hashed: str, seconds: float) -> defer.Deferred:
        """Fires when the holder says it let go of ``hashed``, or after ``seconds``."""
        waiting = defer.Deferred()
        waiters = self._waiting.setdefault(hashed, [])
        waiters.append(waiting)

        def timed_out() -> None:
            if waiting in waiters:
                waiters.remove(waiting)
                if not waiters and self._waiting.get(hashed) is waiters:
                    del self._waiting[hashed]
            waiting.callback(None)

        timer = self.reactor.callLater(seconds, timed_out)
        waiting.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return waiting

    def lease_valid(self) -> bool:
        """Whether this server may grant claims now (its lease was renewed recently enough)."""
        return time.monotonic() < self._lease_valid_until

    # -- files and upload slots

    COMPLETION_RETRY_SECONDS = 0.02  # another server completing the same file: look again this often

    @defer.inlineCallbacks
    def acquire_range(self, file_key, start, end, session_key, limit, request_release):
        local = yield self._local.acquire_range(file_key, start, end, session_key, limit, request_release)
        try:
            claim = yield self._take_row(local, wait=True, byte_range=(start, end))
        except BaseException:
            self._local.release(local)
            raise
        return claim

    @defer.inlineCallbacks
    def lock_completion(self, file_key):
        """Hold the completion of a ranged file on every server (a PostgreSQL advisory lock on the
        registry's connection); fires with the function that lets go. Two servers whose last ranges
        end at once must not both find every block durable and both publish the partial."""
        hashed = pg_claims.file_hash(file_key)
        while not (yield self._query(pg_claims.try_lock_completion, hashed)):
            yield task.deferLater(self.reactor, self.COMPLETION_RETRY_SECONDS, lambda: None)

        def unlock() -> None:
            # a lost connection took the lock with it; the error is only logged
            self._query(pg_claims.unlock_completion, hashed).addErrback(
                lambda f: log.warn("upload registry: could not unlock a completion: {error}",
                                   error=f.getErrorMessage()))
        return unlock

    @defer.inlineCallbacks
    def acquire(self, file_key, session_key, limit, request_release):
        local = yield self._local.acquire(file_key, session_key, limit, request_release)
        try:
            claim = yield self._take_row(local, wait=True)
        except BaseException:
            self._local.release(local)
            raise
        return claim

    @defer.inlineCallbacks
    def try_acquire(self, file_key):
        local = yield self._local.try_acquire(file_key)
        if local is None:
            return None
        try:
            claim = yield self._take_row(local, wait=False)
        except FiledockError:
            claim = None  # PostgreSQL unreachable: "held" is the safe answer (the sweeper and a batch skip it)
        except BaseException:
            self._local.release(local)
            raise
        if claim is None:
            self._local.release(local)
        return claim

    @defer.inlineCallbacks
    def _take_row(self, local: Any, wait: bool, byte_range: tuple[int, int] | None = None):
        """Hold ``local``'s file (or ``byte_range`` of it) in PostgreSQL; with ``wait``, ask the live
        holders elsewhere to let go and wait for it (or their death), else give up (None) at once."""
        hashed = pg_claims.file_hash(local.file_key)
        claim_id = pg_claims.new_claim_id()
        self._claim_ids.add(claim_id)  # before the row can exist: the heartbeat must not drop it
        asked: dict[str, float] = {}
        try:
            while True:
                if not self.lease_valid():
                    raise FiledockError(ErrorCode.INTERNAL_ERROR, "this server is not in contact with its "
                                                                  "PostgreSQL database; try again")
                try:
                    if byte_range is None:
                        granted, holders = yield self._query(pg_claims.take_claim, hashed, self.server_id, claim_id)
                    else:
                        granted, holders = yield self._query(pg_claims.take_range_claim, hashed, *byte_range,
                                                             self.server_id, claim_id)
                except psycopg.Error as exc:
                    log.warn("upload registry: {error}", error=str(exc))
                    raise FiledockError(ErrorCode.INTERNAL_ERROR, "the upload registry (PostgreSQL) did not "
                                                                  "answer; try again") from None
                if granted:
                    # replacing any older claim (a dead server's too) means its holder may have recorded
                    # more since the caller looked: it asks again
                    took_over = local.took_over or bool(asked) or holders is not None
                    claim = SharedClaim(local, hashed, claim_id, took_over=took_over, byte_range=byte_range)
                    if byte_range is None:
                        self._held[hashed] = claim
                    else:
                        self._held_ranges.setdefault(hashed, []).append(claim)
                    return claim
                if not wait:
                    self._claim_ids.discard(claim_id)
                    return None
                now = time.monotonic()
                which = "" if byte_range is None else f" {byte_range[0]} {byte_range[1]}"
                for holder in holders:
                    if now - asked.get(holder, -1e9) >= self.ASK_AGAIN_SECONDS:
                        asked[holder] = now
                        self.takeovers_asked += 1
                        log.info("upload of {key} held by server {holder}: asking it to let go",
                                 key=short_key(local.file_key), holder=holder)
                        self._tell(holder, f"release {hashed} {self.server_id}{which}")
                yield self._sleep(hashed, self.RETRY_SECONDS)
        except BaseException:
            self._claim_ids.discard(claim_id)
            raise

    @defer.inlineCallbacks
    def try_acquire_many(self, file_keys):
        """``try_acquire`` of a batch's files in one round trip to PostgreSQL (not one per file)."""
        local = yield self._local.try_acquire_many(file_keys)
        mine = {key: claim for key, claim in local.items() if claim is not None}
        got = {key: None for key in file_keys}
        if not mine:
            return got
        ids = {key: pg_claims.new_claim_id() for key in mine}
        self._claim_ids.update(ids.values())  # before the rows can exist: the heartbeat must not drop them
        granted: set[str] = set()
        try:
            if self.lease_valid():
                granted = yield self._query(pg_claims.take_claims,
                                            [(pg_claims.file_hash(key), ids[key]) for key in mine], self.server_id)
        except psycopg.Error as exc:  # "held" is the safe answer: the batch fails those items, nothing is lost
            log.warn("upload registry: {error}", error=str(exc))
        except BaseException:
            self._local.release_many(list(mine.values()))
            self._claim_ids.difference_update(ids.values())
            raise
        for key, claim in mine.items():
            hashed = pg_claims.file_hash(key)
            if hashed in granted:
                got[key] = self._held[hashed] = SharedClaim(claim, hashed, ids[key], took_over=claim.took_over)
            else:
                self._claim_ids.discard(ids[key])
                self._local.release(claim)
        return got

    def release_many(self, claims):
        """``release`` of many claims in one round trip."""
        for claim in claims:
            self._local.release(claim.local)
            if self._held.get(claim.hashed) is claim:
                del self._held[claim.hashed]

        def dropped(_: Any) -> None:
            for claim in claims:
                for asker in claim.wanted_by:
                    self._tell(asker, f"released {claim.hashed}")

        def failed(failure: Any) -> None:  # the next heartbeat deletes the rows (their ids are no longer live)
            log.warn("upload registry: could not drop claims: {error}", error=failure.getErrorMessage())

        d = self._query(pg_claims.drop_claims, [(c.hashed, c.claim_id) for c in claims])
        d.addCallbacks(dropped, failed)
        d.addBoth(lambda _: self._claim_ids.difference_update(c.claim_id for c in claims))

    def release(self, claim):
        self._local.release(claim.local)
        if self._held.get(claim.hashed) is claim:
            del self._held[claim.hashed]
        ranged = self._held_ranges.get(claim.hashed)
        if ranged and claim in ranged:
            ranged.remove(claim)
            if not ranged:
                del self._held_ranges[claim.hashed]

        def dropped(_: Any) -> None:
            if claim.wanted_by and claim.asked_at is not None:
                # how long the holder took to settle (for a takeover: what the asking server waited on)
                log.info("upload of {key} let go for server {askers} {seconds} s after it was asked",
                         key=short_key(claim.file_key), askers=",".join(sorted(claim.wanted_by)),
                         seconds=round(time.monotonic() - claim.asked_at, 3))
            for asker in claim.wanted_by:
                self._tell(asker, f"released {claim.hashed}")

        def failed(failure: Any) -> None:  # the next heartbeat deletes the row (its id is no longer live)
            log.warn("upload registry: could not drop a claim: {error}", error=failure.getErrorMessage())

        if claim.range is None:
            d = self._query(pg_claims.drop_claim, claim.hashed, claim.claim_id)
        else:
            d = self._query(pg_claims.drop_range_claim, claim.hashed, claim.range[0], claim.claim_id)
        d.addCallbacks(dropped, failed)
        d.addBoth(lambda _: self._claim_ids.discard(claim.claim_id))

    def wait_for_slot(self, session_key, file_key, limit):
        return self._local.wait_for_slot(session_key, file_key, limit)

    def pass_slot_on(self, session_key):
        self._local.pass_slot_on(session_key)

    @defer.inlineCallbacks
    def is_held(self, file_key):
        if (yield self._local.is_held(file_key)):
            return True
        held = yield self._query(pg_claims.holder_alive, pg_claims.file_hash(file_key))
        return held

    # -- batches: per process (see the module)

    def join_batch_share(self, session_key, limit):
        return self._local.join_batch_share(session_key, limit)

    def leave_batch_share(self, session_key):
        self._local.leave_batch_share(session_key)

    # -- disk space: this process's promises and the other servers' last published ones

    def promise(self, owner, bytes_to_come):
        self._local.promise(owner, bytes_to_come)

    def withdraw(self, owner):
        self._local.withdraw(owner)

    def bytes_promised(self, exclude=None):
        return defer.succeed(self._local.promised_now(exclude) + self._others_promised)

    def session_slots(self, session_key: str) -> int:
        """Upload slots ``session_key`` holds in this process."""
        return self._local.session_slots(session_key)
