"""Ranged uploads (``PUTR``) under the reactor: one file over several connections at once.

The same decisions as the blocking ``RangedUpload`` (``client/blocking.py``), from the same
sans-IO code: ``plan_ranges`` for a fixed K; for ``auto``, the round-trip time of the upload's
first connection (``TCP_INFO``) and, on a long path, ranges from a ``RangeQueue`` taken by as
many connections as a ``StreamController`` asks for (``client/streams_policy.py``). On a short
path ``auto`` sends one plain ``PUT`` on that first connection, exactly as without streams.

Each range resumes where the server's durable blocks of it end; every ``RANGES`` reply's list
of durable ranges is taken out of the queue, so a resume sends only what is missing. The
connection that completes the file gets ``STORED``, the others ``DURABLE``; the verdict is the
plain upload's (size, CRC-32 and ``blake3-4m`` digest equal the local file's, hashed in a thread
beside the sending).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from filedock import wire
from filedock.client.blocking import limit_unsent, tcp_info
from filedock.client.model import (DURABLE, SENT, VERIFIED, Cancelled, Outcome, ProgressCallback, SourceStamp,
                                   SourceWatch, UploadResult)
from filedock.client.ranges import MAX_STREAMS, auto_streams, plan_ranges
from filedock.client.retry import GiveUp, RetryBudget
from filedock.client.streams_policy import (ControllerTiming, RangeQueue, RangeSchedule, StreamController,
                                            chunk_plan, queueing, rtt_from_tcp_info)
from filedock.client.twisted import upload
from filedock.client.twisted.exchange import RequestExchange, StallWatch
from filedock.client.twisted.streaming import FileStreamer, OrderedHasher
from filedock.errors import ErrorCode, FiledockError, LocalFileError, TransportFailure

log = Logger(namespace="filedock.client")

SAMPLE_SECONDS = 0.25
"""How often the controller is asked how many streams to run."""


class _PositionalFile:
    """``read(n)`` from a descriptor at a position of its own (``pread``): several ranges of one file
    are read at once, none moving another's offset."""

    def __init__(self, fd: int, position: int) -> None:
        self._fd, self._position = fd, position

    def read(self, n: int) -> bytes:
        data = os.pread(self._fd, n, self._position)
        self._position += len(data)
        return data


class RangeExchange(RequestExchange):
    """``PUTR``: bytes ``[offset, end)`` of the file from the server's offset, then ``DONE`` ->
    ``wire.RangeStored`` or ``wire.Stored``. ``on_offset(reply)`` sees the ``RANGES`` reply before a
    byte is sent, ``on_sent(n)`` every chunk; ``digest()`` is the local digest if ready, else None."""

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str, fd: int, size: int,
                 start: int, end: int, on_offset: Callable[[wire.RangeOffset], None],
                 on_sent: Callable[[int], None], digest: Callable[[], str | None],
                 asked: wire.ClientConnection | None = None) -> None:
        super().__init__(reactor, peer, None)
        self.session_key, self.file_key, self.fd, self.size = session_key, file_key, fd, size
        self.start, self.end = start, end
        self.on_offset, self.on_sent, self.digest = on_offset, on_sent, digest
        self.sent = 0
        self.awaiting_reply = True  # for RANGES, then for DURABLE/STORED: the stall watch allows REPLY_PATIENCE
        self.streamer: FileStreamer | None = None
        self.congestion: str | None = None
        self.limit_unsent = False
        self.asked = asked is not None  # the request went ahead on the last range's connection (its wire state)
        if asked is not None:
            self.conn = asked
        self.carrier: _OpenConnection | None = None  # set where the connection may carry the next range
        self.ahead: Callable[[], tuple[int, int] | None] | None = None  # the next range, asked behind DONE
        self.asked_next: tuple[int, int] | None = None
        self.kept = False

    def connectionMade(self) -> None:
        if self.asked:  # sent already: its reply may be here too
            self._pump()
        else:
            super().connectionMade()
        self.congestion = transport_congestion(self.transport)
        if self.limit_unsent:  # the end of the range stays in the file, where an idle stream may take it
            sock = tcp_socket(self.transport)
            if sock is not None:
                limit_unsent(sock)

    def request(self) -> bytes:
        return self.conn.send(wire.RangedUploadRequest(self.session_key, self.file_key, self.size, self.start,
                                                       self.end))

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.RangeOffset):
            self.awaiting_reply = False
            self.on_offset(event)
            self.streamer = FileStreamer(self.reactor, _PositionalFile(self.fd, event.offset), event.offset, self.end,
                                         self.transport, self._sent)
            self.streamer.done.addCallbacks(self._body_sent, self.fail)
            self.streamer.start()
        elif isinstance(event, (wire.RangeStored, wire.Stored)):
            state = self.conn.state
            if self.carrier is not None and isinstance(event, wire.RangeStored) and (
                    state is wire.ClientState.IDLE or state is wire.ClientState.AWAIT_OFFSET):
                self.kept = True  # the server reads the next request on this connection (or the one asked ahead)
                self.carrier.detach()
            self.succeed(event)

    def _close(self) -> None:
        if not self.kept:
            super()._close()

    def _sent(self, position: int, data: bytes) -> None:
        self.sent += len(data)
        self.on_sent(len(data))

    def _body_sent(self, _: None) -> None:
        if not self.result.called:
            self.awaiting_reply = True
            data = self.conn.send(wire.Done(self.digest()))
            if self.carrier is not None and self.ahead is not None and (nxt := self.ahead()) is not None:
                self.asked_next = nxt
                data += self.conn.send(wire.RangedUploadRequest(self.session_key, self.file_key, self.size, *nxt))
            self.transport.write(data)

    def halt(self) -> None:
        if self.streamer is not None:
            self.streamer.stop()


class _OpenConnection(Protocol):
    """A connection that carries exchanges in turn: opened before its request is known (auto's first
    one, whose RTT decides), or kept after a range's ``DURABLE`` for the next range. It hands itself
    to the exchange given to ``attach`` and relays what arrives, holding what arrives between two."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.ready: defer.Deferred = defer.Deferred()
        self.target: RequestExchange | None = None
        self.lost: Failure | None = None
        self.pending: list[bytes] = []
        self.carried = 0  # exchanges attached so far

    def connectionMade(self) -> None:
        self.ready.callback(self)

    def attach(self, exchange: RequestExchange) -> defer.Deferred:
        """Carry ``exchange`` on this connection -> its ``result``."""
        self.target = exchange
        self.carried += 1
        if self.lost is not None:
            exchange.connectionLost(self.lost)
        else:
            exchange.makeConnection(self.transport)
            pending, self.pending = self.pending, []
            for data in pending:
                exchange.dataReceived(data)
        return exchange.result

    def detach(self) -> None:
        """The exchange carried is answered and the connection stays: hold what arrives for the next."""
        self.target = None

    def dataReceived(self, data: bytes) -> None:
        if self.target is not None:
            self.target.dataReceived(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.target is not None:
            self.target.connectionLost(reason)
        else:
            self.lost = reason

    def close(self) -> None:
        """Close it if no exchange took it."""
        if self.target is None and self.transport is not None:
            self.transport.loseConnection()


def tcp_socket(transport: Any) -> socket.socket | None:
    """The TCP socket under ``transport`` (through TLS), or None."""
    for _ in range(4):
        if transport is None:
            return None
        handle = transport.getHandle() if hasattr(transport, "getHandle") else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)  # TLS: the TCP transport it wraps
    return None


def transport_info(transport: Any) -> bytes | None:
    """The kernel's ``TCP_INFO`` of the TCP connection under ``transport``, or None."""
    sock = tcp_socket(transport)
    return tcp_info(sock) if sock is not None else None


def transport_rtt(transport: Any) -> float | None:
    """The kernel's round-trip time of the TCP connection under ``transport`` (``TCP_INFO``), or None."""
    info = transport_info(transport)
    return rtt_from_tcp_info(info) if info else None


def transport_congestion(transport: Any) -> str | None:
    """The TCP congestion control of the connection under ``transport``, or None where not known."""
    sock = tcp_socket(transport)
    if sock is None or not hasattr(socket, "TCP_CONGESTION"):
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()
    except OSError:
        return None


class _FirstConnectionClient:
    """A ``TxDataPortClient`` whose next request goes on an already open connection, then as usual."""

    def __init__(self, client: Any, opened: _OpenConnection) -> None:
        self._client, self._opened = client, opened

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def run(self, exchange: RequestExchange) -> defer.Deferred:
        opened, self._opened = self._opened, None
        if opened is None:
            return self._client.run(exchange)
        return opened.attach(exchange)


async def open_connection(client: Any) -> tuple[_OpenConnection, float]:
    """A new data-port connection with nothing sent yet, and its RTT (``TCP_INFO``, else the connect's time)."""
    opened = _OpenConnection(client.reactor)
    began = client.reactor.seconds()
    try:
        await endpoints.connectProtocol(client._endpoint(), opened)
    except Exception as exc:  # noqa: BLE001 - any connect failure is "unreachable"
        raise TransportFailure(f"cannot reach the data port {client.host}:{client.port}: {exc}; is the server "
                               "running?", ErrorCode.UNREACHABLE) from None
    rtt = transport_rtt(opened.transport)
    return opened, rtt if rtt is not None else client.reactor.seconds() - began


async def upload_file(client: Any, session_key: str, file_key: str, path: str, progress: ProgressCallback | None,
                      name: str | None, expect: SourceStamp | None = None) -> UploadResult:
    """``TxDataPortClient.upload_file`` with ``streams`` set: ranges where they pay, else one ``PUT``."""
    name = name if name is not None else os.path.basename(path)
    opened: _OpenConnection | None = None
    how, rtt = "fixed", None
    if client.streams == "auto":
        how = "auto"
        try:
            opened, rtt = await open_connection(client)
            k = auto_streams(rtt, os.stat(path).st_size)
        except defer.CancelledError:
            raise Cancelled(f"{client.peer(file_key)}: cancelled") from None
        except (FiledockError, OSError) as exc:  # the plain PUT's own connects retry as its policy says
            log.info("{name}: {why}; one stream", name=name, why=getattr(exc, "message", str(exc)))
            k = 1
    else:
        k = max(1, int(client.streams))
    try:
        ranged = TxRangedUpload(client, session_key, file_key, path, progress, name, expect, how, rtt, opened)
        if k > 1:
            result = await ranged.run(k)
            if result is not None:
                return result
        log.info("{name}: one stream ({how})", name=name, how=how)
        plain = _FirstConnectionClient(client, ranged.opened) if ranged.opened is not None else client
        ranged.opened = None
        result = await upload.upload_file(plain, session_key, file_key, path, progress, name, expect)
        result.streams = ranged.detail()
        return result
    finally:
        if opened is not None:
            opened.close()


class TxRangedUpload(RangeSchedule):
    """One file's ranges under the reactor; ``run(k)`` -> the verified result, or None where the server
    takes no ranges (the caller sends one ``PUT``)."""

    CONN = "exchange"  # a range's connection (RangeSchedule): its RangeExchange

    def __init__(self, client: Any, session_key: str, file_key: str, path: str, progress: ProgressCallback | None,
                 name: str, expect: SourceStamp | None, how: str, rtt: float | None,
                 opened: _OpenConnection | None) -> None:
        self.client, self.session_key, self.file_key, self.path = client, session_key, file_key, path
        self.report = progress or (lambda stage, done, total: None)
        self.name, self.expect, self.how, self.rtt, self.opened = name, expect, how, rtt, opened
        self.peer = client.peer(file_key)
        self.ranges: list[dict[str, Any]] = []
        self.stored: list[wire.Stored] = []
        self.errors: list[BaseException] = []
        self.queue = RangeQueue([])
        self.controller: StreamController | None = None
        self.in_flight: set[defer.Deferred] = set()
        self.workers: list[defer.Deferred] = []
        self.running = self.peak = 0
        self.halted = False
        self._wake: defer.Deferred | None = None
        self.size = 0
        self.local: Any = None
        self.congestion = transport_congestion(opened.transport) if opened is not None else None

    def detail(self) -> dict[str, Any]:
        """The ``streams`` field of the result, as the blocking client gives it."""
        out = {"streams": max(1, self.peak), "chosen": self.how,
               "rtt_ms": round(self.rtt * 1000, 3) if self.rtt is not None else None,
               "congestion_control": self.congestion,
               "ranges": [{k: r[k] for k in ("start", "end", "from", "sent", "reply")} for r in self.ranges]}
        if self.controller is not None:  # what auto measured (K, aggregate goodput) and the K it kept
            out["measured"] = [{"streams": k, "bytes_per_s": round(rate)} for k, rate in self.controller.history]
            out["kept"] = self.controller.streams
        return out

    async def run(self, k: int) -> UploadResult | None:
        try:
            f = open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise LocalFileError.of(exc, self.path) from None
        with f:
            source = SourceWatch(self.path, f.fileno(), self.name, self.expect)
            self.size = size = source.stamp.size
            if self.how == "auto":
                plan = chunk_plan(size, MAX_STREAMS)
                limit = min(MAX_STREAMS, len(plan))
                self.controller = StreamController(min(k, limit), limit, ControllerTiming.for_rtt(self.rtt))
                k = self.controller.streams
            else:
                plan = plan_ranges(size, k)
            if len(plan) < 2:
                return None
            self.queue = RangeQueue(plan)
            hasher = OrderedHasher(self.client.reactor, self.path, f.fileno())
            self.local = None
            digest_d = hasher.finish(size)  # the whole file, in a thread, beside the sending
            digest_d.addCallbacks(self._hashed, lambda _: None)
            try:
                await self._drive(f.fileno(), k)
                unsupported = [e for e in self.errors if isinstance(e, FiledockError)
                               and e.code is ErrorCode.RANGES_UNSUPPORTED]
                if unsupported:
                    log.info("{name}: {why}; sending it with one PUT", name=self.name, why=unsupported[0].message)
                    return None
                if self.errors:
                    raise self.errors[0]
                return await self._verdict(source, hasher)
            except defer.CancelledError:
                raise Cancelled(f"{self.peer}: cancelled; the server keeps what it holds durably") from None
            finally:
                self._halt()
                hasher.stop()

    def _hashed(self, hasher: Any) -> Any:
        self.local = hasher
        return hasher

    async def _drive(self, fd: int, k: int) -> None:
        reactor = self.client.reactor
        self._spawn(fd, k)
        try:
            while not all(w.called for w in self.workers):
                await self._wait(SAMPLE_SECONDS)
                if self.controller is not None and not self.halted:
                    acked, rtts = self._acked()
                    wanted = self.controller.sample(reactor.seconds(), acked, self._more_work(), queueing(rtts))
                    if wanted > self.running:
                        log.info("{name}: {k} streams (auto)", name=self.name, k=wanted)
                        self._spawn(fd, wanted - self.running)
        except defer.CancelledError:
            self._halt()
            raise

    def _wait(self, seconds: float) -> defer.Deferred:
        """-> fires after ``seconds``, or at once when a worker ends (the last one ends the upload)."""
        wake = self._wake = defer.Deferred()
        call = self.client.reactor.callLater(seconds, self._wake_up)

        def stop(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return wake.addBoth(stop)

    def _wake_up(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    def _spawn(self, fd: int, n: int) -> None:
        for _ in range(n):
            if not self._more_work():
                return
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.workers.append(defer.ensureDeferred(self._worker(fd)))

    def _halt(self) -> None:
        self.halted = True
        for d in list(self.in_flight):
            d.cancel()

    def _progress(self) -> None:
        done = self.size - self.queue.pending_bytes - sum(max(0, r["end"] - r["pos"]) for r in self.ranges)
        self.report(SENT, done, self.size)

    async def _worker(self, fd: int) -> None:
        carrier: _OpenConnection | None = None  # auto: the connection the last range ended on, kept
        asked: tuple[dict[str, Any], wire.ClientConnection] | None = None  # the next range, asked ahead on it
        try:
            while not self.halted:
                if asked is not None:
                    (r, conn), asked = asked, None
                else:
                    r, conn = self._next_range(), None
                    if r is None:
                        return
                more, carrier, asked = await self._range(fd, r, carrier, conn)
                if not more:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to run()
            self.errors.append(exc)
            self._halt()
        finally:
            if asked is not None:
                self._give_back(asked[0])
            if carrier is not None:
                carrier.close()
            self.running -= 1
            self._wake_up()

    def tcp_info_of(self, conn: RangeExchange) -> bytes | None:
        return transport_info(conn.transport)

    def on_split(self, victim: dict[str, Any], point: int, end: int) -> None:
        log.info("{name}: range {start}-{end} split at {point} for an idle stream", name=self.name,
                 start=victim["start"], end=end, point=point)

    def _run(self, exchange: RequestExchange) -> defer.Deferred:
        opened, self.opened = self.opened, None
        return opened.attach(exchange) if opened is not None else self.client.run(exchange)

    async def _carry(self, exchange: RangeExchange, carrier: _OpenConnection | None) -> Any:
        """auto: ``exchange`` on ``carrier``, or on a new connection that may carry the next range."""
        if carrier is None:
            opened, self.opened = self.opened, None
            carrier = opened if opened is not None else (await open_connection(self.client))[0]
        exchange.carrier = carrier
        return await carrier.attach(exchange)

    async def _range(self, fd: int, r: dict[str, Any], carrier: _OpenConnection | None,
                     asked: wire.ClientConnection | None) -> tuple[bool, _OpenConnection | None, Any]:
        """One range's connections until it is durable or the file complete -> (whether to take another,
        the connection to send it on if the server keeps this one, (the next range, its wire state) if
        it was asked for ahead on it). With auto a connection carries ranges in turn, the next range's
        ``PUTR`` right behind ``DONE``, as the blocking client's ``RangedUpload._range``."""
        budget = RetryBudget(self.client.policy)
        best = -1
        while not self.halted:
            progressed = [False]
            reused, answered = carrier is not None, [False]

            def on_offset(reply: wire.RangeOffset) -> None:
                nonlocal best
                answered[0] = True
                self.queue.learn(reply.durable)  # never hand out what the server holds
                r["pos"] = reply.offset
                if r["from"] is None:
                    r["from"] = reply.offset
                progressed[0], best = reply.offset > best, max(best, reply.offset)
                self._progress()

            def on_sent(n: int) -> None:
                r["pos"] += n
                r["sent"] += n
                self._progress()

            exchange = RangeExchange(self.client.reactor, self.peer, self.session_key, self.file_key, fd, self.size,
                                     r["start"], r["end"], on_offset, on_sent,
                                     lambda: self.local.hexdigest() if self.local is not None else None,
                                     asked if reused else None)
            asked = None
            exchange.limit_unsent = self.controller is not None and not reused
            watch = StallWatch(self.client.reactor, exchange, self.client.stall_timeout)
            ahead: dict[str, Any] | None = None

            def ask_ahead() -> tuple[int, int] | None:
                nonlocal ahead
                ahead = self._next_range(steal=False)
                return (ahead["start"], ahead["end"]) if ahead is not None else None

            self._assign(r, exchange, transport_info(carrier.transport) if reused else None)
            if self.controller is not None:
                exchange.ahead = ask_ahead
                d = defer.ensureDeferred(self._carry(exchange, carrier))
            else:
                d = self._run(exchange)
            carrier = None
            self.in_flight.add(d)
            try:
                reply = await d
            except defer.CancelledError:
                return False, None, None
            except Cancelled:
                return False, None, None
            except FiledockError as exc:
                if ahead is not None:  # asked for ahead, perhaps: the server never read it
                    self._give_back(ahead)
                meaning = self._failed(r, exc, reused, answered[0])
                if meaning == "complete":
                    return True, None, None
                if meaning == "again":
                    continue
                decision = budget.failed(exc, progressed[0])
                if isinstance(decision, GiveUp) or self.halted:
                    if not self.halted:
                        self.errors.append(decision.error if isinstance(decision, GiveUp) else exc)
                    self._halt()
                    return False, None, None
                log.info("{name} range {start}-{end}: {why}; reconnecting in {delay:.1f}s", name=self.name,
                         start=r["start"], end=r["end"], why=exc.message, delay=decision.seconds)
                pause = deferLater(self.client.reactor, decision.seconds)
                self.in_flight.add(pause)
                try:
                    await pause
                except defer.CancelledError:
                    return False, None, None
                finally:
                    self.in_flight.discard(pause)
                continue
            finally:
                watch.stop()
                self.in_flight.discard(d)
                r["exchange"] = None
            self._answered(r, reply, exchange.sent)
            self.congestion = self.congestion or exchange.congestion
            kept = exchange.carrier if exchange.kept else None
            if ahead is not None and exchange.asked_next is None:  # taken, but DONE went without it
                self._give_back(ahead)
                ahead = None
            if ahead is not None and kept is None:  # STORED: never read, and the file is complete
                self._give_back(ahead)
                ahead = None
            return True, kept, ((ahead, exchange.conn) if ahead is not None else None)
        if carrier is not None:
            carrier.close()
        return False, None, None

    async def _verdict(self, source: SourceWatch, hasher: OrderedHasher) -> UploadResult:
        size = self.size
        if self.stored:
            stored = self.stored[0]
        else:  # every range durable, STORED lost in a drop or the file complete already: ask its values
            stored = await upload._stored_values(self.client, self.peer, self.session_key, self.file_key, size)
        source.check(stored=True)
        local = await hasher.finish(size)
        self.report(DURABLE, size, size)
        if (stored.size, stored.crc32, stored.digest) != (size, local.crc32, local.hexdigest()):
            raise FiledockError(ErrorCode.DIGEST_MISMATCH,
                                f"{self.name}: the server stored {stored.size} bytes with CRC-32 "
                                f"{wire.format_crc(stored.crc32)} and digest {stored.digest}, but the local file has "
                                f"{size} bytes, CRC-32 {wire.format_crc(local.crc32)}, digest {local.hexdigest()}")
        sent = sum(r["sent"] for r in self.ranges)
        log.info("{name}: {k} streams ({how}), {sent} bytes sent", name=self.name, k=self.peak, how=self.how, sent=sent)
        self.report(VERIFIED, size, size)
        return UploadResult(self.name, size, self.file_key, size - sent if sent <= size else 0, sent, local.crc32,
                            local.hexdigest(), Outcome.COMPLETE, streams=self.detail())
