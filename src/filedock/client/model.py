"""Values the clients hand back: results, progress stages, cancellation."""

from __future__ import annotations

import enum
import os
from typing import Any, Callable

from filedock.client.retry import MAX_BACKOFF, RetryPolicy  # noqa: F401  (public here since before retry.py)
from filedock.errors import ErrorCode, FiledockError, RefusedByServer, RemoteProtocolError
from filedock.record import record
from filedock.wire import ItemFailed, ItemStored, format_crc

# Progress stages, reported in this order for every file.
SENT = "sent"  # bytes written to the connection
DURABLE = "durable"  # the server answered STORED: fsync'd, renamed, recorded
VERIFIED = "verified"  # the server's CRC-32 and digest equal ours

STAGES = (SENT, DURABLE, VERIFIED)

ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done_bytes, total_bytes)``."""


@record
class SourceStamp:
    """Which version of a local file is being sent: size, modification time, inode and device.

    Like tar and rsync, a client compares the stamp from when the file was declared
    (or opened) with the file's stamp before it asks the server to commit, and again
    after: any difference means the bytes sent may not be the bytes the user has.
    """

    size: int
    mtime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> "SourceStamp":
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    @classmethod
    def read(cls, path: str | os.PathLike, fd: int | None = None) -> "SourceStamp | None":
        """The stamp of ``path`` now (None if it is gone); with ``fd``, a path replaced by another
        file shows up as a changed inode."""
        try:
            return cls.of(os.stat(path))
        except OSError:
            return None if fd is None else cls.of(os.fstat(fd))

    def change(self, now: "SourceStamp | None") -> str | None:
        """What changed since this stamp, in words; None if nothing did."""
        if now is None:
            return "was deleted"
        if (now.ino, now.dev) != (self.ino, self.dev):
            return "was replaced by another file"
        if now.size != self.size:
            return f"{'grew' if now.size > self.size else 'shrank'} from {self.size} to {now.size} bytes"
        if now.mtime_ns != self.mtime_ns:
            return "was modified"
        return None


def changed_during_upload(name: str, change: str, stored: bool) -> FiledockError:
    """The ``changed-during-upload`` error for a local file that ``change``d while it was sent.

    ``stored``: the server had already made it complete (with the bytes as they were read).
    """
    if stored:
        what = ("the server stored it complete as it was when read, which is not the file you have now; "
                "upload it again with --replace to store the new version")
    else:
        what = "nothing was recorded complete; run the upload again once the file stays put"
    return FiledockError(ErrorCode.CHANGED_DURING_UPLOAD, f"{name}: the local file {change} during the upload: "
                                                          f"{what}")


class SourceWatch:
    """The local file of an upload and the ``SourceStamp`` it must keep until the server commits it.

    Raises ``changed-during-upload`` at once if the file opened (``fd``) is not the
    version declared (``expect``); ``check()`` compares again, by descriptor (changed in
    place) and by path (replaced or deleted).
    """

    def __init__(self, path: str | os.PathLike, fd: int, name: str, expect: SourceStamp | None = None) -> None:
        self.path, self.fd, self.name = path, fd, name
        opened = SourceStamp.of(os.fstat(fd))
        self.stamp = expect or opened
        change = self.stamp.change(opened)
        if change:
            raise changed_during_upload(name, change, stored=False)

    def check(self, stored: bool = False) -> None:
        """Raise ``changed-during-upload`` if the file is no longer the version of the stamp."""
        change = self.stamp.change(SourceStamp.of(os.fstat(self.fd))) or \
            self.stamp.change(SourceStamp.read(self.path))
        if change:
            raise changed_during_upload(self.name, change, stored)


class Cancelled(Exception):
    """The caller cancelled; the server keeps the partial unless asked to abort."""


class Outcome(str, enum.Enum):
    """What became of one file. ``FAILED`` and the outcomes after it carry an error ``code``."""

    PENDING = "pending"
    COMPLETE = "complete"  # stored durably and verified (a download: verified and renamed into place)
    SENT = "sent"  # the 2007 dialect: every byte handed to the OS, nothing more is known
    FAILED = "failed"  # refused or not reachable: see ``code``
    CHANGED_DURING_UPLOAD = "changed-during-upload"  # the local file changed while it was sent
    CONFLICT = "conflict"  # the job has that name with other bytes, or the local file differs
    DIGEST_MISMATCH = "digest-mismatch"  # the two ends disagree about the bytes

    @classmethod
    def of_error(cls, code: ErrorCode | str) -> "Outcome":
        """The outcome for a file that failed with ``code``."""
        try:
            return cls(code.value if isinstance(code, ErrorCode) else code)
        except ValueError:
            return cls.FAILED


@record(frozen=False)
class TransferResult:
    """What became of one file moved through a filedock server.

    ``outcome`` says what happened; ``code`` (an ``ErrorCode``, or a newer peer's
    string) and ``message`` say why when it is not ``COMPLETE`` or ``SENT``.
    ``crc32`` is the CRC-32 as an int, ``crc32_hex`` as the CLI and the API show it
    (8 hex digits). ``sent`` is the bytes this call moved (a download: received);
    ``resumed_from`` the bytes the other end (or the ``.part``) held when it began.
    """

    name: str
    size: int
    key: str
    resumed_from: int = 0
    sent: int = 0
    crc32: int | None = None
    digest: str | None = None
    outcome: Outcome = Outcome.PENDING
    message: str = ""
    code: ErrorCode | str | None = None
    streams: dict[str, Any] | None = None
    """A ranged upload's connections: how many, why, the path's RTT, the congestion control, each range."""

    @classmethod
    def failed(cls, name: str, size: int, key: str, error: FiledockError) -> "TransferResult":
        """The result for a file that ends with ``error``."""
        return cls(name, size, key, outcome=Outcome.of_error(error.code), message=error.message, code=error.code)

    @property
    def ok(self) -> bool:
        """The file is where it should be: ``COMPLETE`` (or ``SENT`` in the 2007 dialect)."""
        return self.outcome in (Outcome.COMPLETE, Outcome.SENT)

    @property
    def crc32_hex(self) -> str | None:
        """The CRC-32 as 8 hex digits, as ``GET /v1/files/<key>`` and the CLI show it."""
        return format_crc(self.crc32) if self.crc32 is not None else None

    @property
    def state(self) -> str:
        """The CLI's ``state`` field: the outcome's value while it is ``pending``, ``complete`` or
        ``sent``, else the error code (the values of ``filedock ... --json`` never change)."""
        if self.code is None or self.ok or self.outcome is Outcome.PENDING:
            return self.outcome.value
        return self.code.value if isinstance(self.code, ErrorCode) else str(self.code)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "key": self.key, "resumed_from": self.resumed_from,
                "sent": self.sent, "crc32": self.crc32_hex, "digest": self.digest, "state": self.state,
                "message": self.message} | ({"streams": self.streams} if self.streams is not None else {})


class UploadResult(TransferResult):
    """What became of one file sent to the server."""


class DownloadResult(TransferResult):
    """What became of one file fetched from the server (``sent``: bytes received by this call)."""

    @property
    def received(self) -> int:
        """Bytes this call received (the same as ``sent``)."""
        return self.sent


def batch_result(key: str, name: str, local: tuple[int, int, str] | None, answer: Any,
                 report: Callable[[str, str, int, int], None]) -> UploadResult:
    """One file's result from a ``BATCH`` reply: ``local`` is (size, crc32, digest) of what was sent.

    ``complete`` only if the server's values equal the local ones; a refusal carries
    the server's code; no answer at all is an ``internal-error``. Reports DURABLE and
    VERIFIED as they hold.
    """
    size = local[0] if local else 0
    if isinstance(answer, ItemStored):
        report(name, DURABLE, size, size)
        if (answer.size, answer.crc32, answer.digest) != local:
            return UploadResult(name, size, key, 0, size, answer.crc32, answer.digest, Outcome.DIGEST_MISMATCH,
                                f"the server stored crc32 {format_crc(answer.crc32)} digest "
                                f"{answer.digest}, the local file has others", ErrorCode.DIGEST_MISMATCH)
        report(name, VERIFIED, size, size)
        return UploadResult(name, size, key, 0, size, answer.crc32, answer.digest, Outcome.COMPLETE)
    if isinstance(answer, ItemFailed):
        error = RefusedByServer(answer.code, answer.message)
    else:
        error = RemoteProtocolError("the server gave no answer for this file")
    result = UploadResult.failed(name, size, key, error)
    result.sent = size
    return result
