"""The control API: jobs, files and sessions as HTTP/JSON on twisted.web.

One leaf resource answers every path. A small routing table maps (method, path
pattern) to a handler; a handler returns ``(status, payload)`` (or a Deferred of
it) or fails with ``FiledockError``, and one place turns either into a JSON
response. Every request needs ``Authorization: Bearer <token>``; tokens are checked
against the metadata store, which keeps only their hashes.

Client-supplied names (jobs and files) are data: they are stored and echoed, never
used as paths. Names that look like path tricks are still refused, so that a
client writing files out under their names cannot be led outside its directory.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import json
import math
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote_to_bytes

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.iweb import IRequest

import filedock
from filedock import record
from filedock.config import Limits
from filedock.digest import SCHEME
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.dataport import DataPortFactory
from filedock.server.uploadpage import UPLOAD_PAGE_CSP, upload_page_file
from filedock.store.blobstore import BlobStorage
from filedock.store.metadata import DeferredStore
from filedock.store.model import (
    FILE_COMPLETE, SCOPE_ADMIN, SCOPE_READ, SCOPE_UPLOAD, SCOPES, FileRecord, Job, Session, TokenGrant,
)

log = Logger(namespace="filedock.api")

MAX_JOB_NAME = 200
"""Longest job name, in characters."""

MAX_FILE_NAME = 1024
"""Longest file name, in characters."""

MAX_BATCH = 1000
"""Most files one ``POST /v1/jobs/<job>/files`` may declare."""

HTTP_STATUS: dict[str, int] = {
    ErrorCode.BAD_REQUEST.value: 400,
    ErrorCode.UNAUTHORIZED.value: 401,
    ErrorCode.FORBIDDEN.value: 403,
    ErrorCode.NOT_FOUND.value: 404,
    ErrorCode.UNKNOWN_FILE.value: 404,
    ErrorCode.UNKNOWN_SESSION.value: 404,
    ErrorCode.METHOD_NOT_ALLOWED.value: 405,
    ErrorCode.IDLE_TIMEOUT.value: 408,
    ErrorCode.CONFLICT.value: 409,
    ErrorCode.QUOTA_EXCEEDED.value: 409,
    ErrorCode.SESSION_CLOSED.value: 409,
    ErrorCode.SESSION_EXPIRED.value: 409,
    ErrorCode.ALREADY_COMPLETE.value: 409,
    ErrorCode.NOT_COMPLETE.value: 409,
    ErrorCode.TOO_LARGE.value: 413,
    ErrorCode.BODY_TOO_LARGE.value: 413,
    ErrorCode.INTERNAL_ERROR.value: 500,
    ErrorCode.TOO_MANY_CONNECTIONS.value: 503,
    ErrorCode.STORE_UNAVAILABLE.value: 503,
    ErrorCode.NO_SPACE.value: 507,
}
"""The HTTP status for each error code; any other refusal is a 400."""

_KEY_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# the log hides anything key-shaped whatever its case: a client may send a key in upper case
_KEY_SHAPE_ANY_CASE = re.compile(_KEY_SHAPE.pattern, re.IGNORECASE)
_REALM = 'Bearer realm="filedock"'


def http_status(code: str) -> int:
    """The HTTP status a refusal with error ``code`` is sent with."""
    return HTTP_STATUS.get(code, 400)


def hide_keys(text: str, ellipsis: str = "…") -> str:
    """``text`` with every key (job id, file key, session key) cut to its first 8 characters."""
    return _KEY_SHAPE_ANY_CASE.sub(lambda m: m.group()[:8] + ellipsis, text)


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON body of every refusal."""
    return {"error": {"code": code, "message": message}}


class _Refusal(FiledockError):
    """A refusal that also sets response headers (``Allow``, ``WWW-Authenticate``)."""

    def __init__(self, code: ErrorCode, message: str, headers: dict[str, str]) -> None:
        super().__init__(code, message)
        self.headers = headers


def _bad(message: str) -> FiledockError:
    return FiledockError(ErrorCode.BAD_REQUEST, message)


# ------------------------------------------------------------ request validation

_KINDS: dict[str, tuple[type, ...]] = {
    "a string": (str,), "an integer": (int,), "a number": (int, float), "an object": (dict,),
    "a list": (list,),
}


def only_fields(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse fields the endpoint does not know (a typo must not pass silently)."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


def typed_field(body: dict[str, Any], name: str, kind: str, required: bool = False,
                default: Any = None) -> Any:
    """``body[name]`` if it is of ``kind`` (a key of ``_KINDS``, e.g. ``"a string"``)."""
    if name not in body:
        if required:
            raise _bad(f"{name!r} is required")
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, _KINDS[kind]):
        raise _bad(f"{name!r} must be {kind}")
    return value


def flag_field(body: dict[str, Any], name: str) -> bool:
    """``body[name]`` if it is true or false; False if absent."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise _bad(f"{name!r} must be true or false")
    return value


def check_job_name(name: str) -> str:
    """A job name: 1..200 printable characters, not shaped like a job id."""
    if not 1 <= len(name) <= MAX_JOB_NAME:
        raise _bad(f"a job name has 1 to {MAX_JOB_NAME} characters")
    if not name.isprintable():
        raise _bad("a job name may hold printable characters only")
    if _KEY_SHAPE.fullmatch(name):
        raise _bad("a job name may not look like a job id")
    return name


def check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Job metadata: a flat object of strings, finite numbers, booleans and nulls."""
    for key, value in metadata.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise _bad(f"metadata value {key[:100]!r} must be a string, number, boolean or null")
        if isinstance(value, float) and not math.isfinite(value):  # JSON has no Infinity or NaN
            raise _bad(f"metadata value {key[:100]!r} must be a finite number")
    return metadata


def check_file_name(name: str) -> str:
    """A file name: 1..1024 characters, relative, no control characters, no ``..`` component."""
    if not 1 <= len(name) <= MAX_FILE_NAME:
        raise _bad(f"a file name has 1 to {MAX_FILE_NAME} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise _bad("a file name may not hold NUL, other control characters or lone surrogates")
    if name[0] in "/\\":
        raise _bad("a file name is relative to its job: it may not start with / or \\")
    if ".." in re.split(r"[/\\]", name):
        raise _bad("a file name may not have a '..' component")
    return name


def check_size(size: int, limits: Limits) -> int:
    """A declared file size: not negative and within ``limits.max_file_size``."""
    if size < 0:
        raise _bad("'size' may not be negative")
    if size > limits.max_file_size:
        raise FiledockError(ErrorCode.TOO_LARGE, f"files may be at most {limits.max_file_size} bytes")
    return size


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; an empty body is ``{}``."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise _bad("the body is not UTF-8") from None
    except RecursionError:
        raise _bad("the body is nested too deeply") from None
    except ValueError as exc:
        raise _bad(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _bad("the body must be a JSON object")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # 1e999 parses as infinity, which json.dumps would send back as the non-JSON word Infinity
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is too large for a number")
    return value


# ------------------------------------------------------------ JSON shapes


def session_json(session: Session) -> dict[str, Any]:
    """A session as the API shows it."""
    return {"key": session.key, "job": session.job_id, "created": session.created,
            "expires": session.expires, "closed": session.closed, "scope": session.scope}


def job_summary(job: Job, files: list[FileRecord]) -> dict[str, Any]:
    """A job with how many files it declares and how many are complete."""
    return job_counts_json(job, (len(files), sum(f.state == FILE_COMPLETE for f in files),
                                 sum(f.size for f in files), sum(f.received for f in files)))


def job_counts_json(job: Job, counts: tuple[int, int, int, int]) -> dict[str, Any]:
    """A job with (files, complete files, bytes declared, bytes received) as the API shows them."""
    files_total, files_complete, bytes_total, bytes_received = counts
    return job.to_json() | {"files_total": files_total, "files_complete": files_complete,
                            "bytes_total": bytes_total, "bytes_received": bytes_received}


MAX_PAGE = 1000
"""Most jobs or files one page (``?limit=``) may hold."""

LINK_TTL = 300.0
"""Seconds a signed download link (``POST /v1/files/<key>/link``) stays valid."""


@dataclass(frozen=True)
class Query:
    """What a GET or DELETE handler gets instead of a body: the query string and conditional headers."""

    params: dict[str, str] = field(default_factory=dict)
    if_none_match: str | None = None

    def page(self) -> tuple[int, int]:
        """``(limit, offset)`` from ``?limit=&offset=``; no limit is ``-1`` (everything)."""
        limit, offset = self._int("limit", -1), self._int("offset", 0)
        if limit != -1 and not 1 <= limit <= MAX_PAGE:
            raise _bad(f"'limit' is 1 to {MAX_PAGE}")
        if offset < 0:
            raise _bad("'offset' may not be negative")
        return limit, offset

    def _int(self, name: str, default: int) -> int:
        raw = self.params.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or len(raw) > 12:
            raise _bad(f"{name!r} must be a whole number")
        return int(raw)


_LINK_PATH = re.compile(rb"/v1/files/([0-9a-f-]{36})/content")


def _query(request: IRequest) -> Query:
    try:
        raw = parse_qs((request.uri.split(b"?", 1) + [b""])[1].decode("utf-8"), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise _bad("the query string is not valid") from None
    match = request.getHeader(b"if-none-match")
    return Query({k: v[-1] for k, v in raw.items()}, match.decode("latin-1").strip() if match else None)


@dataclass(frozen=True)
class FileBody:
    """A reply that streams a complete file (Range requests answered), never whole in memory: from
    ``path`` on disk, or from ``stream`` (a seekable stream of ``size`` bytes, e.g. from a bucket)."""

    path: Path | None
    name: str
    stream: Any = None
    size: int = 0


# ------------------------------------------------------------ routing and replies


ANY_SCOPE = SCOPES
UPLOAD_SCOPES = (SCOPE_ADMIN, SCOPE_UPLOAD)
READ_SCOPES = (SCOPE_ADMIN, SCOPE_READ)
ADMIN_ONLY = (SCOPE_ADMIN,)

TARGET_SERVER = "server"
"""The route concerns no job (``/v1/info``): open to tokens of one job too."""
TARGET_ALL_JOBS = "all-jobs"
"""The route sees or changes many jobs, or the server's tokens: not for tokens of one job."""
TARGET_JOB, TARGET_FILE, TARGET_SESSION = "job", "file", "session"
"""The route's path argument names a job (id or name), a file key or a session key."""


@dataclass(frozen=True)
class Route:
    """One endpoint: a method, a path pattern (``{}`` is one path segment), the token scopes it
    accepts and what its path argument names (so a token of one job reaches only that job)."""

    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., Any]
    scopes: tuple[str, ...] = ADMIN_ONLY
    target: str = TARGET_ALL_JOBS
    wants_grant: bool = False

    @classmethod
    def of(cls, method: str, path: str, handler: Callable[..., Any], scopes: tuple[str, ...] = ADMIN_ONLY,
           target: str = TARGET_ALL_JOBS, wants_grant: bool = False) -> "Route":
        """A route for ``path``, e.g. ``"/v1/jobs/{}/files"``."""
        return cls(method, re.compile(re.escape(path).replace(r"\{\}", "([^/]+)")), handler, scopes, target,
                   wants_grant)


@dataclass(frozen=True)
class Reply:
    """A response: status, JSON payload and extra headers."""

    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


class _Responder:
    """Answers one API request: writes its reply, unless the client went away meanwhile."""

    def __init__(self, request: IRequest) -> None:
        self.request = request
        self.gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _reason: Failure) -> None:
        self.gone = True

    def send(self, reply: Reply) -> None:
        """Write the reply, unless nobody is listening any more."""
        if isinstance(reply.payload, FileBody):
            self._send_file(reply)
            return
        if isinstance(reply.payload, bytes):  # already encoded (metrics text, an empty 304)
            data = reply.payload
        else:
            data = json.dumps(reply.payload).encode("ascii")  # \u escapes: even lone surrogates encode
        if self.gone or self.request.finished or getattr(self.request, "answered_early", False):
            return
        request = self.request
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Type", reply.content_type.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(data))
        request.setHeader(b"Cache-Control", b"no-store")  # replies carry keys
        request.write(data)
        request.finish()

    def _send_file(self, reply: Reply) -> None:
        from twisted.web import static

        if self.gone or self.request.finished:
            return
        request = self.request
        filename = reply.payload.name.replace("\\", "/").rsplit("/", 1)[-1] or "download"
        request.setHeader(b"Content-Disposition",
                          f"attachment; filename*=UTF-8''{quote(filename, safe='')}".encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        # twisted's static file: a producer that reads as the socket drains, Range and HEAD included
        if reply.payload.path is None:
            body = _opened_file_class()(reply.payload.stream, reply.payload.size)
        else:
            body = static.File(str(reply.payload.path), defaultType="application/octet-stream")
        body.type, body.encoding = "application/octet-stream", None  # never rendered by a browser
        out = body.render_GET(request)
        if out != server.NOT_DONE_YET:  # HEAD, or the file vanished with its job
            request.write(out)
            request.finish()


@functools.cache
def _opened_file_class() -> type:
    from twisted.web import static  # on first use: its import warns about twisted's own deprecations

    class OpenedFile(static.File):
        """twisted's static file (Range, HEAD, a producer that reads as the socket drains) over a
        stream opened already, e.g. an object in a bucket: nothing on the local disk is looked at."""

        def __init__(self, stream: Any, size: int) -> None:
            super().__init__("/nonexistent", defaultType="application/octet-stream")
            self._stream, self._size = stream, size

        def restat(self, reraise: bool = True) -> None:
            pass

        def exists(self) -> bool:
            return True

        def isdir(self) -> bool:
            return False

        def openForReading(self):
            return self._stream

        def getsize(self) -> int:
            return self._size

        def getModificationTime(self) -> float:
            return time.time()  # never "not modified": we keep no modification time for it

    return OpenedFile


class _APIResource(resource.Resource):
    """The root resource: every path goes to ``ControlAPI.answer``."""

    isLeaf = True

    def __init__(self, api: "ControlAPI") -> None:
        super().__init__()
        self._api = api

    def render(self, request: IRequest) -> int:
        self._api.answer(request)
        return server.NOT_DONE_YET


class ControlAPI:
    """The control API over a metadata store, a blob store and (optionally) a data port.

    ``info()`` adds service facts (e.g. the data port's address) to ``GET /v1/info``.
    """

    def __init__(self, store: DeferredStore, blobs: BlobStorage, limits: Limits,
                 dataport: DataPortFactory | None, info: Callable[[], dict]) -> None:
        self.store = store
        self.blobs = blobs
        self.limits = limits
        self.dataport = dataport
        self.info = info
        self.http_uploads: Any = None  # server/http_upload's front end for /files/, if the server mounts it
        self._epoch = secrets.token_hex(4)  # in every ETag: a restart's change count starts at 0 again
        self._link_secret = secrets.token_bytes(32)
        self.routes = [
            Route.of("GET", "/v1/info", self._get_info, ANY_SCOPE, TARGET_SERVER),
            Route.of("GET", "/v1/jobs", self._list_jobs, READ_SCOPES),
            Route.of("POST", "/v1/jobs", self._create_job),
            Route.of("GET", "/v1/jobs/{}", self._get_job, ANY_SCOPE, TARGET_JOB),
            Route.of("PATCH", "/v1/jobs/{}", self._update_job, ADMIN_ONLY, TARGET_JOB),
            Route.of("DELETE", "/v1/jobs/{}", self._delete_job, ADMIN_ONLY, TARGET_JOB),
            Route.of("POST", "/v1/jobs/{}/files", self._add_files, UPLOAD_SCOPES, TARGET_JOB),
            Route.of("POST", "/v1/jobs/{}/sessions", self._open_session, ANY_SCOPE, TARGET_JOB, wants_grant=True),
            Route.of("GET", "/v1/files/{}", self._get_file, ANY_SCOPE, TARGET_FILE),
            Route.of("GET", "/v1/files/{}/content", self._file_content, READ_SCOPES, TARGET_FILE),
            Route.of("POST", "/v1/files/{}/link", self._file_link, READ_SCOPES, TARGET_FILE),
            Route.of("DELETE", "/v1/sessions/{}", self._close_session, ANY_SCOPE, TARGET_SESSION),
            Route.of("GET", "/v1/uploads", self._list_uploads, READ_SCOPES),
            Route.of("GET", "/v1/stats", self._stats, READ_SCOPES),
            Route.of("GET", "/metrics", self._metrics, READ_SCOPES),
            Route.of("POST", "/v1/tokens", self._create_token),
            Route.of("GET", "/v1/tokens", self._list_tokens),
            Route.of("DELETE", "/v1/tokens/{}", self._revoke_token),
        ]
        self._resource = _APIResource(self)

    def resource(self) -> resource.IResource:
        """The root resource, to wrap in a ``Site`` (``site()`` makes a hardened one)."""
        return self._resource

    def site(self) -> server.Site:
        """A ``Site`` for this API: tokens checked before bodies are read, connections and bodies
        bounded in number, bytes and time, keys hidden in the access log."""
        return ControlSite(self._resource, self.limits.max_api_body, api=self)

    # ------------------------------------------------------------ plumbing

    def answer(self, request: IRequest) -> None:
        """Answer one request asynchronously; a client gone meanwhile is not an error."""
        responder = _Responder(request)
        if request.method == b"GET" and request.path in (b"/", b"/dashboard"):
            # the page holds no data: it asks the API, with the token the user types in
            responder.send(Reply(200, dashboard_page(), {"Content-Security-Policy": _DASHBOARD_CSP},
                                "text/html; charset=utf-8"))
            return
        page_file = upload_page_file(request.path) if request.method == b"GET" else None
        if page_file is not None:
            responder.send(Reply(200, page_file.body, {"Content-Security-Policy": UPLOAD_PAGE_CSP,
                                                       "X-Content-Type-Options": "nosniff"}, page_file.content_type))
            return
        d = self._dispatch(request)
        d.addCallback(lambda result: Reply(*result))
        d.addErrback(self._refusal, request)
        d.addCallback(responder.send)
        d.addErrback(self._send_failed, responder)

    @staticmethod
    def _send_failed(failure: Failure, responder: "_Responder") -> None:
        log.failure("control API: could not send a reply", failure)
        if not responder.gone and not responder.request.startedWriting:
            responder.send(Reply(500, error_body(ErrorCode.INTERNAL_ERROR.value, "internal error")))

    @defer.inlineCallbacks
    def _dispatch(self, request: IRequest):
        grant: TokenGrant | None = None
        if not self.signed_link_valid(request.method, request.uri):  # a signed link is its own authority
            grant = yield self._authenticate(request)
        route, args = self._route(request)
        if grant is not None:
            yield self._authorize(grant, route, args)
        body = self._read_body(request) if route.method in ("POST", "PATCH") else _query(request)
        result = yield route.handler(body, *args, **({"grant": grant} if route.wants_grant else {}))
        return result

    @defer.inlineCallbacks
    def _authorize(self, grant: TokenGrant, route: Route, args: list[str]):
        """Refuse (403 forbidden) what ``grant``'s scope or job does not cover."""
        if grant.scope not in route.scopes:
            raise FiledockError(ErrorCode.FORBIDDEN, f"a token of scope {grant.scope!r} may not "
                                                     f"{route.method} {route.pattern.pattern[:60]}")
        if grant.job_id is None or route.target == TARGET_SERVER:
            return
        only_job = FiledockError(ErrorCode.FORBIDDEN, f"this token is for job {grant.job_id} only")
        if route.target == TARGET_ALL_JOBS:
            raise only_job
        # a job is refused alike whether it exists or not: a token of one job learns nothing of others
        if route.target == TARGET_JOB:
            job: Job | None = yield self.store.find_job(args[0])
            owner = job.id if job is not None else None
        elif route.target == TARGET_FILE:
            record: FileRecord | None = yield self.store.get_file(args[0])
            owner = record.job_id if record is not None else grant.job_id  # unknown: the handler says 404
        else:
            session: Session | None = yield self.store.get_session(args[0])
            owner = session.job_id if session is not None else grant.job_id
        if owner != grant.job_id:
            raise only_job

    def _refusal(self, failure: Failure, request: IRequest) -> Reply:
        if failure.check(FiledockError):
            err: FiledockError = failure.value
            headers = err.headers if isinstance(err, _Refusal) else {}
            return Reply(http_status(err.code_str), error_body(err.code_str, err.message), headers)
        log.failure("control API: {method} {path} failed", failure,
                    method=request.method.decode("latin-1"), path=hide_keys(request.path.decode("latin-1")))
        return Reply(500, error_body(ErrorCode.INTERNAL_ERROR.value, "internal error; the server log has details"))

    def check_token(self, request: IRequest, token: bytes) -> defer.Deferred:
        """Fires with the token's ``TokenGrant``, or None for a token the store does not know (logged)."""
        def checked(grant: TokenGrant | None) -> TokenGrant | None:
            if grant is None:
                log.info("control API: refused a token from {peer}", peer=_peer(request))
            return grant
        return self.store.check_token(token.decode("latin-1")).addCallback(checked)

    @defer.inlineCallbacks
    def _authenticate(self, request: IRequest):
        early = getattr(request, "token_check", None)
        if early is not None:  # a ControlSite checked the token before reading the body
            grant = yield early
            if grant is None:
                raise _Refusal(ErrorCode.UNAUTHORIZED, "the token is not valid",
                               {"WWW-Authenticate": _REALM + ', error="invalid_token"'})
            return grant
        token = bearer_token(request)
        grant = yield self.check_token(request, token)
        if grant is None:
            raise _Refusal(ErrorCode.UNAUTHORIZED, "the token is not valid",
                           {"WWW-Authenticate": _REALM + ', error="invalid_token"'})
        return grant

    def _route(self, request: IRequest) -> tuple[Route, list[str]]:
        method = request.method.decode("latin-1")
        try:
            path = request.path.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("the path is not UTF-8") from None
        allowed = []
        for route in self.routes:
            match = route.pattern.fullmatch(path)
            if match and route.method == method:
                return route, [_segment(arg) for arg in match.groups()]
            if match:
                allowed.append(route.method)
        if allowed:
            raise _Refusal(ErrorCode.METHOD_NOT_ALLOWED, f"{method[:20]} is not allowed here",
                           {"Allow": ", ".join(allowed)})
        raise FiledockError(ErrorCode.NOT_FOUND, "no such endpoint")

    def _read_body(self, request: IRequest) -> dict[str, Any]:
        limit = self.limits.max_api_body
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise FiledockError(ErrorCode.BODY_TOO_LARGE, f"request bodies may be at most {limit} bytes")
        request.content.seek(0)
        raw = request.content.read(limit + 1)
        if len(raw) > limit:
            raise FiledockError(ErrorCode.BODY_TOO_LARGE, f"request bodies may be at most {limit} bytes")
        return parse_json_body(raw)

    @defer.inlineCallbacks
    def _find_job(self, ref: str):
        job: Job | None = yield self.store.find_job(ref)
        if job is None:
            raise FiledockError(ErrorCode.NOT_FOUND, f"no job {ref[:200]!r}")
        return job

    # ------------------------------------------------------------ info and jobs

    def _get_info(self, _body: None) -> tuple[int, dict[str, Any]]:
        base = {"version": filedock.__version__, "digest": SCHEME, "limits": record.asdict(self.limits)}
        return 200, {**base, **self.info()}

    @defer.inlineCallbacks
    def _list_jobs(self, query: Query):
        # counted in SQL, one row per job on the page; unchanged since the caller's ETag: nothing read
        limit, offset = query.page()
        etag = yield self._etag()
        if query.if_none_match == etag:
            return 304, b"", {"ETag": etag}
        summaries = yield self.store.job_summaries(limit, offset)
        payload = {"jobs": [job_counts_json(job, counts) for job, *counts in summaries]}
        if limit != -1 or offset:  # a page says how many there are in all
            payload["total"] = yield self.store.count_jobs()
        return 200, payload, {"ETag": etag}

    @defer.inlineCallbacks
    def _etag(self):
        # read before the data: a write in between makes the tag older than the body, never newer
        changes = yield self.store.change_count()
        return f'"{self._epoch}-{changes}"'

    @defer.inlineCallbacks
    def _create_job(self, body: dict[str, Any]):
        only_fields(body, ("name", "metadata", "exist_ok"))
        name = check_job_name(typed_field(body, "name", "a string", required=True))
        metadata = check_metadata(typed_field(body, "metadata", "an object", default={}))
        exist_ok = flag_field(body, "exist_ok")
        try:
            job: Job = yield self.store.create_job(name, metadata)
        except FiledockError as exc:
            if not (exist_ok and exc.code is ErrorCode.CONFLICT):
                raise
            # the job of that name, as GET /v1/jobs/<name> shows it: a client that creates the job when it is
            # missing learns in one round trip what it has, instead of a GET, a 404 and then this POST
            found = yield self._find_job(name)
            shown = yield self._job_with_files(found)
            return 200, shown
        log.info("job created: {job} {name!r}", job=short_key(job.id), name=name)
        return 201, job.to_json()

    @defer.inlineCallbacks
    def _get_job(self, query: Query, ref: str):
        limit, offset = query.page()
        etag = yield self._etag()
        if query.if_none_match == etag:
            return 304, b"", {"ETag": etag}
        job = yield self._find_job(ref)
        if limit == -1 and offset == 0:
            shown = yield self._job_with_files(job)
            return 200, shown, {"ETag": etag}
        counts = yield self.store.job_counts(job.id)
        files = yield self.store.files_page(job.id, limit, offset)
        return 200, job_counts_json(job, counts) | {"files": [f.to_json() for f in files]}, {"ETag": etag}

    @defer.inlineCallbacks
    def _job_with_files(self, job: Job):
        """The job as ``GET /v1/jobs/<job>`` shows it unpaged: its counts and every file."""
        files: list[FileRecord] = yield self.store.list_files(job.id)
        return job_summary(job, files) | {"files": [f.to_json() for f in files]}

    @defer.inlineCallbacks
    def _update_job(self, body: dict[str, Any], ref: str):
        only_fields(body, ("name", "metadata"))
        name = typed_field(body, "name", "a string")
        metadata = typed_field(body, "metadata", "an object")
        if name is not None:
            check_job_name(name)
        if metadata is not None:
            check_metadata(metadata)
        job = yield self._find_job(ref)
        if name is not None or metadata is not None:
            job = yield self.store.update_job(job.id, name, metadata)
        return 200, job.to_json()

    @defer.inlineCallbacks
    def _delete_job(self, _body: None, ref: str):
        job = yield self._find_job(ref)
        files = yield self.store.delete_job(job.id)
        yield threads.deferToThread(self.blobs.delete_job, job.id)
        log.info("job deleted: {job} {name!r} with {n} files", job=short_key(job.id), name=job.name, n=len(files))
        return 200, {"deleted": job.id}

    # ------------------------------------------------------------ files

    @defer.inlineCallbacks
    def _add_files(self, body: dict[str, Any], ref: str):
        batch = "files" in body
        entries = self._file_entries(body) if batch else [self._file_entry(body)]
        replace = frozenset(name for name, _, new_version in entries if new_version)
        entries = [(name, size) for name, size, _ in entries]
        job = yield self._find_job(ref)
        if batch:
            yield self._check_batch(job, entries, replace)
        added: list[FileRecord] = yield self.store.add_files(job.id, entries, self.limits.job_quota,
                                                             replace=replace)
        records = [record.to_json() for record in added]
        return 201, {"files": records} if batch else records[0]

    def _file_entry(self, entry: Any) -> tuple[str, int, bool]:
        """(name, size, replace) of one declared file."""
        if not isinstance(entry, dict):
            raise _bad("a file is an object with 'name' and 'size'")
        only_fields(entry, ("name", "size", "replace"))
        name = check_file_name(typed_field(entry, "name", "a string", required=True))
        size = check_size(typed_field(entry, "size", "an integer", required=True), self.limits)
        return name, size, flag_field(entry, "replace")

    def _file_entries(self, body: dict[str, Any]) -> list[tuple[str, int, bool]]:
        only_fields(body, ("files",))
        items = typed_field(body, "files", "a list", required=True)
        if not 1 <= len(items) <= MAX_BATCH:
            raise _bad(f"'files' lists 1 to {MAX_BATCH} files")
        entries = []
        for i, item in enumerate(items):
            try:
                entries.append(self._file_entry(item))
            except FiledockError as exc:
                raise FiledockError(exc.code, f"files[{i}]: {exc.message}") from None
        names = [name for name, _, _ in entries]
        if len(set(names)) != len(names):
            raise _bad("'files' names a file twice")
        return entries

    @defer.inlineCallbacks
    def _check_batch(self, job: Job, entries: list[tuple[str, int]], replace: frozenset[str] = frozenset()):
        """Refuse a batch up front with the exact name or the quota (the store is all-or-nothing too)."""
        existing: list[FileRecord] = yield self.store.list_files(job.id)
        taken = sorted({f.name for f in existing} & {name for name, _ in entries} - replace)
        if taken:
            raise FiledockError(ErrorCode.CONFLICT, f"the job has a file named {taken[0][:200]!r} already")
        used, wanted, quota = sum(f.size for f in existing), sum(s for _, s in entries), self.limits.job_quota
        if used + wanted > quota:
            raise FiledockError(ErrorCode.QUOTA_EXCEEDED,
                                f"job quota is {quota} bytes; {used} are declared already")

    @defer.inlineCallbacks
    def _get_file(self, _body: None, key: str):
        record: FileRecord | None = yield self.store.get_file(key)
        if record is None:
            raise FiledockError(ErrorCode.NOT_FOUND, "no such file")
        return 200, record.to_json()

    @defer.inlineCallbacks
    def _complete_file(self, key: str):
        record: FileRecord | None = yield self.store.get_file(key)
        if record is None:
            raise FiledockError(ErrorCode.NOT_FOUND, "no such file")
        if record.state != FILE_COMPLETE:
            raise FiledockError(ErrorCode.NOT_COMPLETE, f"the file is not complete yet ({record.received} of "
                                                        f"{record.size} bytes)")
        return record

    @defer.inlineCallbacks
    def _file_content(self, _query: Query, key: str):
        record = yield self._complete_file(key)
        if not self.blobs.remote:
            return 200, FileBody(self.blobs.final_path(record.job_id, record.blob_name), record.name)
        try:  # opened off the reactor; read by a thread that stays a few chunks ahead of the socket
            stream = yield threads.deferToThread(self.blobs.open_complete, record.job_id, record.blob_name)
        except FileNotFoundError:
            raise FiledockError(ErrorCode.NOT_FOUND, "the file's bytes are gone from the object store") from None
        return 200, FileBody(None, record.name, stream, record.size)

    @defer.inlineCallbacks
    def _file_link(self, _body: dict[str, Any], key: str):
        record = yield self._complete_file(key)
        expires = int(time.time() + LINK_TTL)
        url = f"/v1/files/{key}/content?expires={expires}&sig={self._link_signature(key, expires)}"
        return 201, {"url": url, "expires": expires}

    def _link_signature(self, key: str, expires: int) -> str:
        return hmac.new(self._link_secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_link_valid(self, method: bytes, uri: bytes) -> bool:
        """A GET of a file's content with a valid, unexpired signature from ``POST .../link``
        (a browser's plain download cannot send an Authorization header). Takes the raw request
        line's parts, so that the API's early token check can ask before the request is parsed."""
        if method not in (b"GET", b"HEAD"):
            return False
        path, _, query = uri.partition(b"?")
        match = _LINK_PATH.fullmatch(path)
        if match is None:
            return False
        try:
            params = {k: v[-1] for k, v in parse_qs(query.decode("utf-8"), max_num_fields=20).items()}
        except (UnicodeDecodeError, ValueError):
            return False
        sig, expires = params.get("sig", ""), params.get("expires", "")
        if not (sig and expires.isdigit() and len(expires) < 12 and int(expires) >= time.time()):
            return False
        return hmac.compare_digest(sig, self._link_signature(match.group(1).decode(), int(expires)))

    # ------------------------------------------------------------ sessions and uploads

    @defer.inlineCallbacks
    def _open_session(self, body: dict[str, Any], ref: str, grant: TokenGrant):
        only_fields(body, ("ttl",))
        ttl = typed_field(body, "ttl", "a number", default=self.limits.session_ttl)
        if not 0 < ttl <= self.limits.max_session_ttl:
            raise _bad(f"'ttl' is more than 0 and at most {self.limits.max_session_ttl:g} seconds")
        job = yield self._find_job(ref)
        session: Session = yield self.store.open_session(job.id, float(ttl), grant.scope)
        log.info("session opened: {session} for job {job}", session=short_key(session.key), job=short_key(job.id))
        return 201, session_json(session)

    @defer.inlineCallbacks
    def _close_session(self, _body: None, key: str):
        session: Session | None = yield self.store.get_session(key)
        if session is None:
            raise FiledockError(ErrorCode.NOT_FOUND, "no such session")
        session = yield self.store.close_session(key)
        return 200, session_json(session)

    # ------------------------------------------------------------ tokens

    @defer.inlineCallbacks
    def _create_token(self, body: dict[str, Any]):
        only_fields(body, ("label", "scope", "job"))
        label = typed_field(body, "label", "a string", default="api")
        if not 1 <= len(label) <= MAX_JOB_NAME or not label.isprintable():
            raise _bad(f"a label has 1 to {MAX_JOB_NAME} printable characters")
        scope = typed_field(body, "scope", "a string", default=SCOPE_ADMIN)
        if scope not in SCOPES:
            raise _bad(f"'scope' is one of {', '.join(SCOPES)}")
        ref = typed_field(body, "job", "a string")
        job_id = (yield self._find_job(ref)).id if ref is not None else None
        token: str = yield self.store.create_token(label, scope, job_id)
        grant: TokenGrant = yield self.store.check_token(token)
        log.info("token created: {id} {label!r} scope {scope}{job}", id=grant.id, label=label, scope=scope,
                 job=f" for job {short_key(job_id)}" if job_id else "")
        return 201, {"token": token} | grant.to_json()

    @defer.inlineCallbacks
    def _list_tokens(self, _body: None):
        grants: list[TokenGrant] = yield self.store.list_tokens()
        return 200, {"tokens": [g.to_json() for g in grants]}

    @defer.inlineCallbacks
    def _revoke_token(self, _body: None, token_id: str):
        revoked = yield self.store.revoke_token(token_id)
        if not revoked:
            raise FiledockError(ErrorCode.NOT_FOUND, "no such token")
        log.info("token revoked: {id}", id=token_id[:16])
        return 200, {"revoked": token_id}

    def _metrics(self, _body: None) -> tuple[int, bytes, dict[str, str], str]:
        from filedock.server import metrics
        from filedock.server.dataport import DataPortStats

        stats = self.dataport.stats if self.dataport is not None else DataPortStats()
        return 200, metrics.render(stats), {}, metrics.CONTENT_TYPE

    @defer.inlineCallbacks
    def _list_uploads(self, _query: Query):
        uploads = self.dataport.active_uploads() if self.dataport is not None else []
        names: dict[str, str | None] = {}
        for job_id in {u.get("job") for u in uploads}:  # one look-up per job in flight, not per file
            job: Job | None = yield self.store.find_job(job_id) if job_id else None
            names[job_id] = job.name if job is not None else None
        return 200, {"uploads": [u | {"job_name": names.get(u.get("job"))} for u in uploads]}

    def _stats(self, _query: Query) -> tuple[int, dict[str, Any]]:
        # counters that only grow: a dashboard draws the server's throughput over time from two polls
        stats = getattr(self.dataport, "stats", None)
        return 200, {"bytes_received": getattr(stats, "bytes_received", 0), "bytes_sent": getattr(stats, "bytes_sent", 0),
                     "uploads_started": getattr(stats, "uploads_started", 0),
                     "uploads_completed": getattr(stats, "uploads_completed", 0)}


_DASHBOARD_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                  "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.lru_cache(maxsize=1)
def dashboard_page() -> bytes:
    """The web dashboard: one static page that polls the API."""
    return (Path(__file__).with_name("dashboard.html")).read_bytes()


def _segment(raw: str) -> str:
    """One path segment, percent-decoded (a job name may hold ``/`` as ``%2F``)."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("the path is not UTF-8") from None


def bearer_token(request: IRequest) -> bytes:
    """The token of the request's one ``Authorization: Bearer`` header; refuses none, a malformed one or two."""
    headers = request.requestHeaders.getRawHeaders(b"authorization") or []
    if len(headers) > 1:  # which one counts would be up to each proxy on the way: refuse
        raise _bad("send one Authorization header, not several")
    scheme, _, token = (headers[0] if headers else b"").partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise _Refusal(ErrorCode.UNAUTHORIZED, "send 'Authorization: Bearer <token>'", {"WWW-Authenticate": _REALM})
    return token


def _peer(request: IRequest) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", "-")


# ------------------------------------------------------------ the site


class BoundedBody(io.BytesIO):
    """A request body kept in memory up to ``limit + 1`` bytes; what follows is dropped.

    One byte past the limit is kept so the API can tell the body was too large.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.dropped = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        room = max(self.limit + 1 - self.tell(), 0)
        kept = super().write(data[:room]) if room else 0
        self.dropped += len(data) - kept
        return len(data)


def access_log_line(timestamp: str, request: IRequest) -> str:
    """Twisted's combined log line, with keys in the path cut short."""
    return http.combinedLogFormatter(timestamp, _KeysHidden(request))


class _KeysHidden:
    """A request seen by the access log: the URI's keys are shortened."""

    def __init__(self, request: IRequest) -> None:
        self._request = request
        uri = hide_keys(request.uri.decode("latin-1"), "...")
        self.uri = re.sub(r"(sig=[0-9a-f]{8})[0-9a-f]+", r"\1...", uri).encode("latin-1")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def raw_reply(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with a JSON error body, for a connection about to be closed."""
    body = json.dumps(error_body(code, message)).encode("ascii")
    lines = [b"HTTP/1.1 %d %s" % (status, http.RESPONSES.get(status, b"Error")),
             b"Content-Type: application/json", b"Content-Length: %d" % len(body),
             b"Cache-Control: no-store", b"Connection: close"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class ControlRequest(server.Request):
    """A request whose token is checked as soon as its headers are in, before its body is read.

    A request without a valid token costs a header's worth of memory and one store
    look-up: it is answered and its connection closed without reading a byte of its
    body. A valid one reserves room for its body in the site's budget first.
    """

    token_check: defer.Deferred | None = None
    answered_early = False
    http_upload: Any = None
    """The ``server/http_upload`` exchange that serves this request (``/files/``): its body is streamed
    to the exchange, never held here."""

    def gotLength(self, length: int | None) -> None:
        site: ControlSite = self.channel.site
        uploads = site.api.http_uploads if site.api is not None else None
        if uploads is not None and uploads.claims(self.channel._path):
            self.content = BoundedBody(0)
            self.http_upload = uploads.exchange(self, length)
            return
        self.content = site.getContentFile(length)
        if site.api is None:
            return
        method, path = self.channel._command, self.channel._path.split(b"?", 1)[0]
        if method == b"GET" and (path in (b"/", b"/dashboard") or upload_page_file(path) is not None):
            return  # the dashboard and upload pages need no token
        if site.api.signed_link_valid(method, self.channel._path):
            return  # a download through a signed link carries no token
        try:
            token = bearer_token(self)
        except FiledockError as err:
            self.refuse_early(err)
            return
        transport = self.channel.transport
        transport.pauseProducing()  # not one more byte of the body until the token is known
        self.token_check = site.api.check_token(self, token).addCallback(self._admit, length)
        self.token_check.addErrback(self._check_failed)

    def handleContentChunk(self, data: bytes) -> None:
        if self.http_upload is not None:
            self.http_upload.receive(data)
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if self.http_upload is not None:
            self.http_upload.content_ended()
            return
        super().process()

    def connectionLost(self, reason: Failure) -> None:
        if self.http_upload is not None:
            self.http_upload.connection_lost()
        super().connectionLost(reason)

    def _admit(self, grant: TokenGrant | None, length: int | None) -> TokenGrant | None:
        channel = self.channel
        if self.answered_early or channel is None or channel.transport is None:
            return grant  # the client left while the store looked the token up
        site: ControlSite = channel.site
        if grant is None:
            self.refuse_early(_Refusal(ErrorCode.UNAUTHORIZED, "the token is not valid",
                                       {"WWW-Authenticate": _REALM + ', error="invalid_token"'}))
            return None
        if not site.reserve_body(self, length):
            self.refuse_early(FiledockError(ErrorCode.TOO_MANY_CONNECTIONS,
                                            "too many request bodies are arriving at once; try again"))
            return None
        channel.admitted()
        channel.transport.resumeProducing()
        return grant

    def _check_failed(self, failure: Failure) -> None:
        if failure.check(FiledockError) and failure.value.code is ErrorCode.STORE_UNAVAILABLE:
            # the metadata database is down: a known state, one line in the log, 503 to the client
            log.warn("control API: could not check a token: {why}", why=failure.value.message)
            self.refuse_early(failure.value)
            return None
        log.failure("control API: could not check a token", failure)
        self.refuse_early(FiledockError(ErrorCode.INTERNAL_ERROR, "internal error; the server log has details"))
        return None

    def refuse_early(self, err: FiledockError) -> None:
        """Answer ``err`` now and close the connection, whatever of the request is still to come."""
        if self.answered_early:
            return
        self.answered_early = True
        self.content = BoundedBody(0)  # what is already buffered goes nowhere
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the refusal
        headers = err.headers if isinstance(err, _Refusal) else {}
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.write(raw_reply(http_status(err.code_str), err.code_str, err.message, headers))
            transport.loseConnection()


class ControlChannel(http.HTTPChannel):
    """An HTTP/1.1 connection to the control API with a deadline for each whole request.

    From the connection's start (or the end of its previous request) the next request's
    headers and body must arrive within ``api_request_timeout`` seconds, however slowly
    they trickle in. A connection is *waiting* until a request's token is accepted; the
    site may drop the oldest waiting connection to make room for a new one.
    """

    site: "ControlSite"
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()
        self.site.channel_opened(self)

    def admitted(self) -> None:
        """A request's token was accepted: this connection is no longer only waiting."""
        self.site.channel_busy(self)

    def no_deadline(self) -> None:
        """The request in progress is an HTTP upload whose body may take long: its own idle timeout
        applies, not the deadline for a whole request."""
        self._disarm()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: IRequest) -> None:
        super().requestDone(request)
        if self.transport is not None and not self.transport.disconnecting:
            self._arm()
            self.site.channel_waiting(self)

    def connectionLost(self, reason: Failure) -> None:
        self._disarm()
        self.site.channel_closed(self)
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._disarm()
        timeout = self.site.request_timeout
        if timeout:
            self._deadline = self.callLater(timeout, self._too_slow, timeout)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self, timeout: float) -> None:
        self._deadline = None
        if self.transport is None:
            return
        if self.requests:  # a request is half-way in: answer it, then close
            self.transport.write(raw_reply(408, ErrorCode.IDLE_TIMEOUT.value,
                                           f"the request did not arrive within {timeout:g} seconds"))
        self.transport.loseConnection()
        self.callLater(5.0, self.transport.abortConnection)  # a peer that reads nothing is dropped


class ControlSite(server.Site):
    """A ``Site`` for the control API.

    Request bodies are held in memory and never past ``max_body + 1`` bytes (a plain
    ``Site`` spools any body to a temporary file before the API can refuse it), and
    the access log shows keys cut short.
    """

    protocol = ControlChannel  # plain HTTP/1.1 (the API does not offer HTTP/2)
    requestFactory = ControlRequest

    def __init__(self, root: resource.IResource, max_body: int, api: "ControlAPI | None" = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("logFormatter", access_log_line)
        super().__init__(root, **kwargs)
        self.max_body = max_body
        self.api = api
        limits = api.limits if api is not None else Limits()
        self.max_connections = limits.max_api_connections
        self.request_timeout = limits.api_request_timeout
        self.max_bodies_in_flight = limits.max_api_bodies_in_flight
        self.bodies_in_flight = 0
        self._busy: set[ControlChannel] = set()
        self._waiting: dict[ControlChannel, None] = {}  # oldest first

    def getContentFile(self, length: int | None) -> BoundedBody:
        """Where a request's body goes while it arrives."""
        return BoundedBody(self.max_body)

    # -- connections: at most max_connections; the oldest waiting one makes room for a new one

    def channel_opened(self, channel: ControlChannel) -> None:
        """A new connection: keep it, dropping the oldest waiting connection if the site is full."""
        self._waiting[channel] = None
        if len(self._waiting) + len(self._busy) <= self.max_connections:
            return
        oldest = next(iter(self._waiting))
        if oldest is channel:  # every other connection is busy with an admitted request
            self.channel_closed(channel)
            channel.transport.write(raw_reply(503, ErrorCode.TOO_MANY_CONNECTIONS.value,
                                              "the server has too many connections; try again"))
            channel.transport.loseConnection()
            return
        self.channel_closed(oldest)
        oldest.transport.abortConnection()

    def channel_busy(self, channel: ControlChannel) -> None:
        """The connection's request was admitted: it is not dropped to make room."""
        if channel in self._waiting:
            del self._waiting[channel]
            self._busy.add(channel)

    def channel_waiting(self, channel: ControlChannel) -> None:
        """The connection waits for its next request."""
        if channel in self._busy:
            self._busy.discard(channel)
            self._waiting[channel] = None

    def channel_closed(self, channel: ControlChannel) -> None:
        """The connection is gone (or going)."""
        self._waiting.pop(channel, None)
        self._busy.discard(channel)

    # -- bodies: their bytes in memory at once are bounded

    def reserve_body(self, request: ControlRequest, length: int | None) -> bool:
        """Room for ``request``'s body (``length`` bytes, or the most it may hold if chunked), or False."""
        need = min(self.max_body + 1 if length is None else length, self.max_body + 1)
        if need and self.bodies_in_flight + need > self.max_bodies_in_flight:
            return False
        self.bodies_in_flight += need

        def release(_: Any) -> None:
            self.bodies_in_flight -= need
        request.notifyFinish().addBoth(release)
        return True
