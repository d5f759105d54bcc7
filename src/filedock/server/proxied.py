"""Listening behind a TCP load balancer that speaks the PROXY protocol (``haproxy:`` endpoints).

Twisted's own ``haproxy:`` wrapper connects the wrapped protocol as soon as the TCP connection
opens, before the PROXY header has arrived, so anything the protocol does in ``connectionMade``
(the data port's per-address budget) would see the balancer's address. Here the wrapped protocol
is built and connected only once the header is parsed, so it sees the real client from its first
moment (its factory's ``buildProtocol`` gets that address, as for a direct connection);
a connection whose header does not come within the header timeout is dropped.

Under ``haproxy:ssl:...`` the balancer passes the client's TLS through (``mode tcp``): the PROXY header
comes first and in clear, then the client's handshake. So such a listener is plain TCP, and TLS starts
only after the header, as the innermost layer (Twisted's, with the ``ssl:`` part's certificate, key and
options; the data port brings its own, ``tls_fast``).
"""

from __future__ import annotations

from typing import Any

from zope.interface import directlyProvides, providedBy
from twisted.internet import endpoints
from twisted.internet.protocol import Protocol
# Twisted exports only proxyEndpoint; its wrapper classes (unchanged since 2016) are what we extend
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory

PREFIX = "haproxy:"


class HeaderFirstWrapper(HAProxyProtocolWrapper):
    """A PROXY protocol wrapper that builds and connects its protocol only after the header is read."""

    _connected = False
    _timer: Any = None
    _early = b""

    @property
    def bufferSize(self) -> int:
        return self.transport.bufferSize

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        # the protocol asks for larger reads (the data port: 1 MiB per recv): they are the TCP
        # transport's. ProtocolWrapper reads attributes through to it but would keep a written one
        # on the wrapper, where nothing reads it: behind HAProxy every read stayed at Twisted's 64 KiB
        self.transport.bufferSize = size

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection without connecting the wrapped protocol yet
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.reactor.callLater(self.factory.header_timeout, self._no_header)

    def _no_header(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            data = self._early + data  # the signature may come in pieces: the parent needs 16 bytes at once
            if len(data) < 16:
                self._early = data
                return
            self._early = b""
        # the parent parses (or drops the connection on a bad header); it hands any bytes after the
        # header to the wrapped protocol, which must be connected first: catch them and replay
        held: list[bytes] = []
        wrapped, self.wrappedProtocol = self.wrappedProtocol, _Holder(held)
        try:
            super().dataReceived(data)
        finally:
            self.wrappedProtocol = wrapped
        if self._proxyInfo is None:
            return  # the header is not whole yet (or was bad, and the connection is closing)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # the protocol is built only now, so its factory sees the real client as a direct connection would
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.loseConnection()
            return
        self.wrappedProtocol = protocol
        self._connected = True
        self.wrappedProtocol.makeConnection(self)
        for chunk in held:
            if not self._connected or self.wrappedProtocol is None:
                break
            self.wrappedProtocol.dataReceived(chunk)

    def connectionLost(self, reason: Any) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._connected:
            ProtocolWrapper.connectionLost(self, reason)
        else:
            self.factory.unregisterProtocol(self)
            self.wrappedProtocol = None


class HeaderFirstFactory(HAProxyWrappingFactory):
    """Wraps a factory's connections in :class:`HeaderFirstWrapper`; the wrapped factory builds each
    connection's protocol once its PROXY header is read, with the real client's address."""

    protocol = HeaderFirstWrapper
    noisy = False  # the wrapped factory already says when it starts listening

    def __init__(self, wrapped: Any, reactor: Any, header_timeout: float) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: Any) -> HeaderFirstWrapper:
        return self.protocol(self, None)


class _Holder:
    def __init__(self, held: list[bytes]) -> None:
        self.held = held

    def dataReceived(self, data: bytes) -> None:
        self.held.append(data)


class ProxiedServerEndpoint:
    """A server endpoint whose connections start with a PROXY protocol (v1 or v2) header."""

    def __init__(self, inner: Any, reactor: Any, header_timeout: float) -> None:
        self.inner, self.reactor, self.header_timeout = inner, reactor, header_timeout

    def listen(self, factory: Any) -> Any:
        """Listen on the inner endpoint; its port (and so ``getHost``) is the real listening one.

        A TLS inner endpoint listens on plain TCP instead, with TLS started after the header."""
        inner, factory = tls_after_header(self.inner, factory)
        return inner.listen(HeaderFirstFactory(factory, self.reactor, self.header_timeout))


def tls_after_header(inner: Any, factory: Any) -> tuple[Any, Any]:
    """(the plain TCP endpoint under a TLS endpoint ``inner``, ``factory`` wrapped in its TLS), so that
    TLS begins after the PROXY header; ``(inner, factory)`` unchanged when ``inner`` is not TLS.

    An endpoint with its own TLS (``tls_fast.FastTLSEndpoint``) says how with ``plain_and_tls``."""
    if hasattr(inner, "plain_and_tls"):
        return inner.plain_and_tls(factory)
    if isinstance(inner, endpoints.SSL4ServerEndpoint):
        # what listenSSL does (TLSMemoryBIOFactory over TCP), with the header read first; the endpoint
        # keeps what serverFromString parsed in these attributes (unchanged since Twisted 10.1)
        tcp = endpoints.TCP4ServerEndpoint(inner._reactor, inner._port, inner._backlog, inner._interface)
        return tcp, TLSMemoryBIOFactory(inner._sslContextFactory, False, factory)
    return inner, factory


def server_endpoint(reactor: Any, description: str, header_timeout: float) -> Any:
    """``serverFromString``, except that a ``haproxy:`` endpoint connects its protocol only once the
    PROXY header named the real client."""
    if description.startswith(PREFIX):
        inner = endpoints.serverFromString(reactor, description[len(PREFIX):])
        return ProxiedServerEndpoint(inner, reactor, header_timeout)
    return endpoints.serverFromString(reactor, description)


def inner_description(description: str) -> str:
    """The listening endpoint under a ``haproxy:`` prefix (the description itself otherwise)."""
    return description[len(PREFIX):] if description.startswith(PREFIX) else description
