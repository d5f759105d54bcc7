"""The seam between a request (PUT, GET, ABORT, BATCH) and the connection that carries it.

A request object holds one request's semantics: what it asks the session
authority and the upload registry, its writer or producer, its checkpoints and
its outcome. It never writes protocol bytes and never touches a transport: it
tells its ``IRequestChannel`` what happened (``accepted_upload``, ``stored``,
``refused`` ...) and the channel says it in its own protocol. The data port's
connection is one channel; an HTTP request (tus ``PATCH``) can be another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from filedock.config import Limits
from filedock.errors import ErrorCode
from filedock.server.authority import ISessionAuthority
from filedock.server.dataport.stats import DataPortStats
from filedock.server.registry import IUploadRegistry
from filedock.store.blobstore import BlobStorage

log = Logger(namespace="filedock.dataport")


class IRequestChannel(Interface):
    """What a request may ask of the connection (or HTTP request) that carries it."""

    peer = Attribute("who the request came from (its address group), for logs")

    def ended() -> bool:
        """True once the channel ended (an error sent, the peer gone, taken over): a running step
        stops quietly."""

    def authorized(job_id: str, session_key: str | None) -> None:
        """The authority accepted the request for ``job_id``: the API's hooks may now end it."""

    def accepted_upload(offset: int) -> None:
        """Tell the client to send the body from ``offset``; its bytes then come to ``receive``."""

    def stored(size: int, crc32: int, digest: str) -> None:
        """The file is durable and recorded: the final reply; the channel then closes."""

    def accepted_abort() -> None:
        """The partial is gone and recorded so: the final reply of an abort."""

    def accepted_batch() -> None:
        """The batch may stream its items."""

    def batch_results(lines: list) -> None:
        """The final reply of a batch: one ``ItemStored``/``ItemFailed`` per item."""

    def accepted_download(size: int, crc32: int, digest: str) -> None:
        """The file follows from the request's offset; ``stream`` sends it."""

    def stream(producer: Any) -> None:
        """Send the body ``producer`` (an ``IPullProducer``) makes through ``write_body``."""

    def write_body(data: bytes) -> None:
        """Bytes of the body being streamed."""

    def finished() -> None:
        """The streamed body is complete (or stopped): close."""

    def refused(code: ErrorCode, message: str) -> None:
        """End the request with an error; the channel closes."""

    def interrupt(code: ErrorCode, message: str) -> None:
        """End for a reason outside the client (taken over, session closed, job deleted): like
        ``refused``, but a request finishing is left to finish, and a body being sent is cut."""

    def pause_reading(reason: str) -> None:
        """Stop reading for ``reason`` (the disk behind); reading resumes once no reason is left."""

    def resume_reading(reason: str) -> None:
        """``reason`` no longer holds; the channel reads again (and delivers what it has buffered)."""

    def touch() -> None:
        """Note progress, for the idle timeout."""

    def expect_within(seconds: float) -> None:
        """The client must send within ``seconds`` now (a timeout that differs from the current one)."""


@dataclass(frozen=True)
class RequestServices:
    """The server's parts a request uses; one per front end, shared by all its requests."""

    authority: ISessionAuthority
    blobs: BlobStorage
    limits: Limits
    registry: IUploadRegistry
    stats: DataPortStats
    reactor: Any
    in_thread: Callable[..., defer.Deferred]  # runs blocking disk work off the reactor thread
    batch_tags: set[str]  # staging tags of batches in flight (the sweeper leaves them alone)

    def room(self, promised: int) -> int:
        """Bytes the disk may still take: free space less the reserve and ``promised`` (what uploads
        and batches in flight have still to write)."""
        return self.blobs.free_bytes() - self.limits.disk_reserve - promised


class Request:
    """One request on a channel; each kind overrides what applies to it.

    The connection calls ``start`` once, then ``receive``/``item``/``finish`` as the
    wire says, and ``settle`` then ``release`` exactly once when it closes.
    """

    session_key: str | None = None
    outcome: str | None = None  # "complete", or the error code it ended with
    job_deleted = False  # the job was deleted: keep nothing, record nothing
    takes_bytes = False  # an upload or a batch: shutdown drains it
    SPACE_CHECK_BYTES = 4 << 20  # a request taking bytes asks the disk again after this many

    def __init__(self, services: RequestServices, channel: IRequestChannel) -> None:
        self.services, self.channel = services, channel

    def start(self) -> defer.Deferred:
        """Decide (authority, registry, disk) and answer through the channel."""
        raise NotImplementedError

    def receive(self, data: bytes | memoryview) -> None:
        """Body bytes (never for a kind that takes none)."""
        raise NotImplementedError

    def item(self, item: Any) -> defer.Deferred | None:
        """A batch item line (never for other kinds); a Deferred if the channel must wait for it."""
        raise NotImplementedError

    def finish(self, client_digest: str | None) -> defer.Deferred:
        """The client said it is done (``DONE``, or a 2007 client closed)."""
        raise NotImplementedError

    def note_outcome(self, code: str) -> None:
        """The channel ended with ``code`` (the first reason counts)."""
        if self.outcome is None:
            self.outcome = code

    def discard_partial(self) -> None:
        """The client broke the protocol: what it sent is not kept."""

    def end_job(self) -> None:
        """The job is being deleted: keep nothing, record nothing."""
        self.job_deleted = True

    def header_pending(self) -> bool:
        """True while the client owes a header line (its timeout is the header timeout)."""
        return False

    def tick(self) -> None:
        """Called with the idle check: time-based work (checkpoints)."""

    def settle(self) -> defer.Deferred:
        """The channel closed: keep or discard what was written, and record it."""
        return defer.succeed(None)

    def settle_failed(self, failure: Failure) -> None:
        """``settle`` failed: say so in the log (the channel is closed already)."""
        log.failure("could not settle the request", failure)

    def release(self) -> None:
        """Let go of the file (and slots, promises, the status view)."""
