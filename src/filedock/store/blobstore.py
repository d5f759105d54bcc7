"""What the server needs from a place that holds file bytes: the blob-store interface.

Two implementations: ``blobs.BlobStore`` (the data dir, the default) and
``s3.S3BlobStore`` (a bucket of S3-compatible object storage, shared by several
servers). The data port, the control API, the sweeper and ``fsck`` use only what
is named here. Every method may block (disk or network): call them off the reactor.

A partial is opened at the checkpoint its record names (offset, CRC-32, stamp);
the writer takes bytes (``write``), makes them durable (``checkpoint``, whose
result is what may be recorded), and ends with ``finish`` (seal, verify the digest,
publish) or ``close`` (kept for a resume). The complete file appears only once
``finish`` verified it.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Protocol, runtime_checkable

from filedock.store.blobs import BatchEntry, Checkpoint, PrefixLost

__all__ = ["BatchEntry", "BatchWriterLike", "BlobStorage", "Checkpoint", "PartialWriterLike", "PrefixLost",
           "StoredBlob", "open_blob_store"]


class PartialWriterLike(Protocol):
    """One partial being appended to (``PartialWriter`` for the data dir, ``S3PartialWriter`` for a bucket)."""

    on_drain: Callable[[], None] | None
    needs_record: bool
    closed: bool

    @property
    def offset(self) -> int:
        """Bytes accepted so far."""

    def write(self, data: bytes | memoryview) -> bool:
        """Append; True means "stop reading until ``on_drain``"."""

    def snapshot(self, strict: bool = True) -> tuple[int, int]:
        """(offset, crc32) of everything written so far."""

    def checkpoint(self) -> Checkpoint:
        """Make everything written durable where every server can read it; returns what to record."""

    def seal(self) -> tuple[int, str]:
        """Make everything durable and close; returns (crc32, digest)."""

    def publish(self) -> None:
        """Make the sealed partial the complete file."""

    def finish(self, expected_digest: str | None = None) -> tuple[int, str]:
        """Seal, compare the digest (``digest-mismatch``: nothing published), publish."""

    def close(self) -> None:
        """Stop; the partial stays for a resume."""


class BatchWriterLike(Protocol):
    """The small files of one ``BATCH``."""

    on_drain: Callable[[], None] | None
    entries: list[BatchEntry]
    bytes: int
    tag: str

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted, not yet written."""

    def begin(self, key: str, size: int, client_digest: str) -> None:
        """Start the next file."""

    def write(self, data: bytes | memoryview) -> bool:
        """Bytes of the current file; True means "stop reading until ``on_drain``"."""

    def seal(self) -> list[BatchEntry]:
        """Wait for the writes, make them durable; each entry gets its CRC-32 and digest."""

    def publish(self, accepted: list[BatchEntry]) -> None:
        """Make the accepted entries complete files; drop the rest."""

    def discard(self) -> None:
        """Drop whatever was not published."""


class StoredBlob(Protocol):
    """One thing ``fsck`` found in a blob store (see ``BlobStorage.inventory``)."""

    job_id: str
    name: str
    kind: str  # "complete", "partial" (and its block list or tail), "upload" (an S3 multipart upload)
    size: int
    where: str


@runtime_checkable
class BlobStorage(Protocol):
    """Where file bytes live. Methods may block: call them off the reactor."""

    url: str
    """Where this store is, for messages (never with credentials)."""
    remote: bool
    """Its calls go over the network: never one on the reactor, not even a cheap-looking one."""

    def open_partial(self, job_id: str, key: str, offset: int, crc32: int, stamp: str | None,
                     recover: bool = True, size: int | None = None) -> PartialWriterLike:
        """Open a partial at the recorded checkpoint; ``PrefixLost`` if the store holds less."""

    def open_batch(self, job_id: str) -> BatchWriterLike:
        """A writer for one ``BATCH`` into the job."""

    def unrecorded_size(self, job_id: str, key: str) -> int:
        """Size of a complete file in place whose completion was never recorded (0: none)."""

    def open_complete(self, job_id: str, key: str) -> BinaryIO:
        """A complete file as a readable, seekable binary stream (bounded reads)."""

    def complete_size(self, job_id: str, key: str) -> int | None:
        """The complete file's size, or None if there is none."""

    def free_bytes(self) -> int:
        """Room left for bytes (object storage: effectively unbounded)."""

    def discard(self, job_id: str, key: str) -> None:
        """Delete a partial (and whatever it keeps beside it)."""

    def delete_file(self, job_id: str, key: str) -> None:
        """Delete everything stored for one file."""

    def forget(self, job_id: str, key: str) -> None:
        """Delete what an upload of a deleted file left."""

    def delete_job(self, job_id: str) -> None:
        """Delete everything of a job."""

    def sweep_staging(self, active_tags: set[str], older_than: float) -> int:
        """Delete staging leftovers of batches that are gone; returns how many."""

    def close(self) -> None:
        """Let go of threads and connections this store made."""


def _direct_io_option(query: str) -> bool:
    """A file URL's query: nothing, or ``direct_io=on|off`` (``BlobStore``'s ``direct_io``)."""
    from urllib.parse import parse_qs

    from filedock.errors import ErrorCode, FiledockError

    if not query:
        return True
    try:
        options = parse_qs(query, strict_parsing=True)
    except ValueError:
        options = {}
    value = options.pop("direct_io", [""])[-1].lower()
    if options or value not in ("on", "off"):
        raise FiledockError(ErrorCode.BAD_BLOBS_URL,
                            f"--blobs: a file URL takes one option, direct_io=on or direct_io=off, not {query[:100]!r}")
    return value == "on"


def open_blob_store(url: str | None, data_dir, work_queue=None) -> BlobStorage:
    """The blob store a ``--blobs`` URL names: ``file:///dir`` (default: ``data_dir``) or ``s3://bucket/prefix?...``.

    Raises ``FiledockError(bad-config)`` for a URL it cannot use, and (S3) for a bucket
    it cannot reach, so a server fails at start with one clear line.
    """
    from urllib.parse import urlsplit

    from filedock.errors import ErrorCode, FiledockError
    from filedock.store.blobs import BlobStore

    if not url:
        return BlobStore(data_dir, work_queue)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise FiledockError(ErrorCode.BAD_BLOBS_URL, f"--blobs: a file URL is file:///absolute/dir, not {url[:200]!r}")
        return BlobStore(parts.path, work_queue, direct_io=_direct_io_option(parts.query))
    if scheme == "s3":
        from filedock.store.s3 import S3BlobStore

        return S3BlobStore.from_url(url, work_queue)
    raise FiledockError(ErrorCode.BAD_BLOBS_URL,
                        f"--blobs: use file:///dir or s3://bucket/prefix?endpoint=URL, not {url[:200]!r}")

