"""The HTTP upload front end: what every ``/files/`` request shares (services, CORS, finishing uploads)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from filedock import httpupload
from filedock.config import Limits
from filedock.digest import SCHEME
from filedock.errors import ErrorCode, FiledockError
from filedock.server.authority import ISessionAuthority, StoreAuthority, UploadTarget
from filedock.server.dataport.channel import RequestServices
from filedock.store.model import FILE_COMPLETE, SCOPE_ADMIN, SCOPE_UPLOAD, FileRecord, TokenGrant

UPLOADERS = (SCOPE_ADMIN, SCOPE_UPLOAD)


@implementer(ISessionAuthority)
class GrantAuthority:
    """The HTTP front end's authority.

    An HTTP request carries a bearer token, not a session: the exchange checks the
    token's scope and job against the file *before* it builds the ``Upload``, so
    ``authorize_upload`` looks at the file alone (its ``session_key`` only names the
    token's share of upload slots). Progress and completion are recorded by the data
    port's own authority, so job completion events fire alike.
    """

    def __init__(self, inner: StoreAuthority) -> None:
        self.inner = inner
        self.provisional: dict[str, int] = {}  # file key -> the size for now of an upload whose length is deferred
        self.store = inner.store
        self.limits = inner.limits

    @defer.inlineCallbacks
    def authorize_upload(self, session_key: str, file_key: str, size: int | None):
        record: FileRecord | None = yield self.store.get_file(file_key)
        if record is None:
            raise FiledockError(ErrorCode.UNKNOWN_FILE, "no such upload")
        provisional = self.provisional.get(file_key)
        if provisional is not None:  # length deferred: the PATCH in flight says how far the file goes for now
            record = replace(record, size=provisional)
        if size is not None and size != record.size:
            raise FiledockError(ErrorCode.SIZE_MISMATCH, f"the upload is {record.size} bytes, not {size}")
        if record.state == FILE_COMPLETE:
            raise FiledockError(ErrorCode.ALREADY_COMPLETE, "the upload is complete already")
        return UploadTarget(record.job_id, record.key, record.size, record.received, record.crc32,
                            record.part_stamp, record.public_name, record.id)

    def authorize_download(self, session_key: str, file_key: str) -> defer.Deferred:
        return defer.fail(FiledockError(ErrorCode.FORBIDDEN, "HTTP uploads do not download"))

    def record_progress(self, target: UploadTarget, offset: int, crc32: int, stamp: str) -> defer.Deferred:
        return self.inner.record_progress(target, offset, crc32, stamp)

    def record_complete(self, target: UploadTarget, crc32: int, digest: str) -> defer.Deferred:
        return self.inner.record_complete(target, crc32, digest)

    def record_discard(self, target: UploadTarget) -> defer.Deferred:
        return self.inner.record_discard(target)


class HttpUploads:
    """The ``/files/`` front end of one server, shared by all its HTTP upload requests.

    ``api`` checks tokens and holds the store; ``dataport`` lends its registry, stats,
    blob store and disk threads so that claims, takeover, promised space and the status
    view are one with the data port's; ``cors_origins`` are the origins a browser page
    may upload from.
    """

    TICK_SECONDS = 1.0

    def __init__(self, api: Any, dataport: Any, authority: StoreAuthority, cors_origins: tuple[str, ...] = ()) -> None:
        self.api = api
        self.store = api.store
        self.dataport = dataport
        self.limits: Limits = dataport.limits
        self.reactor = dataport.reactor
        self.cors_origins = frozenset(o.rstrip("/") for o in cors_origins)
        self.services = RequestServices(GrantAuthority(authority), dataport.blobs, dataport.limits, dataport.registry,
                                        dataport.stats, dataport.reactor, dataport.in_thread, dataport.batch_tags)
        self.finishing: dict[str, int] = {}  # file key -> the durable offset before its finish began
        self.clock = time.time

    @property
    def max_size(self) -> int:
        """The largest upload served (``Tus-Max-Size``)."""
        return min(self.limits.max_file_size, self.limits.job_quota)

    def claims(self, path: bytes) -> bool:
        """True for the paths this front end serves."""
        try:
            return httpupload.is_upload_path(path.split(b"?", 1)[0].decode("utf-8"))
        except UnicodeDecodeError:
            return False

    def exchange(self, request: Any, length: int | None):
        """The exchange that serves ``request`` (its headers are in, its body is not)."""
        from filedock.server.http_upload.exchange import HttpExchange

        exchange = HttpExchange(self, request, length)
        exchange.begin()
        return exchange

    def cors_headers(self, origin: str | None, preflight: bool) -> dict[str, str]:
        """CORS headers for a request from ``origin``: none unless it is configured."""
        if not origin or origin.rstrip("/") not in self.cors_origins:
            return {}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if preflight:
            headers["Access-Control-Allow-Methods"] = ", ".join(httpupload.ALLOWED_METHODS)
            headers["Access-Control-Allow-Headers"] = ", ".join(httpupload.REQUEST_HEADERS)
            headers["Access-Control-Max-Age"] = "86400"
        else:
            headers["Access-Control-Expose-Headers"] = ", ".join(httpupload.EXPOSED_HEADERS)
        return headers

    def expires(self, record: FileRecord) -> float | None:
        """When the stale-partial sweeper may take this unfinished upload (``partial_ttl`` after its
        last progress); None for a complete file and for one that holds nothing yet (never swept)."""
        if record.state == FILE_COMPLETE or not record.received:
            return None
        return record.updated + self.limits.partial_ttl

    def state_of(self, record: FileRecord, finishing: bool = False, deferred: bool = False,
                 concat: str | None = None) -> httpupload.UploadState:
        """What to report of ``record`` (``deferred``: its length is not known yet; ``concat``: its
        ``Upload-Concat``)."""
        complete = record.state == FILE_COMPLETE
        return httpupload.UploadState(
            offset=record.size if complete else record.received, length=None if deferred else record.size,
            expires=self.expires(record), digest=f"{SCHEME}={record.digest}" if complete and record.digest else None,
            finishing=finishing, max_size=self.max_size, max_age=int(self.limits.partial_ttl), concat=concat)

    @staticmethod
    def may_upload(grant: TokenGrant, job_id: str) -> None:
        """Refuse (403 forbidden) a grant that may not upload into ``job_id``."""
        if grant.scope not in UPLOADERS:
            raise FiledockError(ErrorCode.FORBIDDEN, f"a token of scope {grant.scope!r} may not upload")
        if grant.job_id is not None and grant.job_id != job_id:
            raise FiledockError(ErrorCode.FORBIDDEN, f"this token is for job {grant.job_id} only")
