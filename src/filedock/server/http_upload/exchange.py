"""One HTTP upload request (tus or the IETF draft): an ``IRequestChannel`` around the data port's ``Upload``.

The exchange is made as soon as the request's headers are in, before a byte of its
body is read (twisted.web's ``Request`` would spool the whole body first). It
authenticates from the headers, asks ``filedock.httpupload`` what the request is,
claims the file through the shared upload registry (taking over an older request
at once), and only then lets the body flow, chunk by chunk, into the ``Upload``,
pausing the transport while the blob store is behind. When the body ends (or the
connection drops) what arrived is checkpointed and recorded before any offset is
reported, exactly like the data port's ``OFFSET``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from zope.interface import implementer

from filedock import httpupload, wire
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.authority import UploadTarget
from filedock.server.dataport.channel import IRequestChannel
from filedock.server.dataport.upload import PAUSED, Upload
from filedock.store.concat import PartSource, concatenate
from filedock.store.model import FILE_COMPLETE, FileRecord, TokenGrant, part_name

log = Logger(namespace="filedock.http_upload")

STATUS = {
    ErrorCode.UNAUTHORIZED.value: 401, ErrorCode.FORBIDDEN.value: 403, ErrorCode.NOT_FOUND.value: 404,
    ErrorCode.UNKNOWN_FILE.value: 404, ErrorCode.GONE.value: 410, ErrorCode.EXPIRED.value: 410,
    ErrorCode.CONFLICT.value: 409, ErrorCode.QUOTA_EXCEEDED.value: 413, ErrorCode.TOO_LARGE.value: 413,
    ErrorCode.BAD_OFFSET.value: 409, ErrorCode.ALREADY_COMPLETE.value: 409, ErrorCode.SIZE_MISMATCH.value: 409,
    ErrorCode.TAKEN_OVER.value: 409, ErrorCode.IDLE_TIMEOUT.value: 408, ErrorCode.SESSION_CLOSED.value: 409,
    ErrorCode.NO_SPACE.value: 507, ErrorCode.TOO_MANY_CONNECTIONS.value: 503, ErrorCode.INTERNAL_ERROR.value: 500,
    ErrorCode.SHORT_UPLOAD.value: 400, ErrorCode.CHECKSUM_MISMATCH.value: 460,
}
"""The HTTP status of each filedock error on ``/files/``; any other is a 400."""


def as_http_error(err: FiledockError) -> httpupload.HttpUploadError:
    """A filedock refusal as an HTTP upload refusal."""
    code = err.code_str
    headers = {"WWW-Authenticate": 'Bearer realm="filedock"'} if code == ErrorCode.UNAUTHORIZED.value else {}
    return httpupload.HttpUploadError(STATUS.get(code, 400), code, err.message, headers)


@implementer(IRequestChannel)
class HttpExchange:
    """One ``/files/`` request, from its headers to its response.

    It is the ``IRequestChannel`` of at most one ``Upload`` and quacks like a data-port
    connection for the data port's hooks (``job_id``, ``session_key``, ``request``,
    ``end_job``, ``interrupt``, ``transport``, ``released``), so deleting a job, closing
    down the server and taking over reach HTTP uploads too.
    """

    EARLY_LIMIT = 8 << 20
    """Most body bytes held while the request is decided (what the last reads carried after the headers)."""

    def __init__(self, front: Any, request: Any, length: int | None) -> None:
        self.front, self.http, self.length = front, request, length
        self.expects_body = length is None or length > 0  # None: chunked
        self.method = request.channel._command.decode("latin-1").upper()  # request.method is set later
        self.version = request.channel._version  # and request.clientproto too
        self.path = request.channel._path.split(b"?", 1)[0].decode("utf-8", "replace")
        self.origin: str | None = None
        self.peer = getattr(request.getClientAddress(), "host", "-")
        self.speaker: httpupload.Speaker | None = None
        self.event: Any = None
        self.grant: TokenGrant | None = None
        self.job_id: str | None = None
        self.session_key: str | None = None
        self.request: Upload | None = None  # the data port's name for the request object
        self.released = defer.Deferred()
        self.answered = False
        self.body_ended = False
        self._body_done = defer.Deferred()
        self._lost = False
        self._ended = False  # the upload must stop: the client gone, taken over, refused
        self._pauses: set[str] = set()
        self._early: list[bytes] = []  # body bytes that came before the upload accepted them
        self._early_bytes = 0
        self._receiving = False
        self._hashers: list[tuple[httpupload.Checksum, httpupload.ChunkHasher]] = []
        self._starting: defer.Deferred | None = None
        self._closing: defer.Deferred | None = None
        self._stored: tuple[int, str] | None = None
        self._timer: Any = None
        self._last_activity = front.reactor.seconds()
        self._finishing = False

    @property
    def transport(self) -> Any:
        """The connection's transport (None once it is gone)."""
        channel = self.http.channel
        return channel.transport if channel is not None else None

    # ------------------------------------------------------------ from the site

    def begin(self) -> None:
        """The headers are in: decide, with reading paused until the upload accepts the body."""
        self.pause_reading("start")
        d = self._run()
        d.addErrback(self._failed)
        # once it is served and its request finished (or its connection gone), let go of both sides
        finished = self.http.notifyFinish()
        finished.addErrback(lambda _: None)
        defer.DeferredList([d, finished]).addCallback(self._let_go)

    def _let_go(self, _: Any) -> None:
        """The upload holds this exchange as its channel, and the HTTP request holds it as its
        ``http_upload``: both cycles go now, so a finished exchange (and its request, its upload and
        its writer) is freed at once, not by the next full garbage collection."""
        self._receiving = False
        self.request = None
        # a lost connection's failure: its exception's traceback holds the frames that waited on it (and
        # so this exchange); consumed here, as every waiter has had it
        self._body_done.addErrback(lambda _: None)
        self._body_done = defer.succeed(None)
        if getattr(self.http, "http_upload", None) is self:
            self.http.http_upload = None

    def receive(self, data: bytes) -> None:
        """Body bytes, as twisted.web decodes them."""
        self._last_activity = self.front.reactor.seconds()
        if self._receiving:
            for _, hasher in self._hashers:
                hasher.update(data)
            self.request.receive(data)
        elif not self.answered and not self._ended:
            # the rest of the read that carried the headers (reading is paused): never dropped, and bounded
            self._early_bytes += len(data)
            if self._early_bytes > self.EARLY_LIMIT:
                self.refused(ErrorCode.TOO_MANY_CONNECTIONS, "the body came before the server could take it")
                return
            self._early.append(data)

    def content_ended(self) -> None:
        """The whole body arrived."""
        self.body_ended = True
        if not self._body_done.called:
            self._body_done.callback(None)

    def connection_lost(self) -> None:
        """The connection went before the response was sent."""
        self._lost = True
        self._ended = True
        if not self._body_done.called:
            self._body_done.errback(Failure(FiledockError(ErrorCode.SHORT_UPLOAD, "the connection was lost")))
        if self.request is not None and not self._finishing:
            self.request.note_outcome(ErrorCode.SHORT_UPLOAD.value)
            self._close_upload()

    # ------------------------------------------------------------ deciding

    def _headers(self) -> dict[str, str]:
        headers = {}
        for name, values in self.http.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = ", ".join(v.decode("latin-1") for v in values)
        return headers

    @defer.inlineCallbacks
    def _run(self):
        method, path = self.method, self.path
        headers = self._headers()
        self.origin = headers.get("origin")
        try:
            try:
                self.speaker = httpupload.speaker_of(headers)
            except httpupload.HttpUploadError:
                pass  # parse_request says it again
            if method == "OPTIONS":
                yield self._options(headers)
                return
            self.event = event = httpupload.parse_request(method, path, headers, self.front.max_size)
            self.speaker = event.speaker
            self.grant = yield self._authenticate()
            if isinstance(event, httpupload.Create):
                yield self._create(event)
            elif isinstance(event, httpupload.Probe):
                yield self._probe(event)
            elif isinstance(event, httpupload.Append):
                record = yield self._record(event.key)
                record, deferred = yield self._before_append(record, event.length)
                yield self._append(record, event.offset, event.complete, event.checksum, event.repr_digest,
                                   event.length, deferred=deferred)
            elif isinstance(event, httpupload.Terminate):
                yield self._terminate(event)
        except httpupload.HttpUploadError as err:
            yield self._refuse(err)
        except FiledockError as err:
            yield self._refuse(as_http_error(err))
        finally:
            if self.request is not None:
                yield self._close_upload()  # after a refusal too: settle what it holds, let go

    def _failed(self, failure: Failure) -> None:
        log.failure("HTTP upload: {method} failed", failure, method=self.method)
        self._refuse(httpupload.HttpUploadError(500, ErrorCode.INTERNAL_ERROR.value,
                                                "internal error; the server log has details"))

    @defer.inlineCallbacks
    def _authenticate(self):
        from filedock.server.api import bearer_token

        token = bearer_token(self.http)  # 401 without one, 400 for two
        grant = yield self.front.api.check_token(self.http, token)
        if grant is None:
            raise FiledockError(ErrorCode.UNAUTHORIZED, "the token is not valid")
        channel = self.http.channel
        if channel is not None and hasattr(channel, "admitted"):
            channel.admitted()  # not dropped to make room for newcomers
        self.session_key = f"http:{grant.id}"
        return grant

    @defer.inlineCallbacks
    def _record(self, key: str):
        """The file behind ``/files/<key>`` if this token may upload to it: 404, 403 or 410 otherwise."""
        record: FileRecord | None = yield self.front.store.get_file(key)
        if record is None or record.replaces:
            raise httpupload.HttpUploadError(404, ErrorCode.NOT_FOUND.value, "no such upload")
        self.front.may_upload(self.grant, record.job_id)
        expires = self.front.expires(record)
        if expires is not None and expires < self.front.clock():
            raise httpupload.HttpUploadError(410, ErrorCode.EXPIRED.value,
                                             "the upload expired; its bytes are swept; create it again")
        self.job_id = record.job_id
        return record

    def _options(self, headers: dict[str, str]) -> defer.Deferred:
        status, out = httpupload.options_response(self.front.max_size)
        if "access-control-request-method" in headers:
            out.update(self.front.cors_headers(self.origin, preflight=True))
            status = 204 if self.front.cors_headers(self.origin, True) else 200
        return self._respond(status, out)

    # ------------------------------------------------------------ creation

    @defer.inlineCallbacks
    def _create(self, event: httpupload.Create):
        from filedock.server.api import check_file_name

        metadata = event.metadata
        job_ref = metadata.get("job") or (self.grant.job_id if self.grant.job_id else None)
        if not job_ref:
            raise httpupload.HttpUploadError(400, ErrorCode.BAD_REQUEST.value,
                                             "name the job in Upload-Metadata ('job', its name or id)")
        name = metadata.get("filename") or metadata.get("name")
        if event.partial:
            name = part_name(str(uuid.uuid4()))  # a part is hidden: its name in the job is ours, never the client's
        elif not name:
            raise httpupload.HttpUploadError(400, ErrorCode.BAD_REQUEST.value,
                                             "name the file in Upload-Metadata ('filename' or 'name')")
        else:
            check_file_name(name)
        if self.grant.scope not in ("admin", "upload"):
            raise FiledockError(ErrorCode.FORBIDDEN, f"a token of scope {self.grant.scope!r} may not upload")
        job = yield self._job(job_ref)
        if event.partial or event.final is not None:
            yield self._create_concatenation(job, name, event)
            return
        if event.deferred:
            yield self._create_deferred(job, name, event)
            return
        self.front.may_upload(self.grant, job.id)
        record: FileRecord = yield self.front.store.add_file(job.id, name, event.length, self.front.limits.job_quota)
        yield self._created(record, name, event)

    @defer.inlineCallbacks
    def _job(self, job_ref: str):
        """The job ``job_ref`` names, if this token may upload to it: 404 or 403 otherwise."""
        job = yield self.front.store.find_job(job_ref)
        if job is None:
            if self.grant.job_id is not None:  # a token of one job learns nothing of others
                raise FiledockError(ErrorCode.FORBIDDEN, f"this token is for job {self.grant.job_id} only")
            raise httpupload.HttpUploadError(404, ErrorCode.NOT_FOUND.value,
                                             f"no job {job_ref[:200]!r}: create it first (filedock job create)")
        self.front.may_upload(self.grant, job.id)
        return job

    @defer.inlineCallbacks
    def _created(self, record: FileRecord, name: str, event: httpupload.Create, deferred: bool = False):
        """A new upload's record is made: say where it is (and store the creation's body, if any)."""
        self.job_id = record.job_id
        location = self._location(record.key)
        log.info("HTTP upload created: job={job} file={name!r} key={key} size={size} via {dialect}",
                 job=short_key(record.job_id), name=name, key=short_key(record.key),
                 size="deferred" if deferred else record.size,
                 dialect=self.speaker.dialect.value)
        if self.speaker.dialect is httpupload.Dialect.DRAFT and self.version == b"HTTP/1.1" \
                and self.transport is not None:
            self.transport.write(httpupload.informational_104(
                self.speaker, location, httpupload.upload_limit(self.front.max_size, int(self.front.limits.partial_ttl))))
        if event.has_body or event.length == 0 or event.complete:
            yield self._append(record, 0, event.complete, event.checksum, event.repr_digest, None, location,
                               deferred)
            return
        yield self._body()
        status, headers = httpupload.create_response(
            self.speaker, location, self.front.state_of(record, deferred=deferred,
                                                        concat="partial" if record.is_part else None))
        yield self._respond(status, headers)

    @defer.inlineCallbacks
    def _create_deferred(self, job: Any, name: str, event: httpupload.Create):
        """creation-defer-length: a file of size 0 whose length a later PATCH tells (the quota is checked then)."""
        record: FileRecord = yield self.front.store.add_file(job.id, name, 0, self.front.limits.job_quota)
        yield self.front.store.set_upload_info(record.key, True, None)
        yield self._created(record, name, event, deferred=True)

    @defer.inlineCallbacks
    def _create_concatenation(self, job: Any, name: str, event: httpupload.Create):
        """A part (``Upload-Concat: partial``): a hidden file record of the job, uploaded like any file.
        A final (``Upload-Concat: final;...``): see ``_create_final``."""
        if event.final is not None:
            yield self._create_final(job, name, event.final)
            return
        if event.deferred:
            yield self._create_deferred(job, name, event)
            return
        record: FileRecord = yield self.front.store.add_file(job.id, name, event.length, self.front.limits.job_quota)
        yield self._created(record, name, event)

    @defer.inlineCallbacks
    def _final_parts(self, job_id: str, keys: tuple[str, ...]):
        """The parts a final names, in order: each must be a complete part of the final's job."""
        found = yield self.front.store.files_by_keys(list(keys))
        by_key = {r.key: r for r in found}
        parts = []
        for index, key in enumerate(keys, start=1):
            part = by_key.get(key)
            if part is None:
                raise httpupload.HttpUploadError(404, ErrorCode.UNKNOWN_FILE.value, f"part {index}: no such upload")
            self.front.may_upload(self.grant, part.job_id)
            if part.job_id != job_id:
                raise httpupload.HttpUploadError(403, ErrorCode.FORBIDDEN.value,
                                                 f"part {index} belongs to another job than the final upload")
            if not part.is_part:
                raise httpupload.HttpUploadError(400, ErrorCode.BAD_REQUEST.value,
                                                 f"part {index} was not created with Upload-Concat: partial")
            if part.state != FILE_COMPLETE:
                # concatenation-unfinished is not served: the final's bytes are made at once, all durable
                raise httpupload.HttpUploadError(400, ErrorCode.NOT_COMPLETE.value,
                                                 f"part {index} holds {part.received} of {part.size} bytes: "
                                                 f"finish every part before the final upload")
            parts.append(part)
        return parts

    @defer.inlineCallbacks
    def _create_final(self, job: Any, name: str, keys: tuple[str, ...]):
        """``Upload-Concat: final;<url> ...``: a file of the job whose bytes are its complete parts' in order,
        made durable (fsync'd, checked, renamed, recorded) before the 201; then the parts go."""
        s, registry = self.front.services, self.front.services.registry
        concat = "final;" + " ".join(f"{httpupload.PATH_PREFIX}{key}" for key in keys)
        try:
            parts = yield self._final_parts(job.id, keys)
        except httpupload.HttpUploadError as err:
            done = yield self._same_final(job.id, name, concat) if err.status == 404 else None
            if done is None or done.state != FILE_COMPLETE:
                raise
            # the client sends again a final that was made (its response lost): the same answer
            yield self._respond(*httpupload.create_response(self.speaker, self._location(done.key),
                                                            self.front.state_of(done, concat=concat)))
            return
        size = sum(p.size for p in parts)
        if size > self.front.max_size:
            raise httpupload.HttpUploadError(413, ErrorCode.TOO_LARGE.value,
                                             f"uploads may be at most {self.front.max_size} bytes")
        claims = []
        try:
            for part in parts:  # no other final, termination or sweep of these parts meanwhile
                claim = yield registry.try_acquire(part.key)
                if claim is None:
                    raise httpupload.HttpUploadError(409, ErrorCode.CONFLICT.value,
                                                     "a part is in use (by another final upload?)")
                claims.append(claim)
            # the parts' bytes count against the quota already: the final is checked by its parts'
            try:
                final: FileRecord = yield self.front.store.add_file(job.id, name, size, None)
                yield self.front.store.set_upload_info(final.key, False, concat)
            except FiledockError as err:
                final = yield self._same_final(job.id, name, concat) if err.code is ErrorCode.CONFLICT else None
                if final is None or final.state == FILE_COMPLETE:
                    raise
                # a final whose making was cut short (a crash): made again from its parts, which are all here
            self.job_id = job.id
            self.front.finishing[final.key] = 0
            try:
                crc, digest = yield s.in_thread(concatenate, s.blobs, job.id, final.blob_name,
                                                [PartSource(p.blob_name, p.size, p.crc32) for p in parts])
            except BaseException:
                yield self.front.store.delete_file(final.key)
                raise
            finally:
                self.front.finishing.pop(final.key, None)
            yield s.authority.record_complete(_target(final), crc, digest)
            yield self.front.store.delete_parts([p.key for p in parts])
            for part in parts:
                yield s.in_thread(s.blobs.delete_file, part.job_id, part.blob_name)
        finally:
            for claim in claims:
                registry.release(claim)
        log.info("HTTP upload concatenated: job={job} file={name!r} key={key} size={size} from {n} parts",
                 job=short_key(job.id), name=name, key=short_key(final.key), size=size, n=len(parts))
        record = yield self.front.store.get_file(final.key)
        status, headers = httpupload.create_response(self.speaker, self._location(final.key),
                                                     self.front.state_of(record, concat=concat))
        yield self._respond(status, headers)

    @defer.inlineCallbacks
    def _same_final(self, job_id: str, name: str, concat: str):
        """The job's file ``name`` if it is a final upload made (or being made) of the same parts, else None."""
        for record in (yield self.front.store.list_files(job_id)):
            if record.name == name:
                _, made_of = yield self.front.store.upload_info(record.key)
                return record if made_of == concat else None
        return None

    def _location(self, key: str) -> str:
        host = (self.http.getHeader(b"host") or b"").decode("latin-1")
        scheme = "https" if self.http.isSecure() else "http"
        if re.fullmatch(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", host):
            return f"{scheme}://{host}{httpupload.PATH_PREFIX}{key}"
        return f"{httpupload.PATH_PREFIX}{key}"  # no Host, or one that is not a host: a relative URL

    # ------------------------------------------------------------ offsets

    @defer.inlineCallbacks
    def _probe(self, event: httpupload.Probe):
        record = yield self._record(event.key)
        deferred, concat = yield self.front.store.upload_info(event.key)
        concat = "partial" if record.is_part else concat
        if record.state != FILE_COMPLETE and event.key in self.front.finishing:
            # the last bytes are being made durable: say so now rather than wait (uppy#4743)
            status, headers = httpupload.probe_response(self.speaker, self.front.state_of(
                record, finishing=True, deferred=deferred, concat=concat))
            yield self._respond(status, headers)
            return
        if record.state != FILE_COMPLETE:
            # hold the file for an instant: an older request on it checkpoints, records and lets go first
            registry = self.front.services.registry
            claim = yield registry.acquire(event.key, self.session_key, self.front.limits.max_connections_per_session,
                                           lambda: None)
            try:
                record = yield self._record(event.key)
                deferred, _ = yield self.front.store.upload_info(event.key)
            finally:
                registry.release(claim)
        status, headers = httpupload.probe_response(self.speaker, self.front.state_of(record, deferred=deferred,
                                                                                      concat=concat))
        yield self._respond(status, headers)

    @defer.inlineCallbacks
    def _terminate(self, event: httpupload.Terminate):
        record = yield self._record(event.key)
        if record.is_part:
            yield self._terminate_part(record)
            return
        if record.state == FILE_COMPLETE:
            raise httpupload.HttpUploadError(409, ErrorCode.ALREADY_COMPLETE.value,
                                             "the upload is complete: delete the file through the API")
        registry, s = self.front.services.registry, self.front.services
        claim = yield registry.acquire(event.key, self.session_key, self.front.limits.max_connections_per_session,
                                       lambda: None)
        try:
            record = yield self._record(event.key)
            yield s.authority.record_discard(_target(record))  # the record first: it never claims bytes that are gone
            yield s.in_thread(s.blobs.discard, record.job_id, record.blob_name)
            yield self.front.store.delete_file(event.key)
        finally:
            registry.release(claim)
        log.info("HTTP upload terminated: key={key}", key=short_key(event.key))
        yield self._respond(204, httpupload.base_headers(self.speaker))

    # ------------------------------------------------------------ appending

    @defer.inlineCallbacks
    def _before_append(self, record: FileRecord, length: int | None):
        """A PATCH's record: a final upload refuses it (403); a deferred length is declared if the PATCH
        carries it (the job's quota checked now). Returns (record, length still deferred)."""
        deferred, concat = yield self.front.store.upload_info(record.key)
        if concat is not None and concat.startswith("final"):
            raise httpupload.HttpUploadError(403, ErrorCode.FORBIDDEN.value,
                                             "a final upload (Upload-Concat: final) takes no PATCH: its bytes "
                                             "are its parts'")
        if deferred and length is not None:
            record = yield self.front.store.declare_length(record.key, length, self.front.limits.job_quota)
            log.info("HTTP upload length declared: key={key} size={size}", key=short_key(record.key), size=length)
            deferred = False
        return record, deferred

    @defer.inlineCallbacks
    def _append(self, record: FileRecord, offset: int, complete: bool | None, checksum: Any, repr_digest: Any,
                length: int | None, location: str | None = None, deferred: bool = False,
                provisional: bool = False):
        if deferred:
            yield self._append_deferred(record, offset, checksum, location)
            return
        if length is not None and length != record.size:
            raise httpupload.HttpUploadError(400, ErrorCode.SIZE_MISMATCH.value,
                                             f"the upload is {record.size} bytes, not {length}")
        if record.state == FILE_COMPLETE:
            yield self._already_complete(record, offset)
            return
        self.request = Upload(self.front.services, self, wire.UploadRequest(self.session_key, record.key, record.size))
        self.request.hold_checkpoints = checksum is not None or repr_digest is not None
        self._starting = self.request.start()
        try:
            yield self._starting
        except FiledockError as err:
            if err.code is not ErrorCode.ALREADY_COMPLETE:
                raise
            # an older request finished the file while this one waited for it
            record = yield self.front.store.get_file(record.key)
            yield self._already_complete(record, offset)
            return
        finally:
            self._starting = None
        if self._ended:
            return  # taken over or gone while it started: the clean-up is under way
        held = self.request.writer.offset
        if held != offset:
            state = self.front.state_of(record)
            state = httpupload.UploadState(held, record.size, state.expires, None, False, state.max_size, state.max_age)
            raise httpupload.offset_mismatch(self.speaker, state, offset)
        sent = self.length if self.length is not None else 0
        if self.length is not None and offset + sent > record.size:
            raise httpupload.HttpUploadError(413, ErrorCode.TOO_LARGE.value,
                                             f"the upload is {record.size} bytes; {offset} + {sent} is more")
        if checksum is not None:
            self._hashers.append((checksum, checksum.hasher()))
        if repr_digest is not None and offset == 0 and complete:
            self._hashers.append((repr_digest, repr_digest.hasher()))  # this request carries every byte
        self._receiving = True
        self._expect_body()
        early, self._early = self._early, []
        for data in early:
            self.receive(data)
        self.resume_reading("start")
        try:
            yield self._body()
        except FiledockError:
            return  # the connection went: connection_lost settles what arrived
        if self._ended:
            return
        self._receiving = False
        self._stop_timer()
        upload = self.request
        for wanted, hasher in self._hashers:
            if not httpupload.checksum_matches(wanted, hasher):
                upload.roll_back()
                upload.outcome = ErrorCode.CHECKSUM_MISMATCH.value
                yield self._close_upload()
                raise httpupload.checksum_failed(self.speaker)
        upload.hold_checkpoints = False
        if upload.writer.offset >= record.size and not provisional:
            yield self._finish(upload, record, location)
            return
        if complete:  # the draft client said this was the last byte, but bytes are missing
            upload.note_outcome(ErrorCode.SHORT_UPLOAD.value)
            yield self._close_upload()
            raise httpupload.HttpUploadError(400, ErrorCode.SHORT_UPLOAD.value,
                                             f"Upload-Complete: ?1 but the upload holds {upload.writer.offset} of "
                                             f"{record.size} bytes")
        upload.note_outcome(PAUSED)
        yield self._close_upload()  # checkpoint and record: the offset we report is durable
        record = yield self.front.store.get_file(record.key)
        state = self.front.state_of(record, deferred=provisional, concat="partial" if record.is_part else None)
        if location is not None:
            status, headers = httpupload.create_response(self.speaker, location, state)
        else:
            status, headers = httpupload.append_response(self.speaker, state)
        yield self._respond(status, headers)

    @defer.inlineCallbacks
    def _append_deferred(self, record: FileRecord, offset: int, checksum: Any, location: str | None):
        """A PATCH (or a creation's body) to an upload whose length is still deferred: its bytes are stored
        and made durable like any; the file is never complete until a PATCH with Upload-Length says how
        long it is. The request must say how many bytes it carries (Content-Length)."""
        if self.length is None:
            raise httpupload.HttpUploadError(400, ErrorCode.BAD_REQUEST.value,
                                             "the upload's length is deferred: send Upload-Length, or a "
                                             "Content-Length with this request")
        end = offset + self.length
        if end > self.front.max_size:
            raise httpupload.HttpUploadError(413, ErrorCode.TOO_LARGE.value,
                                             f"uploads may be at most {self.front.max_size} bytes")
        if not self.length:
            state = self.front.state_of(record, deferred=True)
            if offset != record.received:
                raise httpupload.offset_mismatch(self.speaker, state, offset)
            yield self._respond(*(httpupload.create_response(self.speaker, location, state) if location else
                                  httpupload.append_response(self.speaker, state)))
            return
        provisional = self.front.services.authority.provisional
        provisional[record.key] = end  # the Upload holds this request's bytes: its end is the size for now
        try:
            yield self._append(replace(record, size=end), offset, None, checksum, None, None, location,
                               provisional=True)
        finally:
            if provisional.get(record.key) == end:
                del provisional[record.key]

    @defer.inlineCallbacks
    def _terminate_part(self, record: FileRecord):
        """DELETE of a part (complete or not): it goes, record and bytes, like an abandoned one."""
        s, registry = self.front.services, self.front.services.registry
        claim = yield registry.acquire(record.key, self.session_key, self.front.limits.max_connections_per_session,
                                       lambda: None)
        try:
            yield self.front.store.delete_parts([record.key])
            yield s.in_thread(s.blobs.delete_file, record.job_id, record.blob_name)
        finally:
            registry.release(claim)
        log.info("HTTP upload part terminated: key={key}", key=short_key(record.key))
        yield self._respond(204, httpupload.base_headers(self.speaker))

    @defer.inlineCallbacks
    def _already_complete(self, record: FileRecord, offset: int):
        """An append to a complete upload: 204 if it sends nothing from the end, else 409 at the end."""
        state = self.front.state_of(record)
        if offset == record.size and not self.expects_body:
            status, headers = httpupload.append_response(self.speaker, state)
            yield self._respond(status, headers)
            return
        raise httpupload.offset_mismatch(self.speaker, state, offset)

    @defer.inlineCallbacks
    def _finish(self, upload: Upload, record: FileRecord, location: str | None):
        key = record.key
        self._finishing = True
        self.front.finishing[key] = upload.writer.offset
        try:
            yield upload.finish(None)
        finally:
            self.front.finishing.pop(key, None)
            self._finishing = False
            yield self._close_upload()
        record = yield self.front.store.get_file(key)
        state = self.front.state_of(record)
        if location is not None:
            status, headers = httpupload.create_response(self.speaker, location, state)
        else:
            status, headers = httpupload.append_response(self.speaker, state)
        yield self._respond(status, headers)

    def _body(self) -> defer.Deferred:
        """Fires once the body ended (fails if the connection went first)."""
        d = defer.Deferred()
        self._body_done.addBoth(lambda result: (d.errback(result) if isinstance(result, Failure) else d.callback(None),
                                                result)[1])
        return d

    def _close_upload(self) -> defer.Deferred:
        """Once: the upload settles (checkpoint and record, or roll back) and lets go of the file."""
        if self._closing is None:
            upload = self.request
            self._closing = d = defer.Deferred()

            def settle(_: Any) -> defer.Deferred:
                if upload.hold_checkpoints:
                    upload.roll_back()  # unchecked bytes (a checksum still to compare) are never recorded
                return upload.settle().addErrback(upload.settle_failed)

            def release(_: Any) -> None:
                self._stop_timer()
                self.front.dataport.authorized.discard(self)
                upload.release()
                if not self.released.called:
                    self.released.callback(None)
                d.callback(None)

            start = self._starting if self._starting is not None else defer.succeed(None)
            waiting = defer.Deferred()
            start.addBoth(lambda result: (waiting.callback(None), result)[1])
            waiting.addCallback(settle).addBoth(release)
        result = defer.Deferred()
        self._closing.addBoth(lambda r: (result.callback(None), r)[1])
        return result

    # ------------------------------------------------------------ IRequestChannel

    def ended(self) -> bool:
        return self._ended

    def authorized(self, job_id: str, session_key: str | None) -> None:
        self.job_id = job_id
        self.front.dataport.authorized.add(self)

    def accepted_upload(self, offset: int) -> None:
        """The upload is claimed and open at ``offset``; ``_append`` compares it with the client's."""

    def stored(self, size: int, crc32: int, digest: str) -> None:
        self._stored = (crc32, digest)

    def refused(self, code: ErrorCode, message: str) -> None:
        code_s = code.value if isinstance(code, ErrorCode) else str(code)
        if self.request is not None:
            self.request.note_outcome(code_s)
        if self._ended:
            return
        self._ended = True
        self._receiving = False
        self._refuse(as_http_error(FiledockError(code_s, message)))
        if self.request is not None and not self._finishing:
            self._close_upload()

    def interrupt(self, code: ErrorCode, message: str) -> None:
        if self._finishing or self._ended:
            return  # a finish is never interrupted: a newer holder waits for ``released``
        self.refused(code, message)

    def end_job(self) -> None:
        """The job was deleted: end now with ``gone``; nothing of this upload is kept."""
        if self.request is not None:
            self.request.end_job()
        self.interrupt(ErrorCode.GONE, "the job was deleted; nothing of this upload is kept")

    def pause_reading(self, reason: str) -> None:
        transport = self.transport
        if not self._pauses and transport is not None and not self._lost:
            transport.pauseProducing()
        self._pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        transport = self.transport
        if not self._pauses and transport is not None and not self._lost and not self.body_ended:
            transport.resumeProducing()

    def touch(self) -> None:
        self._last_activity = self.front.reactor.seconds()

    def expect_within(self, seconds: float) -> None:
        """The idle check (every second while the body arrives) applies ``idle_timeout``."""

    def accepted_abort(self) -> None:  # pragma: no cover - HTTP uploads never abort through a request
        raise NotImplementedError

    def accepted_batch(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def batch_results(self, lines: list) -> None:  # pragma: no cover
        raise NotImplementedError

    def accepted_download(self, size: int, crc32: int, digest: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def stream(self, producer: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    def write_body(self, data: bytes) -> None:  # pragma: no cover
        raise NotImplementedError

    def finished(self) -> None:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------ timers

    def _expect_body(self) -> None:
        channel = self.http.channel
        if channel is not None and hasattr(channel, "no_deadline"):
            channel.no_deadline()  # a big body takes longer than the API's request deadline; idle_timeout applies
        transport = self.transport
        if transport is not None and hasattr(transport, "bufferSize"):
            transport.bufferSize = 1 << 20  # as on the data port: 16 times fewer reads than Twisted's 64 KiB
        self._last_activity = self.front.reactor.seconds()
        self._timer = self.front.reactor.callLater(self.front.TICK_SECONDS, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._receiving or self._ended:
            return
        now = self.front.reactor.seconds()
        if "hashing" in self._pauses:
            self._last_activity = now  # our disk is the slow one: the client waits for us
        if now - self._last_activity >= self.front.limits.idle_timeout:
            self.refused(ErrorCode.IDLE_TIMEOUT, f"nothing received for {self.front.limits.idle_timeout:g} seconds")
            transport = self.transport
            if transport is not None:
                transport.abortConnection()
            return
        self.request.tick()
        self._timer = self.front.reactor.callLater(self.front.TICK_SECONDS, self._tick)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # ------------------------------------------------------------ responses

    def _cors(self) -> dict[str, str]:
        return self.front.cors_headers(self.origin, preflight=False)

    @defer.inlineCallbacks
    def _respond(self, status: int, headers: dict[str, str], body: bytes = b""):
        """The final response, once the (empty) body ended; after a body, keep-alive works."""
        if self.answered or self._lost:
            return
        if not self.body_ended and not self.expects_body:
            try:
                yield self._body()
            except FiledockError:
                return
        if self.answered or self._lost:
            return
        self.answered = True
        request = self.http
        request.setResponseCode(status, _reason(status))
        for name, value in {**headers, **self._cors()}.items():
            request.setHeader(name, value)
        if status not in (204, 304) and self.method != "HEAD":
            request.setHeader("Content-Length", str(len(body)))
            request.write(body)
        elif status != 204:
            request.setHeader("Content-Length", "0")
        request.finish()

    def _refuse(self, err: httpupload.HttpUploadError) -> defer.Deferred:
        """A refusal: sent normally once the body is in; before that, at once and the connection closed
        (the rest of the body goes nowhere)."""
        self._ended = True
        if self.answered or self._lost:
            return defer.succeed(None)
        status, headers, body = httpupload.error_response(self.speaker, err)
        if self.body_ended or not self.expects_body:
            return self._respond(status, headers, body)
        self.answered = True
        self._receiving = False
        transport = self.transport
        if transport is None:
            return defer.succeed(None)
        self.http.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the refusal
        lines = [b"HTTP/1.1 %d %s" % (status, _reason(status)), b"Content-Length: %d" % len(body),
                 b"Connection: close"]
        lines += [f"{k}: {v}".encode("latin-1") for k, v in {**headers, **self._cors()}.items()]
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + (body if self.method != "HEAD" else b""))
        transport.loseConnection()
        self.front.reactor.callLater(2.0, self._abort_if_open)
        return defer.succeed(None)

    def _abort_if_open(self) -> None:
        transport = self.transport
        if transport is not None and not self._lost:
            transport.abortConnection()


def _reason(status: int) -> bytes:
    return {460: b"Checksum Mismatch", 104: b"Upload Resumption Supported"}.get(status) or \
        http.RESPONSES.get(status, b"Unknown")


def _target(record: FileRecord) -> UploadTarget:
    return UploadTarget(record.job_id, record.key, record.size, record.received, record.crc32, record.part_stamp,
                        record.public_name, record.id)


__all__ = ["HttpExchange", "as_http_error"]
