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
import io
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.iweb import IRequest

import filedock
from filedock.config import Limits
from filedock.digest import SCHEME
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.dataport import DataPortFactory
from filedock.store.blobs import BlobStore
from filedock.store.metadata import DeferredStore
from filedock.store.model import FILE_COMPLETE, FileRecord, Job, Session

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
    ErrorCode.NOT_FOUND.value: 404,
    ErrorCode.UNKNOWN_FILE.value: 404,
    ErrorCode.UNKNOWN_SESSION.value: 404,
    ErrorCode.METHOD_NOT_ALLOWED.value: 405,
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
    ErrorCode.NO_SPACE.value: 507,
}
"""The HTTP status for each error code; any other refusal is a 400."""

_KEY_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_REALM = 'Bearer realm="filedock"'


def http_status(code: str) -> int:
    """The HTTP status a refusal with error ``code`` is sent with."""
    return HTTP_STATUS.get(code, 400)


def hide_keys(text: str, ellipsis: str = "…") -> str:
    """``text`` with every key (job id, file key, session key) cut to its first 8 characters."""
    return _KEY_SHAPE.sub(lambda m: m.group()[:8] + ellipsis, text)


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
    """Job metadata: a flat object of strings, numbers, booleans and nulls."""
    for key, value in metadata.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise _bad(f"metadata value {key[:100]!r} must be a string, number, boolean or null")
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
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
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


# ------------------------------------------------------------ JSON shapes


def session_json(session: Session) -> dict[str, Any]:
    """A session as the API shows it."""
    return {"key": session.key, "job": session.job_id, "created": session.created,
            "expires": session.expires, "closed": session.closed}


def job_summary(job: Job, files: list[FileRecord]) -> dict[str, Any]:
    """A job with how many files it declares and how many are complete."""
    return job.to_json() | {"files_total": len(files),
                            "files_complete": sum(f.state == FILE_COMPLETE for f in files)}


# ------------------------------------------------------------ routing and replies


@dataclass(frozen=True)
class Route:
    """One endpoint: a method and a path pattern (``{}`` is one path segment)."""

    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., Any]

    @classmethod
    def of(cls, method: str, path: str, handler: Callable[..., Any]) -> "Route":
        """A route for ``path``, e.g. ``"/v1/jobs/{}/files"``."""
        return cls(method, re.compile(re.escape(path).replace(r"\{\}", "([^/]+)")), handler)


@dataclass(frozen=True)
class Reply:
    """A response: status, JSON payload and extra headers."""

    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


class _Exchange:
    """One request being answered; remembers whether the client went away meanwhile."""

    def __init__(self, request: IRequest) -> None:
        self.request = request
        self.gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _reason: Failure) -> None:
        self.gone = True

    def send(self, reply: Reply) -> None:
        """Write the reply, unless nobody is listening any more."""
        if isinstance(reply.payload, bytes):  # already encoded (metrics text)
            data = reply.payload
        else:
            data = json.dumps(reply.payload).encode("ascii")  # \u escapes: even lone surrogates encode
        if self.gone or self.request.finished:
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

    def __init__(self, store: DeferredStore, blobs: BlobStore, limits: Limits,
                 dataport: DataPortFactory | None, info: Callable[[], dict]) -> None:
        self.store = store
        self.blobs = blobs
        self.limits = limits
        self.dataport = dataport
        self.info = info
        self.routes = [
            Route.of("GET", "/v1/info", self._get_info),
            Route.of("GET", "/v1/jobs", self._list_jobs),
            Route.of("POST", "/v1/jobs", self._create_job),
            Route.of("GET", "/v1/jobs/{}", self._get_job),
            Route.of("PATCH", "/v1/jobs/{}", self._update_job),
            Route.of("DELETE", "/v1/jobs/{}", self._delete_job),
            Route.of("POST", "/v1/jobs/{}/files", self._add_files),
            Route.of("POST", "/v1/jobs/{}/sessions", self._open_session),
            Route.of("GET", "/v1/files/{}", self._get_file),
            Route.of("DELETE", "/v1/sessions/{}", self._close_session),
            Route.of("GET", "/v1/uploads", self._list_uploads),
            Route.of("GET", "/metrics", self._metrics),
        ]
        self._resource = _APIResource(self)

    def resource(self) -> resource.IResource:
        """The root resource, to wrap in a ``Site`` (``site()`` makes a hardened one)."""
        return self._resource

    def site(self) -> server.Site:
        """A ``Site`` for this API: bodies bounded in memory, keys hidden in the access log."""
        return ControlSite(self._resource, self.limits.max_api_body)

    # ------------------------------------------------------------ plumbing

    def answer(self, request: IRequest) -> None:
        """Answer one request asynchronously; a client gone meanwhile is not an error."""
        exchange = _Exchange(request)
        if request.method == b"GET" and request.path in (b"/", b"/dashboard"):
            # the page holds no data: it asks the API, with the token the user types in
            exchange.send(Reply(200, dashboard_page(), {"Content-Security-Policy": _DASHBOARD_CSP},
                                "text/html; charset=utf-8"))
            return
        d = self._dispatch(request)
        d.addCallback(lambda result: Reply(*result))
        d.addErrback(self._refusal, request)
        d.addCallback(exchange.send)
        d.addErrback(self._send_failed, exchange)

    @staticmethod
    def _send_failed(failure: Failure, exchange: "_Exchange") -> None:
        log.failure("control API: could not send a reply", failure)
        if not exchange.gone and not exchange.request.startedWriting:
            exchange.send(Reply(500, error_body(ErrorCode.INTERNAL_ERROR.value, "internal error")))

    @defer.inlineCallbacks
    def _dispatch(self, request: IRequest):
        yield self._authenticate(request)
        route, args = self._route(request)
        body = self._read_body(request) if route.method in ("POST", "PATCH") else None
        result = yield route.handler(body, *args)
        return result

    def _refusal(self, failure: Failure, request: IRequest) -> Reply:
        if failure.check(FiledockError):
            err: FiledockError = failure.value
            headers = err.headers if isinstance(err, _Refusal) else {}
            return Reply(http_status(err.code_str), error_body(err.code_str, err.message), headers)
        log.failure("control API: {method} {path} failed", failure,
                    method=request.method.decode("latin-1"), path=hide_keys(request.path.decode("latin-1")))
        return Reply(500, error_body(ErrorCode.INTERNAL_ERROR.value, "internal error; the server log has details"))

    @defer.inlineCallbacks
    def _authenticate(self, request: IRequest):
        scheme, _, token = (request.getHeader(b"authorization") or b"").partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise _Refusal(ErrorCode.UNAUTHORIZED, "send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": _REALM})
        valid = yield self.store.check_token(token.decode("latin-1"))
        if not valid:
            log.info("control API: refused a token from {peer}", peer=_peer(request))
            raise _Refusal(ErrorCode.UNAUTHORIZED, "the token is not valid",
                           {"WWW-Authenticate": _REALM + ', error="invalid_token"'})

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
        base = {"version": filedock.__version__, "digest": SCHEME, "limits": asdict(self.limits)}
        return 200, {**base, **self.info()}

    @defer.inlineCallbacks
    def _list_jobs(self, _body: None):
        jobs: list[Job] = yield self.store.list_jobs()
        files = yield defer.gatherResults([self.store.list_files(job.id) for job in jobs],
                                          consumeErrors=True)
        return 200, {"jobs": [job_summary(job, fs) for job, fs in zip(jobs, files)]}

    @defer.inlineCallbacks
    def _create_job(self, body: dict[str, Any]):
        only_fields(body, ("name", "metadata"))
        name = check_job_name(typed_field(body, "name", "a string", required=True))
        metadata = check_metadata(typed_field(body, "metadata", "an object", default={}))
        job: Job = yield self.store.create_job(name, metadata)
        log.info("job created: {job} {name!r}", job=short_key(job.id), name=name)
        return 201, job.to_json()

    @defer.inlineCallbacks
    def _get_job(self, _body: None, ref: str):
        job = yield self._find_job(ref)
        files: list[FileRecord] = yield self.store.list_files(job.id)
        return 200, job_summary(job, files) | {"files": [f.to_json() for f in files]}

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
        replace = entry.get("replace", False)
        if not isinstance(replace, bool):
            raise _bad("'replace' must be true or false")
        return name, size, replace

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

    # ------------------------------------------------------------ sessions and uploads

    @defer.inlineCallbacks
    def _open_session(self, body: dict[str, Any], ref: str):
        only_fields(body, ("ttl",))
        ttl = typed_field(body, "ttl", "a number", default=self.limits.session_ttl)
        if not 0 < ttl <= self.limits.max_session_ttl:
            raise _bad(f"'ttl' is more than 0 and at most {self.limits.max_session_ttl:g} seconds")
        job = yield self._find_job(ref)
        session: Session = yield self.store.open_session(job.id, float(ttl))
        log.info("session opened: {session} for job {job}", session=short_key(session.key), job=short_key(job.id))
        return 201, session_json(session)

    @defer.inlineCallbacks
    def _close_session(self, _body: None, key: str):
        session: Session | None = yield self.store.get_session(key)
        if session is None:
            raise FiledockError(ErrorCode.NOT_FOUND, "no such session")
        session = yield self.store.close_session(key)
        return 200, session_json(session)

    def _metrics(self, _body: None) -> tuple[int, bytes, dict[str, str], str]:
        from filedock.server import metrics
        from filedock.server.dataport import DataPortStats

        stats = self.dataport.stats if self.dataport is not None else DataPortStats()
        return 200, metrics.render(stats), {}, metrics.CONTENT_TYPE

    def _list_uploads(self, _body: None) -> tuple[int, dict[str, Any]]:
        return 200, {"uploads": self.dataport.active_uploads() if self.dataport is not None else []}


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
        self.uri = hide_keys(request.uri.decode("latin-1"), "...").encode("latin-1")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class ControlSite(server.Site):
    """A ``Site`` for the control API.

    Request bodies are held in memory and never past ``max_body + 1`` bytes (a plain
    ``Site`` spools any body to a temporary file before the API can refuse it), and
    the access log shows keys cut short.
    """

    def __init__(self, root: resource.IResource, max_body: int, **kwargs: Any) -> None:
        kwargs.setdefault("logFormatter", access_log_line)
        super().__init__(root, **kwargs)
        self.max_body = max_body

    def getContentFile(self, length: int | None) -> BoundedBody:
        """Where a request's body goes while it arrives."""
        return BoundedBody(self.max_body)
