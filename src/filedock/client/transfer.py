"""Sans-IO state of one file's transfer across connections: what to do next, and what it came to.

``UploadAttempt``, ``DownloadAttempt`` and ``BatchAttempt`` hold everything one ``upload_file`` or
``download_file`` call decides, whoever drives it: where to resume, what counts as
progress, which failures are retried (through ``RetryBudget``), when the partial is
dropped, when a download starts again from 0, and whether the two ends agree about
the bytes. They take events (``offset``, ``body_sent``, ``digest_ready``,
``stored``, ``failed``, ...) and return actions (``Connect``, ``SendBody``,
``SendDone``, ``Sleep``, ``Finish``, ...). They never touch a socket, a file, a
clock or a thread: the blocking client (``blocking.py``) and the Twisted client
(``client/twisted/``) are drivers that do what the actions say.
"""

from __future__ import annotations

from typing import Callable

from filedock import wire
from filedock.client.model import (DownloadResult, Outcome, SourceStamp, UploadResult, batch_result,
                                   changed_during_upload)
from filedock.client.retry import RETRYABLE_REFUSALS, GiveUp, RetryBudget, RetryPolicy, Sleep
from filedock.errors import ErrorCode, FiledockError, RefusedByServer, RemoteProtocolError, TransportFailure
from filedock.record import record

__all__ = ["Connect", "SendBody", "SendDone", "AwaitDigest", "QueryStored", "DropPartial", "Restart", "Sleep",
           "Finish", "Fail", "UploadAttempt", "DownloadAttempt", "BatchAttempt", "reply_error"]


@record
class Connect:
    """Open a new connection and send the request (for a download: from ``offset``)."""

    offset: int = 0


@record
class SendBody:
    """Send ``count`` bytes of the file from ``offset``; report each piece with ``body_sent``."""

    offset: int
    count: int


@record
class SendDone:
    """Check the local file is still the version declared, then send ``DONE <digest>``."""

    digest: str


@record
class AwaitDigest:
    """The body is out, the local digest is not: close the connection (the server checkpoints what it
    got), wait for the digest, then ``Connect`` (the server then says ``OFFSET <size>``)."""


@record
class QueryStored:
    """The server holds the file complete already: ask its values (a ``GET`` of zero bytes at ``size``)
    and feed them to ``stored``."""

    size: int


@record
class DropPartial:
    """The partial may mix two versions of the local file: ``ABORT`` it (best effort), then fail with
    ``error``."""

    error: FiledockError


@record
class Restart:
    """A download's partial is not a prefix of the server's file: empty it, then ``Connect`` from 0."""


@record
class Finish:
    """The transfer is complete and verified."""

    result: UploadResult | DownloadResult


@record
class Fail:
    """The transfer fails with ``error``; ``discard``: the local partial is wrong, delete it."""

    error: FiledockError
    discard: bool = False


def _explained(error: FiledockError, name: str) -> FiledockError:
    """A failure with the file's name in it (and what to do, where there is something to do)."""
    if error.message.startswith(f"{name}: "):
        return error
    hint = " (the stored partial did not match the local file)" if error.code is ErrorCode.DIGEST_MISMATCH else ""
    explained = type(error).__new__(type(error))  # the same class (what is retried depends on it)
    explained.__dict__.update(error.__dict__)
    FiledockError.__init__(explained, error.code, f"{name}: {error.message}{hint}")
    return explained


class UploadAttempt:
    """One upload of one file, across as many connections as it takes.

    Driving it: ``start()``; after the request, feed ``offset(n)`` (the server's
    ``OFFSET``); while sending, ``body_sent(n)``; when the local digest is ready,
    ``digest_ready(crc32, digest)`` (or ``digest_late()`` if it is not ready in
    time); on ``STORED``, ``stored(values)``; on any failure ``failed(error)``. Each
    returns the next action (None: nothing to do but wait for the next event).
    """

    def __init__(self, name: str, file_key: str, size: int, policy: RetryPolicy = RetryPolicy()) -> None:
        self.name, self.file_key, self.size = name, file_key, size
        self.budget = RetryBudget(policy)
        self.resumed_from: int | None = None
        self.sent = 0
        self.offset_now: int | None = None  # the server's offset on the current connection
        self._best = -1
        self._progressed = False
        self._local: tuple[int, int, str] | None = None
        self._stored: wire.Stored | None = None

    def start(self) -> Connect:
        """The first action: open a connection and send ``PUT``."""
        self.offset_now = None
        self._progressed = False
        return Connect()

    def offset(self, offset: int) -> SendBody:
        """The server holds ``offset`` bytes durably: send the rest. A higher offset than on any
        earlier connection is progress (bytes merely handed to the kernel prove nothing)."""
        if self.resumed_from is None:
            self.resumed_from = offset
        if offset > self._best:
            self._progressed = self._best >= 0
            self._best = offset
        self.offset_now = offset
        return SendBody(offset, self.size - offset)

    def body_sent(self, count: int) -> None:
        """``count`` more bytes were written to the connection."""
        self.sent += count

    def digest_late(self) -> AwaitDigest:
        """The body is out but the local digest is still being computed."""
        return AwaitDigest()

    def digest_ready(self, crc32: int, digest: str) -> SendDone | Finish | Fail:
        """The local file's CRC-32 and digest over all ``size`` bytes."""
        self._local = (self.size, crc32, digest)
        if self._stored is not None:
            return self._verify()
        return SendDone(digest)

    def stored(self, values: wire.Stored) -> Finish | Fail | None:
        """The server made the file complete with these values (``STORED``, or ``QueryStored``'s answer).
        -> the verdict, or None until ``digest_ready``."""
        self._stored = values
        if self.resumed_from is None:
            self.resumed_from = self.size
        return self._verify() if self._local is not None else None

    def failed(self, error: FiledockError) -> Sleep | QueryStored | DropPartial | Fail:
        """The connection ended without ``STORED``, or the local file changed: what now.

        The failure rules of every upload: a file the server holds complete already is
        verified (``QueryStored``); a local file that changed has its partial dropped;
        anything ``RetryPolicy.retryable`` waits and reconnects until the budget runs out;
        everything else fails at once.
        """
        if isinstance(error, RefusedByServer) and error.code is ErrorCode.ALREADY_COMPLETE:
            return QueryStored(self.size)
        if error.code is ErrorCode.CHANGED_DURING_UPLOAD:
            return DropPartial(_explained(error, self.name))
        decision = self.budget.failed(error, self._progressed)
        if isinstance(decision, GiveUp):
            return Fail(_explained(decision.error, self.name))
        return decision

    def _verify(self) -> Finish | Fail:
        stored, (size, crc, digest) = self._stored, self._local
        if (stored.size, stored.crc32, stored.digest) != (size, crc, digest):
            return Fail(FiledockError(
                ErrorCode.DIGEST_MISMATCH,
                f"{self.name}: the server stored {stored.size} bytes with CRC-32 {wire.format_crc(stored.crc32)} "
                f"and digest {stored.digest}, but the local file has {size} bytes, CRC-32 {wire.format_crc(crc)}, "
                f"digest {digest}"))
        return Finish(UploadResult(self.name, size, self.file_key, self.resumed_from or 0, self.sent, crc, digest,
                                   Outcome.COMPLETE))


class DownloadAttempt:
    """One download of one file into a partial, across as many connections as it takes.

    Driving it: ``start(have)`` with the bytes the partial holds (hashed); after the
    request, ``started(start)`` (the server's ``DATA`` line); ``body_received(n)`` per
    piece written; ``complete(crc32, digest)`` once the body is in and hashed;
    ``restarted()`` after emptying the partial; ``failed(error)`` on any failure.
    """

    def __init__(self, name: str, file_key: str, policy: RetryPolicy = RetryPolicy()) -> None:
        self.name, self.file_key = name, file_key
        self.budget = RetryBudget(policy)
        self.have = 0
        self.resumed_from = 0
        self.received = 0
        self.start_line: wire.DownloadStart | None = None
        self._progressed = False

    def start(self, have: int) -> Connect:
        """The partial holds ``have`` bytes already: ask for the rest."""
        self.have = self.resumed_from = have
        return self.connect()

    def connect(self) -> Connect:
        """Another connection, from what the partial holds."""
        self._progressed = False
        return Connect(self.have)

    def started(self, start: wire.DownloadStart) -> Restart | None:
        """The server's ``DATA`` line: a different file than on an earlier connection starts again."""
        if self.start_line is not None and (start.size, start.digest) != (self.start_line.size,
                                                                          self.start_line.digest):
            return Restart()
        self.start_line = start
        return None

    def body_received(self, count: int) -> None:
        """``count`` more bytes were written to the partial (bytes received are progress)."""
        self.have += count
        self.received += count
        self._progressed = True

    def restarted(self) -> Connect:
        """The partial was emptied."""
        self.have = self.resumed_from = 0
        self.start_line = None
        return self.connect()

    def failed(self, error: FiledockError) -> Sleep | Restart | Fail:
        """The connection ended before the whole body: what now."""
        if isinstance(error, RefusedByServer) and error.code is ErrorCode.BAD_OFFSET and self.have:
            return Restart()  # the partial is longer than the file: not a prefix of it
        decision = self.budget.failed(error, self._progressed)
        if isinstance(decision, GiveUp):
            return Fail(decision.error)
        return decision

    def complete(self, crc32: int, digest: str) -> Finish | Fail:
        """Every byte is in and hashed: the verdict (``Fail(discard=True)``: the partial is wrong)."""
        start = self.start_line
        ours = (self.have, crc32, digest)
        if ours != (start.size, start.crc32, start.digest):
            return Fail(FiledockError(
                ErrorCode.DIGEST_MISMATCH,
                f"{self.name}: received {ours[0]} bytes with CRC-32 {wire.format_crc(crc32)} and digest {digest}, "
                f"but the server has {start.size} bytes, CRC-32 {wire.format_crc(start.crc32)}, digest "
                f"{start.digest}; the partial download ({self.resumed_from} bytes resumed) was deleted, "
                "download again"), discard=True)
        return Finish(DownloadResult(self.name, start.size, self.file_key, self.resumed_from, self.received,
                                     start.crc32, start.digest, Outcome.COMPLETE))



class BatchAttempt:
    """One ``BATCH`` of small whole files, sent again until the server answers it.

    ``files`` are (file key, path, name); ``stamps`` (by key) the files' ``SourceStamp``
    when declared (a driver adds the missing ones when it reads the file). Driving it:
    ``start()``; send ``remaining`` and report each file read with ``item_read``; a file
    that is not its stamp when read: ``source_changed`` (the connection is closed before
    ``DONE``, so nothing of it is stored) -> the batch again without it; the server's
    answers: ``answered``; a failure: ``failed``. Then ``to_check()`` names the files
    the server stored, whose stamps the driver reads again, and ``results`` gives one
    result per file, in order.
    """

    def __init__(self, files: list[tuple[str, object, str]], stamps: dict[str, SourceStamp] | None = None,
                 policy: RetryPolicy = RetryPolicy()) -> None:
        self.files = files
        self.stamps: dict[str, SourceStamp] = dict(stamps or {})
        self.budget = RetryBudget(policy)
        self.changed: dict[str, FiledockError] = {}
        self.local: dict[str, tuple[int, int, str]] = {}
        self.answers: dict[str, object] = {}

    @property
    def remaining(self) -> list[tuple[str, object, str]]:
        """The files still to send (those that changed are left out)."""
        return [item for item in self.files if item[0] not in self.changed]

    def start(self) -> Connect | None:
        """Another connection for ``remaining``; None when no file is left to send."""
        return Connect() if self.remaining else None

    def item_read(self, key: str, size: int, crc32: int, digest: str) -> None:
        """A file was read (and hashed) to be sent with these values."""
        self.local[key] = (size, crc32, digest)

    def source_changed(self, key: str, change: str) -> Connect | None:
        """File ``key`` is not the version declared: leave it out and send the rest again."""
        name = next(name for k, _, name in self.files if k == key)
        self.changed[key] = changed_during_upload(name, change, stored=False)
        return self.start()

    def answered(self, answers: dict[str, object]) -> None:
        """The server's ``STORED``/``FAILED`` per file (by key), up to ``END``."""
        self.answers = answers

    def failed(self, error: FiledockError) -> Sleep | Fail:
        """The connection ended before ``END``: send the batch again, or give up."""
        decision = self.budget.failed(error)
        return Fail(decision.error) if isinstance(decision, GiveUp) else decision

    def to_check(self) -> list[tuple[str, object]]:
        """(key, path) of the files the server stored: their stamps must still hold."""
        return [(key, path) for key, path, _ in self.files if key not in self.changed and key in self.stamps
                and isinstance(self.answers.get(key), wire.ItemStored)]

    def results(self, now: dict[str, SourceStamp | None], report: Callable[[str, str, int, int], None],
                ) -> list[UploadResult]:
        """One result per file, in order; ``now``: the current stamps of ``to_check()``'s files.

        ``complete`` only where the server's size, CRC-32 and digest equal the local ones;
        a file that changed (before it was sent, or after it was stored) is
        ``changed-during-upload``; a refused file carries the server's code.
        """
        for key, _ in self.to_check():
            change = self.stamps[key].change(now.get(key))
            if change:
                name = next(name for k, _, name in self.files if k == key)
                self.changed[key] = changed_during_upload(name, change, stored=True)
        results = []
        for key, _, name in self.files:
            if key in self.changed:
                stamp = self.stamps.get(key)
                results.append(UploadResult.failed(name, stamp.size if stamp else 0, key, self.changed[key]))
            else:
                results.append(batch_result(key, name, self.local.get(key), self.answers.get(key), report))
        return results


def reply_error(event: object) -> FiledockError:
    """The exception for a data-port event that is not the reply expected.

    ``ERR <code>`` from the server is ``RefusedByServer``; the connection ending is a
    ``TransportFailure``; a reply the protocol does not allow is a ``RemoteProtocolError``
    (``wire.ClientConnection`` reports those as ``ServerError("malformed-header", ...)``
    with its own message; the server never sends that code to a client's reply).
    """
    if isinstance(event, wire.ServerError):
        if getattr(event, "local", False) or (event.code == ErrorCode.MALFORMED_HEADER.value and (
                event.message == "server reply line too long" or event.message.startswith("unexpected reply "))):
            return RemoteProtocolError(f"the server's reply broke the protocol: {event.message}")
        return RefusedByServer(event.code, f"the server said {event.code}: {event.message}"
                               if event.code in _TRANSIENT_CODES else event.message)
    if isinstance(event, wire.EndOfStream):
        return TransportFailure("the server closed the connection")
    return RemoteProtocolError(f"unexpected reply from the server: {event!r}")


_TRANSIENT_CODES = frozenset(code.value for code in RETRYABLE_REFUSALS)
