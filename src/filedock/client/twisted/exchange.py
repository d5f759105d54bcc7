"""One data-port request on one Twisted connection, and the watch that abandons a stalled one.

``RequestExchange`` feeds ``wire.ClientConnection`` and fires ``result`` once; each
request kind (``upload``, ``download``, ``batch``) subclasses it. What a failure
means and whether it is retried is not decided here (see ``filedock.client.transfer``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from filedock import wire
from filedock.client.model import Cancelled, ProgressCallback
from filedock.client.retry import REPLY_PATIENCE
from filedock.client.transfer import reply_error
from filedock.errors import ErrorCode, TransportFailure

# ---------------------------------------------------------------- one request per connection


class RequestExchange(Protocol):
    """One data-port request on one connection: feeds ``wire.ClientConnection``, fires ``result`` once.

    Subclasses give the request line (``request``) and act on reply events
    (``on_event``); ``halt`` releases what they hold (files, producer, hasher).
    """

    def __init__(self, reactor: Any, peer: str, progress: ProgressCallback | None) -> None:
        self.reactor = reactor
        self.peer = peer
        self.progress = progress
        self.conn = wire.ClientConnection()
        self.result: defer.Deferred = defer.Deferred(self._cancel)
        self.connecting: defer.Deferred | None = None
        self.settling = False  # the reply is in; the result waits for local work only
        self.bytes_in = 0  # bytes received on this connection (the stall watch's sign of life)
        self._eof = False
        self._halted = False

    # -- to override

    def request(self) -> bytes:
        raise NotImplementedError

    def on_event(self, event: Any) -> None:
        raise NotImplementedError

    def halt(self) -> None:
        """Stop local work and release files; called once, whatever the outcome."""

    def cancel_message(self) -> str:
        """What a cancel means for this request (the text of ``Cancelled``)."""
        return "cancelled; the server keeps what it holds durably"

    # -- Twisted callbacks

    def makeConnection(self, transport: Any) -> None:
        no_delay = getattr(transport, "setTcpNoDelay", None)  # TCP, also under TLS; not a test's transport
        if no_delay is not None:  # as the blocking client's: DONE never waits for the ACK of the body's last segment
            try:
                no_delay(True)
            except OSError:  # a peer already gone (some systems refuse the option then): reading says so
                pass
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        self.transport.write(self.request())

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self._eof and not self.result.called:
            self.conn.receive_data(data)
            self._pump()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._eof:
            self._eof = True
            self.conn.receive_data(b"")
            self._pump()
        if self.settling or self.result.called:
            if self.result.called:
                self._halt()
            return
        if reason.check(error.ConnectionDone):
            what = "the server closed the connection before it answered"
        else:
            what = f"connection lost: {reason.getErrorMessage()}"
        self.fail(TransportFailure(f"{self.peer}: {what}"))

    def connect_failed(self, failure: Failure) -> None:
        """The endpoint could not connect (unless we cancelled it)."""
        if not self.result.called:
            self.fail(TransportFailure(f"cannot reach the data port {self.peer}: {failure.getErrorMessage()}; is the "
                                    "server running? (a server reached under another name or address needs "
                                    "--public-host)", ErrorCode.UNREACHABLE))

    # -- outcomes

    def _pump(self) -> None:
        while not self.result.called:
            event = self.conn.next_event()
            if event is wire.NEED_DATA or isinstance(event, wire.EndOfStream):
                return  # connectionLost reports an early end
            if isinstance(event, wire.ServerError):
                self.fail(reply_error(event))
                return
            try:
                self.on_event(event)
            except Exception:
                self.fail(Failure())
                return

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def succeed(self, value: Any) -> None:
        if not self.result.called:
            self._halt()
            self.result.callback(value)
            self._close()

    def fail(self, reason: Exception | Failure) -> None:
        if not self.result.called:
            self._halt()
            self.result.errback(reason)
            self._close()

    def _cancel(self, d: defer.Deferred) -> None:
        self._halt()
        d.errback(Cancelled(f"{self.peer}: {self.cancel_message()}"))
        if self.connecting is not None and not self.connecting.called:
            self.connecting.cancel()  # connect_failed sees the result fired and stays quiet
        self._close()

    def _halt(self) -> None:
        if not self._halted:
            self._halted = True
            self.halt()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class StallWatch:
    """Aborts an exchange's connection when neither bytes nor replies moved for ``timeout`` seconds; the
    connection then fails with a ``TransportFailure``, which the caller's ``RetryPolicy`` retries."""

    def __init__(self, reactor: Any, exchange: "RequestExchange", timeout: float) -> None:
        self.reactor, self.exchange, self.timeout = reactor, exchange, timeout
        self._seen = (-1, -1)
        self._since = reactor.seconds()
        self._call = reactor.callLater(min(1.0, timeout), self._check)

    def _check(self) -> None:
        now = self.reactor.seconds()
        seen = (getattr(self.exchange, "sent", 0), self.exchange.bytes_in)
        # once all is sent, the server may take a while to make it durable (a batch: many files at once)
        limit = max(self.timeout, REPLY_PATIENCE) if getattr(self.exchange, "awaiting_reply", False) \
            else self.timeout
        if seen != self._seen or self.exchange.settling:
            self._seen, self._since = seen, now
        elif now - self._since >= limit and self.exchange.transport is not None:
            self.exchange.transport.abortConnection()  # connectionLost fails it: the caller reconnects
            return
        self._call = self.reactor.callLater(min(1.0, self.timeout), self._check)

    def stop(self) -> None:
        if self._call.active():
            self._call.cancel()
