"""One HTTP/1.1 client connection, for the control API's JSON requests (``client/http.py``).

What ``http.client`` did for ``ApiClient``, without its import: ``http.client`` loads the
``email`` package to parse headers and ``ssl`` whether or not TLS is used, 13-18 ms of every
``filedock`` command's start-up on this project's machines (``python -X importtime``), which
is where most of a short command's time goes and ~2 % of a 1 GiB ``filedock upload`` on
loopback. The control API asks for little: one request at a time on a connection kept alive
between requests; an answer whose body is delimited by ``Content-Length``, chunked, or the
connection's close; ``1xx`` interim answers skipped. Lines, headers and chunk-size lines have
limits, so a peer that is not an HTTP server cannot make the client read without end.

``ssl`` is imported only by a connection given a TLS context (the caller made the context,
so it is loaded already).
"""

from __future__ import annotations

import socket
from typing import Any

MAX_LINE = 65536
"""Longest status, header or chunk-size line (``http.client``'s limit)."""

MAX_HEADERS = 100
"""Most header lines in one answer (``http.client``'s limit)."""

_NO_BODY = (204, 304)


def address(host: str) -> str | bytes:
    """``host`` as ``getaddrinfo`` takes it without the ``idna`` codec: bytes when it is ASCII (a name or an
    address literal), which is what that codec would make of it. The codec's import (with ``stringprep``
    and ``unicodedata``) was 3-4 ms of a command's start-up; a name beyond ASCII still goes through it."""
    return host.encode("ascii") if host.isascii() else host


class HTTPException(Exception):
    """The answer broke HTTP/1.1 (or the connection ended inside it)."""


class BadStatusLine(HTTPException):
    """The first line of the answer is not an HTTP status line; ``line`` is what came instead."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class RemoteDisconnected(ConnectionResetError, BadStatusLine):
    """The server closed the connection without a status line (as ``http.client``'s, both a reset and
    a bad status line)."""

    def __init__(self, message: str) -> None:
        ConnectionResetError.__init__(self, message)
        self.line = ""


class Response:
    """A whole answer: ``status``, ``reason``, ``headers`` (names in lower case), the body (``read``) and
    whether the server closes the connection after it (``will_close``)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes, will_close: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._body = body
        self.will_close = will_close

    def read(self) -> bytes:
        return self._body


class Connection:
    """``Connection(host, port, timeout, context)``: ``connect()``, then ``request(...)`` and
    ``getresponse()`` in turn, as often as the server keeps the connection; ``close()``.

    ``context`` (an ``ssl.SSLContext``) makes it HTTPS, the server's name checked against ``host``.
    ``sock`` is the connected socket (its time-out may be changed between requests).
    """

    def __init__(self, host: str, port: int, timeout: float | None = None, context: Any = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.context = context
        self.sock: socket.socket | None = None
        self._reader: Any = None
        self._method = ""
        default_port = 443 if context is not None else 80
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal
        self._host_header = name if port == default_port else f"{name}:{port}"

    def connect(self) -> None:
        sock = socket.create_connection((address(self.host), self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the request goes in one write
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._reader = sock.makefile("rb")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> None:
        """Send one request (``body`` with its ``Content-Length``; a POST, PUT or PATCH without one says 0)."""
        headers = headers or {}
        if any(c in part for part in (method, path) for c in " \r\n\0") or \
                any(c in part for part in (*headers, *headers.values()) for c in "\r\n\0"):
            raise ValueError(f"a space or line break in the request line or a header: {method} {path}")
        if self.sock is None:
            self.connect()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}", "Accept-Encoding: identity"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._method = method
        assert self.sock is not None
        self.sock.sendall(head + (body or b""))

    def getresponse(self) -> Response:
        """The answer to the last request, its body read whole."""
        while True:
            version, status, reason = self._status_line()
            headers = self._headers()
            if 100 <= status < 200 and status != 101:  # an interim answer (100 Continue): the real one follows
                continue
            break
        connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
        will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        if self._method == "HEAD" or status in _NO_BODY or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._chunked()
        elif "content-length" in headers:
            body = self._exactly(_length(headers["content-length"]))
        else:  # delimited by the close
            body = self._reader.read()
            will_close = True
        return Response(status, reason, headers, body, will_close)

    def close(self) -> None:
        reader, sock, self._reader, self.sock = self._reader, self.sock, None, None
        if reader is not None:
            reader.close()
        if sock is not None:
            sock.close()

    # -- reading

    def _line(self) -> bytes:
        line = self._reader.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise HTTPException(f"a line longer than {MAX_LINE} bytes")
        return line

    def _status_line(self) -> tuple[str, int, str]:
        raw = self._line()
        if not raw:
            raise RemoteDisconnected("the server closed the connection without an answer")
        line = raw.decode("iso-8859-1")
        version, _, rest = line.rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
            raise BadStatusLine(line)
        return version, int(code), reason.strip()

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                return headers
            name, sep, value = line.decode("iso-8859-1").partition(":")
            if not sep:
                raise HTTPException(f"not a header line: {line[:60]!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        raise HTTPException(f"more than {MAX_HEADERS} header lines")

    def _exactly(self, n: int) -> bytes:
        data = self._reader.read(n)
        if len(data) < n:
            raise HTTPException(f"the connection ended {n - len(data)} bytes before the end of the answer")
        return data

    def _chunked(self) -> bytes:
        parts = []
        while True:
            line = self._line()
            size = line.split(b";", 1)[0].strip()  # chunk extensions are ignored
            try:
                n = int(size, 16)
            except ValueError:
                raise HTTPException(f"not a chunk size: {line[:60]!r}") from None
            if n < 0:
                raise HTTPException(f"not a chunk size: {line[:60]!r}")
            if n == 0:
                self._headers()  # the trailer, up to the empty line
                return b"".join(parts)
            parts.append(self._exactly(n))
            if self._line() not in (b"\r\n", b"\n"):
                raise HTTPException("a chunk does not end where its size says")


def _length(value: str) -> int:
    values = {v.strip() for v in value.split(",")}  # the same length repeated is allowed (RFC 9110 8.6)
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise HTTPException(f"not a Content-Length: {value[:60]!r}")
    return int(values.pop())
