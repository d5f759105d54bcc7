"""Blocking client for the control API (http.client; no extra dependency).

Used by the CLI and the blocking uploader. Errors come back as ``FiledockError``
with the server's stable code.
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any
from urllib.parse import quote, urlsplit

from filedock.errors import ErrorCode, FiledockError


class ApiClient:
    """``ApiClient("http://127.0.0.1:7480/", token).get("/v1/jobs")``."""

    def __init__(self, url: str, token: str | None, timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise FiledockError(ErrorCode.BAD_REQUEST, f"not an http(s) URL: {url}")
        self.url = url
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.token = token
        self.timeout = timeout
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.tls else None)
        self._info: dict[str, Any] | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.tls:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request; returns the decoded body or raises ``FiledockError``."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise FiledockError(ErrorCode.INTERNAL_ERROR, f"cannot reach {self.url}: {exc}") from exc
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if resp.status >= 400:
            err = (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
            raise FiledockError(err.get("code", ErrorCode.INTERNAL_ERROR.value),
                                err.get("message", f"HTTP {resp.status} from {self.url}"))
        return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    # -- the calls clients make most

    def info(self, fresh: bool = False) -> dict[str, Any]:
        """``GET /v1/info`` (the data port's address, the limits), asked once per client unless ``fresh``."""
        if fresh or self._info is None:
            self._info = self.get("/v1/info")
        return self._info

    def job(self, id_or_name: str) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{quote(id_or_name, safe='')}")

    def create_job(self, name: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.post("/v1/jobs", {"name": name, "metadata": metadata or {}})

    def add_file(self, job: str, name: str, size: int) -> dict[str, Any]:
        return self.post(f"/v1/jobs/{quote(job, safe='')}/files", {"name": name, "size": size})

    def open_session(self, job: str, ttl: float | None = None) -> dict[str, Any]:
        return self.post(f"/v1/jobs/{quote(job, safe='')}/sessions", {} if ttl is None else {"ttl": ttl})

    def close_session(self, key: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/sessions/{quote(key, safe='')}")

    def file(self, key: str) -> dict[str, Any]:
        return self.get(f"/v1/files/{quote(key, safe='')}")
