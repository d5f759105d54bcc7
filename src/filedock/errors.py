"""Stable error codes shared by the data port, the control API, the clients and the CLI.

One concept, one name: the code a client sees on the wire (``ERR <code> <message>``),
in a JSON error body (``{"error": {"code": ..., "message": ...}}``) and in the CLI's
output is the same string.
"""

from __future__ import annotations

import enum
import sys


class ErrorCode(str, enum.Enum):
    """Every error a client can be told about. The values never change."""

    MALFORMED_HEADER = "malformed-header"
    HEADER_TOO_LONG = "header-too-long"
    UNKNOWN_SESSION = "unknown-session"
    SESSION_EXPIRED = "session-expired"
    SESSION_CLOSED = "session-closed"
    UNKNOWN_FILE = "unknown-file"
    SIZE_MISMATCH = "size-mismatch"
    EXCESS_DATA = "excess-data"
    SHORT_UPLOAD = "short-upload"
    ALREADY_COMPLETE = "already-complete"
    NOT_COMPLETE = "not-complete"
    BAD_OFFSET = "bad-offset"
    TOO_LARGE = "too-large"
    QUOTA_EXCEEDED = "quota-exceeded"
    NO_SPACE = "no-space"
    DIGEST_MISMATCH = "digest-mismatch"
    IDLE_TIMEOUT = "idle-timeout"
    TAKEN_OVER = "taken-over"
    TOO_MANY_CONNECTIONS = "too-many-connections"
    GONE = "gone"
    INTERNAL_ERROR = "internal-error"
    STORE_UNAVAILABLE = "store-unavailable"  # the metadata database (PostgreSQL) cannot be reached: retry later
    FORBIDDEN = "forbidden"
    BLOB_STORE_UNAVAILABLE = "blob-store-unavailable"  # the object store cannot be reached or refused
    BAD_RANGE = "bad-range"  # a ranged upload's range is not inside the file or not aligned
    RANGES_UNSUPPORTED = "ranges-unsupported"  # this server's blob store takes no ranged uploads (S3)
    # clients only: what a client finds out by itself
    UNREACHABLE = "unreachable"
    TLS_FAILED = "tls-failed"
    CHANGED_DURING_UPLOAD = "changed-during-upload"
    BAD_REPLY = "bad-reply"  # the server's reply broke the protocol (never sent by a server)
    # server start and fsck only
    BAD_BLOBS_URL = "bad-blobs-url"
    # control API only
    BAD_REQUEST = "bad-request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not-found"
    METHOD_NOT_ALLOWED = "method-not-allowed"
    CONFLICT = "conflict"
    BODY_TOO_LARGE = "body-too-large"
    # HTTP uploads (tus, the IETF draft) only
    UNSUPPORTED_VERSION = "unsupported-version"
    UNSUPPORTED_MEDIA_TYPE = "unsupported-media-type"
    UNSUPPORTED_CHECKSUM = "unsupported-checksum"
    UNSUPPORTED_EXTENSION = "unsupported-extension"
    CHECKSUM_MISMATCH = "checksum-mismatch"
    EXPIRED = "expired"


class FiledockError(Exception):
    """An error with a stable code and a message fit to show a user."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        try:
            self.code: ErrorCode | str = ErrorCode(code)
        except ValueError:  # a newer peer's code: keep it as the peer said it
            self.code = str(code)
        self.message = message
        super().__init__(f"{self.code_str}: {message}")

    @property
    def code_str(self) -> str:
        """The code as it appears on the wire."""
        return self.code.value if isinstance(self.code, ErrorCode) else self.code


class RefusedByServer(FiledockError):
    """The server answered with an error (``ERR <code>`` or a JSON error body): ``code`` is its code."""


class TransportFailure(FiledockError):
    """The connection could not be made, broke, or stalled: nothing the server decided.

    ``code`` is ``unreachable`` when no connection could be made, else ``internal-error``.
    """

    def __init__(self, message: str, code: ErrorCode | str = ErrorCode.INTERNAL_ERROR) -> None:
        super().__init__(code, message)


class LocalFileError(FiledockError):
    """A local file could not be read or written (``OSError``); another attempt would not help.

    Its code stays ``internal-error`` where results and the CLI show it (their values never change).
    """

    def __init__(self, message: str, code: ErrorCode | str = ErrorCode.INTERNAL_ERROR) -> None:
        super().__init__(code, message)

    @classmethod
    def of(cls, exc: OSError, path: object = None) -> "LocalFileError":
        """The error for ``exc``, naming the file."""
        where = exc.filename if exc.filename is not None else path
        return cls(f"{where}: {exc.strerror or exc}" if where is not None else str(exc.strerror or exc))


class RemoteProtocolError(FiledockError):
    """The server said something the protocol does not allow (code ``bad-reply``): not the client's fault."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_REPLY, message)


class LocalProtocolError(FiledockError):
    """This client tried something the protocol does not allow (a bug here, code ``internal-error``)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL_ERROR, message)


def short_key(key: str) -> str:
    """A key shortened for logs and messages: enough to correlate, not enough to use."""
    return key[:8] + "…" if len(key) > 8 else key


def ssl_errors(*names: str) -> tuple[type[BaseException], ...]:
    """``ssl``'s exception classes of these names if ``ssl`` is loaded, else none: for an ``except``
    clause in client code that also runs without TLS, where nothing can raise them (no TLS object
    exists before ``ssl`` is imported) and a plain upload need not import ``ssl`` at all (5-9 ms
    of a command's start-up)."""
    module = sys.modules.get("ssl")
    return tuple(getattr(module, name) for name in names) if module is not None else ()
