"""The Twisted client: the data port in the versioned dialect, and the control API.

Every call returns a ``Deferred``, so it works from callbacks, from
``inlineCallbacks`` and from ``async def`` through ``defer.ensureDeferred``::

    async def send(reactor, api, job, paths):
        return await upload_job(api, job, paths)

    results = defer.ensureDeferred(send(reactor, TxApiClient(reactor, url, token), "takes", paths))

One data-port connection carries one request (PUT, GET, ABORT or BATCH). An upload asks
the server where to start (``OFFSET``), streams the rest of the file with a push
producer in 256 KiB reads (paused whenever the transport's buffer is full, so
memory stays bounded however large the file), sends ``DONE <digest>`` and waits
for ``STORED``. The local CRC-32 and content digest always cover the whole file:
bytes the server already held, and bytes that passed while a thread was busy, are
read back from disk in a thread; the rest is hashed as it is sent.

If the digest is still being computed when the last byte is out (a resume after a
long prefix), the connection is closed rather than left silent past the server's
idle timeout, and a new one sends ``DONE`` once the digest is ready.

Uploads reconnect on their own: after a dropped connection, a server restart, a
takeover or an idle timeout, and when nothing moved for ``stall_timeout`` seconds,
a new connection learns the server's durable offset and sends only the rest, after a
jittered exponential backoff. ``attempts`` counts failures in a row without
progress (a higher durable offset than any seen before resets it).

Cancelling a returned Deferred (``d.cancel()``) closes the connection cleanly and
fails it with ``Cancelled``; the server keeps the durable part of an upload, so the
next upload of the file resumes from there.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from typing import Any, BinaryIO, Callable, Sequence
from urllib.parse import quote, urlsplit

from twisted.internet import defer, endpoints, error, interfaces, threads
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from filedock import digest, durability, wire
from filedock.client.blocking import REPLY_PATIENCE
from filedock.client.model import (DURABLE, SENT, VERIFIED, Cancelled, ProgressCallback, RetryPolicy,
                                   SourceStamp, SourceWatch, UploadResult, batch_result, changed_during_upload)
from filedock.client.uploader import (DECLARE_BATCH, JobProgress, batch_units, collect_files, compare_complete,
                                     undeclared)
from filedock.errors import ErrorCode, FiledockError, short_key

log = Logger(namespace="filedock.client")

CHUNK_SIZE = 256 * 1024
"""Bytes per read when streaming a file to the data port."""


# ---------------------------------------------------------------- hashing a file in order


class _StopReading:
    """A read-only view of a file that reports end of file once ``stopped()`` is true."""

    def __init__(self, f: BinaryIO, stopped: Callable[[], bool]) -> None:
        self._f, self._stopped = f, stopped

    def readinto(self, buf: Any) -> int:
        return 0 if self._stopped() else self._f.readinto(buf)


class _OrderedHasher:
    """CRC-32 and content digest of a file that is sent or received in order.

    ``passed(position, data)`` hashes the bytes inline when every byte before them
    is hashed already; otherwise (a resumed prefix, or bytes that passed while a
    thread was hashing) the missing range is read back from ``path`` in a thread.
    Only one party touches the ``ContentHasher`` at a time: a thread while
    ``_thread`` is set, the reactor otherwise.
    """

    def __init__(self, reactor: Any, path: str) -> None:
        self.hasher = digest.ContentHasher()
        self._reactor, self._path = reactor, path
        self._wanted = 0
        self._thread: defer.Deferred | None = None
        self._waiters: list[defer.Deferred] = []
        self._error: FiledockError | None = None
        self._stopped = False

    def passed(self, position: int, data: bytes | memoryview) -> None:
        """Bytes ``[position, position + len(data))`` were read or written."""
        end = position + len(data)
        if self._thread is None and self.hasher.offset == position:
            self.hasher.update(data)
        self.need(end)

    def need(self, upto: int) -> None:
        """Bytes ``[0, upto)`` are on disk and must be hashed."""
        self._wanted = max(self._wanted, upto)
        self._advance()

    def finish(self, size: int) -> defer.Deferred:
        """-> the ``ContentHasher`` once ``[0, size)`` is hashed (the last bytes: call it once ``size`` is final)."""
        if self._error is not None:
            return defer.fail(self._error)
        d = defer.Deferred()
        self._waiters.append(d)
        self.need(size)
        return d

    def stop(self) -> None:
        """Hash nothing more; a running thread ends at its next read."""
        self._stopped = True

    def _advance(self) -> None:
        if self._thread is not None or self._stopped or self._error is not None:
            return
        start = self.hasher.offset
        if start < self._wanted:
            length = self._wanted - start
            self._thread = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                                     self._hash_range, start, length)
            self._thread.addBoth(self._range_hashed, start + length)
        else:
            self._settle(self.hasher)

    def _hash_range(self, start: int, length: int) -> None:
        with open(self._path, "rb", buffering=0) as f:
            f.seek(start)
            digest.hash_stream(_StopReading(f, lambda: self._stopped), length, hasher=self.hasher)

    def _range_hashed(self, result: Any, end: int) -> None:
        self._thread = None
        if self._stopped:
            return
        if isinstance(result, Failure):
            self._error = FiledockError(ErrorCode.INTERNAL_ERROR,
                                        f"cannot read {self._path}: {result.getErrorMessage()}")
        elif self.hasher.offset != end:
            self._error = FiledockError(ErrorCode.CHANGED_DURING_UPLOAD,
                                        f"{self._path} ends at byte {self.hasher.offset}, not {end}: it changed "
                                        "during the transfer")
        if self._error is not None:
            self._settle(Failure(self._error))
            return
        self._advance()

    def _settle(self, outcome: digest.ContentHasher | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if d.called:  # cancelled by its caller
                continue
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)


# ---------------------------------------------------------------- streaming a file


@implementer(interfaces.IPushProducer)
class FileStreamer:
    """Writes bytes ``[position, size)`` of an open file to a transport, ``chunk_size`` at a time.

    A push producer: one read per reactor turn while the transport takes more,
    none while the transport has paused it (its buffer is full), so memory stays
    bounded whatever the file size. ``on_chunk(position, data)`` sees each chunk
    right after it is written. ``done`` fires once the last byte is written, or
    fails if the file ends early or ``on_chunk`` raises; ``stop()`` ends it silently.
    """

    def __init__(self, reactor: Any, f: BinaryIO, position: int, size: int, transport: Any,
                 on_chunk: Callable[[int, bytes], None], chunk_size: int = CHUNK_SIZE) -> None:
        self.reactor, self.f, self.position, self.size = reactor, f, position, size
        self.transport, self.on_chunk, self.chunk_size = transport, on_chunk, chunk_size
        self.done = defer.Deferred()
        self._paused = False
        self._stopped = False
        self._registered = False
        self._call: Any = None

    def start(self) -> None:
        """Register with the transport and begin; an empty range is done at once."""
        if self.position >= self.size:
            self._end(None)
            return
        self.transport.registerProducer(self, True)
        self._registered = True
        self._schedule()

    def stop(self) -> None:
        """Write nothing more and let go of the transport; ``done`` does not fire."""
        self.stopProducing()
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    # -- IPushProducer, called by the transport

    def pauseProducing(self) -> None:
        self._paused = True
        self._unschedule()

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._stopped = True
        self._unschedule()

    # -- internals

    def _schedule(self) -> None:
        if self._call is None and not self._paused and not self._stopped:
            self._call = self.reactor.callLater(0, self._send)

    def _unschedule(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _send(self) -> None:
        self._call = None
        if self._paused or self._stopped:
            return
        try:
            data = self.f.read(min(self.chunk_size, self.size - self.position))
            if not data:
                raise FiledockError(ErrorCode.CHANGED_DURING_UPLOAD,
                                    f"the file ends at byte {self.position}, not {self.size}: it shrank during "
                                    "the upload; nothing was recorded complete")
            position = self.position
            self.position += len(data)
            self.transport.write(data)
            self.on_chunk(position, data)
        except Exception:
            self._end(Failure())
            return
        if self.position >= self.size:
            self._end(None)
        else:
            self._schedule()

    def _end(self, failure: Failure | None) -> None:
        self.stop()
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)


# ---------------------------------------------------------------- one request per connection


class _Exchange(Protocol):
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

    def connectionMade(self) -> None:
        self.transport.write(self.request())

    def dataReceived(self, data: bytes) -> None:
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
        self.fail(FiledockError(ErrorCode.INTERNAL_ERROR, f"{self.peer}: {what}"))

    def connect_failed(self, failure: Failure) -> None:
        """The endpoint could not connect (unless we cancelled it)."""
        if not self.result.called:
            self.fail(FiledockError(ErrorCode.UNREACHABLE,
                                    f"cannot reach the data port {self.peer}: {failure.getErrorMessage()}; is the "
                                    "server running? (a server reached under another name or address needs "
                                    "--public-host)"))

    # -- outcomes

    def _pump(self) -> None:
        while not self.result.called:
            event = self.conn.next_event()
            if event is wire.NEED_DATA or isinstance(event, wire.EndOfStream):
                return  # connectionLost reports an early end
            if isinstance(event, wire.ServerError):
                self.fail(event.exception())
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


class _StallWatch:
    """Aborts an upload's connection when neither bytes nor replies moved for ``timeout`` seconds."""

    def __init__(self, reactor: Any, exchange: "_Exchange", timeout: float) -> None:
        self.reactor, self.exchange, self.timeout = reactor, exchange, timeout
        self._seen = (-1, -1)
        self._since = reactor.seconds()
        self._call = reactor.callLater(min(1.0, timeout), self._check)

    def _check(self) -> None:
        now = self.reactor.seconds()
        seen = (self.exchange.sent, len(self.exchange.conn._input) + self.exchange.conn.body_received)
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


class _LateDigest(Exception):
    """The body is sent but the local digest is not ready: the connection was closed on purpose."""


class _UploadExchange(_Exchange):
    """``PUT``: stream the file from the server's offset, then ``DONE <digest>`` -> ``wire.Stored``.

    The caller owns the open file and the hasher (they outlive a connection) and
    compares the reply with its own values. If the digest is still not ready
    ``hash_wait`` seconds after the last byte went out, the connection is closed
    (the server checkpoints everything it got) and the result fails with
    ``_LateDigest``: a silent connection would hit the server's idle timeout.
    """

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str, f: BinaryIO, size: int,
                 hasher: _OrderedHasher, progress: ProgressCallback | None, hash_wait: float,
                 check_source: Callable[[], None] = lambda: None) -> None:
        super().__init__(reactor, peer, progress)
        self.session_key, self.file_key, self.f, self.size = session_key, file_key, f, size
        self.hasher = hasher
        self.check_source = check_source
        self.hash_wait = hash_wait
        self.offset: int | None = None
        self.sent = 0
        self.streamer: FileStreamer | None = None
        self._late: Any = None

    def request(self) -> bytes:
        return self.conn.upload(self.session_key, self.file_key, self.size)

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.Offset):
            self._send_from(event.offset)
        elif isinstance(event, wire.Stored):
            self.succeed(event)

    def _send_from(self, offset: int) -> None:
        self.offset = offset
        self.f.seek(offset)
        self.hasher.need(offset)
        self.report(SENT, offset, self.size)
        self.streamer = FileStreamer(self.reactor, self.f, offset, self.size, self.transport, self._sent)
        d = self.streamer.done
        d.addCallback(self._body_sent)
        d.addErrback(self.fail)
        self.streamer.start()

    def _sent(self, position: int, data: bytes) -> None:
        self.sent += len(data)
        self.hasher.passed(position, data)
        self.report(SENT, position + len(data), self.size)

    def _body_sent(self, _: None) -> None:
        d = self.hasher.finish(self.size)
        if not d.called:
            self._late = self.reactor.callLater(self.hash_wait, self.fail, _LateDigest())
        d.addCallback(self._send_done)
        d.addErrback(self.fail)

    def _send_done(self, hasher: digest.ContentHasher) -> None:
        if not self.result.called:
            self.check_source()  # DONE commits what was declared: never a file that changed meanwhile
            self.transport.write(self.conn.done(hasher.hexdigest()))

    def halt(self) -> None:
        if self._late is not None and self._late.active():
            self._late.cancel()
        if self.streamer is not None:
            self.streamer.stop()


class _DownloadExchange(_Exchange):
    """``GET``: append to ``dest + ".part"`` from its length, verify, fsync, rename into place."""

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str, dest: str,
                 progress: ProgressCallback | None) -> None:
        super().__init__(reactor, peer, progress)
        self.session_key, self.file_key, self.dest = session_key, file_key, dest
        self.part_path = dest + ".part"
        self.f = open(self.part_path, "ab")
        self.offset = self.position = os.fstat(self.f.fileno()).st_size
        self.size = 0
        self.expected: wire.DownloadStart | None = None
        self.hasher = _OrderedHasher(reactor, self.part_path)
        self._committing = False

    def request(self) -> bytes:
        return self.conn.download(self.session_key, self.file_key, self.offset)

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.DownloadStart):
            self.expected, self.size = event, event.size
            self.hasher.need(self.offset)
            self.report(SENT, self.offset, self.size)
        elif isinstance(event, wire.Data):
            self.f.write(event.data)
            self.f.flush()  # the hashing thread reads the file back through its own handle
            self.hasher.passed(self.position, event.data)
            self.position += len(event.data)
            self.report(SENT, self.position, self.size)
        elif isinstance(event, wire.BodyComplete):
            self.settling = True
            d = self.hasher.finish(self.size)
            d.addCallback(self._verify)
            d.addCallbacks(self.succeed, self.fail)

    def _verify(self, hasher: digest.ContentHasher) -> defer.Deferred | None:
        if self.result.called:
            return None  # cancelled meanwhile
        want = self.expected
        if (hasher.crc32, hasher.hexdigest()) != (want.crc32, want.digest):
            self.f.close()
            os.unlink(self.part_path)  # some byte of it is wrong; start again from 0 next time
            raise FiledockError(ErrorCode.DIGEST_MISMATCH,
                                f"{os.path.basename(self.dest)}: the server has crc32 "
                                f"{wire.format_crc(want.crc32)} digest {want.digest}; the bytes received "
                                f"({self.offset} resumed from the .part) have crc32 "
                                f"{wire.format_crc(hasher.crc32)} digest {hasher.hexdigest()}; "
                                "the .part was deleted, download again")
        self._committing = True
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._commit)
        return d.addCallback(self._committed)

    def _commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        durability.publish(self.part_path, self.dest)

    def _committed(self, _: None) -> UploadResult:
        want = self.expected
        self.report(DURABLE, self.size, self.size)
        self.report(VERIFIED, self.size, self.size)
        return UploadResult(os.path.basename(self.dest), self.size, self.file_key, self.offset,
                            self.size - self.offset, want.crc32, want.digest, "complete")

    def halt(self) -> None:
        self.hasher.stop()
        if not self._committing:
            self.f.close()  # the .part keeps every byte written: a later download resumes


class _StoredValuesExchange(_Exchange):
    """``GET`` from the end of a complete file: its size, CRC-32 and digest as ``wire.Stored``."""

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str, size: int) -> None:
        super().__init__(reactor, peer, None)
        self.session_key, self.file_key, self.size = session_key, file_key, size

    def request(self) -> bytes:
        return self.conn.download(self.session_key, self.file_key, self.size)

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.DownloadStart):
            self.succeed(wire.Stored(event.size, event.crc32, event.digest))


class _AbortExchange(_Exchange):
    """``ABORT``: the server deletes the partial."""

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str) -> None:
        super().__init__(reactor, peer, None)
        self.session_key, self.file_key = session_key, file_key

    def request(self) -> bytes:
        return self.conn.abort(self.session_key, self.file_key)

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.Aborted):
            self.succeed(None)


class _BatchSourceChanged(Exception):
    """A file of a batch is not the version declared: the batch is closed before DONE (nothing stored)."""

    def __init__(self, key: str, change: str) -> None:
        super().__init__(change)
        self.key, self.change = key, change


def _read_group(items: list[tuple[str, str, SourceStamp]]) -> list[tuple[bytes, int, str]]:
    """In a thread: each small file's bytes, CRC-32 and digest (read once, hashed once), checked against
    its stamp (key, path, stamp) before and after the read; ``_BatchSourceChanged`` if it differs."""
    out = []
    for key, path, stamp in items:
        with open(path, "rb", buffering=0) as f:
            before = SourceStamp.of(os.fstat(f.fileno()))
            data = f.read()
            change = stamp.change(before) or stamp.change(SourceStamp.of(os.fstat(f.fileno())))
        if change:
            raise _BatchSourceChanged(key, change)
        h = digest.ContentHasher()
        h.update(data)
        out.append((data, h.crc32, h.hexdigest()))
    return out


@implementer(interfaces.IPushProducer)
class _BatchExchange(_Exchange):
    """``BATCH``: many small whole files on one connection -> ``{file_key: ItemStored | ItemFailed}``.

    Files are read and hashed in a thread, ``GROUP_BYTES`` at a time with the next
    group read while this one is written, and written only while the transport
    takes them (it pauses us as a push producer): memory stays at about two groups.
    ``local`` gets (size, crc32, digest) of every file as sent.
    """

    GROUP_BYTES = 4 << 20

    def __init__(self, reactor: Any, peer: str, session_key: str, files: list[tuple[str, str, str]],
                 stamps: list[SourceStamp], report: Callable[[str, str, int, int], None]) -> None:
        super().__init__(reactor, peer, None)
        self.session_key, self.files, self.stamps, self.report_file = session_key, files, stamps, report
        self.sizes = [stamp.size for stamp in stamps]
        self.local: dict[str, tuple[int, int, str]] = {}
        self.answers: dict[str, Any] = {}
        self.sent = 0
        self.awaiting_reply = False  # DONE is out: only the server's answer is missing
        self._stopped = False
        self._registered = False
        self._resume: defer.Deferred | None = None
        self._sending: defer.Deferred | None = None

    def request(self) -> bytes:
        return self.conn.batch(self.session_key, len(self.files))

    def cancel_message(self) -> str:
        if self.awaiting_reply:
            return ("cancelled after the whole batch was sent: the server may still store it; "
                    "run again to learn which files are complete")
        return "cancelled; nothing of this batch was stored"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.registerProducer(self, True)
        self._registered = True
        self._sending = defer.ensureDeferred(self._send_items())
        self._sending.addErrback(self.fail)

    def _unregister(self) -> None:
        # a registered (paused) producer keeps Twisted from ever closing the connection
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    def _groups(self) -> list[list[int]]:
        groups, group, size = [], [], 0
        for i, n in enumerate(self.sizes):
            if group and size + n > self.GROUP_BYTES:
                groups.append(group)
                group, size = [], 0
            group.append(i)
            size += n
        return groups + ([group] if group else [])

    def _read(self, group: list[int]) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), _read_group,
                                         [(self.files[i][0], self.files[i][1], self.stamps[i]) for i in group])

    async def _send_items(self) -> None:
        groups = self._groups()
        upcoming = self._read(groups[0]) if groups else None
        for index, group in enumerate(groups):
            contents = await upcoming
            upcoming = self._read(groups[index + 1]) if index + 1 < len(groups) else None
            for i, (data, crc, hexdigest) in zip(group, contents):
                key, _, name = self.files[i]
                self.local[key] = (len(data), crc, hexdigest)
                line = self.conn.batch_item(key, len(data), hexdigest)
                for start in range(0, max(len(data), 1), CHUNK_SIZE):  # a slow link still shows progress
                    while self._resume is not None and not self._stopped:
                        await self._resume
                    if self._stopped or self.result.called:
                        return
                    piece = data[start:start + CHUNK_SIZE]
                    self.transport.write(line + piece if start == 0 else piece)
                    self.sent += len(piece)
                self.report_file(name, SENT, len(data), len(data))
        self._unregister()
        self.awaiting_reply = True
        self.transport.write(self.conn.done())

    def on_event(self, event: Any) -> None:
        if isinstance(event, (wire.ItemStored, wire.ItemFailed)):
            self.answers[event.file_key] = event
        elif isinstance(event, wire.BatchEnd):
            self.succeed(self.answers)

    # -- IPushProducer: the transport's buffer is full, or has room again

    def pauseProducing(self) -> None:
        if self._resume is None:
            self._resume = defer.Deferred()

    def resumeProducing(self) -> None:
        waiting, self._resume = self._resume, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()

    def halt(self) -> None:
        self.stopProducing()
        if self.transport is not None:
            self._unregister()


# ---------------------------------------------------------------- public: the data port

HASH_WAIT = 30.0
"""Seconds a connection whose body is sent waits for the local digest before it is
closed and reopened once the digest is ready (the server times out silent connections)."""


class TxDataPortClient:
    """Uploads and downloads through one server's data port (versioned dialect).

    ``tls_options`` is an ``optionsForClientTLS(...)`` result for a TLS data port;
    without it the connection is plain TCP. Each request opens its own connection.
    Uploads reconnect on their own (``attempts``, ``backoff``, ``stall_timeout``; see
    the module docstring). All methods must be called in the reactor thread.
    """

    RETRYABLE = frozenset({ErrorCode.INTERNAL_ERROR, ErrorCode.TAKEN_OVER, ErrorCode.IDLE_TIMEOUT,
                           ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.UNREACHABLE})

    def __init__(self, reactor: Any, host: str, port: int, tls_options: Any = None,
                 connect_timeout: float = 30.0, hash_wait: float = HASH_WAIT, attempts: int = 5,
                 backoff: float = 0.5, stall_timeout: float = 60.0) -> None:
        self.reactor, self.host, self.port = reactor, host, port
        self.tls_options = tls_options
        self.connect_timeout = connect_timeout
        self.hash_wait = hash_wait
        self.attempts, self.backoff, self.stall_timeout = attempts, backoff, stall_timeout

    def __repr__(self) -> str:
        return f"TxDataPortClient({self.host!r}, {self.port}, tls={self.tls_options is not None})"

    def upload_file(self, session_key: str, file_key: str, path: str | os.PathLike,
                    progress: ProgressCallback | None = None, *, name: str | None = None,
                    expect: SourceStamp | None = None) -> defer.Deferred:
        """Upload ``path`` as declared file ``file_key``, from where the server's durable copy ends.

        -> ``UploadResult`` with ``state == "complete"``, only after ``STORED`` and only
        if the server's size, CRC-32 and digest equal the local file's. A file the
        server holds complete already is verified (a zero-byte GET for its values),
        not sent again. Progress: ``(SENT, bytes_held_or_sent, size)`` repeatedly,
        then ``DURABLE``, then ``VERIFIED``. Fails with ``FiledockError`` (the
        server's code; ``digest-mismatch`` when the two ends disagree) or, after
        ``d.cancel()``, ``Cancelled``: the connection is closed cleanly and the
        server keeps the partial, so the next call resumes.

        ``expect`` is the file's stamp when declared (default: when opened). A file whose
        size, modification time or inode changed is not committed: no ``DONE``, the
        partial is dropped, and the Deferred fails with ``changed-during-upload`` (also
        when the change is noticed after ``STORED``: the server then holds the file as read).
        """
        return defer.ensureDeferred(self._upload(session_key, file_key, os.fspath(path), progress, name, expect))

    def download_file(self, session_key: str, file_key: str, dest: str | os.PathLike,
                      progress: ProgressCallback | None = None) -> defer.Deferred:
        """Download a complete file to ``dest`` -> ``UploadResult`` (``sent`` = bytes received).

        Bytes go to ``dest + ".part"``; a later call resumes from its length (a
        ``.part`` longer than the file is started again from 0). Once every byte is
        in, the CRC-32 and digest are checked against the server's (a mismatch
        deletes the ``.part`` and fails with ``digest-mismatch``), then the file is
        fsync'd and renamed to ``dest``. Progress: ``SENT`` while bytes arrive,
        then ``DURABLE`` and ``VERIFIED``. ``d.cancel()`` keeps the ``.part``.
        """
        return defer.ensureDeferred(self._download(session_key, file_key, os.fspath(dest), progress))

    def upload_batch(self, session_key: str, files: Sequence[tuple[str, str | os.PathLike, str]],
                     progress: Callable[[str, str, int, int], None] | None = None,
                     stamps: dict[str, SourceStamp] | None = None) -> defer.Deferred:
        """Upload many small whole files on one connection (``BATCH``) -> ``list[UploadResult]``.

        ``files`` is (file key, path, name) each; every file must be at most the
        server's ``batch_item_max`` (``GET /v1/info``). Results come in the order
        given: ``complete`` only where the server's size, CRC-32 and digest equal the
        local file's; a file the server refused carries its code (the others are
        stored all the same). A dropped connection sends the batch again (files
        stored already are answered from the record), like an upload's reconnects.
        ``progress(name, stage, done, total)`` per file. ``d.cancel()`` before the
        whole batch is sent stores nothing of it; after that the server may still
        store it (``Cancelled`` says which): the next upload learns which files are
        complete. ``stamps`` (by file key) are the files' stamps when declared: a file that
        differs when read is ``changed-during-upload`` and the batch goes again without it
        (closed before ``DONE``, so nothing of the first attempt is stored).
        """
        return defer.ensureDeferred(self._upload_batch(session_key, [(k, os.fspath(p), n) for k, p, n in files],
                                                       progress, stamps))

    def abort_file(self, session_key: str, file_key: str) -> defer.Deferred:
        """Give up an upload: the server deletes its partial -> None."""
        return self._run(_AbortExchange(self.reactor, self._peer(file_key), session_key, file_key))

    # -- internals

    async def _upload(self, session_key: str, file_key: str, path: str, progress: ProgressCallback | None,
                      name: str | None, expect: SourceStamp | None = None) -> UploadResult:
        name = name if name is not None else os.path.basename(path)
        report = progress or (lambda stage, done, total: None)
        peer = self._peer(file_key)
        with open(path, "rb") as f:
            source = SourceWatch(path, f.fileno(), name, expect)
            size = source.stamp.size
            hasher = _OrderedHasher(self.reactor, path)
            try:
                resumed_from, sent, stored = await self._put(session_key, file_key, f, size, hasher, report,
                                                             source.check)
                local = await hasher.finish(size)
            except defer.CancelledError:
                raise Cancelled(f"{peer}: cancelled; the server keeps what it holds durably") from None
            except FiledockError as exc:
                if exc.code is not ErrorCode.CHANGED_DURING_UPLOAD:
                    raise
                try:  # its bytes belong to no one version: drop the partial (best effort)
                    await self.abort_file(session_key, file_key)
                except FiledockError as abort:
                    log.info("{peer}: could not drop the partial: {why}", peer=peer, why=abort.message)
                source.check()
                raise FiledockError(exc.code, f"{name}: {exc.message}") from None
            finally:
                hasher.stop()
            source.check(stored=True)
        report(DURABLE, size, size)
        mine = (size, local.crc32, local.hexdigest())
        if (stored.size, stored.crc32, stored.digest) != mine:
            raise FiledockError(ErrorCode.DIGEST_MISMATCH,
                                f"{name}: the server stored {stored.size} bytes with crc32 "
                                f"{wire.format_crc(stored.crc32)} and digest {stored.digest}, but the local file "
                                f"has {size} bytes, crc32 {wire.format_crc(mine[1])}, digest {mine[2]}")
        report(VERIFIED, size, size)
        return UploadResult(name, size, file_key, resumed_from, sent, stored.crc32, stored.digest, "complete")

    async def _put(self, session_key: str, file_key: str, f: BinaryIO, size: int, hasher: _OrderedHasher,
                   report: ProgressCallback, check_source: Callable[[], None]) -> tuple[int, int, wire.Stored]:
        """PUT until ``STORED`` -> (resumed from, bytes sent, the server's values)."""
        peer = self._peer(file_key)
        resumed_from: int | None = None
        sent = 0
        failures, best = 0, -1
        while True:
            exchange = _UploadExchange(self.reactor, peer, session_key, file_key, f, size, hasher, report,
                                       self.hash_wait, check_source)
            watchdog = _StallWatch(self.reactor, exchange, self.stall_timeout)
            try:
                stored = await self._run(exchange)
            except _LateDigest:
                await hasher.finish(size)  # then a new connection: OFFSET <size>, nothing to send, DONE
                continue
            except FiledockError as exc:
                if exc.code in self.RETRYABLE:
                    if exchange.offset is not None and exchange.offset > best:
                        failures, best = 0, exchange.offset  # the server holds more: progress
                    failures += 1
                    if failures >= self.attempts:
                        raise FiledockError(exc.code, f"gave up after {failures} attempts without progress: "
                                                      f"{exc.message}") from None
                    delay = RetryPolicy(self.attempts, self.backoff).delay(failures)
                    log.info("{peer}: {why}; reconnecting in {delay:.2f}s", peer=peer, why=exc.message,
                             delay=delay)
                    await deferLater(self.reactor, delay)
                    continue
                if exc.code is not ErrorCode.ALREADY_COMPLETE:
                    raise
                # complete already (an earlier call, or ours with STORED lost): ask for its values
                hasher.need(size)
                report(SENT, size, size)
                stored = await self._run(_StoredValuesExchange(self.reactor, peer, session_key, file_key, size))
            finally:
                watchdog.stop()
                if resumed_from is None:
                    resumed_from = exchange.offset
                sent += exchange.sent
            return (size if resumed_from is None else resumed_from), sent, stored

    async def _upload_batch(self, session_key: str, files: list[tuple[str, str, str]],
                            progress: Callable[[str, str, int, int], None] | None,
                            stamps: dict[str, SourceStamp] | None = None) -> list[UploadResult]:
        report = progress or (lambda name, stage, done, total: None)
        if not files:
            return []
        known = dict(stamps or {})
        missing = [(key, path) for key, path, _ in files if key not in known]
        found = await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                lambda: [SourceStamp.of(os.stat(path)) for _, path in missing])
        known.update((key, stamp) for (key, _), stamp in zip(missing, found))
        peer = f"{self.host}:{self.port} (batch of {len(files)} files)"
        changed: dict[str, FiledockError] = {}
        names = {key: name for key, _, name in files}
        failures = 0
        answers: dict[str, Any] = {}
        local: dict[str, tuple[int, int, str]] = {}
        while True:
            remaining = [item for item in files if item[0] not in changed]
            if not remaining:
                break
            exchange = _BatchExchange(self.reactor, peer, session_key, remaining,
                                      [known[key] for key, _, _ in remaining], report)
            watchdog = _StallWatch(self.reactor, exchange, self.stall_timeout)
            try:
                answers = await self._run(exchange)
                local = exchange.local
                break
            except _BatchSourceChanged as exc:  # closed before DONE: nothing stored; again without it
                changed[exc.key] = changed_during_upload(names[exc.key], exc.change, stored=False)
            except FiledockError as exc:
                failures += 1
                if exc.code not in self.RETRYABLE:
                    raise
                if failures >= self.attempts:
                    raise FiledockError(exc.code, f"gave up after {failures} attempts: {exc.message}") from None
                delay = RetryPolicy(self.attempts, self.backoff).delay(failures)
                log.info("{peer}: {why}; sending the batch again in {delay:.2f}s", peer=peer, why=exc.message,
                         delay=delay)
                try:
                    await deferLater(self.reactor, delay)
                except defer.CancelledError:
                    raise Cancelled(f"{peer}: cancelled between attempts; the server may have stored part "
                                    "of it: run again to learn which files are complete") from None
            finally:
                watchdog.stop()
        results = []
        for key, path, name in files:
            if key not in changed and isinstance(answers.get(key), wire.ItemStored):
                change = known[key].change(SourceStamp.read(path))
                if change:
                    changed[key] = changed_during_upload(name, change, stored=True)
            if key in changed:
                results.append(UploadResult(name, known[key].size, key, state=changed[key].code_str,
                                            message=changed[key].message))
            else:
                results.append(batch_result(key, name, local.get(key), answers.get(key), report))
        return results

    async def _download(self, session_key: str, file_key: str, dest: str,
                        progress: ProgressCallback | None) -> UploadResult:
        peer = self._peer(file_key)
        exchange = _DownloadExchange(self.reactor, peer, session_key, file_key, dest, progress)
        try:
            return await self._run(exchange)
        except FiledockError as exc:
            if exc.code is not ErrorCode.BAD_OFFSET or exchange.offset == 0:
                raise
        os.truncate(exchange.part_path, 0)  # longer than the server's file: not a prefix of it
        return await self._run(_DownloadExchange(self.reactor, peer, session_key, file_key, dest, progress))

    def _peer(self, file_key: str) -> str:
        return f"{self.host}:{self.port} (file {short_key(file_key)})"

    def _endpoint(self) -> Any:
        ep = endpoints.HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.connect_timeout)
        if self.tls_options is not None:
            ep = endpoints.wrapClientTLS(self.tls_options, ep)
        return ep

    def _run(self, exchange: _Exchange) -> defer.Deferred:
        connecting = endpoints.connectProtocol(self._endpoint(), exchange)
        exchange.connecting = connecting
        connecting.addErrback(exchange.connect_failed)
        return exchange.result


# ---------------------------------------------------------------- public: the control API

MAX_API_REPLY = 64 * 1024 * 1024
"""Largest control-API reply body the client reads (a job with very many files)."""


class _BodyCollector(Protocol):
    """Collects a response body up to ``limit`` bytes (``readBody`` without its warning)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)
        if self.size > self.limit and not self.done.called:
            self.transport.stopProducing()
            self.done.errback(FiledockError(ErrorCode.BODY_TOO_LARGE,
                                            f"the reply is longer than {self.limit} bytes"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)



class _ApiTransient(Exception):
    """One API attempt failed in a way a later attempt may cure (``error``: the 5xx answer, if any)."""

    def __init__(self, reason: str, sent: bool, error: FiledockError | None = None) -> None:
        super().__init__(reason)
        self.reason, self.sent, self.error = reason, sent, error


class TxApiClient:
    """The few control-API calls a Twisted client needs; each returns a Deferred of the JSON reply.

    Errors fail the Deferred with ``FiledockError`` carrying the server's code.
    ``tls_policy`` is an ``IPolicyForHTTPS`` for ``https://`` URLs (Agent's default
    trusts the platform's roots).
    """

    def __init__(self, reactor: Any, url: str, token: str | None, tls_policy: Any = None,
                 retry: RetryPolicy | None = None) -> None:
        from twisted.web.client import Agent

        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise FiledockError(ErrorCode.BAD_REQUEST, f"not an http(s) URL: {url}")
        self.reactor = reactor
        self.url = url
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.token = token
        self.agent = Agent(reactor, tls_policy) if tls_policy is not None else Agent(reactor)
        self.retry = retry or RetryPolicy()

    def request(self, method: str, path: str, body: Any = None) -> defer.Deferred:
        """One JSON request -> the decoded reply body.

        Like the blocking ``ApiClient``: refused, reset, timed-out and 5xx requests are
        tried again (``retry``: the data port's attempts and backoff), and a refusal that
        only a lost earlier attempt explains is reconciled by the request's natural key
        (``filedock.client.http.recover_plan``). ``unreachable`` / ``tls-failed`` say
        what to check.
        """
        return defer.ensureDeferred(self._request(method, path, body))

    async def _request(self, method: str, path: str, body: Any) -> Any:
        from filedock.client.http import ApiError, recover_plan

        try:
            return await self._attempts(method, path, body)
        except ApiError as exc:
            plan = recover_plan(method, path, body, exc)
            if plan is None:
                raise
            get_path, check = plan
            try:
                recovered = check(await self._attempts("GET", get_path, None))
            except FiledockError:
                raise exc from None
            if recovered is None:
                raise
            return recovered

    async def _attempts(self, method: str, path: str, body: Any) -> Any:
        from filedock.client.http import unreachable_message

        failures, repeated = 0, False
        while True:
            try:
                return await self._once(method, path, body, repeated)
            except _ApiTransient as exc:
                repeated = repeated or exc.sent
                failures += 1
                if failures >= self.retry.attempts:
                    if exc.error is not None:
                        raise exc.error from None
                    raise FiledockError(ErrorCode.UNREACHABLE,
                                        unreachable_message(self.url, exc.reason, failures, None)) from None
                delay = self.retry.delay(failures)
                log.info("{method} {path}: {why}; trying again in {delay:.1f}s", method=method, path=path,
                         why=exc.reason, delay=delay)
                await deferLater(self.reactor, delay)

    async def _once(self, method: str, path: str, body: Any, repeated: bool) -> Any:
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        from filedock.client.http import RETRY_STATUSES, ApiError

        headers = Headers({b"Accept": [b"application/json"]})
        if self.token:
            headers.addRawHeader(b"Authorization", f"Bearer {self.token}".encode())
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
        try:
            response = await self.agent.request(method.encode(), (self.base + path).encode(), headers, producer)
            collector = _BodyCollector(MAX_API_REPLY)
            response.deliverBody(collector)
            raw = await collector.done
        except defer.CancelledError:
            raise
        except FiledockError:
            raise
        except Exception as exc:
            raise self._failure(exc) from None
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if response.code >= 400:
            err = payload.get("error", {}) if isinstance(payload, dict) else {}
            error = ApiError(err.get("code", ErrorCode.INTERNAL_ERROR.value),
                             err.get("message", f"HTTP {response.code} from {self.url}"), response.code, repeated)
            if response.code in RETRY_STATUSES:
                raise _ApiTransient(f"HTTP {response.code}: {error.message}", True, error)
            raise error
        return payload

    def _failure(self, exc: Exception) -> Exception:
        """What one failed request means: final (a wrong address, a certificate) or worth another attempt."""
        from twisted.web._newclient import ParseError, _WrapperException

        reasons = [f.value for f in exc.reasons] if isinstance(exc, _WrapperException) else [exc]
        for reason in reasons:
            if isinstance(reason, ParseError) and bytes(reason.args[-1] if reason.args else b"")[:4] == b"ERR ":
                return FiledockError(ErrorCode.UNREACHABLE,
                                     f"{self.url} is a filedock data port, not the control API: use the API's "
                                     "URL (`filedock serve` prints it as 'filedock API: ...'; port 7480 by default)")
            if isinstance(reason, ParseError):
                return FiledockError(ErrorCode.UNREACHABLE,
                                     f"{self.url} did not answer in HTTP; is that the filedock API's address?")
            if isinstance(reason, error.DNSLookupError):
                return FiledockError(ErrorCode.UNREACHABLE,
                                     f"cannot reach the filedock API at {self.url}: {reason}")
            text = str(reason)
            if "certificate verify failed" in text or type(reason).__name__ == "VerificationError":
                return FiledockError(ErrorCode.TLS_FAILED,
                                     f"the certificate of {self.url} failed verification ({text[:200]}): pass a "
                                     "tls_policy that trusts its CA, and use a host name the certificate names")
        sent = not isinstance(exc, error.ConnectError)
        why = "; ".join(str(r) or type(r).__name__ for r in reasons)
        return _ApiTransient(why, sent)

    # -- the calls clients make most

    def info(self) -> defer.Deferred:
        """``GET /v1/info``: version, digest scheme, limits, ``data_port``."""
        return self.request("GET", "/v1/info")

    def job(self, id_or_name: str) -> defer.Deferred:
        """``GET /v1/jobs/<id-or-name>``: the job with its ``files``."""
        return self.request("GET", f"/v1/jobs/{quote(id_or_name, safe='')}")

    def create_job(self, name: str, metadata: dict[str, Any] | None = None) -> defer.Deferred:
        """``POST /v1/jobs``."""
        return self.request("POST", "/v1/jobs", {"name": name, "metadata": metadata or {}})

    def add_file(self, job: str, name: str, size: int) -> defer.Deferred:
        """``POST /v1/jobs/<job>/files``: declare one file -> its record (with ``key``)."""
        return self.request("POST", f"/v1/jobs/{quote(job, safe='')}/files", {"name": name, "size": size})

    def add_files(self, job: str, files: Sequence[tuple[str, int]], replace: bool = False) -> defer.Deferred:
        """``POST /v1/jobs/<job>/files`` with ``{"files": [...]}``: declare up to 1000 files in one
        transaction -> their records, in order. ``replace``: new versions of files of those names
        (see ``ApiClient.add_files``)."""
        extra = {"replace": True} if replace else {}
        d = self.request("POST", f"/v1/jobs/{quote(job, safe='')}/files",
                         {"files": [{"name": name, "size": size, **extra} for name, size in files]})
        return d.addCallback(lambda reply: reply["files"])

    def open_session(self, job: str, ttl: float | None = None) -> defer.Deferred:
        """``POST /v1/jobs/<job>/sessions`` -> the session (with ``key``)."""
        return self.request("POST", f"/v1/jobs/{quote(job, safe='')}/sessions", {} if ttl is None else {"ttl": ttl})

    def close_session(self, key: str) -> defer.Deferred:
        """``DELETE /v1/sessions/<key>``."""
        return self.request("DELETE", f"/v1/sessions/{quote(key, safe='')}")

    def file(self, key: str) -> defer.Deferred:
        """``GET /v1/files/<key>``: state, received, crc32, digest."""
        return self.request("GET", f"/v1/files/{quote(key, safe='')}")


# ---------------------------------------------------------------- public: a job's files

_ANY_ADDRESS = ("", "0.0.0.0", "::")


def upload_job(api: TxApiClient, job: str, paths: Sequence[str | os.PathLike], progress: JobProgress | None = None,
               *, create: bool = False, tls_options: Any = None, prefix: str = "") -> defer.Deferred:
    """Upload files (directories expanded) into a job one after another -> ``list[UploadResult]``.

    Small files (up to the server's ``batch_item_max``) go together in ``BATCH``es,
    each file declared in one API call per thousand.

    Names and declarations follow the blocking ``JobUploader``: a file given
    directly is named by its base name, a file under a given directory by its
    relative path; a name the job lacks is declared with the file's size; a
    declared file of another size is a ``conflict``; a file the server holds
    complete is verified, not sent. ``job`` is an id or a name (created if
    ``create``). One session is opened and closed at the end. Unlike
    ``JobUploader``, the first failure fails the Deferred (as in the 2007 design:
    callback when all are in, errback otherwise); cancelling it cancels the file in
    flight. ``progress(name, stage, done, total)`` reports each file. The data
    port's address comes from ``GET /v1/info``; if it speaks TLS, ``tls_options``
    is used (default: ``optionsForClientTLS(host)`` with the platform's trust roots).
    ``prefix`` goes before every name (``filedock.client.uploader.collect_files``). A
    file that changes while it is sent fails it with ``changed-during-upload``.
    """
    return defer.ensureDeferred(_upload_job(api, job, paths, progress, create, tls_options, prefix))


async def _upload_job(api: TxApiClient, job: str, paths: Sequence[str | os.PathLike],
                      progress: JobProgress | None, create: bool, tls_options: Any,
                      prefix: str = "") -> list[UploadResult]:
    local = collect_files(paths, prefix)
    info = await api.info()
    client = _data_client(api, info, tls_options)
    record = await _resolve_job(api, job, create)
    declared, missing = undeclared(record, local)
    for start in range(0, len(missing), DECLARE_BATCH):
        chunk = missing[start:start + DECLARE_BATCH]
        for entry in await api.add_files(record["id"], [(item.name, item.size) for item in chunk]):
            declared[entry["name"]] = entry
    report = progress or (lambda name, stage, done, total: None)
    session = await api.open_session(record["id"])
    try:
        results: dict[int, UploadResult] = {}
        todo = []
        for i, item in enumerate(local):
            if declared[item.name]["state"] == "complete":  # verified here, not sent again
                results[i] = await _verify_complete(api.reactor, item, declared[item.name], report)
                if results[i].state != "complete":
                    raise FiledockError(results[i].state, results[i].message)
            else:
                todo.append(i)
        limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
        for unit in batch_units([local[i].size for i in todo], limits):
            unit = [todo[j] for j in unit]
            items = [local[i] for i in unit]
            if len(items) > 1:
                done = await client.upload_batch(session["key"], [(declared[item.name]["key"], item.path, item.name)
                                                                  for item in items], report,
                                                 {declared[item.name]["key"]: item.stamp for item in items
                                                  if item.stamp is not None})
                failed = next((r for r in done if r.state != "complete"), None)
                if failed is not None:  # as in 2007: the first failure fails the job's Deferred
                    raise FiledockError(failed.state, f"{failed.name}: {failed.message}")
                results.update(zip(unit, done))
                continue
            (item,) = items

            def one_file(stage: str, done: int, total: int, name: str = item.name) -> None:
                report(name, stage, done, total)
            results[unit[0]] = await client.upload_file(session["key"], declared[item.name]["key"], item.path,
                                                        one_file, name=item.name, expect=item.stamp)
        return [results[i] for i in range(len(local))]
    finally:
        try:
            await api.close_session(session["key"])
        except FiledockError:
            pass  # the uploads' outcome stands; an unclosed session just expires


async def _verify_complete(reactor: Any, item: Any, record: dict[str, Any], report: JobProgress) -> UploadResult:
    """A file the server holds complete: hash the local one (in a thread) and compare, send nothing."""
    hasher = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), digest.hash_file, item.path)
    return compare_complete(item, record["key"], record.get("crc32"), record.get("digest"), hasher, report)


def _data_client(api: TxApiClient, info: dict[str, Any], tls_options: Any) -> TxDataPortClient:
    """The data-port client for the address ``GET /v1/info`` gave (the API's host if unspecified)."""
    port = info["data_port"]
    host = port.get("host") or ""
    if host in _ANY_ADDRESS:
        host = urlsplit(api.base).hostname
    if port.get("tls") and tls_options is None:
        from twisted.internet.ssl import optionsForClientTLS

        tls_options = optionsForClientTLS(host)
    return TxDataPortClient(api.reactor, host, int(port["port"]), tls_options if port.get("tls") else None)


async def _resolve_job(api: TxApiClient, job: str, create: bool) -> dict[str, Any]:
    try:
        return await api.job(job)
    except FiledockError as exc:
        if exc.code is not ErrorCode.NOT_FOUND or not create:
            raise
    created = await api.create_job(job)
    return {"files": [], **created}  # a job just made has no files (one a lost attempt made may list some)
