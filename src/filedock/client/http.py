"""Blocking client for the control API (over ``http11.Connection``; no extra dependency).

Used by the CLI and the blocking uploader. Errors come back as ``FiledockError``
with the server's stable code.

Every request rides through a server restart: a refused or reset connection, a
timeout and a 5xx answer are tried again with the data port's backoff and attempt
budget (``filedock.client.model.RetryPolicy``). Requests that change something are
safe to repeat: a repeated request whose earlier attempt may have reached the
server is reconciled by its natural key (``recover_plan``): a job created by the
lost attempt, files it declared, a job it deleted count as done. A server that
cannot be reached at all is ``unreachable``; a TLS failure is ``tls-failed``;
both say what to check.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote, unquote, urlsplit

from filedock.client import http11
from filedock.client.retry import RETRY_STATUSES, RetryPolicy  # noqa: F401  (RETRY_STATUSES: public here before)
from filedock.errors import ErrorCode, FiledockError, RefusedByServer, ssl_errors

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("filedock.client")

HANDSHAKE_TIMEOUT = 5.0
"""Seconds a TLS handshake may take before the port is asked whether it speaks plain HTTP."""

IDLE_KEPT = 2
"""Connections kept alive for later requests: the uploader runs at most two requests at once (the
next step's beside ``prefetch_info`` or the session beside the files), so a request beside another
finds a connection open instead of paying a connect's round trip."""


class ApiError(RefusedByServer):
    """A control-API refusal. ``repeated``: an earlier attempt of the same request may have reached
    the server (it was sent and then lost, or answered 5xx), so the refusal may be of our own making."""

    def __init__(self, code: ErrorCode | str, message: str, status: int = 0, repeated: bool = False) -> None:
        super().__init__(code, message)
        self.status = status
        self.repeated = repeated


class _Stale(Exception):
    """A connection kept alive from an earlier request was closed before this one was answered."""


class _Transient(Exception):
    """One attempt failed in a way a later attempt may cure."""

    def __init__(self, reason: str, sent: bool, error: FiledockError | None = None) -> None:
        super().__init__(reason)
        self.reason, self.sent, self.error = reason, sent, error


def unreachable_message(url: str, reason: str, attempts: int, url_source: str | None) -> str:
    """What a user reads when the API cannot be reached: the reason and what to check."""
    tries = f" (tried {attempts} times)" if attempts > 1 else ""
    source = url_source or "the API URL"
    return (f"cannot reach the filedock API at {url}: {reason}{tries}. Is the server running? {source} is "
            f"{url}; it should be the API's address, which `filedock serve` prints as 'filedock API: ...'")


def tls_message(url: str, host: str, exc: ssl.SSLError | TimeoutError) -> str:
    """A TLS failure put as what to do about it."""
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        if exc.verify_code in (62, 64):  # hostname mismatch, IP address mismatch
            return (f"the certificate of {url} is not issued for {host!r} ({why}): use in the URL a host name "
                    "the certificate names")
        return (f"the certificate of {url} is not trusted ({why}): pass the CA certificate that signed it "
                "with --cacert FILE (or FILEDOCK_CACERT)")
    return f"the TLS handshake with {url} failed ({getattr(exc, 'reason', None) or exc or 'timed out'})"


class ApiClient:
    """``ApiClient("http://127.0.0.1:7480/", token).get("/v1/jobs")``.

    ``retry`` is the attempt budget and backoff for refused, reset, timed-out and 5xx
    requests (the data port's defaults). ``url_source`` names where the URL came from
    (``FILEDOCK_URL``, ``--server``...) for the message when it cannot be reached.
    """

    def __init__(self, url: str, token: str | None, timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None, retry: RetryPolicy | None = None,
                 url_source: str | None = None) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise FiledockError(ErrorCode.BAD_REQUEST, f"not an http(s) URL: {url}")
        self.url = url
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.token = token
        self.timeout = timeout
        if ssl_context is None and self.tls:
            from filedock.client.trust import client_context

            ssl_context = client_context()
        self.ssl_context = ssl_context
        self.retry = retry or RetryPolicy()
        self.url_source = url_source
        self._info: dict[str, Any] | None = None
        self._info_soon: threading.Thread | None = None  # prefetch_info's request, while it runs
        self._idle: list[http11.Connection] = []  # kept alive from earlier requests, newest last
        self._idle_lock = threading.Lock()

    def close(self) -> None:
        """Close the connections kept alive for the next requests, if any."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take_idle(self) -> http11.Connection | None:
        with self._idle_lock:
            return self._idle.pop() if self._idle else None

    def _keep(self, conn: http11.Connection) -> None:
        with self._idle_lock:
            if len(self._idle) < IDLE_KEPT:
                self._idle.append(conn)
                return
        conn.close()  # more threads' requests ended than are likely to run at once again

    def _connection(self) -> http11.Connection:
        if self.tls:
            # a plain-HTTP server waits for a request line that a TLS hello never ends: a short handshake
            # timeout finds that out in seconds (then _tls_failure asks in plain HTTP)
            return http11.Connection(self.host, self.port, timeout=min(self.timeout, HANDSHAKE_TIMEOUT),
                                     context=self.ssl_context)
        return http11.Connection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request; returns the decoded body or raises ``FiledockError``.

        Transient failures are retried (see the module docstring); a refusal that only
        a lost earlier attempt explains is reconciled by the request's natural key.
        """
        try:
            return self._attempts(method, path, body)
        except ApiError as exc:
            plan = recover_plan(method, path, body, exc)
            if plan is None:
                raise
            get_path, check = plan
            try:
                recovered = check(self._attempts("GET", get_path, None))
            except FiledockError:
                raise exc from None
            if recovered is None:
                raise
            log.info("%s %s: done by an earlier attempt whose answer was lost", method, path)
            return recovered

    def _attempts(self, method: str, path: str, body: Any) -> Any:
        failures, repeated = 0, False
        while True:
            try:
                return self._once(method, path, body, repeated)
            except _Stale:
                # the connection kept from the last request was closed meanwhile (the server's idle timeout,
                # a restart): send again at once on a new one, as HTTP clients do. The server may have
                # read the request before it closed, so a refusal now is reconciled as a repeat
                repeated = True
                continue
            except _Transient as exc:
                repeated = repeated or exc.sent
                failures += 1
                if failures >= self.retry.attempts:
                    if exc.error is not None:
                        raise exc.error from None
                    raise FiledockError(ErrorCode.UNREACHABLE, unreachable_message(
                        self.url, exc.reason, failures, self.url_source)) from None
                delay = self.retry.delay(failures)
                log.info("%s %s: %s; trying again in %.1fs (attempt %d of %d)", method, path, exc.reason,
                         delay, failures + 1, self.retry.attempts)
                time.sleep(delay)

    def _once(self, method: str, path: str, body: Any, repeated: bool) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        kept = self._take_idle()
        conn = kept or self._connection()
        sent = keep = False
        try:
            if kept is None:
                try:
                    conn.connect()
                except TimeoutError as exc:
                    if not self.tls:
                        raise
                    raise self._tls_failure(exc, False) from None
                conn.sock.settimeout(self.timeout)
            sent = True  # from here on the server may have acted on the request
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
            except (http11.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                    *ssl_errors("SSLEOFError", "SSLZeroReturnError")):
                if kept is not None:
                    raise _Stale() from None
                raise
            raw = resp.read()
            keep = not resp.will_close
        except ssl_errors("SSLError") as exc:
            raise self._tls_failure(exc, sent) from None
        except http11.BadStatusLine as exc:
            line = exc.line.strip()
            if line.startswith("ERR "):
                raise FiledockError(ErrorCode.UNREACHABLE, self._data_port_message()) from None
            if isinstance(exc, http11.RemoteDisconnected):
                raise _Transient("the server closed the connection without answering", sent) from None
            raise FiledockError(ErrorCode.UNREACHABLE,
                                f"{self.url} did not answer in HTTP ({line[:60]!r}); is that the filedock API's "
                                "address?" + ("" if self.tls else " If the server uses TLS, use https://"))
        except socket.gaierror as exc:
            raise FiledockError(ErrorCode.UNREACHABLE, unreachable_message(
                self.url, f"the host name {self.host!r} does not resolve ({exc.strerror or exc})", 1,
                self.url_source)) from None
        except (OSError, http11.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise _Transient(reason, sent) from None
        finally:
            if keep:  # the next request goes on this connection: one round trip, not two (and no TLS handshake)
                self._keep(conn)
            else:
                conn.close()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if resp.status >= 400:
            err = (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
            error = ApiError(err.get("code", ErrorCode.INTERNAL_ERROR.value),
                             err.get("message", f"HTTP {resp.status} from {self.url}"), resp.status, repeated)
            if RetryPolicy.retryable_status(resp.status):
                raise _Transient(f"HTTP {resp.status}: {error.message}", True, error)
            raise error
        return payload

    def _data_port_message(self) -> str:
        return (f"{self.url} is a filedock data port, not the control API: "
                f"{self.url_source or 'the API URL'} should name the API (`filedock serve` prints it as "
                "'filedock API: ...'; port 7480 by default)")

    def _tls_failure(self, exc: ssl.SSLError | TimeoutError, sent: bool) -> Exception:
        """A certificate problem is final; a failed handshake is either a plain port (said so) or a drop."""
        import ssl

        if isinstance(exc, ssl.SSLCertVerificationError):
            return FiledockError(ErrorCode.TLS_FAILED, tls_message(self.url, self.host, exc))
        plain = self._speaks_plain()
        if plain == "http":
            return FiledockError(ErrorCode.TLS_FAILED,
                                 f"{self.url} does not speak TLS: it answered in plain HTTP. Use "
                                 f"http://{self._netloc()}/ (or leave out --tls)")
        if plain == "dataport":
            return FiledockError(ErrorCode.UNREACHABLE, self._data_port_message())
        return _Transient(tls_message(self.url, self.host, exc), sent)

    def _netloc(self) -> str:
        return urlsplit(self.url if "://" in self.url else f"http://{self.url}").netloc

    def _speaks_plain(self) -> str | None:
        """After a failed TLS handshake: does the port answer plain HTTP ("http"), or the data port's ERR
        line ("dataport")? None if neither (or nothing answers)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=min(self.timeout, 5.0)) as sock:
                sock.sendall(b"GET /v1/info HTTP/1.0\r\nHost: filedock\r\n\r\n")
                head = sock.recv(64)
        except OSError:
            return None
        if head.startswith(b"HTTP/"):
            return "http"
        if head.startswith(b"ERR "):
            return "dataport"
        return None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    # -- the calls clients make most

    def info(self, fresh: bool = False) -> dict[str, Any]:
        """``GET /v1/info`` (the data port's address, the limits), asked once per client unless ``fresh``."""
        soon = self._info_soon
        if soon is not None and not fresh:
            soon.join()  # prefetch_info's answer, or nothing: then it is asked here, with its errors
        if fresh or self._info is None:
            self._info = self.get("/v1/info")
        return self._info

    def prefetch_info(self) -> None:
        """Ask ``GET /v1/info`` now, on a connection of its own, for a later ``info()``.

        The uploader needs the data port's address and the limits only after it has found the
        job and declared the files: asked beside those requests, the answer costs no round trip
        of its own (100 ms on a long path), and its connection stays open for the next request
        that runs beside another (``IDLE_KEPT``). A failure here is forgotten: ``info()`` then
        asks again and reports it.
        """
        if self._info is not None or self._info_soon is not None:
            return

        def ask() -> None:
            try:
                self._info = self.get("/v1/info")
            except Exception as exc:  # noqa: BLE001 - info() asks again and raises it there
                log.debug("GET /v1/info ahead: %s", exc)

        self._info_soon = threading.Thread(target=ask, name="filedock-api-info", daemon=True)
        self._info_soon.start()

    def job(self, id_or_name: str) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{quote(id_or_name, safe='')}")

    def create_job(self, name: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """``POST /v1/jobs``. A repeat after a lost answer finds the job it made (same name and metadata)."""
        return self.post("/v1/jobs", {"name": name, "metadata": metadata or {}})

    def find_or_create_job(self, name: str) -> dict[str, Any]:
        """The job named ``name`` with its files, created (with no files) if there is none: one
        ``POST /v1/jobs`` with ``exist_ok``, one round trip where a lookup and a creation take two."""
        job = self.post("/v1/jobs", {"name": name, "metadata": {}, "exist_ok": True})
        return {"files": [], **job}

    def add_file(self, job: str, name: str, size: int) -> dict[str, Any]:
        return self.post(f"/v1/jobs/{quote(job, safe='')}/files", {"name": name, "size": size})

    def add_files(self, job: str, files: list[tuple[str, int]], replace: bool = False) -> list[dict[str, Any]]:
        """Declare up to 1000 files in one transaction -> their records, in order. A repeat after a lost
        answer finds the files it declared (same names and sizes). ``replace``: each is a new version of
        the job's file of that name, which it replaces once complete (docs/api.md); repeating it is
        harmless (the server returns the version waiting already)."""
        extra = {"replace": True} if replace else {}
        reply = self.post(f"/v1/jobs/{quote(job, safe='')}/files",
                          {"files": [{"name": name, "size": size, **extra} for name, size in files]})
        return reply["files"]

    def open_session(self, job: str, ttl: float | None = None) -> dict[str, Any]:
        return self.post(f"/v1/jobs/{quote(job, safe='')}/sessions", {} if ttl is None else {"ttl": ttl})

    def close_session(self, key: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/sessions/{quote(key, safe='')}")

    def file(self, key: str) -> dict[str, Any]:
        return self.get(f"/v1/files/{quote(key, safe='')}")


# ---------------------------------------------------------------- repeating a request safely

Recovery = tuple[str, Callable[[Any], Any]]
"""(the path to GET, a check of its reply -> the original request's answer, or None: a real refusal)."""


def recover_plan(method: str, path: str, body: Any, exc: FiledockError) -> Recovery | None:
    """How to tell whether a refusal of a repeated request means an earlier attempt did the work.

    Only for a request sent more than once (``exc.repeated``), and only where a natural
    key says it: creating a job that exists with the same name and metadata, declaring
    files that exist with the same names and sizes, renaming a job to the name it now
    has, deleting a job that is gone. Opening a session again is harmless (an extra
    session expires) and closing one is idempotent on the server, so those need nothing.
    """
    if not getattr(exc, "repeated", False):
        return None
    parts = path.split("/")  # "", "v1", "jobs", <job>, ...
    body = body if isinstance(body, dict) else {}
    if method == "POST" and path == "/v1/jobs" and exc.code is ErrorCode.CONFLICT:
        name, metadata = body.get("name"), body.get("metadata") or {}
        return (f"/v1/jobs/{quote(str(name), safe='')}",
                lambda job: job if isinstance(job, dict) and job.get("name") == name
                and job.get("metadata") == metadata else None)
    if method == "POST" and len(parts) == 5 and parts[2] == "jobs" and parts[4] == "files" \
            and exc.code is ErrorCode.CONFLICT:
        wanted = body.get("files") if "files" in body else [body]
        return f"/v1/jobs/{parts[3]}", lambda job: _declared_already(job, wanted, "files" in body)
    if method == "PATCH" and len(parts) == 4 and parts[2] == "jobs" and "name" in body \
            and exc.code in (ErrorCode.CONFLICT, ErrorCode.NOT_FOUND):
        return (f"/v1/jobs/{quote(str(body['name']), safe='')}",
                lambda job: {k: v for k, v in job.items() if k != "files"}
                if "metadata" not in body or job.get("metadata") == body["metadata"] else None)
    if method == "DELETE" and len(parts) == 4 and parts[2] == "jobs" and exc.code is ErrorCode.NOT_FOUND:
        ref = unquote(parts[3])
        return "/v1/jobs", lambda listing: None if any(ref in (j.get("id"), j.get("name"))
                                                      for j in listing.get("jobs", [])) else {"deleted": ref}
    return None


def _declared_already(job: Any, wanted: list[Any], batch: bool) -> Any:
    if not isinstance(job, dict):
        return None
    have = {f.get("name"): f for f in job.get("files", []) if isinstance(f, dict)}
    records = []
    for entry in wanted:
        record = have.get(entry.get("name")) if isinstance(entry, dict) else None
        if record is None or record.get("size") != entry.get("size"):
            return None
        records.append(record)
    return {"files": records} if batch else records[0]
