"""Values the clients hand back: results, progress stages, cancellation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from filedock.wire import format_crc

# Progress stages, reported in this order for every file.
SENT = "sent"  # bytes written to the connection
DURABLE = "durable"  # the server answered STORED: fsync'd, renamed, recorded
VERIFIED = "verified"  # the server's CRC-32 and digest equal ours

STAGES = (SENT, DURABLE, VERIFIED)

ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done_bytes, total_bytes)``."""


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
