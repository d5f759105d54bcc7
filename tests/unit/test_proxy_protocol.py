"""``haproxy:`` listen strings: the backlog goes on the inner endpoint, and the wrapped protocol is
connected only once the PROXY header named the real client."""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from filedock.server.proxied import HeaderFirstFactory, ProxiedServerEndpoint, server_endpoint
from filedock.server.service import _address, with_backlog


def proxy_v2(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 7481) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def test_with_backlog_goes_on_the_endpoint_under_haproxy():
    assert with_backlog("haproxy:tcp:7481:interface=127.0.0.1") == \
        "haproxy:tcp:7481:interface=127.0.0.1:backlog=1024"
    assert with_backlog("haproxy:ssl:7481:privateKey=k.pem:certKey=c.pem") == \
        "haproxy:ssl:7481:privateKey=k.pem:certKey=c.pem:backlog=1024"
    assert with_backlog("haproxy:tcp:0:backlog=5") == "haproxy:tcp:0:backlog=5"
    assert with_backlog("haproxy:systemd:domain=INET:index=0") == "haproxy:systemd:domain=INET:index=0"


def test_a_haproxy_description_makes_a_proxied_endpoint_and_keeps_tls_known():
    assert isinstance(server_endpoint(Clock(), "haproxy:tcp:0:interface=127.0.0.1", 5.0), ProxiedServerEndpoint)

    class Port:
        def getHost(self):
            return IPv4Address("TCP", "127.0.0.1", 4321)

    assert _address(Port(), "haproxy:ssl:0:privateKey=k.pem") == ("127.0.0.1", 4321, True)
    assert _address(Port(), "haproxy:tcp:0") == ("127.0.0.1", 4321, False)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.peer_at_start = None
        self.data = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.peer_at_start = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class RecordingFactory(Factory):
    def __init__(self, inner: Recorder) -> None:
        self.inner, self.built_for = inner, []

    def buildProtocol(self, addr):
        self.built_for.append(addr)
        return self.inner


def connect(clock: Clock, timeout: float = 5.0):
    inner = Recorder()
    inner.built = RecordingFactory(inner)
    factory = HeaderFirstFactory(inner.built, clock, timeout)
    wrapper = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 9999))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 9999))
    wrapper.makeConnection(transport)
    return wrapper, inner, transport


def test_the_protocol_starts_only_after_the_header_and_sees_the_real_client():
    clock = Clock()
    wrapper, inner, transport = connect(clock)
    header = proxy_v2("203.0.113.7", 40000)
    wrapper.dataReceived(header[:10])  # the header may come in pieces
    assert inner.peer_at_start is None
    wrapper.dataReceived(header[10:] + b"PUT x\n")
    assert (inner.peer_at_start.host, inner.peer_at_start.port) == ("203.0.113.7", 40000)
    assert [a.host for a in inner.built.built_for] == ["203.0.113.7"]  # what the data port's budget keys on
    assert inner.data == b"PUT x\n"
    wrapper.dataReceived(b"more")
    assert inner.data == b"PUT x\nmore"
    clock.advance(10)
    assert not transport.disconnecting and not getattr(transport, "aborted", False)


def test_no_header_is_refused_and_the_protocol_never_starts():
    wrapper, inner, transport = connect(Clock())
    wrapper.dataReceived(b"PUT x 1 2 3 4 5 6 7 8\n")
    assert transport.disconnecting
    wrapper.connectionLost(None)
    assert inner.peer_at_start is None and not inner.lost and inner.built.built_for == []


def test_a_silent_connection_is_dropped_after_the_header_timeout():
    clock = Clock()
    wrapper, inner, transport = connect(clock, timeout=5.0)
    clock.advance(4)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    assert inner.peer_at_start is None


def test_a_local_header_counts_as_the_balancer_itself():
    """HAProxy's health checks send the LOCAL command (0x20) with no addresses."""
    wrapper, inner, _ = connect(Clock())
    wrapper.dataReceived(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + b"\x00\x00")
    assert inner.peer_at_start.host == "10.0.0.1"
