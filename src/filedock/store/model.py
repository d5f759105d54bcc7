"""Records the job store hands out: plain frozen values, no behaviour, no SQL."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from filedock.digest import format_crc

JOB_OPEN = "open"
JOB_COMPLETE = "complete"

FILE_PENDING = "pending"
FILE_PARTIAL = "partial"
FILE_COMPLETE = "complete"
RANGED_STAMP = "ranged"
"""A file's ``part_stamp`` while its progress is a ranged upload's blocks (``range_blocks``), not a prefix."""


@dataclass(frozen=True)
class Job:
    """A job: a named set of files that arrive together."""

    id: str
    name: str
    metadata: dict[str, Any]
    created: float
    updated: float
    state: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


REPLACEMENT_MARK = "\x01"
"""A new version that waits to replace a file (``upload --replace``) is stored under the name
``MARK + <the file's id> + MARK + <its name>``: a control character is never in a name a client
may declare, so the two records never clash, and the id (never a key: no key is stored) says
which file it replaces. (Not NUL:
SQLite's string functions stop at a NUL.)"""


def replacement_name(replaced_id: str, name: str) -> str:
    """The stored name of a new version of file ``replaced_id`` named ``name``."""
    return f"{REPLACEMENT_MARK}{replaced_id}{REPLACEMENT_MARK}{name}"


PART_MARK = "\x02"
"""A part of a tus concatenation (``Upload-Concat: partial``) is stored under the name
``MARK + <a random id>``: a hidden file record of its job, never listed, never counted in the
job's state or completion event, deleted once a final upload made of it completes (or by
the sweeper when abandoned). Like ``REPLACEMENT_MARK``, a control character no client may
declare, so a part never clashes with a file's name."""


def part_name(part_id: str) -> str:
    """The stored name of a concatenation part."""
    return f"{PART_MARK}{part_id}"


@dataclass(frozen=True)
class FileRecord:
    """A declared file of a job and how much of it the server holds durably.

    ``received`` is the durable offset; ``crc32`` is the CRC-32 of those bytes (the
    final CRC once complete); ``digest`` is set only when complete. A ``name`` that
    starts with ``REPLACEMENT_MARK`` is a new version waiting to take the place of file
    ``replaces`` once complete; listings leave it out.
    """

    key: str
    job_id: str
    name: str
    size: int
    received: int
    state: str
    crc32: int
    digest: str | None
    uploaded_at: float | None
    updated: float
    part_stamp: str | None = None
    id: str = ""
    """The file's stable id: its blobs' name on disk. Not a secret, and no key: ``key`` is."""
    replaces_key: str | None = None
    """The key of the file this new version replaces (what ``to_json`` shows; set by the store)."""

    @property
    def blob_name(self) -> str:
        """What the file's blobs are named on disk (its id; its key for a record made without one)."""
        return self.id or self.key

    @property
    def replaces(self) -> str | None:
        """The id of the file this new version replaces once complete (None for a plain file)."""
        return self.name.split(REPLACEMENT_MARK, 2)[1] if self.name.startswith(REPLACEMENT_MARK) else None

    @property
    def is_part(self) -> bool:
        """A part of a tus concatenation (``PART_MARK``): hidden, never completes its job."""
        return self.name.startswith(PART_MARK)

    @property
    def public_name(self) -> str:
        """The name a client sees: a new version waiting to replace a file shows that file's name."""
        return self.name.split(REPLACEMENT_MARK, 2)[2] if self.name.startswith(REPLACEMENT_MARK) else self.name

    def to_json(self) -> dict[str, Any]:
        out = {
            "key": self.key, "job": self.job_id, "name": self.public_name, "size": self.size,
            "received": self.received, "state": self.state,
            "crc32": format_crc(self.crc32) if self.state == FILE_COMPLETE else None,
            "digest": self.digest, "uploaded_at": self.uploaded_at,
        }
        if self.replaces:
            out["replaces"] = self.replaces_key
        return out


SCOPE_ADMIN = "admin"
SCOPE_UPLOAD = "upload"
SCOPE_READ = "read"
SCOPES = (SCOPE_ADMIN, SCOPE_UPLOAD, SCOPE_READ)
"""What a token (and a session opened with it) may do: everything; declare, upload, resume and
check files; or list, show and download them."""


@dataclass(frozen=True)
class TokenGrant:
    """What a token grants: a ``scope``, and one job only when ``job_id`` is set.

    ``id`` names the token for listing and revoking; it is a prefix of the token's
    SHA-256, so it grants nothing.
    """

    id: str
    label: str
    scope: str
    job_id: str | None
    created: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "scope": self.scope, "job": self.job_id,
                "created": self.created}


@dataclass(frozen=True)
class Session:
    """Permission to move the files of one job until ``expires`` or until closed.

    ``scope`` is that of the token that opened it: an ``upload`` session cannot
    download, a ``read`` session cannot upload.
    """

    key: str
    job_id: str
    created: float
    expires: float
    closed: float | None
    scope: str = SCOPE_ADMIN

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"job": self.job_id}


@dataclass(frozen=True)
class Event:
    """A job-completion event waiting in the outbox."""

    id: str
    job_id: str
    kind: str
    payload: dict[str, Any]
    created: float
    attempts: int
    delivered: float | None
    delivered_to: tuple[str, ...] = ()
