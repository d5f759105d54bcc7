"""No line of the data-port protocol waits for an ACK: every data connection has ``TCP_NODELAY``.

With Nagle's algorithm a small segment waits while an earlier small one is unacknowledged: the
client's ``DONE`` behind the body's last, partly filled segment, and the server's ``RANGES`` for a
pipelined ``PUTR`` behind its ``DURABLE``, each waited for the peer's ACK: a delayed ACK (40 ms) on
loopback, a round trip on a long path, once per file or range. Both ends write each line in one
``send`` and bodies in large ones, so nothing is gained by holding them.

The server's side is checked on real loopback connections to the data port in this process, as
``filedock serve`` builds it from ``--data-listen`` (plain TCP, the TLS fast path, behind a PROXY
header); the clients' on the sockets they connect.
"""

from __future__ import annotations

import socket
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import endpoints, threads
from twisted.internet.protocol import connectionDone

from filedock.client.blocking import DataPortClient
from filedock.client.twisted.exchange import RequestExchange
from filedock.client.twisted.ranged import tcp_socket
from filedock.config import Limits
from filedock.server.authority import StoreAuthority
from filedock.server.dataport import DataPortFactory
from filedock.server.tls_fast import data_endpoint
from filedock.store.blobs import BlobStore
from filedock.store.metadata import DeferredStore
from filedock.store.sqlite import SQLiteStore
from tests.integration.harness import tls_files


def no_delay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


class DataPort:
    """The data port of one store, listening on loopback in this process from a ``--data-listen``
    description; the protocols it builds are remembered by weak reference."""

    def __init__(self, reactor: Any, tmp_path: Path, description: str) -> None:
        self.reactor = reactor
        self.sqlite = SQLiteStore(tmp_path / "meta.db")
        self.built: list[weakref.ref] = []
        limits = Limits(disk_reserve=0)
        blobs = BlobStore(tmp_path / "data")
        factory = DataPortFactory(StoreAuthority(DeferredStore(self.sqlite, reactor), limits, blobs=blobs),
                                  blobs, limits, reactor)
        build = factory.buildProtocol

        def remember(addr: Any) -> Any:
            proto = build(addr)
            self.built.append(weakref.ref(proto))
            return proto

        factory.buildProtocol = remember
        endpoint = data_endpoint(reactor, description, limits.header_timeout)
        self.port = threads.blockingCallFromThread(reactor, endpoint.listen, factory)

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port.getHost().port

    def server_side_no_delay(self) -> bool:
        """TCP_NODELAY on the server's socket of the one connection made, once its protocol is connected."""
        deadline = time.monotonic() + 10

        def look() -> bool | None:
            protos = [r() for r in self.built if r() is not None]
            if not protos or protos[0].transport is None:
                return None
            sock = tcp_socket(protos[0].transport)
            assert sock is not None, f"no TCP socket under {protos[0].transport!r}"
            return no_delay(sock)

        while (seen := threads.blockingCallFromThread(self.reactor, look)) is None:
            assert time.monotonic() < deadline, "the data port built no connected protocol"
            time.sleep(0.02)
        return seen

    def stop(self) -> None:
        threads.blockingCallFromThread(self.reactor, self.port.stopListening)
        self.sqlite.close()


@pytest.mark.parametrize("kind", ["tcp", "ssl", "haproxy"])
def test_the_data_port_never_holds_a_reply_for_an_ack(reactor_thread, tmp_path, kind):
    """Plain TCP, the TLS fast path (a wrapper between the protocol and TCP) and a PROXY-header
    listener (another wrapper; the protocol is built once the header is read): the socket under
    each data-port connection has TCP_NODELAY."""
    description = "tcp:0:interface=127.0.0.1"
    if kind == "ssl":
        key, cert = tls_files(tmp_path)
        description = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    elif kind == "haproxy":
        description = "haproxy:" + description
    port = DataPort(reactor_thread, tmp_path, description)
    try:
        with socket.create_connection(port.address, timeout=10) as sock:
            if kind == "haproxy":
                sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 7481\r\n")
            assert port.server_side_no_delay()
            assert not no_delay(sock)  # the test's own socket: Linux's default, so the option is the server's doing
    finally:
        port.stop()


def test_the_blocking_client_sends_its_lines_at_once(tmp_path):
    """``DataPortClient``'s data connections (every upload, range and download) have TCP_NODELAY."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = DataPortClient("127.0.0.1", listener.getsockname()[1])
        link = client._connect(None)
        try:
            accepted, _ = listener.accept()
            with accepted:
                assert no_delay(link.sock)
                assert not no_delay(accepted)
        finally:
            link.close()


class _Quiet(RequestExchange):
    """An exchange that asks nothing: only its connection is looked at."""

    def request(self) -> bytes:
        return b""

    def connectionLost(self, reason: Any = connectionDone) -> None:
        pass


def test_the_twisted_client_sends_its_lines_at_once(reactor_thread):
    """The Twisted client's exchanges (uploads, ranges, downloads, batches) set TCP_NODELAY on the
    connection they are made with."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        exchange = _Quiet(reactor_thread, "test", None)
        endpoint = endpoints.TCP4ClientEndpoint(reactor_thread, "127.0.0.1", listener.getsockname()[1])
        threads.blockingCallFromThread(reactor_thread, endpoints.connectProtocol, endpoint, exchange)
        accepted, _ = listener.accept()
        with accepted:
            try:
                assert threads.blockingCallFromThread(reactor_thread, lambda: no_delay(tcp_socket(exchange.transport)))
            finally:
                threads.blockingCallFromThread(reactor_thread, exchange.transport.abortConnection)
