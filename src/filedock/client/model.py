"""Values the clients hand back: results, progress stages, cancellation."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from filedock.errors import ErrorCode
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
