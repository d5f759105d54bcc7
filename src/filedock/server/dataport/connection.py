"""The data port's connection: the event pump between ``filedock.wire`` and a request object.

The sans-IO core says what the client asked; the connection makes the request
object for it (``upload.py``, ``download.py``, ``abort.py``, ``batch.py``), hands it
the body, runs its asynchronous steps with reading paused, owns the timeouts and
says in wire bytes what the request tells it (it is the request's
``IRequestChannel``). Its lifecycle is one ``Lifecycle`` with the transitions below.
"""

from __future__ import annotations

import enum
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from filedock import wire
from filedock.config import Limits
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.authority import ISessionAuthority
from filedock.server.dataport.abort import Abort
from filedock.server.dataport.batch import BatchUpload
from filedock.server.dataport.budget import UnauthenticatedBudget, peer_group
from filedock.server.dataport.channel import IRequestChannel, Request, RequestServices
from filedock.server.dataport.download import Download
from filedock.server.dataport.ranged import RangedUpload
from filedock.server.dataport.stats import DataPortStats
from filedock.server.dataport.upload import Upload
from filedock.server.registry import InProcessUploadRegistry, IUploadRegistry
from filedock.store.blobstore import BlobStorage

log = Logger(namespace="filedock.dataport")

REQUEST_KINDS: dict[type, type[Request]] = {
    wire.UploadRequest: Upload,
    wire.RangedUploadRequest: RangedUpload,
    wire.DownloadRequest: Download,
    wire.AbortRequest: Abort,
    wire.BatchRequest: BatchUpload,
}
"""Which request object serves each request the wire parses: a new kind is one module and one line."""


class Lifecycle(enum.Enum):
    """Where a data-port connection stands. Every transition is in ``_NEXT``."""

    AWAITING_REQUEST = "awaiting-request"  # no whole request line yet: counts against the unauthenticated budget
    STARTING = "starting"  # the request decides (authority, registry, disk); reading is paused
    TRANSFERRING = "transferring"  # an upload's body or a batch's items come in, or a download goes out
    FINISHING = "finishing"  # the request seals, verifies and records: it is never interrupted
    ENDING = "ending"  # the final reply or an error line is out; the transport closes
    LOST = "lost"  # the transport is gone; a step still running ends before the clean-up
    CLOSED = "closed"  # the request settled its partial and let go of its file: nothing more


_NEXT: dict[Lifecycle, frozenset[Lifecycle]] = {
    Lifecycle.AWAITING_REQUEST: frozenset({Lifecycle.STARTING, Lifecycle.ENDING, Lifecycle.LOST}),
    Lifecycle.STARTING: frozenset({Lifecycle.TRANSFERRING, Lifecycle.ENDING, Lifecycle.LOST}),
    Lifecycle.TRANSFERRING: frozenset({Lifecycle.FINISHING, Lifecycle.ENDING, Lifecycle.LOST}),
    Lifecycle.FINISHING: frozenset({Lifecycle.ENDING, Lifecycle.LOST, Lifecycle.AWAITING_REQUEST}),
    Lifecycle.ENDING: frozenset({Lifecycle.LOST}),
    Lifecycle.LOST: frozenset({Lifecycle.CLOSED}),
    Lifecycle.CLOSED: frozenset(),
}

_ENDED = frozenset({Lifecycle.ENDING, Lifecycle.LOST, Lifecycle.CLOSED})
_GONE = frozenset({Lifecycle.LOST, Lifecycle.CLOSED})


class DataPortFactory(Factory):
    """Builds data-port connections.

    ``authority`` is any ``ISessionAuthority``; ``blobs`` is where bytes go;
    ``registry`` says who holds which file (default: this process's own).
    """

    def __init__(self, authority: ISessionAuthority, blobs: BlobStorage, limits: Limits = Limits(),
                 reactor: Any = None, run_blocking: Any = None, registry: IUploadRegistry | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.authority = ISessionAuthority(authority)
        self.blobs = blobs
        self.limits = limits
        self.reactor = reactor
        self.registry = IUploadRegistry(registry if registry is not None else InProcessUploadRegistry())
        self.stats = DataPortStats()
        self.budget = UnauthenticatedBudget(limits, self.stats)
        self.authorized: set[DataPortProtocol] = set()  # connections whose request the authority accepted
        self.batch_tags: set[str] = set()
        self._run_blocking = run_blocking
        self.services = RequestServices(self.authority, blobs, limits, self.registry, self.stats, reactor,
                                        self.in_thread, self.batch_tags)

    def buildProtocol(self, addr: Any) -> "DataPortProtocol":
        proto = DataPortProtocol()
        proto.factory = self
        proto.peer = peer_group(addr)
        return proto

    @property
    def unauthenticated_count(self) -> int:
        """Connections that have not sent a whole request line yet."""
        return self.budget.count

    # -- the API's hooks: a deleted job or a closed session ends its connections now

    def end_job(self, job_id: str) -> int:
        """The job's delete committed: end its connections with ``gone``; nothing of theirs is kept."""
        ended = [p for p in list(self.authorized) if p.job_id == job_id]
        for proto in ended:
            proto.end_job()
        if ended:
            log.info("job {job} deleted: ended {n} data-port connections", job=short_key(job_id), n=len(ended))
        return len(ended)

    def interrupt_job(self, job_id: str) -> int:
        """The job is about to be deleted: end its connections with ``gone`` but keep and record
        their partials as usual, since the delete may still fail; ``end_job`` forgets them once it
        committed."""
        ended = [p for p in list(self.authorized) if p.job_id == job_id]
        for proto in ended:
            proto.interrupt(ErrorCode.GONE, "the job is being deleted")
        return len(ended)

    def end_session(self, session_key: str) -> int:
        """The session was closed: end its connections (``session-closed``; partials are kept)."""
        ended = [p for p in list(self.authorized) if p.session_key == session_key]
        for proto in ended:
            proto.interrupt(ErrorCode.SESSION_CLOSED, "the session was closed; the partial is kept")
        return len(ended)

    def end_uploads(self) -> list[defer.Deferred]:
        """On shutdown: cut every connection that writes files; each fires its Deferred once its
        partial is checkpointed and recorded."""
        writing = [p for p in list(self.authorized) if p.request is not None and p.request.takes_bytes
                   or isinstance(p.request, Abort)]
        for proto in writing:
            if proto.transport is not None:
                proto.transport.abortConnection()
        return [p.released for p in writing]

    def active_uploads(self) -> list[dict[str, Any]]:
        """What is being uploaded now (for status and the dashboard): files, and batches as one entry each."""
        return self.stats.status()

    def in_thread(self, fn, *args) -> defer.Deferred:
        """Run blocking disk work off the reactor thread (or as ``run_blocking`` says, in tests)."""
        if self._run_blocking is not None:
            return self._run_blocking(fn, *args)
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)


@implementer(IRequestChannel)
class DataPortProtocol(Protocol):
    """One data-port connection: the channel of the request it carries (of one after another, where
    a request ends with the connection kept: a ranged upload's ``DURABLE``)."""

    factory: DataPortFactory
    READ_SIZE = 1 << 20
    ABORT_GRACE = 2.0

    def __init__(self) -> None:
        self.phase = Lifecycle.AWAITING_REQUEST
        self.conn: wire.ServerConnection | None = None
        self.request: Request | None = None
        self.session_key: str | None = None
        self.job_id: str | None = None  # once the authority accepted the request
        self.peer = "-"
        self.released = defer.Deferred()
        self._receive: Any = None  # the request's ``receive``, bound once: the per-chunk path
        self._step: defer.Deferred | None = None  # the request's asynchronous step running now
        self._pauses: set[str] = set()
        self._last_activity = 0.0
        self._connected_at = 0.0
        self._timer: Any = None
        self._streaming = False  # a download's stream is one long step whose producer touches on progress

    def _enter(self, phase: Lifecycle) -> None:
        if phase is self.phase:
            return
        if phase not in _NEXT[self.phase]:
            if self.phase in _GONE:
                return  # the peer is gone: a step that still runs changes nothing; the clean-up follows
            raise RuntimeError(f"data port: {self.phase.value} -> {phase.value}")
        if self.phase is Lifecycle.AWAITING_REQUEST:
            self.factory.budget.leave(self)
        self.phase = phase

    # ------------------------------------------------------------ Twisted callbacks

    def connectionMade(self) -> None:
        f = self.factory
        f.stats.active += 1
        self.conn = wire.ServerConnection(max_line=f.limits.max_header)
        refusal = f.budget.admit(self)
        if refusal is not None:
            f.stats.refused += 1
            log.info("connection from {peer} refused: {why}", peer=self.peer, why=refusal)
            self.refused(ErrorCode.TOO_MANY_CONNECTIONS, refusal)
            return
        if hasattr(self.transport, "bufferSize"):
            # Twisted reads 64 KiB per recv by default; 1 MiB cuts the per-read cost 16-fold
            self.transport.bufferSize = self.READ_SIZE
        no_delay = getattr(self.transport, "setTcpNoDelay", None)  # TCP, through TLS and PROXY wrappers
        if no_delay is not None:
            # every reply is one line written at once; with Nagle's algorithm a reply waited for the
            # client's ACK of the one before (``DURABLE``, then the pipelined ``PUTR``'s ``RANGES``):
            # a delayed ACK (40 ms) on a LAN, a round trip on a long path
            try:
                no_delay(True)
            except OSError:  # a peer already gone (some systems refuse the option then): reading says so
                pass
        self.touch()
        self._connected_at = self._last_activity
        self._timer = f.reactor.callLater(f.limits.header_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        self._last_activity = self.factory.reactor.seconds()
        self.conn.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure = None) -> None:
        self.factory.stats.active -= 1
        self._enter(Lifecycle.LOST)
        self.factory.budget.leave(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.conn is not None and not self.conn.peer_closed:
            self.conn.receive_data(b"")
            self._pump()
        if self._step is None:  # otherwise the running step cleans up when it ends
            self._cleanup()

    # ------------------------------------------------------------ event pump

    def _pump(self) -> None:
        while self._step is None and self.conn is not None:
            event = self.conn.next_event()
            if event is wire.NEED_DATA or event is wire.PAUSED:
                return
            if type(event) is wire.Data:
                self._receive(event.data)
            elif type(event) in REQUEST_KINDS:
                self._start(event)
            elif isinstance(event, wire.BatchItem):
                d = self.request.item(event)
                if d is not None:
                    self._run(d)
            elif isinstance(event, wire.Done):
                after = self.conn.next_event()  # bytes already buffered after DONE break the protocol
                if isinstance(after, wire.ProtocolError):
                    self.request.discard_partial()
                    self.refused(after.code, after.message)
                    return
                self._finish(event.digest)
            elif isinstance(event, wire.BodyComplete):
                continue
            elif isinstance(event, wire.EndOfStream):
                self._on_eof()
                return
            elif isinstance(event, wire.ProtocolError):
                if event.code is ErrorCode.EXCESS_DATA and self.request is not None:
                    self.request.discard_partial()
                self.refused(event.code, event.message)
                return

    def _start(self, event: Any) -> None:
        """A whole request line: the authority decides at once, so it no longer counts as unauthenticated."""
        self._enter(Lifecycle.STARTING)
        self.request = REQUEST_KINDS[type(event)](self.factory.services, self, event)
        self._receive = self.request.receive
        self._run(self.request.start())

    def _finish(self, client_digest: str | None) -> None:
        self._enter(Lifecycle.FINISHING)
        self._run(self.request.finish(client_digest))

    def _on_eof(self) -> None:
        if self.conn.awaiting_close:
            self._finish(None)
            return
        if self.conn.receiving_body and isinstance(self.request, (Upload, RangedUpload)):  # a batch item's body is not an upload
            self.request.note_outcome(ErrorCode.SHORT_UPLOAD.value)
        self._enter(Lifecycle.ENDING)
        self.transport.loseConnection()

    def _run(self, d: defer.Deferred) -> None:
        """Pause reading while an asynchronous step runs; errors become one error line."""
        if d.called and not isinstance(d.result, Failure):
            return
        self._step = d
        self.pause_reading("step")

        def done(_: Any) -> None:
            self._step = None
            if self.phase not in _ENDED:
                self.resume_reading("step")

        def failed(failure: Failure) -> None:
            self._step = None
            if failure.check(FiledockError):
                err = failure.value
                self.refused(err.code, err.message)
            elif self.request is not None and self.request.job_deleted:
                # the job's directory went while we used it: expected, not a bug
                self.refused(ErrorCode.GONE, "the job was deleted; nothing of this upload is kept")
            else:
                log.failure("data port step failed", failure)
                self.refused(ErrorCode.INTERNAL_ERROR, "internal error; the partial is kept")
            # its traceback's frames hold the request (and the request this connection) in a cycle
            # through the exception: drop them, or a refused connection waits for a full collection
            failure.cleanFailure()

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._cleanup() if self.phase is Lifecycle.LOST else None)

    # ------------------------------------------------------------ IRequestChannel

    def ended(self) -> bool:
        return self.phase in _ENDED

    def authorized(self, job_id: str, session_key: str | None) -> None:
        self.job_id, self.session_key = job_id, session_key
        self.factory.authorized.add(self)

    def accepted_upload(self, offset: int) -> None:
        if self.phase in _ENDED:
            return  # ended while the request decided: the client hears nothing more
        self.transport.write(self.conn.send(wire.Offset(offset)))
        self._enter(Lifecycle.TRANSFERRING)
        self.expect_within(self.factory.limits.idle_timeout)

    def accepted_range(self, offset: int, durable: tuple[tuple[int, int], ...]) -> None:
        """A ranged upload: send the range from ``offset``; ``durable`` is every range the server holds."""
        if self.phase in _ENDED:
            return
        self.transport.write(self.conn.send(wire.RangeOffset(offset, durable)))
        self._enter(Lifecycle.TRANSFERRING)
        self.expect_within(self.factory.limits.idle_timeout)

    def range_stored(self, start: int, end: int) -> None:
        """A ranged upload's final reply when other ranges are still missing: its range is durable,
        and the connection stays open for the client's next request (its next range, usually)."""
        if self.phase not in _ENDED:
            self.transport.write(self.conn.send(wire.RangeStored(start, end)))
            self._next_request()

    def _next_request(self) -> None:
        """The request ended well and the connection stays: the request lets go of its file (its
        writer is closed and its blocks recorded, so settling has nothing left to keep) and the
        next request line is due within the header timeout, checked afresh by the authority."""
        request, self.request, self._receive = self.request, None, None
        self.factory.authorized.discard(self)
        self.job_id = self.session_key = None
        d = request.settle()
        d.addErrback(request.settle_failed)
        d.addBoth(lambda _: request.release())
        self._enter(Lifecycle.AWAITING_REQUEST)
        self.touch()
        self._connected_at = self._last_activity
        self.expect_within(self.factory.limits.header_timeout)

    def stored(self, size: int, crc32: int, digest: str) -> None:
        if self.phase not in _ENDED:  # a 2007 upload finishes once its client is gone: nothing to say
            self._final_reply(self.conn.send(wire.Stored(size, crc32, digest)))

    def accepted_abort(self) -> None:
        if self.phase not in _ENDED:
            self._final_reply(self.conn.send(wire.Aborted()))

    def accepted_batch(self) -> None:
        if self.phase in _ENDED:
            return
        self.transport.write(self.conn.send(wire.BatchAccepted()))
        self._enter(Lifecycle.TRANSFERRING)

    def batch_results(self, lines: list) -> None:
        if self.phase not in _ENDED:
            self._final_reply(self.conn.send(wire.BatchResults(tuple(lines))))

    def accepted_download(self, size: int, crc32: int, digest: str) -> None:
        if self.phase in _ENDED:
            return
        self.transport.write(self.conn.send(wire.DownloadStart(size, self.conn.request.offset, crc32, digest)))
        self._enter(Lifecycle.TRANSFERRING)

    def stream(self, producer: Any) -> None:
        self.transport.registerProducer(producer, False)
        self._streaming = True
        self.expect_within(self.factory.limits.idle_timeout)

    def write_body(self, data: bytes) -> None:
        self.transport.write(data)

    def finished(self) -> None:
        if self.phase not in _GONE:
            self.transport.unregisterProducer()
            self._enter(Lifecycle.ENDING)
            self.transport.loseConnection()

    def _final_reply(self, line: bytes) -> None:
        self.transport.write(line)
        self._enter(Lifecycle.ENDING)
        self.transport.loseConnection()

    def refused(self, code: ErrorCode, message: str) -> None:
        code_s = code.value if isinstance(code, ErrorCode) else str(code)
        if self.request is not None:
            self.request.note_outcome(code_s)
        if self.phase in _GONE:
            return
        if self.phase is not Lifecycle.ENDING:
            line = self.conn.send(wire.ServerError(code_s, message)) if self.conn else wire.format_error(code, message)
            if line:
                self.transport.write(line)
            self._enter(Lifecycle.ENDING)
        self.transport.loseConnection()
        # a stalled peer may never read the error line: do not wait on it for long
        self.factory.reactor.callLater(self.ABORT_GRACE, self._abort_if_open)

    def interrupt(self, code: ErrorCode, message: str) -> None:
        if self.phase is Lifecycle.FINISHING or self.phase in _GONE:
            return  # it ends by itself; a newer holder waits for ``released``
        if self.conn.sending_body:  # mid-download an error line would read as file bytes
            self.request.note_outcome(code.value)
            self.transport.abortConnection()
            return
        self.refused(code, message)

    def pause_reading(self, reason: str) -> None:
        if not self._pauses and self.transport is not None and self.phase not in _GONE:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if not self._pauses and self.transport is not None and self.phase not in _GONE:
            self.transport.resumeProducing()
        self._pump()

    def touch(self) -> None:
        self._last_activity = self.factory.reactor.seconds()

    def expect_within(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.factory.reactor.callLater(seconds, self._check_idle)

    # ------------------------------------------------------------ the API's hooks

    def end_job(self) -> None:
        """The job was deleted: end now with ``gone``; the clean-up keeps and records nothing.

        An upload already finishing is left to finish: it ends in ``STORED`` (and the
        job's deletion removes the file) or, if the deletion came first, in ``gone``.
        """
        if self.request is not None:
            self.request.end_job()
        self.interrupt(ErrorCode.GONE, "the job was deleted; nothing of this upload is kept")

    # ------------------------------------------------------------ ending

    def crowded_out(self) -> None:
        """The unauthenticated budget gave this silent connection's slot to a newcomer."""
        self.refused(ErrorCode.TOO_MANY_CONNECTIONS, "the server holds too many connections; this "
                                                     "one sent no request in time")

    def _abort_if_open(self) -> None:
        if self.phase not in _GONE:
            self.transport.abortConnection()

    def _cleanup(self) -> None:
        """Once per connection: the request keeps or discards its partial, records it, lets go."""
        if self.phase is not Lifecycle.LOST:
            return
        self._enter(Lifecycle.CLOSED)
        request = self.request
        if request is None:
            self._release()
            return
        d = request.settle()
        d.addErrback(request.settle_failed)
        d.addBoth(lambda _: self._release())

    def _release(self) -> None:
        self.factory.authorized.discard(self)
        if self.request is not None:
            self.request.release()
        # the request holds this connection as its channel: let go of it (and of the parser's buffers),
        # so a closed connection is freed at once, not by the next full garbage collection
        self.request = self._receive = self.conn = None
        self.released.callback(None)

    # ------------------------------------------------------------ timeouts

    def _check_idle(self) -> None:
        limits = self.factory.limits
        waiting_header = self.phase is Lifecycle.AWAITING_REQUEST or (
            self.phase is Lifecycle.TRANSFERRING and self.request.header_pending())
        limit = limits.header_timeout if waiting_header else limits.idle_timeout
        since = self._connected_at if waiting_header else self._last_activity
        idle = self.factory.reactor.seconds() - since  # a header must be complete in time, not just trickle
        if (self._step is not None and not self._streaming) or "hashing" in self._pauses:
            idle = 0.0  # we are the slow one (a step, or our disk behind): the client is waiting for us
            self.touch()
        if idle >= limit:
            if self._streaming:  # the client stopped reading: mid-stream only a cut can end it
                self.interrupt(ErrorCode.IDLE_TIMEOUT, f"nothing read for {limit:g} seconds")
                return
            self.refused(ErrorCode.IDLE_TIMEOUT, f"nothing received for {limit:g} seconds")
            return
        if self.phase is Lifecycle.TRANSFERRING:
            self.request.tick()
        self._timer = self.factory.reactor.callLater(min(limit - idle, limits.checkpoint_seconds) or limit,
                                                     self._check_idle)
