"""``TxApiClient``: the control API from Twisted (``twisted.web.client.Agent``), retried like the
blocking ``ApiClient``."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, Sequence
from urllib.parse import quote, urlsplit

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from filedock.client.model import RetryPolicy
from filedock.errors import ErrorCode, FiledockError

log = Logger(namespace="filedock.client")

MAX_API_REPLY = 64 * 1024 * 1024
"""Largest control-API reply body the client reads (a job with very many files)."""


class BodyCollector(Protocol):
    """Collects a response body up to ``limit`` bytes (``readBody`` without its warning)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)
        if self.size > self.limit and not self.done.called:
            self.transport.stopProducing()
            self.done.errback(FiledockError(ErrorCode.BODY_TOO_LARGE,
                                            f"the reply is longer than {self.limit} bytes"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)



class ApiTransient(Exception):
    """One API attempt failed in a way a later attempt may cure (``error``: the 5xx answer, if any)."""

    def __init__(self, reason: str, sent: bool, error: FiledockError | None = None) -> None:
        super().__init__(reason)
        self.reason, self.sent, self.error = reason, sent, error


class TxApiClient:
    """The few control-API calls a Twisted client needs; each returns a Deferred of the JSON reply.

    Errors fail the Deferred with ``FiledockError`` carrying the server's code.
    ``tls_policy`` is an ``IPolicyForHTTPS`` for ``https://`` URLs (Agent's default
    trusts the platform's roots).
    """

    def __init__(self, reactor: Any, url: str, token: str | None, tls_policy: Any = None,
                 retry: RetryPolicy | None = None) -> None:
        from twisted.web.client import Agent

        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise FiledockError(ErrorCode.BAD_REQUEST, f"not an http(s) URL: {url}")
        self.reactor = reactor
        self.url = url
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.token = token
        self.agent = Agent(reactor, tls_policy) if tls_policy is not None else Agent(reactor)
        self.retry = retry or RetryPolicy()

    def request(self, method: str, path: str, body: Any = None) -> defer.Deferred:
        """One JSON request -> the decoded reply body.

        Like the blocking ``ApiClient``: refused, reset, timed-out and 5xx requests are
        tried again (``retry``: the data port's attempts and backoff), and a refusal that
        only a lost earlier attempt explains is reconciled by the request's natural key
        (``filedock.client.http.recover_plan``). ``unreachable`` / ``tls-failed`` say
        what to check.
        """
        return defer.ensureDeferred(self._request(method, path, body))

    async def _request(self, method: str, path: str, body: Any) -> Any:
        from filedock.client.http import ApiError, recover_plan

        try:
            return await self._attempts(method, path, body)
        except ApiError as exc:
            plan = recover_plan(method, path, body, exc)
            if plan is None:
                raise
            get_path, check = plan
            try:
                recovered = check(await self._attempts("GET", get_path, None))
            except FiledockError:
                raise exc from None
            if recovered is None:
                raise
            return recovered

    async def _attempts(self, method: str, path: str, body: Any) -> Any:
        from filedock.client.http import unreachable_message

        failures, repeated = 0, False
        while True:
            try:
                return await self._once(method, path, body, repeated)
            except ApiTransient as exc:
                repeated = repeated or exc.sent
                failures += 1
                if failures >= self.retry.attempts:
                    if exc.error is not None:
                        raise exc.error from None
                    raise FiledockError(ErrorCode.UNREACHABLE,
                                        unreachable_message(self.url, exc.reason, failures, None)) from None
                delay = self.retry.delay(failures)
                log.info("{method} {path}: {why}; trying again in {delay:.1f}s", method=method, path=path,
                         why=exc.reason, delay=delay)
                await deferLater(self.reactor, delay)

    async def _once(self, method: str, path: str, body: Any, repeated: bool) -> Any:
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        from filedock.client.http import ApiError

        headers = Headers({b"Accept": [b"application/json"]})
        if self.token:
            headers.addRawHeader(b"Authorization", f"Bearer {self.token}".encode())
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
        try:
            response = await self.agent.request(method.encode(), (self.base + path).encode(), headers, producer)
            collector = BodyCollector(MAX_API_REPLY)
            response.deliverBody(collector)
            raw = await collector.done
        except defer.CancelledError:
            raise
        except FiledockError:
            raise
        except Exception as exc:
            raise self._failure(exc) from None
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if response.code >= 400:
            err = payload.get("error", {}) if isinstance(payload, dict) else {}
            error = ApiError(err.get("code", ErrorCode.INTERNAL_ERROR.value),
                             err.get("message", f"HTTP {response.code} from {self.url}"), response.code, repeated)
            if self.retry.retryable_status(response.code):
                raise ApiTransient(f"HTTP {response.code}: {error.message}", True, error)
            raise error
        return payload

    def _failure(self, exc: Exception) -> Exception:
        """What one failed request means: final (a wrong address, a certificate) or worth another attempt."""
        from twisted.web._newclient import ParseError, _WrapperException

        reasons = [f.value for f in exc.reasons] if isinstance(exc, _WrapperException) else [exc]
        for reason in reasons:
            if isinstance(reason, ParseError) and bytes(reason.args[-1] if reason.args else b"")[:4] == b"ERR ":
                return FiledockError(ErrorCode.UNREACHABLE,
                                     f"{self.url} is a filedock data port, not the control API: use the API's "
                                     "URL (`filedock serve` prints it as 'filedock API: ...'; port 7480 by default)")
            if isinstance(reason, ParseError):
                return FiledockError(ErrorCode.UNREACHABLE,
                                     f"{self.url} did not answer in HTTP; is that the filedock API's address?")
            if isinstance(reason, error.DNSLookupError):
                return FiledockError(ErrorCode.UNREACHABLE,
                                     f"cannot reach the filedock API at {self.url}: {reason}")
            text = str(reason)
            if "certificate verify failed" in text or type(reason).__name__ == "VerificationError":
                return FiledockError(ErrorCode.TLS_FAILED,
                                     f"the certificate of {self.url} failed verification ({text[:200]}): pass a "
                                     "tls_policy that trusts its CA, and use a host name the certificate names")
        sent = not isinstance(exc, error.ConnectError)
        why = "; ".join(str(r) or type(r).__name__ for r in reasons)
        return ApiTransient(why, sent)

    # -- the calls clients make most

    def info(self) -> defer.Deferred:
        """``GET /v1/info``: version, digest scheme, limits, ``data_port``."""
        return self.request("GET", "/v1/info")

    def job(self, id_or_name: str) -> defer.Deferred:
        """``GET /v1/jobs/<id-or-name>``: the job with its ``files``."""
        return self.request("GET", f"/v1/jobs/{quote(id_or_name, safe='')}")

    def create_job(self, name: str, metadata: dict[str, Any] | None = None) -> defer.Deferred:
        """``POST /v1/jobs``."""
        return self.request("POST", "/v1/jobs", {"name": name, "metadata": metadata or {}})

    def find_or_create_job(self, name: str) -> defer.Deferred:
        """``POST /v1/jobs`` with ``exist_ok`` -> the job named ``name`` with its ``files``, created (with
        none) if there was no such job: one round trip where a lookup and a creation take two."""
        d = self.request("POST", "/v1/jobs", {"name": name, "metadata": {}, "exist_ok": True})
        return d.addCallback(lambda job: {"files": [], **job})

    def add_file(self, job: str, name: str, size: int) -> defer.Deferred:
        """``POST /v1/jobs/<job>/files``: declare one file -> its record (with ``key``)."""
        return self.request("POST", f"/v1/jobs/{quote(job, safe='')}/files", {"name": name, "size": size})

    def add_files(self, job: str, files: Sequence[tuple[str, int]], replace: bool = False) -> defer.Deferred:
        """``POST /v1/jobs/<job>/files`` with ``{"files": [...]}``: declare up to 1000 files in one
        transaction -> their records, in order. ``replace``: new versions of files of those names
        (see ``ApiClient.add_files``)."""
        extra = {"replace": True} if replace else {}
        d = self.request("POST", f"/v1/jobs/{quote(job, safe='')}/files",
                         {"files": [{"name": name, "size": size, **extra} for name, size in files]})
        return d.addCallback(lambda reply: reply["files"])

    def open_session(self, job: str, ttl: float | None = None) -> defer.Deferred:
        """``POST /v1/jobs/<job>/sessions`` -> the session (with ``key``)."""
        return self.request("POST", f"/v1/jobs/{quote(job, safe='')}/sessions", {} if ttl is None else {"ttl": ttl})

    def close_session(self, key: str) -> defer.Deferred:
        """``DELETE /v1/sessions/<key>``."""
        return self.request("DELETE", f"/v1/sessions/{quote(key, safe='')}")

    def file(self, key: str) -> defer.Deferred:
        """``GET /v1/files/<key>``: state, received, crc32, digest."""
        return self.request("GET", f"/v1/files/{quote(key, safe='')}")
