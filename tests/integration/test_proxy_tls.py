"""``haproxy:ssl:`` listeners: the balancer passes the client's TLS through (``mode tcp``) and sends the
PROXY header in clear before it, so filedock reads the header first and only then starts TLS (the data
port's own ``tls_fast``, Twisted's on the API port).

One test writes the v2 header by hand, as ``send-proxy-v2`` does; the other puts a real HAProxy
(Debian ``haproxy``) in front of both ports.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from filedock.client.http import ApiClient
from tests.integration.harness import ServerProcess, tls_files
from tests.integration.test_dataport import digest_of, recv_line, wait_closed, wait_for
from tests.integration.test_proxy_protocol import HeaderAddingForwarder, proxy_v2_header

MiB = 1 << 20


class ProxiedTLSServer(ServerProcess):
    """A server whose two ports are ``haproxy:ssl:`` listeners; ``api`` goes through a forwarder that
    prepends a v2 header naming 203.0.113.9 and passes the TLS through."""

    forwarder: HeaderAddingForwarder | None = None

    def __init__(self, tmp_path: Path) -> None:
        self.key, self.cert = tls_files(tmp_path)
        listen = f"haproxy:ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"
        super().__init__(tmp_path / "data", log_path=tmp_path / "server.log",
                         extra=["--api-listen", listen, "--data-listen", listen])

    @property
    def api_addr(self) -> tuple[str, int]:
        from urllib.parse import urlsplit

        url = urlsplit(self.url)
        return url.hostname, url.port

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    @property
    def api(self) -> ApiClient:
        if self.forwarder is None:
            self.forwarder = HeaderAddingForwarder(self.api_addr, "203.0.113.9")
        return ApiClient(f"https://127.0.0.1:{self.forwarder.port}/", self.token, ssl_context=self.client_context())


def upload_over(sock: ssl.SSLSocket, session: str, key: str, data: bytes) -> bytes:
    """A versioned PUT of ``data`` on an open TLS socket; the server's last line."""
    sock.sendall(f"FILEDOCK/1 PUT {session} {key} {len(data)}\r\n".encode())
    assert recv_line(sock) == b"OFFSET 0"
    sock.sendall(data)
    sock.sendall(f"DONE {digest_of(data)}\r\n".encode())
    return recv_line(sock)


def get_info(sock: ssl.SSLSocket, token: str) -> bytes:
    sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 + f"Authorization: Bearer {token}\r\n\r\n".encode())
    return wait_closed(sock)


def log_line(server: ServerProcess, *needles: str) -> str:
    return wait_for(lambda: next((l for l in server.log().splitlines() if all(n in l for n in needles)), None))


def test_a_clear_proxy_header_then_tls_on_both_ports(tmp_path):
    """A client writes a PROXY v2 header in clear, then does its TLS handshake: a 3 MiB upload over the
    data port is STORED (through the stdlib TLS path) and a request over the API port is answered; both
    log lines name the header's client, not 127.0.0.1."""
    with ProxiedTLSServer(tmp_path) as server:
        data = os.urandom(3 * MiB + 11)
        _, files, session = server.job_with_files("proxied-tls", {"f": len(data)})
        key = files["f"]["key"]
        raw = socket.create_connection(server.data_addr, timeout=30)
        raw.sendall(proxy_v2_header("203.0.113.7", 40000, server.data_addr[1]))
        sock = server.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert upload_over(sock, session["key"], key, data) == \
            f"STORED {len(data)} {zlib.crc32(data):08x} {digest_of(data)}".encode()
        sock.close()
        assert "peer=203.0.113.7" in log_line(server, "upload complete"), server.log()
        assert "pyOpenSSL on memory BIOs" in server.log() and "after the PROXY header" in server.log(), server.log()
        assert server.api.file(key)["state"] == "complete"

        raw = socket.create_connection(server.api_addr, timeout=30)
        raw.sendall(proxy_v2_header("203.0.113.8", 40001, server.api_addr[1]))
        sock = server.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        reply = get_info(sock, server.token)
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
        line = log_line(server, "GET /v1/info", '"203.0.113.8"')
        assert '" 200 ' in line, line
        # the job was made through the forwarder, whose header named 203.0.113.9
        assert any('"203.0.113.9"' in l and "POST /v1/jobs" in l for l in server.log().splitlines()), server.log()


def test_tls_first_without_a_header_is_refused(tmp_path):
    """A client that starts its handshake at once (no PROXY header) gets no TLS session."""
    with ProxiedTLSServer(tmp_path) as server:
        for addr in (server.data_addr, server.api_addr):
            raw = socket.create_connection(addr, timeout=10)
            with pytest.raises((ssl.SSLError, OSError)):
                server.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
            raw.close()


# -- a real HAProxy in front

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def haproxy_in_front(tmp_path):
    """A server with ``haproxy:ssl:`` ports behind a private HAProxy (``mode tcp``, ``send-proxy-v2``,
    TLS passed through); yields (server, data frontend, api frontend)."""
    if HAPROXY is None:
        why = "HAProxy is not installed: apt-get install -y haproxy (Debian's package)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    with ProxiedTLSServer(tmp_path) as server:
        data_front, api_front = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
        config = tmp_path / "haproxy.cfg"
        config.write_text(f"""global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend data
    bind {data_front[0]}:{data_front[1]}
    default_backend data
backend data
    server fd1 {server.data_addr[0]}:{server.data_addr[1]} send-proxy-v2
frontend api
    bind {api_front[0]}:{api_front[1]}
    default_backend api
backend api
    server fd1 {server.api_addr[0]}:{server.api_addr[1]} send-proxy-v2
""")
        log = open(tmp_path / "haproxy.log", "wb")
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            for front in (data_front, api_front):
                while True:
                    assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
                    try:
                        socket.create_connection(front, timeout=1).close()
                        break
                    except OSError:
                        assert time.monotonic() < deadline, "HAProxy did not listen in time"
                        time.sleep(0.05)
            yield server, data_front, api_front
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()


def test_through_a_real_haproxy_passing_tls_through(haproxy_in_front):
    """Clients connect to HAProxy from 127.0.0.2 (a loopback address HAProxy itself does not use to reach
    the server): an upload and an API request over TLS succeed, and both log lines name 127.0.0.2."""
    server, data_front, api_front = haproxy_in_front
    data = os.urandom(2 * MiB + 3)
    _, files, session = server.job_with_files("haproxy", {"f": len(data)})
    key = files["f"]["key"]
    raw = socket.create_connection(data_front, timeout=30, source_address=("127.0.0.2", 0))
    sock = server.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    assert upload_over(sock, session["key"], key, data) == \
        f"STORED {len(data)} {zlib.crc32(data):08x} {digest_of(data)}".encode()
    sock.close()
    assert "peer=127.0.0.2" in log_line(server, "upload complete"), server.log()

    raw = socket.create_connection(api_front, timeout=30, source_address=("127.0.0.2", 0))
    sock = server.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    reply = get_info(sock, server.token)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert '" 200 ' in log_line(server, "GET /v1/info", '"127.0.0.2"')
