"""Values the clients hand back: results, progress stages, cancellation."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from filedock.errors import ErrorCode, FiledockError
from filedock.wire import ItemFailed, ItemStored, format_crc

# Progress stages, reported in this order for every file.
SENT = "sent"  # bytes written to the connection
DURABLE = "durable"  # the server answered STORED: fsync'd, renamed, recorded
VERIFIED = "verified"  # the server's CRC-32 and digest equal ours

STAGES = (SENT, DURABLE, VERIFIED)

ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done_bytes, total_bytes)``."""


MAX_BACKOFF = 30.0
"""Longest wait between two attempts, in seconds."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a client rides through drops and restarts: ``attempts`` failures in a row before it gives
    up, waiting a jittered exponential backoff (``backoff`` seconds, doubling, at most ``MAX_BACKOFF``)
    between them. The data port and the control API use the same numbers."""

    attempts: int = 5
    backoff: float = 0.5

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (from 1)."""
        return min(MAX_BACKOFF, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.5)


@dataclass(frozen=True)
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


@dataclass
class UploadResult:
    """What became of one file. ``state`` is ``complete`` or an error code."""

    name: str
    size: int
    key: str
    resumed_from: int = 0
    sent: int = 0
    crc32: int | None = None
    digest: str | None = None
    state: str = "pending"
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "key": self.key, "resumed_from": self.resumed_from,
                "sent": self.sent, "crc32": format_crc(self.crc32) if self.crc32 is not None else None,
                "digest": self.digest, "state": self.state, "message": self.message}


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
            return UploadResult(name, size, key, 0, size, answer.crc32, answer.digest,
                                ErrorCode.DIGEST_MISMATCH.value,
                                f"the server stored crc32 {format_crc(answer.crc32)} digest "
                                f"{answer.digest}, the local file has others")
        report(name, VERIFIED, size, size)
        return UploadResult(name, size, key, 0, size, answer.crc32, answer.digest, "complete")
    if isinstance(answer, ItemFailed):
        return UploadResult(name, size, key, 0, size, state=answer.code, message=answer.message)
    return UploadResult(name, size, key, 0, size, state=ErrorCode.INTERNAL_ERROR.value,
                        message="the server gave no answer for this file")
