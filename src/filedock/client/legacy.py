"""The 2007-dialect client: for servers that speak only the original protocol.

One connection per file: the ASCII line ``<session-uuid> <file-uuid> <size>\\r\\n``,
then exactly ``size`` raw bytes, then the client closes. That is the whole
protocol. The server never answers, so this client can only ever report a file as
*sent* (every byte handed to the operating system and the connection closed
cleanly); whether the server stored it, and with what checksum, has to be asked
elsewhere (with filedock's own server: ``GET /v1/files/<key>``). A refused upload
(unknown session, wrong size) looks the same as a successful one if every byte fit
in the socket buffers before the server closed. Use ``TxDataPortClient`` against
any filedock server: it resumes, and it is told ``STORED`` only once the file is
durable.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from twisted.internet import defer, endpoints, error
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from filedock import digest, wire
from filedock.client.model import SENT, Cancelled, Outcome, ProgressCallback, UploadResult
from filedock.client.txclient import FileStreamer
from filedock.client.jobplan import JobProgress
from filedock.errors import ErrorCode, FiledockError, short_key

CHUNK_SIZE = 64 * 1024
"""Bytes per write, as in the 2007 design."""


class LegacyUploadProtocol(Protocol):
    """Sends one file in the 2007 dialect, then closes.

    ``done`` fires with an ``UploadResult`` whose ``state`` is ``"sent"`` once the
    last byte was written and the connection closed cleanly: the dialect has no
    acknowledgement, so "sent" is all it can report. Its ``crc32`` and ``digest``
    are of the bytes sent. ``done`` fails with ``FiledockError`` if the connection
    ends early, and with ``Cancelled`` after ``done.cancel()`` (the connection is
    closed cleanly; a filedock server keeps the bytes it received as a partial,
    never as a complete file). Progress is ``(SENT, bytes_sent, size)`` per chunk.
    """

    def __init__(self, reactor: Any, session_key: str, file_key: str, path: str | os.PathLike,
                 progress: ProgressCallback | None = None) -> None:
        self.reactor = reactor
        self.session_key, self.file_key, self.path = session_key, file_key, os.fspath(path)
        self.progress = progress
        self.f = open(self.path, "rb")
        self.size = os.fstat(self.f.fileno()).st_size
        self.hasher = digest.ContentHasher()
        self.done: defer.Deferred = defer.Deferred(self._cancel)
        self.streamer: FileStreamer | None = None
        self._written = False

    def connectionMade(self) -> None:
        self.transport.write(wire.legacy_header(self.session_key, self.file_key, self.size))
        self.streamer = FileStreamer(self.reactor, self.f, 0, self.size, self.transport, self._sent,
                                     chunk_size=CHUNK_SIZE)
        self.streamer.done.addCallbacks(self._all_written, self._fail)
        self.streamer.start()

    def dataReceived(self, data: bytes) -> None:
        """A 2007 server says nothing; anything it does say is ignored."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._halt()
        if self.done.called:
            return
        if self._written and reason.check(error.ConnectionDone):
            self.done.callback(UploadResult(os.path.basename(self.path), self.size, self.file_key, 0,
                                            self.size, self.hasher.crc32, self.hasher.hexdigest(), Outcome.SENT))
            return
        sent = self.streamer.position if self.streamer is not None else 0
        self.done.errback(FiledockError(ErrorCode.INTERNAL_ERROR,
                                        f"file {short_key(self.file_key)}: connection ended after {sent} of "
                                        f"{self.size} bytes ({reason.getErrorMessage()}); the 2007 dialect "
                                        "gives no reason"))

    def _sent(self, position: int, data: bytes) -> None:
        self.hasher.update(data)
        if self.progress is not None:
            self.progress(SENT, position + len(data), self.size)

    def _all_written(self, _: None) -> None:
        self._written = True
        self.transport.loseConnection()  # the end of the bytes is the end of the protocol

    def _fail(self, failure: Failure) -> None:
        self._halt()
        if not self.done.called:
            self.done.errback(failure)
        if self.transport is not None:
            self.transport.loseConnection()

    def _cancel(self, d: defer.Deferred) -> None:
        self._halt()
        d.errback(Cancelled(f"file {short_key(self.file_key)}: cancelled after "
                            f"{self.streamer.position if self.streamer else 0} of {self.size} bytes"))
        if self.transport is not None:
            self.transport.loseConnection()

    def _halt(self) -> None:
        if self.streamer is not None:
            self.streamer.stop()
        self.f.close()


class LegacyJobUploader:
    """Uploads a job's files one after another over the 2007 dialect.

    ``files`` is a list of ``(file_key, path)``. ``start()`` returns a Deferred that
    fires with the ``UploadResult`` list (each ``state == "sent"``: see the module
    docstring for why nothing stronger can be said) once every file was sent, or
    fails on the first failure; later files are not attempted. ``cancel()`` closes
    the connection in flight and fails that Deferred with ``Cancelled``.
    ``progress(name, stage, done, total)`` reports each file in bytes sent (the
    stage is always ``SENT``); ``job_total`` is the sum of the files' sizes, for an
    overall figure.
    """

    def __init__(self, reactor: Any, host: str, port: int, session_key: str,
                 files: Sequence[tuple[str, str | os.PathLike]],
                 progress: JobProgress | None = None, connect_timeout: float = 30.0) -> None:
        self.reactor, self.host, self.port = reactor, host, port
        self.session_key = session_key
        self.files = [(key, os.fspath(path)) for key, path in files]
        self.progress = progress
        self.connect_timeout = connect_timeout
        self._running: defer.Deferred | None = None
        self.job_total = sum(os.path.getsize(path) for _, path in self.files)

    def start(self) -> defer.Deferred:
        """Begin -> ``list[UploadResult]``. Call once."""
        if self._running is not None:
            raise RuntimeError("LegacyJobUploader.start() called twice")
        self._running = defer.ensureDeferred(self._upload_all())
        return self._running

    def cancel(self) -> None:
        """Stop: the file in flight is cut short, the rest are not sent."""
        if self._running is not None and not self._running.called:
            self._running.cancel()

    async def _upload_all(self) -> list[UploadResult]:
        return [await self._upload_one(key, path) for key, path in self.files]

    async def _upload_one(self, file_key: str, path: str) -> UploadResult:
        name = os.path.basename(path)

        def progress(stage: str, done: int, total: int) -> None:
            if self.progress is not None:
                self.progress(name, stage, done, total)

        proto = LegacyUploadProtocol(self.reactor, self.session_key, file_key, path, progress)
        endpoint = endpoints.HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.connect_timeout)
        try:
            await endpoints.connectProtocol(endpoint, proto)
        except defer.CancelledError:
            proto.f.close()
            raise Cancelled(f"file {short_key(file_key)}: cancelled before it connected") from None
        except Exception as exc:
            proto.f.close()
            raise FiledockError(ErrorCode.INTERNAL_ERROR, f"cannot reach {self.host}:{self.port}: {exc}") from exc
        return await proto.done
