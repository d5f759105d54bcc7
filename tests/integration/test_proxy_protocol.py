"""Behind a TCP load balancer speaking PROXY protocol v2 (``haproxy:`` listen strings): a real server
process sees, logs and budgets the client the header names, not the balancer's address.

No HAProxy binary: the tests send the v2 header by hand, as HAProxy's ``send-proxy-v2`` does, and the
control API is reached through a tiny in-test forwarder that prepends the same header.
"""

from __future__ import annotations

import socket
import struct
import threading
import zlib

from filedock.client.http import ApiClient
from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, recv_line, wait_closed, wait_for

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LISTEN = "haproxy:tcp:0:interface=127.0.0.1"


def proxy_v2_header(src: str, src_port: int, dst_port: int, dst: str = "127.0.0.1") -> bytes:
    """A PROXY v2 header: PROXY command (0x21), TCP over IPv4 (0x11), 12 address bytes."""
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", src_port, dst_port)
    return SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def connect_as(addr: tuple[str, int], client: str, client_port: int = 40000) -> socket.socket:
    sock = socket.create_connection(addr, timeout=30)
    sock.sendall(proxy_v2_header(client, client_port, addr[1]))
    return sock


class HeaderAddingForwarder:
    """What HAProxy with ``send-proxy-v2`` does, in a thread: each connection to it goes on to
    ``target`` with a PROXY v2 header naming ``client`` first."""

    def __init__(self, target: tuple[str, int], client: str) -> None:
        self.target, self.client = target, client
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = connect_as(self.target, self.client)
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


class ProxiedServer(ServerProcess):
    """A server whose two ports are ``haproxy:`` listeners; ``api`` goes through a forwarder."""

    forwarder: HeaderAddingForwarder | None = None

    @property
    def api_addr(self) -> tuple[str, int]:
        from urllib.parse import urlsplit

        url = urlsplit(self.url)
        return url.hostname, url.port

    @property
    def api(self) -> ApiClient:
        if self.forwarder is None:
            self.forwarder = HeaderAddingForwarder(self.api_addr, "203.0.113.9")
        return ApiClient(f"http://127.0.0.1:{self.forwarder.port}/", self.token)


def proxied_server(tmp_path, limits: list[str] | None = None) -> ProxiedServer:
    return ProxiedServer(tmp_path / "data", limits=limits, log_path=tmp_path / "server.log",
                         extra=["--api-listen", LISTEN, "--data-listen", LISTEN])


def test_a_put_through_a_proxy_header_is_stored_and_logged_with_the_real_client(tmp_path):
    """The ready file names the real listening ports; a data-port PUT after a v2 header is STORED and
    the upload line names the header's client; the API access log does too."""
    with proxied_server(tmp_path) as server:
        assert server.info["data_port"] > 0 and server.api_addr[1] > 0
        data = b"proxied bytes " * 1000
        _, files, session = server.job_with_files("proxied", {"f": len(data)})
        key = files["f"]["key"]
        sock = connect_as(server.data_addr, "203.0.113.7")
        sock.sendall(f"FILEDOCK/1 PUT {session['key']} {key} {len(data)}\r\n".encode())
        assert recv_line(sock) == b"OFFSET 0"
        sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
        assert recv_line(sock) == f"STORED {len(data)} {zlib.crc32(data):08x} {digest_of(data)}".encode()
        sock.close()
        line = wait_for(lambda: next((l for l in server.log().splitlines() if "upload complete" in l), None))
        assert "peer=203.0.113.7" in line, line
        # the API calls above came through the forwarder claiming 203.0.113.9
        assert any('"203.0.113.9"' in l and "POST /v1/jobs" in l for l in server.log().splitlines()), server.log()


def test_the_api_answers_after_a_proxy_header_and_logs_the_real_client(tmp_path):
    with proxied_server(tmp_path) as server:
        sock = connect_as(server.api_addr, "203.0.113.7")
        sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     + f"Authorization: Bearer {server.token}\r\n\r\n".encode())
        reply = wait_closed(sock)
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
        line = wait_for(lambda: next((l for l in server.log().splitlines() if "GET /v1/info" in l), None))
        assert '"203.0.113.7" - - [' in line and '" 200 ' in line, line


def test_the_per_address_budget_keys_on_the_proxied_client(tmp_path):
    """All connections come from 127.0.0.1 (the "balancer"): 203.0.113.7 spends its share of silent
    connections and is refused, while 203.0.113.8 on the same balancer is still served."""
    limits = ["max_unauthenticated_per_address=3", "header_timeout=60"]
    with proxied_server(tmp_path, limits) as server:
        silent = [connect_as(server.data_addr, "203.0.113.7", 40000 + i) for i in range(3)]
        refused = connect_as(server.data_addr, "203.0.113.7", 40010)
        assert recv_line(refused).startswith(b"ERR too-many-connections "), server.log()
        other = connect_as(server.data_addr, "203.0.113.8")
        other.sendall(b"FILEDOCK/1 PUT nosuchsession nosuchkey 10\r\n")
        reply = recv_line(other)
        assert reply.startswith(b"ERR ") and not reply.startswith(b"ERR too-many-connections "), reply
        for s in silent:
            s.settimeout(0.2)
            try:
                assert s.recv(1) == b"never", "a silent connection was answered"
            except socket.timeout:
                pass
            s.close()


def test_a_connection_without_a_proxy_header_is_refused(tmp_path):
    with proxied_server(tmp_path) as server:
        sock = socket.create_connection(server.data_addr, timeout=30)
        sock.sendall(b"FILEDOCK/1 PUT somesession somekey 10\r\n")
        assert wait_closed(sock) == b""
