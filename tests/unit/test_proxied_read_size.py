"""Behind a ``haproxy:`` endpoint the data port's reads are as large as on a direct connection.

The data port sets ``transport.bufferSize`` (1 MiB per recv instead of Twisted's 64 KiB). Behind
the PROXY protocol its transport is the wrapper: the size must reach the TCP transport under it,
where Twisted reads it (it stayed on the wrapper before, so every read behind HAProxy was 64 KiB
and the server spent half as much CPU again per byte)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from filedock.server.dataport.connection import DataPortProtocol
from filedock.server.proxied import HeaderFirstFactory
from tests.unit.test_proxy_protocol import proxy_v2


class LargeReads(Protocol):
    """Asks for the data port's read size, the way ``DataPortProtocol.connectionMade`` does."""

    def connectionMade(self) -> None:
        self.transport.bufferSize = DataPortProtocol.READ_SIZE


def test_the_read_size_a_wrapped_protocol_asks_for_reaches_the_tcp_transport():
    inner = LargeReads()
    factory = HeaderFirstFactory(Factory.forProtocol(lambda: inner), Clock(), 5.0)
    wrapper = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 9999))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 9999))
    transport.bufferSize = 1 << 16  # Twisted's TCP default
    wrapper.makeConnection(transport)
    wrapper.dataReceived(proxy_v2("192.0.2.7", 40000))
    assert inner.transport is wrapper
    assert transport.bufferSize == DataPortProtocol.READ_SIZE == 1 << 20
    assert wrapper.bufferSize == transport.bufferSize
