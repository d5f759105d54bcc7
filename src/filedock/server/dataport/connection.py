"""The data port: a thin Twisted adapter around ``filedock.wire.ServerConnection``.

The sans-IO core says what the client asked; this module does the I/O: asks the
session authority, claims the file (taking over an older connection), appends to
the partial, checkpoints it, makes it durable and answers.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer, interfaces, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from filedock import wire
from filedock.config import Limits
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.authority import DownloadSource, IBatchAuthority, ISessionAuthority, UploadTarget
from filedock.store.blobs import BatchWriter, BlobStore, PartialWriter, PrefixLost

log = Logger(namespace="filedock.dataport")


@dataclass
class DataPortStats:
    """Counters for metrics; monotonically increasing except ``active``."""

    bytes_received: int = 0
    bytes_sent: int = 0
    uploads_started: int = 0
    uploads_completed: int = 0
    uploads_failed: Counter = field(default_factory=Counter)
    resumes: int = 0
    takeovers: int = 0
    downloads: int = 0
    active: int = 0
    refused: int = 0  # connections refused (or ended) for the connection limits
    durable_buckets: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
    durable_counts: list[int] = field(default_factory=lambda: [0] * 10)
    durable_sum: float = 0.0
    durable_count: int = 0

    def observe_durable(self, seconds: float) -> None:
        """One upload's time from its last byte to durable, into a cumulative histogram."""
        self.durable_sum += seconds
        self.durable_count += 1
        for i, bound in enumerate(self.durable_buckets):
            if seconds <= bound:
                self.durable_counts[i] += 1


def peer_group(addr: Any) -> str:
    """Who a connection counts against for the per-address share: its IP address (an IPv6
    address by its /64, which one host usually holds whole); one group for non-IP transports."""
    host = getattr(addr, "host", None)
    if not host:
        return "-"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class DataPortFactory(Factory):
    """Builds data-port connections.

    ``authority`` is any ``ISessionAuthority``; ``blobs`` is where bytes go.
    """

    def __init__(self, authority: ISessionAuthority, blobs: BlobStore, limits: Limits = Limits(),
                 reactor: Any = None, run_blocking: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.authority = ISessionAuthority(authority)
        self.blobs = blobs
        self.limits = limits
        self.reactor = reactor
        self.uploads: dict[str, DataPortProtocol] = {}
        self.batches: set[DataPortProtocol] = set()  # connections streaming a BATCH
        self.session_connections: Counter[str] = Counter()  # PUT and ABORT connections per session
        self.session_batches: Counter[str] = Counter()  # BATCH connections per session: a share of their own
        self.slot_waiters: dict[str, deque[defer.Deferred]] = {}  # 2007 uploads waiting for a session slot
        self.authorized: set[DataPortProtocol] = set()  # connections whose session the authority accepted
        # connections that have not sent a whole request line yet, by peer (oldest first)
        self.unauthenticated: dict[str, dict[DataPortProtocol, None]] = {}
        self.unauthenticated_count = 0
        self.stats = DataPortStats()
        self._run_blocking = run_blocking

    def buildProtocol(self, addr: Any) -> "DataPortProtocol":
        proto = DataPortProtocol()
        proto.factory = self
        proto.peer = peer_group(addr)
        return proto

    # -- connections without a request yet: a budget of their own, shared fairly between peers

    def admit(self, proto: "DataPortProtocol") -> str | None:
        """Count a new connection as unauthenticated; or say why it is refused.

        One peer holds at most ``max_unauthenticated_per_address`` such connections. When
        all connections, or all unauthenticated ones, are in use, the newcomer takes the
        slot of the oldest unauthenticated connection of the peer holding the most, if
        that peer holds more than the newcomer's would: a flood from a few addresses
        cannot lock the others out, and uploads under way are never the ones ended.
        """
        limits = self.limits
        mine = self.unauthenticated.get(proto.peer, {})
        if len(mine) >= limits.max_unauthenticated_per_address:
            return "too many connections from your address have not sent a request"
        if self.stats.active > limits.max_connections or self.unauthenticated_count >= limits.max_unauthenticated:
            heaviest = max(self.unauthenticated.values(), key=len, default={})
            if len(heaviest) <= len(mine) + 1:
                return "the server holds too many connections"
            victim = next(iter(heaviest))
            self.stats.refused += 1
            log.info("connection from {peer} ended for a newcomer from {other}: no request yet",
                     peer=victim.peer, other=proto.peer)
            victim.unauthenticated_leaves()
            victim._send_error(ErrorCode.TOO_MANY_CONNECTIONS, "the server holds too many connections; this "
                                                               "one sent no request in time")
        self.unauthenticated.setdefault(proto.peer, {})[proto] = None
        self.unauthenticated_count += 1
        return None

    def authenticated(self, proto: "DataPortProtocol") -> None:
        """``proto`` sent a whole request line (or is gone): it no longer counts as unauthenticated."""
        mine = self.unauthenticated.get(proto.peer)
        if mine is not None and proto in mine:
            del mine[proto]
            self.unauthenticated_count -= 1
            if not mine:
                del self.unauthenticated[proto.peer]

    # -- the API's hooks: a deleted job or a closed session ends its connections now

    def end_job(self, job_id: str) -> int:
        """The job was (or is being) deleted: end its connections with ``gone``; nothing of theirs is kept."""
        ended = [p for p in list(self.authorized) if p.job_id == job_id]
        for proto in ended:
            proto.end_gone()
        if ended:
            log.info("job {job} deleted: ended {n} data-port connections", job=short_key(job_id), n=len(ended))
        return len(ended)

    def end_session(self, session_key: str) -> int:
        """The session was closed: end its connections (``session-closed``; partials are kept)."""
        ended = [p for p in list(self.authorized) if p.session_key == session_key]
        for proto in ended:
            proto.take_over(ErrorCode.SESSION_CLOSED, "the session was closed; the partial is kept")
        return len(ended)

    def bytes_promised(self, exclude: Any = None) -> int:
        """Bytes the uploads in progress still have to write, and batches have queued: space spoken for."""
        uploads = sum(p.target.size - p.writer.offset for p in self.uploads.values()
                      if p is not exclude and p.target is not None and p.writer is not None and not p.writer.closed)
        return uploads + sum(p.batch.pending_bytes for p in self.batches if p.batch is not None)

    def active_uploads(self) -> list[dict[str, Any]]:
        """What is being uploaded now (for status and the dashboard): files, and batches as one entry each."""
        files = [p.describe() for p in self.uploads.values() if p.target is not None]
        return files + [p.describe_batch() for p in self.batches]

    def wake_slot_waiter(self, session_key: str) -> None:
        """A slot of ``session_key`` freed up: the longest-waiting 2007 upload of the session may take it."""
        waiters = self.slot_waiters.get(session_key)
        if waiters:
            waiting = waiters.popleft()
            if not waiters:
                del self.slot_waiters[session_key]
            waiting.callback(None)

    def in_thread(self, fn, *args) -> defer.Deferred:
        """Run blocking disk work off the reactor thread (or as ``run_blocking`` says, in tests)."""
        if self._run_blocking is not None:
            return self._run_blocking(fn, *args)
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)


@implementer(interfaces.IPullProducer)
class _FileProducer:
    """Streams a file from an offset in 1 MiB reads; the transport pulls."""

    CHUNK = 1 << 20

    def __init__(self, proto: "DataPortProtocol", f: Any, remaining: int) -> None:
        self.proto, self.f, self.remaining = proto, f, remaining
        self.done = defer.Deferred()

    def resumeProducing(self) -> None:
        data = self.f.read(min(self.CHUNK, self.remaining)) if self.remaining else b""
        if not data:
            self.stopProducing()
            return
        self.remaining -= len(data)
        self.proto.factory.stats.bytes_sent += len(data)
        self.proto.touch()
        self.proto.transport.write(data)

    def stopProducing(self) -> None:
        if not self.done.called:
            self.f.close()
            self.done.callback(self.remaining)


class DataPortProtocol(Protocol):
    """One data-port connection."""

    factory: DataPortFactory
    READ_SIZE = 1 << 20
    SPACE_CHECK_BYTES = 4 << 20

    def __init__(self) -> None:
        self.conn: wire.ServerConnection | None = None
        self.target: UploadTarget | None = None
        self.writer: PartialWriter | None = None
        self.session_key: str | None = None
        self.job_id: str | None = None  # once the authority accepted the request
        self.peer = "-"
        self.released = defer.Deferred()
        self.started = 0.0
        self.resumed_from = 0
        self._busy = False
        self._lost = False
        self._finishing = False
        self._discard = False
        self._outcome: str | None = None
        self._checkpointing: defer.Deferred | None = None
        self._since_checkpoint = 0
        self._last_checkpoint = 0.0
        self._last_activity = 0.0
        self._timer: Any = None
        self._pauses: set[str] = set()
        self._connected_at = 0.0
        self._since_space_check = 0
        self._cleaned = False
        self._gone = False  # the job was deleted: keep nothing, record nothing
        self._slot: Counter[str] | None = None  # the per-session counter this connection takes a slot in
        self.batch: BatchWriter | None = None
        self._batch_room = 0  # bytes a batch may still take before the disk is asked again
        self._batch_keys: list[str] = []

    # ------------------------------------------------------------ Twisted callbacks

    def connectionMade(self) -> None:
        f = self.factory
        f.stats.active += 1
        self.conn = wire.ServerConnection(max_line=f.limits.max_header)
        refusal = f.admit(self)
        if refusal is not None:
            f.stats.refused += 1
            log.info("connection from {peer} refused: {why}", peer=self.peer, why=refusal)
            self._send_error(ErrorCode.TOO_MANY_CONNECTIONS, refusal)
            return
        if hasattr(self.transport, "bufferSize"):
            # Twisted reads 64 KiB per recv by default; 1 MiB cuts the per-read cost 16-fold
            self.transport.bufferSize = self.READ_SIZE
        self.touch()
        self._connected_at = self._last_activity
        self._timer = f.reactor.callLater(f.limits.header_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        self._last_activity = self.factory.reactor.seconds()
        self.conn.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure = None) -> None:
        self._lost = True
        self.factory.stats.active -= 1
        self.unauthenticated_leaves()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.conn is not None and not self.conn.peer_closed:
            self.conn.receive_data(b"")
            self._pump()
        if not self._busy:  # otherwise the running step cleans up when it ends
            self._cleanup()

    # ------------------------------------------------------------ event loop

    def unauthenticated_leaves(self) -> None:
        """This connection no longer counts against the unauthenticated budget."""
        self.factory.authenticated(self)

    def _authorized(self, job_id: str) -> None:
        """The authority accepted this connection's session for ``job_id``."""
        self.job_id = job_id
        self.factory.authorized.add(self)

    def _stopped(self) -> bool:
        """Ended while a step waited (taken over, the job deleted, the peer gone): the step stops quietly."""
        return self._lost or self._gone or self.conn.state is wire.ServerState.CLOSED

    def touch(self) -> None:
        """Note progress, for the idle timeout."""
        self._last_activity = self.factory.reactor.seconds()

    def _pump(self) -> None:
        while not self._busy and self.conn is not None:
            event = self.conn.next_event()
            if event is wire.NEED_DATA or event is wire.PAUSED:
                return
            if self.conn.state is not wire.ServerState.REQUEST:
                self.unauthenticated_leaves()  # a whole request line is here; the authority decides at once
            if isinstance(event, wire.Data):
                if self.batch is not None:
                    self._on_batch_data(event.data)
                else:
                    self._on_data(event.data)
            elif isinstance(event, wire.UploadRequest):
                self._run(self._on_upload(event))
            elif isinstance(event, wire.DownloadRequest):
                self._run(self._on_download(event))
            elif isinstance(event, wire.AbortRequest):
                self._run(self._on_abort(event))
            elif isinstance(event, wire.BatchRequest):
                self._run(self._on_batch(event))
            elif isinstance(event, wire.BatchItem):
                self._on_batch_item(event)
            elif isinstance(event, wire.Done):
                after = self.conn.next_event()  # bytes already buffered after DONE break the protocol
                if isinstance(after, wire.ProtocolError):
                    self._discard = True
                    self._send_error(after.code, after.message)
                    return
                self._run(self._finish_batch() if self.batch is not None else self._finish(event.digest))
            elif isinstance(event, wire.BodyComplete):
                continue
            elif isinstance(event, wire.EndOfStream):
                self._on_eof()
                return
            elif isinstance(event, wire.ProtocolError):
                if event.code is ErrorCode.EXCESS_DATA:
                    self._discard = True
                self._send_error(event.code, event.message)
                return

    def _run(self, d: defer.Deferred) -> None:
        """Pause reading while an asynchronous step runs; errors become one error line."""
        if d.called and not isinstance(d.result, Failure):
            return
        self._busy = True
        self._pause("step")

        def done(_: Any) -> None:
            self._busy = False
            if not self._lost and self.conn.state is not wire.ServerState.CLOSED:
                self._resume("step")
                self._pump()

        def failed(failure: Failure) -> None:
            self._busy = False
            if failure.check(FiledockError):
                err = failure.value
                self._send_error(err.code, err.message)
            elif self._gone:  # the job's directory went while we used it: expected, not a bug
                self._send_error(ErrorCode.GONE, "the job was deleted; nothing of this upload is kept")
            else:
                log.failure("data port step failed", failure)
                self._send_error(ErrorCode.INTERNAL_ERROR, "internal error; the partial is kept")

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._cleanup() if self._lost else None)

    def _pause(self, reason: str) -> None:
        """Stop reading for ``reason`` (a step running, or the hasher behind)."""
        if not self._pauses and self.transport is not None and not self._lost:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        """Read again once no reason to pause is left."""
        self._pauses.discard(reason)
        if not self._pauses and self.transport is not None and not self._lost:
            self.transport.resumeProducing()

    def _hash_drained(self) -> None:
        """Called in the reactor thread when the writer's hasher caught up."""
        if "hashing" in self._pauses:
            self._resume("hashing")
            self._pump()

    # ------------------------------------------------------------ uploads

    @defer.inlineCallbacks
    def _on_upload(self, req: wire.UploadRequest):
        f = self.factory
        target: UploadTarget = yield f.authority.authorize_upload(req.session_key, req.file_key, req.size)
        self._authorized(target.job_id)
        if req.legacy:
            yield self._session_slot(req.session_key, req.file_key)
            if self._stopped():
                return
        took_over = yield self._claim(req.session_key, req.file_key)
        if self._stopped():
            return  # taken over (or the job deleted) while we waited for the older connection
        if took_over:  # the older connection recorded more: ask again
            target = yield f.authority.authorize_upload(req.session_key, req.file_key, req.size)
        if req.legacy and target.received:
            # a 2007 client always starts at byte 0: whatever partial we held is replaced, and the record
            # goes back to 0 (durably) before a byte of it is overwritten
            yield f.authority.record_discard(target)
            target = replace(target, received=0, crc32=0, stamp=None)
        held = 0 if req.legacy else f.blobs.unrecorded_size(target.job_id, target.blob_name)
        need = target.size - max(target.received, held)
        promised = f.bytes_promised(exclude=self)
        if need > f.blobs.free_bytes() - f.limits.disk_reserve - promised:
            raise FiledockError(ErrorCode.NO_SPACE, f"the server cannot hold {need} more bytes"
                                + (f" ({promised} are promised to uploads in progress)" if promised else ""))
        target = yield self._open_writer(target, recover=not req.legacy, inline=not (target.received or held))
        if self._stopped():
            return
        self.resumed_from = self.writer.offset
        self.started = time.monotonic()
        self._last_checkpoint = self.started
        f.stats.uploads_started += 1
        if self.resumed_from:
            f.stats.resumes += 1
        self.transport.write(self.conn.accept_upload(self.writer.offset))
        self._schedule_idle(f.limits.idle_timeout)

    @defer.inlineCallbacks
    def _open_writer(self, target: UploadTarget, recover: bool, inline: bool):
        """Open the partial as the record says; returns the target as recorded now.

        At every instant the record claims no byte the disk does not hold: a partial
        shorter than its record is recorded back at 0 before it is rewritten, and a
        partial whose state differs from the record (a complete file never recorded, a
        prefix hashed again) is checkpointed and recorded before a byte is accepted.
        """
        f = self.factory
        args = (target.job_id, target.blob_name, target.received, target.crc32, target.stamp, recover)
        try:
            if inline:  # a new partial is a create and an fstat: not worth a thread hop
                self.writer = f.blobs.open_partial(*args)
            else:  # a resume may read the partial back: off the reactor
                self.writer = yield f.in_thread(f.blobs.open_partial, *args)
        except PrefixLost as exc:
            log.warn("partial of {key} is shorter than its record ({why}): starting again from 0",
                     key=short_key(target.file_key), why=str(exc))
            yield f.authority.record_discard(target)
            target = replace(target, received=0, crc32=0, stamp=None)
            self.writer = yield f.in_thread(f.blobs.open_partial, *args[:2], 0, 0, None, False)
        self.writer.on_drain = lambda: f.reactor.callFromThread(self._hash_drained)
        self.target = target  # from here on, the clean-up closes the writer and records what it holds
        if self.writer.needs_record:
            cp = yield f.in_thread(self.writer.checkpoint)
            yield f.authority.record_progress(target, cp.offset, cp.crc32, cp.stamp)
            if cp.offset >= target.size:
                log.info("file {key} was complete on disk but not recorded: resuming at its end",
                         key=short_key(target.file_key))
            target = replace(target, received=cp.offset, crc32=cp.crc32, stamp=cp.stamp)
            self.target = target
        return target

    @defer.inlineCallbacks
    def _session_slot(self, session_key: str, file_key: str):
        """A 2007 upload waits for one of its session's slots instead of being refused: its client
        never reads a reply, so a refusal would lose the upload silently (a burst of 500 lost 462)."""
        f = self.factory
        while True:
            old = f.uploads.get(file_key)
            replacing = old is not None and old.session_key == session_key and old._slot is f.session_connections
            if f.session_connections[session_key] - replacing < f.limits.max_connections_per_session:
                return
            waiting = defer.Deferred()
            f.slot_waiters.setdefault(session_key, deque()).append(waiting)
            yield waiting
            if self._stopped():
                f.wake_slot_waiter(session_key)  # pass the free slot on
                return

    def _claim(self, session_key: str, file_key: str) -> defer.Deferred:
        """Become the one connection writing ``file_key``; an older one is taken over.

        Fires with True once an older connection let go, False if there was none.
        """
        f = self.factory
        old = f.uploads.get(file_key)
        # its slot is about to free up (a batch publishing the file holds a batch slot, not this kind)
        replacing = old is not None and old.session_key == session_key and old._slot is f.session_connections
        if f.session_connections[session_key] - replacing >= f.limits.max_connections_per_session:
            raise FiledockError(ErrorCode.TOO_MANY_CONNECTIONS, "too many connections for this session")
        self.session_key = session_key
        self._slot = f.session_connections
        f.session_connections[session_key] += 1
        f.uploads[file_key] = self
        if old is None:
            return defer.succeed(False)
        f.stats.takeovers += 1
        log.info("upload of {key} taken over by a new connection", key=short_key(file_key))
        old.take_over()
        let_go = defer.Deferred()
        old.released.addBoth(lambda result: (let_go.callback(True), result)[1])
        return let_go

    def take_over(self, code: ErrorCode = ErrorCode.TAKEN_OVER,
                  message: str = "a newer connection took over this upload") -> None:
        """A newer connection wants this file (or the session was closed): stop, keep what is durable, let go."""
        if self._finishing or self._lost:
            return  # it ends by itself; the newer connection waits for ``released``
        self._end(code, message)

    def end_gone(self) -> None:
        """The job was deleted: end now with ``gone``; the clean-up keeps and records nothing.

        An upload already finishing is left to finish: it ends in ``STORED`` (and the
        job's deletion removes the file) or, if the deletion came first, in ``gone``.
        """
        self._gone = True
        self._discard = True
        if self._finishing or self._lost:
            return
        self._end(ErrorCode.GONE, "the job was deleted; nothing of this upload is kept")

    def _end(self, code: ErrorCode, message: str) -> None:
        if self.conn.state is wire.ServerState.SENDING:  # mid-download an error line would read as file bytes
            self._outcome = code.value
            self.transport.abortConnection()
            return
        self._send_error(code, message)

    def _on_data(self, data: bytes | memoryview) -> None:
        try:
            behind = self.writer.write(data)
        except FiledockError as exc:
            self._send_error(exc.code, exc.message)
            return
        if behind:
            self._pause("hashing")
        n = len(data)
        self.factory.stats.bytes_received += n
        self._since_checkpoint += n
        self._since_space_check += n
        if self._since_space_check >= self.SPACE_CHECK_BYTES:
            self._since_space_check = 0
            if self.factory.blobs.free_bytes() < self.factory.limits.disk_reserve // 2:
                # something else ate the space: stop before the store has none left to record in
                self._send_error(ErrorCode.NO_SPACE, "the server's disk is nearly full; the partial is kept")
                return
        if self._since_checkpoint >= self.factory.limits.checkpoint_bytes and self._checkpointing is None:
            self._checkpoint()

    def _checkpoint(self) -> defer.Deferred:
        """Make the bytes written so far durable and record the offset."""
        f, writer, target = self.factory, self.writer, self.target
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

        def record(cp):
            return f.authority.record_progress(target, cp.offset, cp.crc32, cp.stamp)

        def clear(result):
            self._checkpointing = None
            if self._since_checkpoint >= f.limits.checkpoint_bytes and not self._lost and not writer.closed \
                    and not self._finishing:
                self._checkpoint()  # more arrived meanwhile than one checkpoint's worth
            return result

        d = f.in_thread(writer.checkpoint).addCallback(record).addBoth(clear)
        self._checkpointing = d
        d.addErrback(self._checkpoint_failed)
        return d

    def _checkpoint_failed(self, failure: Failure) -> None:
        if self._gone or failure.check(FiledockError):  # a full disk or a deleted job: one line, no traceback
            log.warn("checkpoint of {key} failed: {error}", key=short_key(self.target.file_key),
                     error=getattr(failure.value, "message", None) or type(failure.value).__name__)
        else:
            log.failure("checkpoint failed", failure)

    @defer.inlineCallbacks
    def _finish(self, client_digest: str | None):
        """The whole body is here: seal, verify, publish, record; then answer."""
        f, writer, target = self.factory, self.writer, self.target
        self._finishing = True
        try:
            if self._checkpointing is not None:
                yield self._checkpointing
            sealed_at = time.monotonic()
            try:
                crc, digest = yield f.in_thread(writer.finish, client_digest)
            except FiledockError as exc:
                if exc.code is ErrorCode.DIGEST_MISMATCH:
                    self._discard = True
                    self._outcome = exc.code.value
                raise
            except FileNotFoundError:  # the partial (or the job's directory) was deleted under us
                self._gone = self._discard = True
                raise FiledockError(ErrorCode.GONE, "the file was deleted during the upload; nothing is kept") \
                    from None
            try:
                yield f.authority.record_complete(target, crc, digest)
            except FiledockError as exc:
                if exc.code is ErrorCode.NO_SPACE:
                    # the file is durable and in place; a retry finds it there and resumes at its end
                    log.warn("upload of {key}: the disk is full, its completion could not be recorded; "
                             "the bytes are kept", key=short_key(target.file_key))
                    raise FiledockError(ErrorCode.NO_SPACE, "the server's disk is full: the file's bytes are "
                                                            "kept, and a retry resumes at its end") from None
                if exc.code is ErrorCode.GONE:
                    self._gone = self._discard = True
                raise
            f.stats.observe_durable(time.monotonic() - sealed_at)
            f.stats.uploads_completed += 1
            self._outcome = "complete"
            self._log_outcome(crc, digest)
            if not self._lost:
                self.transport.write(self.conn.stored(target.size, crc, digest))
                self.transport.loseConnection()
        finally:
            self._finishing = False

    def _on_eof(self) -> None:
        state = self.conn.state
        if state is wire.ServerState.LEGACY_END:
            self._run(self._finish(None))
        elif state is wire.ServerState.BODY and isinstance(self.conn.request, wire.UploadRequest):
            self._outcome = ErrorCode.SHORT_UPLOAD.value
            self.transport.loseConnection()
        else:
            self.transport.loseConnection()

    # ------------------------------------------------------------ batches of small files

    @defer.inlineCallbacks
    def _on_batch(self, req: wire.BatchRequest):
        f = self.factory
        authority = IBatchAuthority(f.authority, None)
        if authority is None:
            raise FiledockError(ErrorCode.MALFORMED_HEADER, "this data port does not take batches")
        if req.count > f.limits.batch_max_files:
            raise FiledockError(ErrorCode.TOO_LARGE, f"a batch holds at most {f.limits.batch_max_files} files")
        job_id = yield authority.authorize_session(req.session_key)
        self._authorized(job_id)
        # batches have a share of their own: stalled ones (a session key is all they need) never take
        # the slots of the session's uploads
        if f.session_batches[req.session_key] >= f.limits.max_batches_per_session:
            raise FiledockError(ErrorCode.TOO_MANY_CONNECTIONS, "too many batches for this session")
        self.session_key = req.session_key
        self._slot = f.session_batches
        f.session_batches[req.session_key] += 1
        self.batch = f.blobs.open_batch(job_id)
        self.batch.on_drain = lambda: f.reactor.callFromThread(self._hash_drained)
        self._batch_room = self._room()
        self.batch_job, self.batch_count = job_id, req.count
        f.batches.add(self)
        self.started = time.monotonic()
        self.transport.write(self.conn.accept_batch())
        self._schedule_idle(f.limits.header_timeout)  # its first item line is due like a request line

    def _on_batch_item(self, item: wire.BatchItem) -> None:
        limits = self.factory.limits
        if item.size > limits.batch_item_max:
            self._send_error(ErrorCode.TOO_LARGE, f"batch items are at most {limits.batch_item_max} bytes; "
                                                  "send larger files with PUT")
        elif self.batch.bytes + item.size > limits.batch_max_bytes:
            self._send_error(ErrorCode.TOO_LARGE, f"a batch holds at most {limits.batch_max_bytes} bytes")
        else:
            self._since_space_check += item.size
            if item.size > self._batch_room or self._since_space_check >= self.SPACE_CHECK_BYTES:
                self._batch_room, self._since_space_check = self._room(), 0
                if item.size > self._batch_room:
                    self._send_error(ErrorCode.NO_SPACE, f"the server cannot hold {item.size} more bytes")
                    return
            self._batch_room -= item.size
            try:
                self.batch.begin(item.file_key, item.size, item.digest)
            except FiledockError as exc:
                self._send_error(exc.code, exc.message)
            except OSError as exc:
                self._write_failed(exc)

    def _room(self) -> int:
        """Bytes a batch may still take: free space less the reserve and what uploads (and batches,
        this one included) have still to write."""
        f = self.factory
        return f.blobs.free_bytes() - f.limits.disk_reserve - f.bytes_promised()

    def _write_failed(self, exc: OSError) -> None:
        """A disk error other than a full disk: one error line, no traceback, nothing stored."""
        log.error("batch write failed: {error}", error=exc.strerror or repr(exc))
        self._send_error(ErrorCode.INTERNAL_ERROR, f"the server could not write the batch "
                                                   f"({exc.strerror or type(exc).__name__}); nothing was stored")

    def _on_batch_data(self, data: bytes | memoryview) -> None:
        try:
            behind = self.batch.write(data)
        except FiledockError as exc:
            self._send_error(exc.code, exc.message)
            return
        except OSError as exc:
            self._write_failed(exc)
            return
        if behind:
            self._pause("hashing")
        self.factory.stats.bytes_received += len(data)

    @defer.inlineCallbacks
    def _finish_batch(self):
        """All items are here: fsync them, check each, publish the good ones, record them at once."""
        f, batch = self.factory, self.batch
        authority = IBatchAuthority(f.authority)
        self._finishing = True
        try:
            marks = [time.monotonic()]
            entries = yield f.in_thread(batch.seal)
            marks.append(time.monotonic())
            verdicts = yield authority.authorize_batch(self.session_key, [(e.key, e.size) for e in entries])
            lines, accepted = self._judge_batch(entries, verdicts)
            for entry, target in accepted:
                if target.received:  # its partial goes when the batch publishes: the record goes to 0 first
                    yield f.authority.record_discard(target)
            marks.append(time.monotonic())
            yield f.in_thread(batch.publish, [entry for entry, _ in accepted])
            marks.append(time.monotonic())
            if accepted:
                yield authority.record_batch([(target, e.crc32, e.digest) for e, target in accepted])
            marks.append(time.monotonic())
            f.stats.uploads_completed += len(accepted)
            self._outcome = "complete"
            log.info("batch complete: {stored} of {count} files stored, {bytes} bytes, {secs:.3f}s "
                     "(receive {receive:.3f}, fsync {fsync:.3f}, check {check:.3f}, rename {rename:.3f}, "
                     "record {record:.3f})",
                     stored=len(accepted), count=len(entries), bytes=batch.bytes,
                     secs=marks[-1] - self.started, receive=marks[0] - self.started,
                     fsync=marks[1] - marks[0], check=marks[2] - marks[1], rename=marks[3] - marks[2],
                     record=marks[4] - marks[3], event="batch-outcome")
            if not self._lost:
                self.transport.write(self.conn.batch_results(lines))
                self.transport.loseConnection()
        finally:
            self._finishing = False
            self._release_batch_keys()

    def _judge_batch(self, entries, verdicts):
        """Per item: the reply line; and (entry, target) for each one to publish and record."""
        f = self.factory
        lines: list[wire.ItemStored | wire.ItemFailed] = []
        accepted = []
        seen: set[str] = set()
        for e in entries:
            verdict = verdicts.get(e.key)
            if e.key in seen:
                lines.append(wire.ItemFailed(e.key, ErrorCode.CONFLICT.value, "the file is twice in the batch"))
            elif isinstance(verdict, FiledockError):
                lines.append(wire.ItemFailed(e.key, verdict.code_str, verdict.message))
            elif e.client_digest != e.digest:
                lines.append(wire.ItemFailed(e.key, ErrorCode.DIGEST_MISMATCH.value,
                                             f"the server computed {e.digest}"))
            elif isinstance(verdict, DownloadSource):  # complete already: same bytes are fine
                if verdict.digest == e.digest:
                    lines.append(wire.ItemStored(e.key, verdict.size, verdict.crc32, verdict.digest))
                else:
                    lines.append(wire.ItemFailed(e.key, ErrorCode.ALREADY_COMPLETE.value,
                                                 "the file is complete already, with other bytes"))
            elif e.key in f.uploads:
                lines.append(wire.ItemFailed(e.key, ErrorCode.CONFLICT.value,
                                             "an upload of this file is in progress"))
            else:
                f.uploads[e.key] = self  # a PUT arriving now waits for this batch to let go
                self._batch_keys.append(e.key)
                e.blob = verdict.blob_name
                accepted.append((e, verdict))
                lines.append(wire.ItemStored(e.key, e.size, e.crc32, e.digest))
            seen.add(e.key)
        return lines, accepted

    def _release_batch_keys(self) -> None:
        for key in self._batch_keys:
            if self.factory.uploads.get(key) is self:
                del self.factory.uploads[key]
        self._batch_keys = []

    # ------------------------------------------------------------ downloads and aborts

    @defer.inlineCallbacks
    def _on_download(self, req: wire.DownloadRequest):
        f = self.factory
        source: DownloadSource = yield f.authority.authorize_download(req.session_key, req.file_key)
        self._authorized(source.job_id)
        if req.offset > source.size:
            raise FiledockError(ErrorCode.BAD_OFFSET, f"offset is past the end ({source.size} bytes)")
        fh = yield f.in_thread(f.blobs.open_complete, source.job_id, source.blob_name)
        fh.seek(req.offset)
        f.stats.downloads += 1
        self.transport.write(self.conn.accept_download(source.size, source.crc32, source.digest))
        producer = _FileProducer(self, fh, source.size - req.offset)
        self.transport.registerProducer(producer, False)
        self._schedule_idle(f.limits.idle_timeout)
        remaining = yield producer.done
        if not self._lost:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
        log.info("download of {key}: {result}", key=short_key(req.file_key),
                 result="complete" if remaining == 0 else f"stopped with {remaining} bytes left")

    @defer.inlineCallbacks
    def _on_abort(self, req: wire.AbortRequest):
        f = self.factory
        target = yield f.authority.authorize_upload(req.session_key, req.file_key, None)
        self._authorized(target.job_id)
        took_over = yield self._claim(req.session_key, req.file_key)
        if self._stopped():
            return
        if took_over:
            target = yield f.authority.authorize_upload(req.session_key, req.file_key, None)
        yield f.authority.record_discard(target)  # the record first: it never claims bytes that are gone
        yield f.in_thread(f.blobs.discard, target.job_id, target.blob_name)
        self.transport.write(self.conn.accept_abort())
        self.transport.loseConnection()

    # ------------------------------------------------------------ ending

    def _send_error(self, code: ErrorCode, message: str) -> None:
        if self._outcome is None:
            self._outcome = code.value if isinstance(code, ErrorCode) else str(code)
        if self._lost:
            return
        line = self.conn.refuse(code, message) if self.conn else wire.format_error(code, message)
        if line:
            self.transport.write(line)
        self.transport.loseConnection()
        # a stalled peer may never read the error line: do not wait on it for long
        self.factory.reactor.callLater(self.ABORT_GRACE, self._abort_if_open)

    ABORT_GRACE = 2.0

    def _abort_if_open(self) -> None:
        if not self._lost:
            self.transport.abortConnection()

    def _cleanup(self) -> None:
        """Once per connection: keep or discard the partial, record it, let go of the file."""
        if self._cleaned:
            return
        self._cleaned = True
        d = self._settle_partial()
        d.addErrback(self._settle_failed)
        d.addBoth(lambda _: self._release())

    def _settle_failed(self, failure: Failure) -> None:
        if failure.check(FiledockError):  # a full disk, a deleted file: expected, one line
            log.warn("could not record the partial of {key}: {error}", error=failure.value.message,
                     key=short_key(self.target.file_key) if self.target else "-")
        else:
            log.failure("could not record the partial", failure)

    @defer.inlineCallbacks
    def _settle_partial(self):
        f, writer, target = self.factory, self.writer, self.target
        if self.batch is not None and self._outcome != "complete":
            yield f.in_thread(self.batch.discard)  # a batch is all or nothing per connection
            f.stats.uploads_failed[self._outcome or "disconnected"] += 1
        if writer is None or target is None:
            return
        if self._checkpointing is not None:
            yield self._checkpointing
        if self._gone:  # the job was deleted: nothing to keep and no record to update
            writer.close()
            yield f.in_thread(f.blobs.forget, target.job_id, target.blob_name)
        elif self._discard:
            writer.close()
            yield f.authority.record_discard(target)  # the record first: it never claims bytes that are gone
            yield f.in_thread(f.blobs.discard, target.job_id, target.blob_name)
        elif not writer.closed:
            cp = yield f.in_thread(writer.checkpoint)
            writer.close()
            yield f.authority.record_progress(target, cp.offset, cp.crc32, cp.stamp)
        if self._outcome != "complete":
            f.stats.uploads_failed[self._outcome or "disconnected"] += 1
            self._log_outcome(None, None)

    def _release(self) -> None:
        f = self.factory
        f.batches.discard(self)
        f.authorized.discard(self)
        if self.target is not None and f.uploads.get(self.target.file_key) is self:
            del f.uploads[self.target.file_key]
        elif self.conn is not None and isinstance(self.conn.request, (wire.UploadRequest, wire.AbortRequest)):
            key = self.conn.request.file_key
            if f.uploads.get(key) is self:
                del f.uploads[key]
        if self.session_key is not None and self._slot is not None:
            self._slot[self.session_key] -= 1
            if self._slot[self.session_key] <= 0:
                del self._slot[self.session_key]
        self.released.callback(None)
        if self.session_key is not None and self._slot is f.session_connections:
            f.wake_slot_waiter(self.session_key)

    def _log_outcome(self, crc: int | None, digest: str | None) -> None:
        target = self.target
        elapsed = max(time.monotonic() - self.started, 1e-9)
        sent = (self.writer.offset if self.writer else 0) - self.resumed_from
        log.info("upload {result}: job={job} file={name!r} key={key} size={size} from={start} "
                 "bytes={sent} seconds={secs:.3f} rate={rate:.1f}MB/s",
                 result=self._outcome or "disconnected", job=short_key(target.job_id), name=target.name,
                 key=short_key(target.file_key), size=target.size, start=self.resumed_from, sent=sent,
                 secs=elapsed, rate=sent / elapsed / 1e6, crc32=crc, digest=digest,
                 event="upload-outcome")

    # ------------------------------------------------------------ timeouts

    def _schedule_idle(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.factory.reactor.callLater(seconds, self._check_idle)

    def _check_idle(self) -> None:
        limits = self.factory.limits
        waiting_header = self.conn.state is wire.ServerState.REQUEST or (
            self.batch is not None and not self.batch.entries and self.conn.state is wire.ServerState.BATCH_ITEM)
        limit = limits.header_timeout if waiting_header else limits.idle_timeout
        since = self._connected_at if waiting_header else self._last_activity
        idle = self.factory.reactor.seconds() - since  # a header must be complete in time, not just trickle
        if self._busy or self._finishing or "hashing" in self._pauses:
            idle = 0.0  # we are the slow one (a step, or our disk behind): the client is waiting for us
            self.touch()
        if idle >= limit:
            self._send_error(ErrorCode.IDLE_TIMEOUT, f"nothing received for {limit:g} seconds")
            return
        if self.target is not None and time.monotonic() - self._last_checkpoint > limits.checkpoint_seconds \
                and self._checkpointing is None and self.writer and not self.writer.closed \
                and self.conn.state is wire.ServerState.BODY:
            self._checkpoint()
        self._timer = self.factory.reactor.callLater(min(limit - idle, limits.checkpoint_seconds) or limit,
                                                     self._check_idle)

    def describe_batch(self) -> dict[str, Any]:
        """A batch in flight, for status: how many of its files and bytes have arrived."""
        b = self.batch
        return {"job": self.batch_job, "name": f"batch of {self.batch_count} files ({len(b.entries)} arrived)",
                "key": None, "size": sum(e.size for e in b.entries),  # what the items announced so far
                "received": b.bytes, "resumed_from": 0, "seconds": round(time.monotonic() - self.started, 3),
                "files": self.batch_count, "files_arrived": len(b.entries)}

    def describe(self) -> dict[str, Any]:
        """This upload, for status: no keys in full."""
        t = self.target
        return {"job": t.job_id, "name": t.name, "key": short_key(t.file_key), "size": t.size,
                "received": self.writer.offset if self.writer else t.received,
                "resumed_from": self.resumed_from,
                "seconds": round(time.monotonic() - self.started, 3)}
