"""``TxDataPortClient``: the Twisted client of one server's data port (versioned dialect).

Each call opens its own connection(s) and returns a ``Deferred``; the request kinds
live in ``upload``, ``download`` and ``batch`` beside this module, their decisions
in ``filedock.client.transfer``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from twisted.internet import defer, endpoints

from filedock.client.model import ProgressCallback, RetryPolicy, SourceStamp
from filedock.client.retry import RETRYABLE_REFUSALS
from filedock.client.ranges import MIN_RANGED_SIZE
from filedock.client.twisted import batch, download, ranged, upload
from filedock.client.twisted.exchange import RequestExchange
from filedock.client.twisted.upload import AbortExchange
from filedock.errors import ErrorCode, short_key

HASH_WAIT = 30.0
"""Seconds a connection whose body is sent waits for the local digest before it is
closed and reopened once the digest is ready (the server times out silent connections)."""


def _size(path: str | os.PathLike) -> int:
    """The file's size, or -1 if it cannot be read (the upload then reports why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


class TxDataPortClient:
    """Uploads and downloads through one server's data port (versioned dialect).

    ``tls_options`` is an ``optionsForClientTLS(...)`` result for a TLS data port;
    without it the connection is plain TCP. Each request opens its own connection.
    Uploads reconnect on their own (``attempts``, ``backoff``, ``stall_timeout``; see
    the module docstring). ``streams`` sends a large file over several connections at once
    (``PUTR``): a number K, or ``"auto"`` (K from the path's RTT and the measured goodput; one
    plain ``PUT`` on a short path), see ``filedock.client.twisted.ranged``. All methods must be
    called in the reactor thread.
    """

    RETRYABLE = RETRYABLE_REFUSALS | {ErrorCode.UNREACHABLE}
    """Codes tried again (``filedock.client.retry.RetryPolicy.retryable`` decides; kept for callers)."""

    def __init__(self, reactor: Any, host: str, port: int, tls_options: Any = None,
                 connect_timeout: float = 30.0, hash_wait: float = HASH_WAIT, attempts: int = 5,
                 backoff: float = 0.5, stall_timeout: float = 60.0, streams: int | str | None = None) -> None:
        self.reactor, self.host, self.port = reactor, host, port
        self.streams = streams  # connections per large file: a number, "auto", or None (one plain PUT)
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

        With ``streams`` set and a file of at least ``MIN_RANGED_SIZE``, the file goes as ranges over
        several connections; the result's ``streams`` says how many, why, the RTT and each range.
        """
        if self.streams is not None and _size(path) >= MIN_RANGED_SIZE:
            return defer.ensureDeferred(ranged.upload_file(self, session_key, file_key, os.fspath(path), progress,
                                                           name, expect))
        return defer.ensureDeferred(upload.upload_file(self, session_key, file_key, os.fspath(path), progress, name,
                                                       expect))

    def download_file(self, session_key: str, file_key: str, dest: str | os.PathLike,
                      progress: ProgressCallback | None = None) -> defer.Deferred:
        """Download a complete file to ``dest`` -> ``DownloadResult`` (``sent`` = bytes received).

        Bytes go to ``dest + ".part"``; a later call resumes from its length (a
        ``.part`` longer than the file is started again from 0). Once every byte is
        in, the CRC-32 and digest are checked against the server's (a mismatch
        deletes the ``.part`` and fails with ``digest-mismatch``), then the file is
        fsync'd and renamed to ``dest``. Progress: ``SENT`` while bytes arrive,
        then ``DURABLE`` and ``VERIFIED``. ``d.cancel()`` keeps the ``.part``.

        A dropped or stalled connection (nothing moved for ``stall_timeout``) is
        reconnected as the client's ``RetryPolicy`` allows, from the ``.part``'s length.
        A ``.part`` that is a symbolic link is refused (``LocalFileError``), never followed.
        """
        return defer.ensureDeferred(download.download_file(self, session_key, file_key, os.fspath(dest), progress))

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
        return defer.ensureDeferred(batch.upload_batch(self, session_key,
                                                       [(k, os.fspath(p), n) for k, p, n in files], progress, stamps))

    def abort_file(self, session_key: str, file_key: str) -> defer.Deferred:
        """Give up an upload: the server deletes its partial -> None."""
        return self.run(AbortExchange(self.reactor, self.peer(file_key), session_key, file_key))

    # -- connections

    @property
    def policy(self) -> RetryPolicy:
        """``attempts`` and ``backoff`` as the ``RetryPolicy`` every transfer of this client follows."""
        return RetryPolicy(self.attempts, self.backoff)

    def peer(self, file_key: str) -> str:
        """How logs and messages name this data port and file."""
        return f"{self.host}:{self.port} (file {short_key(file_key)})"

    def _endpoint(self) -> Any:
        ep = endpoints.HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.connect_timeout)
        if self.tls_options is not None:
            ep = endpoints.wrapClientTLS(self.tls_options, ep)
        return ep

    def run(self, exchange: RequestExchange) -> defer.Deferred:
        """Connect ``exchange`` on a new connection -> its ``result``."""
        connecting = endpoints.connectProtocol(self._endpoint(), exchange)
        exchange.connecting = connecting
        connecting.addErrback(exchange.connect_failed)
        return exchange.result
