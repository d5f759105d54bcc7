"""``client/http11.py``: the control API's HTTP/1.1 connection, against a real loopback socket.

Each test's server answers with bytes written out by hand (the ways an HTTP/1.1 server, a proxy
in front of one, or something that is not one at all may answer) and records what it was sent.
"""

from __future__ import annotations

import socket
import threading

import pytest

from filedock.client import http11


class Canned:
    """A one-connection server: for each request read (head and ``Content-Length`` body), the next
    canned answer is sent; ``None`` closes the connection instead (first: once a request is read;
    after an answer: at once)."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            buf = b""
            for i, answer in enumerate(self.answers):
                if answer is None and i:
                    return
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                if answer is None:
                    return
                conn.sendall(answer)

    def connection(self) -> http11.Connection:
        return http11.Connection("127.0.0.1", self.port, timeout=10)

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def canned():
    servers: list[Canned] = []

    def make(*answers: bytes | None) -> Canned:
        servers.append(Canned(list(answers)))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_two_requests_on_one_kept_connection(canned):
    """A Content-Length answer leaves the connection open for the next request; the request carries the
    Host (with the port), the JSON body and its length, in one piece."""
    server = canned(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"id\": \"j\"}",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
    conn = server.connection()
    conn.request("POST", "/v1/jobs", b'{"name": "a"}', {"Authorization": "Bearer t"})
    first = conn.getresponse()
    assert (first.status, first.reason, first.read(), first.will_close) == (201, "Created", b'{"id": "j"}', False)
    assert first.headers["content-type"] == "application/json"
    conn.request("GET", "/v1/jobs")
    second = conn.getresponse()
    assert (second.status, second.read(), second.will_close) == (200, b"[]", False)
    conn.close()
    server.close()
    post, get = server.requests
    assert post.startswith(b"POST /v1/jobs HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in post
    assert b"Authorization: Bearer t\r\n" in post and b"Content-Length: 13\r\n" in post
    assert post.endswith(b'\r\n\r\n{"name": "a"}')
    assert get.startswith(b"GET /v1/jobs HTTP/1.1\r\n") and b"Content-Length" not in get


def test_a_post_without_a_body_says_length_zero(canned):
    server = canned(b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn = server.connection()
    conn.request("POST", "/v1/sessions/k/close")
    answer = conn.getresponse()
    assert (answer.status, answer.read(), answer.will_close) == (204, b"", False)  # 204 has no body
    conn.request("DELETE", "/v1/sessions/k")
    assert conn.getresponse().status == 200
    conn.close()
    server.close()
    assert b"Content-Length: 0\r\n" in server.requests[0]


def test_a_chunked_answer_with_extensions_and_a_trailer(canned):
    server = canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"4;name=value\r\n{\"a\"\r\nB\r\n: [1, 2, 3]\r\n1\r\n}\r\n0\r\nX-Trailer: yes\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
    conn = server.connection()
    conn.request("GET", "/v1/jobs/j")
    assert conn.getresponse().read() == b'{"a": [1, 2, 3]}'
    conn.request("GET", "/v1/info")  # the trailer was read to its end: the next answer starts clean
    assert conn.getresponse().read() == b"next"
    conn.close()


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
                                  b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\n\r\n"], ids=["connection-close", "http-1.0", "until-close"])
def test_an_answer_that_ends_the_connection_says_so(canned, head):
    server = canned(head + b"{}", None)
    conn = server.connection()
    conn.request("GET", "/v1/info")
    answer = conn.getresponse()
    assert answer.read() == b"{}" and answer.will_close
    conn.close()


def test_http_1_0_keep_alive_keeps_the_connection(canned):
    server = canned(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")
    conn = server.connection()
    conn.request("GET", "/v1/info")
    assert not conn.getresponse().will_close
    conn.close()


def test_interim_answers_are_skipped(canned):
    server = canned(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: y\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    conn = server.connection()
    conn.request("POST", "/v1/jobs", b"{}")
    answer = conn.getresponse()
    assert (answer.status, answer.read()) == (200, b"ok")
    conn.close()


def test_the_data_ports_err_line_is_a_bad_status_line(canned):
    """Pointed at the data port by mistake: its ``ERR`` line comes back as the line itself, for the
    API client to say which port this is."""
    server = canned(b"ERR bad-request not a filedock request\r\n")
    conn = server.connection()
    conn.request("GET", "/v1/info")
    with pytest.raises(http11.BadStatusLine) as exc:
        conn.getresponse()
    assert exc.value.line.startswith("ERR bad-request")
    assert not isinstance(exc.value, http11.RemoteDisconnected)
    conn.close()


def test_a_close_without_an_answer_is_remote_disconnected(canned):
    server = canned(None)
    conn = server.connection()
    conn.request("GET", "/v1/info")
    with pytest.raises(http11.RemoteDisconnected) as exc:
        conn.getresponse()
    assert isinstance(exc.value, ConnectionResetError) and isinstance(exc.value, http11.BadStatusLine)
    conn.close()


@pytest.mark.parametrize("answer, why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "before the end"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "not a Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nab", "not a Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not a chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "does not end"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100 header"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "longer than"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "not a header line"),
], ids=["short-body", "bad-length", "two-lengths", "bad-chunk-size", "chunk-overrun", "many-headers",
        "long-line", "not-a-header"])
def test_a_broken_answer_is_an_http_exception(canned, answer, why):
    server = canned(answer, None)
    conn = server.connection()
    conn.request("GET", "/v1/info")
    with pytest.raises(http11.HTTPException, match=why):
        conn.getresponse()
    conn.close()


def test_the_same_length_repeated_is_one_length(canned):
    server = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
    conn = server.connection()
    conn.request("GET", "/v1/info")
    assert conn.getresponse().read() == b"ok"
    conn.close()


@pytest.mark.parametrize("path, headers", [("/v1/jobs\r\nX: y", {}), ("/v1/a b", {}),
                                           ("/v1/jobs", {"Authorization": "Bearer t\r\nX-Evil: 1"})])
def test_a_line_break_in_a_request_is_refused_before_anything_is_sent(canned, path, headers):
    server = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn = server.connection()
    with pytest.raises(ValueError):
        conn.request("GET", path, headers=headers)
    assert conn.sock is None  # not even connected
    conn.request("GET", "/v1/info")
    assert conn.getresponse().status == 200
    conn.close()
    server.close()
    assert len(server.requests) == 1


def test_host_header_leaves_out_the_default_port_and_brackets_ipv6():
    assert http11.Connection("api.example", 80)._host_header == "api.example"
    assert http11.Connection("api.example", 7480)._host_header == "api.example:7480"
    assert http11.Connection("::1", 7480)._host_header == "[::1]:7480"


def test_an_ascii_host_is_resolved_without_the_idna_codec(canned):
    """``address`` hands ``getaddrinfo`` bytes for an ASCII host (what the codec would make of it) and
    leaves a name beyond ASCII to the codec; a connection by name still finds the server."""
    assert http11.address("127.0.0.1") == b"127.0.0.1" and http11.address("::1") == b"::1"
    assert http11.address("bücher.example") == "bücher.example"
    server = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    conn = http11.Connection("localhost", server.port, timeout=10)
    conn.request("GET", "/v1/info")
    assert conn.getresponse().read() == b"ok"
    conn.close()
