"""The data port's TLS: OpenSSL through pyOpenSSL on memory BIOs, decrypting into reused buffers.

Twisted's ``ssl:`` endpoint runs TLS through pyOpenSSL too (``TLSMemoryBIOProtocol``), but every
32 KiB ``recv`` on the TLS object allocates a fresh buffer and copies out of it, and the
reactor thread saturated there at 0.28x the raw plaintext limit. Here the same listener
string (``ssl:PORT:privateKey=KEY:certKey=CERT``, with ``interface=``, ``backlog=``,
``extraCertChain=`` and ``dhParameters=``)
listens on plain TCP, and each connection is wrapped in :class:`FastTLSProtocol`:
ciphertext from the socket goes into the connection's incoming memory BIO (one copy, in C), and
``SSL_read`` decrypts straight into a 1 MiB ``bytearray`` that is handed
on in views of disjoint regions, never reused: the upload's writer may keep a view
queued, and the bytes under it never change. Plaintext is never copied in Python.

Why pyOpenSSL and not the standard library's ``ssl.SSLObject`` (which this module used first):
the standard library links the system's OpenSSL (3.0 here), whose AES-GCM has no AVX-512 code,
while ``cryptography`` (pyOpenSSL's engine, already installed for Twisted) ships its own, newer
OpenSSL with AVX-512 (VAES) AES-GCM. In a profile of a 1 GiB ``filedock upload --tls``, the system
OpenSSL's AES-GCM was a fifth of both ends' CPU; ``cryptography``'s moved the same bytes in about a
third of the time (``benchmarks/README.md``, "TLS on the newer OpenSSL").

Only the data port uses this; the control API keeps Twisted's own TLS (its bodies are small).
An ``ssl:`` listener with options this module does not speak (``sslmethod``, ...) keeps
Twisted's path, with a log line saying so,
and so does every ``ssl:`` listener when the environment has ``FILEDOCK_DATA_TLS=twisted``.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

log = Logger(namespace="filedock.dataport")

READ_SIZE = 1 << 20
"""Plaintext bytes per buffer, and ciphertext bytes per ``recv`` from the socket."""

POOLED_BUFFERS = 40
"""Buffers a connection keeps for reuse once nothing refers to them any more. A fresh 1 MiB
``bytearray`` is a fresh ``mmap`` whose 256 pages all fault when first written: with eight
alive at once that cost about 1 ms per MiB in a micro-benchmark here, and allocating was a
fifth of the reactor's samples in a profile. The upload's writer queues up to 32 MiB
(``FlowControl.HIGH_WATER``) before reading pauses, so a pool of eight ran dry on every fast
upload: a py-spy profile of a 1 GiB ``filedock upload --tls`` still had 95 of the reactor's 879
samples in allocating here. Forty covers the writer's queue. The pool grows only as buffers
are needed at once, so at most this many MiB stay with a connection until it closes (the
writer's queue holds as much while it is full)."""

TLS12_CIPHERS = "ECDHE+AESGCM+AES128:ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1"
"""TLS 1.2 suites: forward-secret AEAD only, AES-GCM first (hardware AES on every server
CPU of the last decade), AES-128 before AES-256 (see ``TLS13_SUITES``)."""

TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
"""TLS 1.3 suites in the server's order of preference: AES-128-GCM first. OpenSSL's default
puts AES-256-GCM first, whose 14 rounds cost more than AES-128's 10 on both ends: here
``openssl speed -evp`` (16 KiB) moved 2.9 GB/s with AES-256-GCM and 4.0 GB/s with AES-128-GCM,
about 0.1 s of CPU per GiB less on each end of a bulk upload. Both are AEAD suites every
TLS 1.3 peer speaks."""

_SPOKEN = frozenset({"interface", "backlog", "privateKey", "certKey", "extraCertChain", "dhParameters"})
"""The ``ssl:`` options this module understands; any other keeps Twisted's own TLS."""


def openssl_version() -> str:
    """The OpenSSL this module's TLS runs on (``cryptography``'s own, not the system's)."""
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()


def server_context(private_key: str, cert: str, extra_chain: str | None = None,
                   dh_parameters: str | None = None) -> SSL.Context:
    """A server context for the data port: TLS 1.2+, AEAD suites, the given PEM key and certificate
    (``extra_chain``: intermediates sent after it, as Twisted's ``extraCertChain``)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(TLS12_CIPHERS.encode())
    ctx.set_tls13_ciphersuites(TLS13_SUITES.encode())
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    try:
        if dh_parameters:
            ctx.load_tmp_dh(dh_parameters)
        ctx.use_certificate_chain_file(cert)  # certKey may hold the chain after the leaf, as with Twisted
        if extra_chain:
            for pem in _pem_blocks(open(extra_chain, "rb").read()):
                ctx.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
        ctx.use_privatekey_file(private_key)
        ctx.check_privatekey()
    except (SSL.Error, crypto.Error, OSError) as exc:
        raise ValueError(f"data port TLS: cannot use the certificate {cert} with the private key "
                         f"{private_key}: {_reason(exc)}") from None
    return ctx


def _pem_blocks(data: bytes) -> list[bytes]:
    """Each ``-----BEGIN CERTIFICATE-----`` block of a PEM file, in order."""
    return re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)


def _fast_read_into() -> Any:
    """``read_into(conn, view) -> n``: ``SSL_read`` straight into ``view``, or None where it cannot be.

    pyOpenSSL's ``recv_into`` decrypts into a temporary C buffer and copies out of it (its comment
    says why: cffi could not pass a writable memoryview when it was written; it can now). This calls
    ``SSL_read`` on the view itself, through the same cffi library and the same error mapping as
    pyOpenSSL's own calls. It reaches pyOpenSSL's private ``_lib``, ``_ffi``, ``_ssl`` and
    ``_raise_ssl_error``: when any of them is missing (another pyOpenSSL), ``recv_into`` is used
    and the only cost is the copy (about 0.06 s of CPU per GiB here).
    """
    lib, ffi = getattr(SSL, "_lib", None), getattr(SSL, "_ffi", None)
    raise_error = getattr(SSL.Connection, "_raise_ssl_error", None)
    if lib is None or ffi is None or raise_error is None or not hasattr(lib, "SSL_read"):
        return None
    ssl_read, from_buffer = lib.SSL_read, ffi.from_buffer

    def read_into(conn: SSL.Connection, view: memoryview) -> int:
        with from_buffer(view, require_writable=True) as data:
            result = ssl_read(conn._ssl, data, len(view))
        if result <= 0:
            raise_error(conn, conn._ssl, result)  # WantReadError, ZeroReturnError or an Error
            raise SSL.Error(f"SSL_read returned {result} without an error")  # never loop on it
        return result

    return read_into


_READ_INTO = _fast_read_into()


def read_into(conn: SSL.Connection, view: memoryview) -> int:
    """Decrypt what is whole in ``conn``'s BIO into ``view`` (at most one record); the bytes read."""
    if _READ_INTO is not None and hasattr(conn, "_ssl"):
        return _READ_INTO(conn, view)
    return conn.recv_into(view)


def parse_ssl_description(description: str) -> tuple[str, dict[str, str]] | None:
    """``ssl:PORT:k=v...`` -> (port, options), or None if it is not an ``ssl:`` endpoint.

    Colons escaped with a backslash (``interface=\\:\\:1``) stay in their value, as with Twisted.
    """
    fields = re.split(r"(?<!\\):", description)
    if fields[0] != "ssl":
        return None
    port, options = "", {}
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if not sep:
            if port:
                return None  # two positional arguments: leave it to Twisted to explain
            port = field
            continue
        options[key] = value.replace("\\:", ":")
    if not port and "port" in options:
        port = options.pop("port")
    return port, options


def server_endpoint(reactor: Any, description: str) -> Any:
    """The data port's endpoint for ``description``: an ``ssl:`` one with the options above is served by
    :class:`FastTLSEndpoint`; anything else (``tcp:``, ``unix:``, other ``ssl:`` options) by Twisted."""
    parsed = parse_ssl_description(description)
    if parsed is None:
        return endpoints.serverFromString(reactor, description)
    port, options = parsed
    if os.environ.get("FILEDOCK_DATA_TLS") == "twisted":  # an operator's way back, and the bench's A/B
        log.info("data port: FILEDOCK_DATA_TLS=twisted: Twisted's (pyOpenSSL) TLS")
        return endpoints.serverFromString(reactor, description)
    unknown = sorted(set(options) - _SPOKEN)
    if unknown or "privateKey" not in options or not port:
        log.info("data port: ssl: options {unknown} keep Twisted's (slower) TLS", unknown=",".join(unknown) or "-")
        return endpoints.serverFromString(reactor, description)
    ctx = server_context(options["privateKey"], options.get("certKey", options["privateKey"]),
                         options.get("extraCertChain"), options.get("dhParameters"))
    tcp = endpoints.TCP4ServerEndpoint if ":" not in options.get("interface", "") else endpoints.TCP6ServerEndpoint
    inner = tcp(reactor, int(port), backlog=int(options.get("backlog", 50)), interface=options.get("interface", ""))
    return FastTLSEndpoint(inner, ctx, reactor)


def data_endpoint(reactor: Any, description: str, header_timeout: float) -> Any:
    """``proxied.server_endpoint`` for the data port: the same, with ``ssl:`` served as above."""
    from filedock.server import proxied

    if description.startswith(proxied.PREFIX):
        inner = server_endpoint(reactor, proxied.inner_description(description))
        return proxied.ProxiedServerEndpoint(inner, reactor, header_timeout)
    return server_endpoint(reactor, description)


class FastTLSEndpoint:
    """A TCP server endpoint whose connections speak TLS through :class:`FastTLSProtocol`."""

    def __init__(self, inner: Any, context: SSL.Context, reactor: Any) -> None:
        self.inner, self.context, self.reactor = inner, context, reactor

    def listen(self, factory: Any) -> defer.Deferred:
        """Listen on the inner TCP endpoint; the port's ``getHost`` is the real listening one."""
        log.info("data port: TLS by pyOpenSSL on memory BIOs ({openssl})", openssl=openssl_version())
        return self.inner.listen(FastTLSFactory(factory, self.context, self.reactor))

    def plain_and_tls(self, factory: Any) -> tuple[Any, "FastTLSFactory"]:
        """(the plain TCP endpoint, ``factory`` wrapped in this TLS): for ``haproxy:ssl:``, whose PROXY
        header comes in clear before the handshake (``proxied.tls_after_header``)."""
        log.info("data port: TLS by pyOpenSSL on memory BIOs ({openssl}), after the PROXY header",
                 openssl=openssl_version())
        return self.inner, FastTLSFactory(factory, self.context, self.reactor)


class FastTLSFactory(WrappingFactory):
    """Wraps each connection of ``wrapped`` (a protocol factory) in server-side TLS."""

    noisy = False  # the wrapped factory already says when it starts listening

    def __init__(self, wrapped: Any, context: SSL.Context, reactor: Any) -> None:
        super().__init__(wrapped)
        self.context, self.reactor = context, reactor

    def buildProtocol(self, addr: Any) -> "FastTLSProtocol | None":
        proto = self.wrappedFactory.buildProtocol(addr)
        return None if proto is None else FastTLSProtocol(self, proto)


class FastTLSProtocol(ProtocolWrapper):
    """Server-side TLS for one connection, over a memory-BIO ``SSL.Connection``; the transport of the
    protocol it wraps.

    The wrapped protocol is connected when the TCP connection opens, so its timers (the
    header time-out, the unauthenticated budget) run during the handshake too: a client
    that never finishes one is dropped as one that never sends a request is. Reading is
    paused and resumed for the wrapped protocol as for a plain transport; decrypted bytes
    are delivered only while it is not paused (what is still encrypted waits in the BIO,
    and the socket is not read meanwhile, so memory stays bounded).
    """

    def __init__(self, factory: FastTLSFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._tls = SSL.Connection(factory.context, None)  # None: memory BIOs on both sides
        self._tls.set_accept_state()
        self._handshaking = True
        self._early: list[bytes] = []  # what the wrapped protocol wrote before the handshake finished
        self._paused = False
        self._delivery_due = False
        self._closing = False
        self._eof = False
        self._pool: list[bytearray] = []
        self._buf = memoryview(self._fresh_buffer())
        self._pos = 0  # self._buf[:self._pos] is handed on already and must not be written again

    def _fresh_buffer(self) -> bytearray:
        """A pooled buffer no view refers to any more, or a new one (pooled while there is room)."""
        for buf in self._pool:
            # referred to by the pool, this loop and getrefcount's argument only: every view of it
            # (they hold it through their shared buffer object) is gone, so nobody reads it any more
            if sys.getrefcount(buf) == 3:
                return buf
        buf = bytearray(READ_SIZE)
        if len(self._pool) < POOLED_BUFFERS:
            self._pool.append(buf)
        return buf

    def connectionLost(self, reason: Any) -> None:
        # the buffers go now, whoever still holds this object (a timer, a reference cycle)
        self._pool, self._buf, self._early = [], None, []
        self._eof = self._closing = True  # a delivery still scheduled does nothing
        super().connectionLost(reason)

    def makeConnection(self, transport: Any) -> None:
        below = transport
        while isinstance(below, ProtocolWrapper):  # under a PROXY header reader: its TCP transport
            below = below.transport
        if hasattr(below, "bufferSize"):
            below.bufferSize = READ_SIZE  # 1 MiB per recv: fewer calls into the BIO and the decrypter
        super().makeConnection(transport)

    # -- the socket's side

    def dataReceived(self, data: bytes) -> None:
        self._tls.bio_write(data)
        if self._handshaking and not self._handshake():
            return
        self._deliver()

    def _handshake(self) -> bool:
        """Advance the handshake; True once it is done."""
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return False
        except SSL.Error as exc:
            self._flush()  # the alert, if OpenSSL made one
            log.info("data port: TLS handshake from {peer} failed: {why}", peer=_peer(self), why=_reason(exc))
            self._handshaking = False
            self._closing = True
            self.transport.loseConnection()
            return False
        self._handshaking = False
        self._flush()
        early, self._early = self._early, []
        for data in early:
            self.write(data)
        if self._closing:
            self._close_notify()
        return True

    def _deliver(self) -> None:
        """Decrypt whatever is whole in the BIO into the shared buffer and hand it on, while not paused."""
        self._delivery_due = False
        tls, wrapped = self._tls, self.wrappedProtocol
        # once closing (the wrapped protocol said its last word, or the client's close_notify came),
        # nothing more is handed on
        while not (self._paused or self._eof or self._closing or self._handshaking) and wrapped is not None:
            start = pos = self._pos
            buf = self._buf
            try:
                while pos < READ_SIZE:
                    pos += read_into(tls, buf[pos:])
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                self._eof = True  # close_notify: the client finished cleanly
            except SSL.Error as exc:  # SysCallError too: the client closed TCP without close_notify
                log.info("data port: TLS error from {peer}: {why}", peer=_peer(self), why=_reason(exc))
                self._eof = True
                self._flush()
                self.transport.abortConnection()
                return
            if pos == READ_SIZE:
                self._buf, self._pos = None, 0  # the old one belongs to its views until they are done
                self._buf = memoryview(self._fresh_buffer())
            else:
                self._pos = pos
            if pos > start:
                wrapped.dataReceived(buf[start:pos])
                wrapped = self.wrappedProtocol
            elif not self._eof:
                break  # nothing whole in the BIO: wait for the socket
        if self._eof and not self._closing:
            self.loseConnection()  # the wrapped protocol hears the end in connectionLost, as on plain TCP

    # -- the wrapped protocol's transport

    def write(self, data: bytes) -> None:
        if self._closing and not self._handshaking:
            return
        if self._handshaking:
            self._early.append(bytes(data))
            return
        try:
            self._tls.sendall(data)
        except SSL.Error as exc:
            log.info("data port: TLS write to {peer} failed: {why}", peer=_peer(self), why=_reason(exc))
            self.transport.abortConnection()
            return
        self._flush()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._handshaking:
            self.transport.loseConnection()  # nothing was said in TLS yet
            return
        self._close_notify()

    def _close_notify(self) -> None:
        try:
            self._tls.shutdown()
        except SSL.Error:
            pass  # we do not wait for the client's own close_notify
        self._flush()
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self.transport.resumeProducing()
        # bytes already decrypted or in the BIO would wait for the next packet: deliver them soon,
        # from the reactor (not inside the caller, which may be in the middle of its own step)
        if not self._delivery_due:
            self._delivery_due = True
            self.factory.reactor.callLater(0, self._deliver)

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def _flush(self) -> None:
        """Send what OpenSSL wrote into the outgoing BIO (handshake, alerts, replies)."""
        chunks = []
        while True:
            try:
                chunks.append(self._tls.bio_read(65536))
            except SSL.WantReadError:  # the BIO is empty
                break
            except SSL.Error:
                break
        if chunks:
            self.transport.write(b"".join(chunks))


def _peer(proto: FastTLSProtocol) -> str:
    try:
        addr = proto.transport.getPeer()
        return f"{addr.host}:{addr.port}"
    except Exception:  # a peer address is only for the log line
        return "-"


def _reason(exc: BaseException) -> str:
    """A short human reason: OpenSSL's for an ``SSL.Error`` (its last queued one), else the exception's."""
    args = getattr(exc, "args", ())
    if isinstance(exc, (SSL.Error, crypto.Error)) and args and isinstance(args[0], list) and args[0]:
        last = args[0][-1]  # [(library, function, reason), ...]
        if isinstance(last, tuple) and last:
            return str(last[-1]).lower().replace("_", " ")
    if isinstance(exc, SSL.SysCallError) and len(args) == 2:
        return str(args[1]).lower()
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
