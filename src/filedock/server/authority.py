"""The session authority: the data port's one question to the outside world.

The data port asks "may this session write (or read) this file, and from where?"
and reports what became durable. ``StoreAuthority`` answers from filedock's own
job store; a Twisted application with sessions of its own (the 2007 design kept them
in a Perspective Broker server) implements ``ISessionAuthority`` instead and mounts
``DataPortFactory`` with it (see examples/embed_dataport.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import Interface, implementer

from filedock.config import Limits
from filedock.errors import ErrorCode, FiledockError
from filedock.store.metadata import DeferredStore
from filedock.store.model import FILE_COMPLETE, SCOPE_ADMIN, SCOPE_READ, SCOPE_UPLOAD, Session

_UPLOADERS = (SCOPE_ADMIN, SCOPE_UPLOAD)
_READERS = (SCOPE_ADMIN, SCOPE_READ)

log = Logger(namespace="filedock.authority")


@dataclass(frozen=True)
class UploadTarget:
    """A file the data port may write: where it lives and what is already durable."""

    job_id: str
    file_key: str
    size: int
    received: int
    crc32: int
    stamp: str | None
    name: str = ""
    file_id: str = ""
    replaces: str | None = None
    """The id of the file this new version replaces once complete (``upload --replace``), when known."""
    replaces_known: bool = False
    """Whether ``replaces`` was read with the record (else ``record_complete`` looks it up: one more
    round trip to the store, which PostgreSQL makes dear for many small files)."""

    @property
    def blob_name(self) -> str:
        """What the file's blobs are named on disk: its stable id (its key, if the authority has no ids)."""
        return self.file_id or self.file_key


@dataclass(frozen=True)
class DownloadSource:
    """A complete file the data port may read."""

    job_id: str
    file_key: str
    size: int
    crc32: int
    digest: str
    name: str = ""
    file_id: str = ""

    @property
    def blob_name(self) -> str:
        """What the file's blobs are named on disk: its stable id (its key, if the authority has no ids)."""
        return self.file_id or self.file_key


class ISessionAuthority(Interface):
    """What the data port needs from whoever owns sessions and file records.

    Every method returns a Deferred. Refusals fail it with ``FiledockError``
    carrying one of the protocol's error codes.
    """

    def authorize_upload(session_key: str, file_key: str, size: int | None) -> defer.Deferred:
        """-> UploadTarget, or fail (unknown-session, session-expired, unknown-file, ...).

        ``size`` is what the client announced; None for an abort, which announces none.
        """

    def authorize_download(session_key: str, file_key: str) -> defer.Deferred:
        """-> DownloadSource for a complete file."""

    def record_progress(target: UploadTarget, offset: int, crc32: int, stamp: str) -> defer.Deferred:
        """``offset`` bytes of the target are fsync'd; remember it for a resume."""

    def record_complete(target: UploadTarget, crc32: int, digest: str) -> defer.Deferred:
        """The file is fsync'd and renamed into place: record it complete."""

    def record_discard(target: UploadTarget) -> defer.Deferred:
        """The partial was deleted: the file starts again from 0."""


class IBatchAuthority(Interface):
    """Optional: what the data port needs for ``BATCH`` (many small files on one connection).

    An authority without it gets ``BATCH`` refused; single-file uploads are unaffected.
    """

    def authorize_session(session_key: str) -> defer.Deferred:
        """-> the session's job id, or fail (unknown-session, session-expired, session-closed)."""

    def authorize_batch(session_key: str, items: list[tuple[str, int]]) -> defer.Deferred:
        """For (file key, size) pairs -> {key: UploadTarget | DownloadSource | FiledockError}.

        UploadTarget: may be written; DownloadSource: complete already (with these values);
        FiledockError: refused (unknown-file, size-mismatch, too-large...).
        """

    def record_batch(items: list[tuple[UploadTarget, int, str]]) -> defer.Deferred:
        """Files fsync'd and renamed into place: record them complete, in one transaction."""


@implementer(ISessionAuthority, IBatchAuthority)
class StoreAuthority:
    """``ISessionAuthority`` backed by filedock's metadata store."""

    def __init__(self, store: DeferredStore, limits: Limits = Limits(),
                 clock: Callable[[], float] = time.time,
                 on_complete: Callable[[UploadTarget, bool], None] | None = None,
                 blobs: Any = None) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self.on_complete = on_complete
        self.blobs = blobs  # where a file replaced by a new version (upload --replace) is deleted

    @defer.inlineCallbacks
    def _replaced(self, targets: list[UploadTarget]):
        """(job id, file id) of the files that these new versions replace once recorded complete."""
        known = [(t.job_id, t.replaces) for t in targets if t.replaces_known and t.replaces]
        unknown = [t.file_key for t in targets if not t.replaces_known]
        records = (yield self.store.files_by_keys(unknown)) if unknown else []
        return known + [(r.job_id, r.replaces) for r in records if r.replaces]

    @defer.inlineCallbacks
    def _delete_replaced(self, replaced: list[tuple[str, str]]):
        """After the commit that swapped the records: the old versions' bytes go (a crash before this
        leaves an orphan that fsck reports and --repair removes)."""
        if not replaced or self.blobs is None:
            return
        try:
            yield threads.deferToThread(lambda: [self.blobs.delete_file(job_id, key) for job_id, key in replaced])
        except Exception:
            log.failure("could not delete a replaced file's bytes")

    def _check_session(self, session: Session | None) -> Session:
        if session is None:
            raise FiledockError(ErrorCode.UNKNOWN_SESSION, "no such session")
        if session.closed is not None:
            raise FiledockError(ErrorCode.SESSION_CLOSED, "the session was closed")
        if session.expires <= self.clock():
            raise FiledockError(ErrorCode.SESSION_EXPIRED, "the session has expired")
        return session

    @staticmethod
    def _check_scope(session: Session, scopes: tuple[str, ...], verb: str) -> None:
        if session.scope not in scopes:
            raise FiledockError(ErrorCode.FORBIDDEN, f"the session was opened with a {session.scope} token: "
                                                     f"it may not {verb}")

    @defer.inlineCallbacks
    def _session_and_file(self, session_key: str, file_key: str, scopes: tuple[str, ...], verb: str):
        session, record = yield self.store.session_and_file(session_key, file_key)
        self._check_scope(self._check_session(session), scopes, verb)
        if record is None or record.job_id != session.job_id:
            raise FiledockError(ErrorCode.UNKNOWN_FILE, "no such file in the session's job")
        return record

    @defer.inlineCallbacks
    def authorize_session(self, session_key: str):
        session = self._check_session((yield self.store.get_session(session_key)))
        self._check_scope(session, _UPLOADERS, "upload")
        return session.job_id

    @defer.inlineCallbacks
    def authorize_batch(self, session_key: str, items: list[tuple[str, int]]):
        session = self._check_session((yield self.store.get_session(session_key)))
        self._check_scope(session, _UPLOADERS, "upload")
        records = {r.key: r for r in (yield self.store.files_by_keys([key for key, _ in items]))}
        verdicts: dict[str, Any] = {}
        for key, size in items:
            record = records.get(key)
            if record is None or record.job_id != session.job_id:
                verdicts[key] = FiledockError(ErrorCode.UNKNOWN_FILE, "no such file in the session's job")
            elif size != record.size:
                verdicts[key] = FiledockError(ErrorCode.SIZE_MISMATCH,
                                              f"the file was declared with {record.size} bytes, not {size}")
            elif record.state == FILE_COMPLETE:
                verdicts[key] = DownloadSource(record.job_id, key, record.size, record.crc32, record.digest,
                                               record.public_name, record.id)
            else:
                verdicts[key] = UploadTarget(record.job_id, key, record.size, record.received, record.crc32,
                                             record.part_stamp, record.public_name, record.id,
                                             record.replaces, replaces_known=True)
        return verdicts

    @defer.inlineCallbacks
    def record_batch(self, items: list[tuple[UploadTarget, int, str]]):
        replaced = yield self._replaced([t for t, _, _ in items])
        completed_jobs = yield self.store.record_complete_many([(t.file_key, crc, dig) for t, crc, dig in items])
        yield self._delete_replaced(replaced)
        if self.on_complete is not None:
            done = set(completed_jobs)
            for target, _, _ in items:
                self.on_complete(target, target.job_id in done)
                done.discard(target.job_id)
        return completed_jobs

    @defer.inlineCallbacks
    def authorize_upload(self, session_key: str, file_key: str, size: int):
        record = yield self._session_and_file(session_key, file_key, _UPLOADERS, "upload")
        if size is not None and size != record.size:
            raise FiledockError(ErrorCode.SIZE_MISMATCH,
                                f"the file was declared with {record.size} bytes, not {size}")
        if record.size > self.limits.max_file_size:
            raise FiledockError(ErrorCode.TOO_LARGE, f"files may be at most {self.limits.max_file_size} bytes")
        if record.state == FILE_COMPLETE:
            raise FiledockError(ErrorCode.ALREADY_COMPLETE, "the file is complete already")
        return UploadTarget(record.job_id, record.key, record.size, record.received, record.crc32,
                            record.part_stamp, record.public_name, record.id, record.replaces, replaces_known=True)

    @defer.inlineCallbacks
    def authorize_download(self, session_key: str, file_key: str):
        record = yield self._session_and_file(session_key, file_key, _READERS, "download")
        if record.state != FILE_COMPLETE:
            raise FiledockError(ErrorCode.NOT_COMPLETE, "the file is not complete yet")
        return DownloadSource(record.job_id, record.key, record.size, record.crc32, record.digest, record.name,
                              record.id)

    def record_progress(self, target: UploadTarget, offset: int, crc32: int, stamp: str):
        return self.store.record_progress(target.file_key, offset, crc32, stamp)

    @defer.inlineCallbacks
    def record_complete(self, target: UploadTarget, crc32: int, digest: str):
        replaced = yield self._replaced([target])
        job_complete = yield self.store.record_complete(target.file_key, crc32, digest)
        yield self._delete_replaced(replaced)
        if self.on_complete is not None:
            self.on_complete(target, job_complete)
        return job_complete

    def record_discard(self, target: UploadTarget):
        return self.store.reset_file(target.file_key)

    def record_range_blocks(self, target: UploadTarget, blocks: list[tuple[int, str, int]]):
        """Blocks of a ranged upload are fsync'd: record them (index, hash hex, CRC-32)."""
        return self.store.record_range_blocks(target.file_key, blocks)

    def range_blocks(self, target: UploadTarget):
        """Fires with the durable blocks of a ranged upload: (index, hash hex, CRC-32), by index."""
        return self.store.range_blocks(target.file_key)
