"""Reading a local file for the Twisted client: hashing it in order, and streaming it to a transport.

``OrderedHasher`` keeps one CRC-32 and content digest of a file that is sent or
received in order, reading back in a thread whatever passed before it could hash
inline; ``FileStreamer`` is the push producer that writes a file's bytes while the
transport takes them.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, Callable

from twisted.internet import defer, interfaces, threads
from twisted.python.failure import Failure
from zope.interface import implementer

from filedock import digest
from filedock.errors import ErrorCode, FiledockError, LocalFileError

CHUNK_SIZE = 256 * 1024
"""Bytes per read when streaming a file to the data port."""


# ---------------------------------------------------------------- hashing a file in order


class StopReading:
    """A read-only view of a file that reports end of file once ``stopped()`` is true."""

    def __init__(self, f: BinaryIO, stopped: Callable[[], bool]) -> None:
        self._f, self._stopped = f, stopped

    def readinto(self, buf: Any) -> int:
        return 0 if self._stopped() else self._f.readinto(buf)


class _PositionalReader:
    """``readinto`` from a descriptor at a position of its own (``pread``: no offset shared with a writer)."""

    def __init__(self, fd: int, position: int) -> None:
        self._fd, self._position = fd, position

    def readinto(self, buf: Any) -> int:
        n = os.preadv(self._fd, [buf], self._position)
        self._position += n
        return n


class OrderedHasher:
    """CRC-32 and content digest of a file that is sent or received in order.

    ``passed(position, data)`` hashes the bytes inline when every byte before them
    is hashed already; otherwise (a resumed prefix, or bytes that passed while a
    thread was hashing) the missing range is read back from ``path`` in a thread.
    Only one party touches the ``ContentHasher`` at a time: a thread while
    ``_thread`` is set, the reactor otherwise. With ``fd`` (open for reading), the
    range is read from that descriptor (``pread``), never by path again.
    """

    def __init__(self, reactor: Any, path: str, fd: int | None = None) -> None:
        self.hasher = digest.ContentHasher()
        self._reactor, self._path, self._fd = reactor, path, fd
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
        if self._fd is not None:
            digest.hash_stream(StopReading(_PositionalReader(self._fd, start), lambda: self._stopped), length,
                               hasher=self.hasher)
            return
        with open(self._path, "rb", buffering=0) as f:
            f.seek(start)
            digest.hash_stream(StopReading(f, lambda: self._stopped), length, hasher=self.hasher)

    def _range_hashed(self, result: Any, end: int) -> None:
        self._thread = None
        if self._stopped:
            return
        if isinstance(result, Failure):
            # a local file that cannot be read: no new connection cures that (never retried)
            self._error = LocalFileError(f"cannot read {self._path}: {result.getErrorMessage()}")
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
