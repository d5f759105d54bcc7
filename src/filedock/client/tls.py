"""The data connection's TLS on the client: OpenSSL through pyOpenSSL, straight on the socket.

The standard library's ``ssl`` links the system's OpenSSL (3.0 on Debian 12), whose AES-GCM has no
AVX-512 code; ``cryptography`` (pyOpenSSL's engine, installed with Twisted's TLS) ships a newer
OpenSSL that has it. Sending 1 GiB over TLS 1.3 to ``socat`` on loopback, the sending thread's CPU
was 0.68-0.92 s with ``ssl.SSLSocket`` and 0.42-0.59 s with :class:`TLSSocket`, the same bytes on
the wire. The server's side is ``server/tls_fast.py``.

Only a context filedock made itself (``trust.client_context``: a CA file, or the system's roots)
takes this path, because its trust can be rebuilt exactly: the same CA file or default paths,
peer verification, and the host name checked by OpenSSL during verification, as the standard
library does (``service_identity`` after the handshake where pyOpenSSL does not reach those calls). A
library caller's own ``ssl.SSLContext`` (client certificates, pinned suites, a custom verify) keeps
the standard library's socket, whatever it holds.

:class:`TLSSocket` is the part of ``ssl.SSLSocket`` the blocking client uses: ``send`` (returns what
it took, retried with the same buffer after a time-out, as OpenSSL requires), ``recv`` (``b""`` at
the peer's close), ``pending``, ``settimeout``/``setblocking`` (a time-out raises ``TimeoutError``,
non-blocking raises ``BlockingIOError``) and ``close``; anything else (``setsockopt``,
``getsockopt``, ``fileno``) is the TCP socket's.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import time
from typing import Any

from OpenSSL import SSL

from filedock.client.trust import CertificateRefused, TrustedContext


def fast_context(ctx: ssl.SSLContext | None) -> SSL.Context | None:
    """The pyOpenSSL context with ``ctx``'s trust, or None if ``ctx`` is not filedock's own unchanged."""
    if type(ctx) is not TrustedContext or ctx.verify_mode != ssl.CERT_REQUIRED or not ctx.check_hostname:
        return None
    fast = SSL.Context(SSL.TLS_CLIENT_METHOD)
    fast.set_min_proto_version(SSL.TLS1_2_VERSION)
    if ctx.cafile:
        fast.load_verify_locations(ctx.cafile)
    else:
        fast.set_default_verify_paths()
    fast.set_verify(SSL.VERIFY_PEER, _note_verify_error)
    lib = getattr(SSL, "_lib", None)
    if lib is not None and hasattr(lib, "SSL_CTX_clear_mode"):
        # pyOpenSSL turns partial writes on: SSL_write then returns after every 16 KiB record, and each
        # return is a trip through pyOpenSSL's Python (65,536 per GiB; they cost what the faster
        # AES-GCM saved). Off, one call sends a whole piece, as the standard library's socket does.
        lib.SSL_CTX_clear_mode(fast._context, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    return fast


def _note_verify_error(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    """OpenSSL's verify callback: keep the first failure on the connection for the message; its verdict stands."""
    if not ok and getattr(conn, "filedock_verify_error", None) is None:
        conn.filedock_verify_error = errno
    return bool(ok)


def verify_error_string(code: int) -> str:
    """OpenSSL's words for X.509 verify error ``code`` (``certificate has expired``, ...)."""
    lib = getattr(SSL, "_lib", None)
    try:
        text = SSL._ffi.string(lib.X509_verify_cert_error_string(code)).decode()  # type: ignore[attr-defined]
    except Exception:  # a message only
        return f"certificate verify failed (X.509 error {code})"
    return f"certificate verify failed: {text}"


class TLSSocket:
    """A client TLS connection over a connected TCP socket (see the module's docstring).

    The socket stays blocking, with its time-out set in the kernel (``SO_SNDTIMEO``/``SO_RCVTIMEO``):
    one ``SSL_write`` then encrypts and sends a whole 1 MiB piece in C, waiting for the socket as it
    goes. Waiting in Python instead (a non-blocking socket, ``poll`` between partial writes) made a
    call into pyOpenSSL per record or two, and its Python overhead ate the faster AES-GCM whole.
    """

    def __init__(self, sock: socket.socket, conn: SSL.Connection, timeout: float | None) -> None:
        self._sock = sock
        self._conn = conn
        self._timeout: float | None = None
        self.settimeout(timeout)

    @classmethod
    def connect(cls, sock: socket.socket, context: SSL.Context, host: str, timeout: float) -> "TLSSocket":
        """Handshake on ``sock`` as a client of ``host`` within ``timeout`` seconds; the peer's certificate
        verified against ``context``'s trust and ``host``. ``CertificateRefused`` if it is not;
        ``OSError`` (``TimeoutError``, a reset) if the handshake fails otherwise."""
        conn = SSL.Connection(context, sock)
        conn.set_connect_state()
        literal = _ip_literal(host)
        if literal is None:
            conn.set_tlsext_host_name(host.encode("idna"))
        checked_by_openssl = _expect_name(conn, host, literal)
        tls = cls(sock, conn, timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.do_handshake()
                break
            except (SSL.WantReadError, SSL.WantWriteError):  # a socket time-out ran out
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no TLS handshake within {timeout:g} seconds") from None
            except SSL.Error as exc:
                code = getattr(conn, "filedock_verify_error", None)
                if code in (62, 64):  # the words the standard library's socket uses
                    what = "Hostname" if code == 62 else "IP address"
                    raise CertificateRefused(code, f"{what} mismatch, certificate is not valid for {host!r}") from None
                if code is not None:
                    raise CertificateRefused(code, verify_error_string(code)) from None
                raise _os_error(exc) from None
        if not checked_by_openssl:
            _check_name(conn, host, literal)
        return tls

    # -- what the blocking client calls

    def send(self, data: bytes | memoryview) -> int:
        """Encrypt and send from the front of ``data``; the bytes taken (whole records). After a
        ``TimeoutError`` or ``BlockingIOError`` call again with the same bytes, as OpenSSL requires."""
        try:
            return self._conn.send(data)
        except (SSL.WantWriteError, SSL.WantReadError):
            raise self._would_block() from None
        except SSL.Error as exc:
            raise _os_error(exc) from None

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` decrypted bytes; ``b""`` once the server closed (with or without close_notify)."""
        try:
            return self._conn.recv(bufsize)
        except (SSL.WantReadError, SSL.WantWriteError):
            raise self._would_block() from None
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:  # the peer closed TCP without close_notify
                return b""
            raise _os_error(exc) from None
        except SSL.Error as exc:
            raise _os_error(exc) from None

    def pending(self) -> int:
        """Decrypted bytes OpenSSL holds that ``recv`` returns without reading the socket."""
        return self._conn.pending()

    def settimeout(self, timeout: float | None) -> None:
        """None: wait as long as it takes; 0: never wait (``BlockingIOError``); else at most ``timeout``
        seconds per wait for the socket (``TimeoutError``)."""
        self._timeout = timeout
        if timeout == 0.0:
            self._sock.setblocking(False)
            return
        self._sock.setblocking(True)
        seconds = timeout or 0.0  # a zero timeval: no time-out
        whole = int(seconds)
        timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def version(self) -> str:
        return self._conn.get_protocol_version_name()

    def cipher(self) -> tuple[str | None, str, int | None]:
        return self._conn.get_cipher_name(), self._conn.get_cipher_version() or "", self._conn.get_cipher_bits()

    def close(self) -> None:
        """Say close_notify if the socket takes it at once, then close the socket."""
        try:
            self._sock.setblocking(False)
            self._conn.shutdown()
        except (SSL.Error, OSError):
            pass
        self._sock.close()

    def __getattr__(self, name: str) -> Any:  # setsockopt, getsockopt, fileno, getpeername, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._sock, name)

    def __enter__(self) -> "TLSSocket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _would_block(self) -> OSError:
        if self._timeout == 0.0:
            return BlockingIOError("the TLS socket would block")
        return TimeoutError("timed out")


def _ip_literal(host: str) -> Any:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _expect_name(conn: SSL.Connection, host: str, literal: Any) -> bool:
    """Have OpenSSL's own verification check that the certificate names ``host`` (as the standard
    library does: no partial wildcards), so a mismatch fails the handshake with verify error 62 or 64;
    False where this pyOpenSSL does not reach those calls (``_check_name`` checks after the handshake).
    ``service_identity``, which that takes, costs 20-50 ms to import: a twentieth of a 1 GiB upload."""
    lib = getattr(SSL, "_lib", None)
    if lib is None or not all(hasattr(lib, n) for n in ("SSL_get0_param", "X509_VERIFY_PARAM_set1_host",
                                                        "X509_VERIFY_PARAM_set1_ip",
                                                        "X509_VERIFY_PARAM_set_hostflags")):
        return False
    param = lib.SSL_get0_param(conn._ssl)
    if literal is None:
        name = host.encode("idna")
        lib.X509_VERIFY_PARAM_set_hostflags(param, lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        ok = lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:
        packed = literal.packed
        ok = lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise CertificateRefused(62 if literal is None else 64, f"cannot check the certificate against {host!r}")
    return True


def _check_name(conn: SSL.Connection, host: str, literal: Any) -> None:
    """The certificate names ``host`` (DNS name or IP address, RFC 6125 as ``service_identity`` checks)."""
    from service_identity import CertificateError, VerificationError
    from service_identity.pyopenssl import verify_hostname, verify_ip_address

    try:
        if literal is None:
            verify_hostname(conn, host)
        else:
            verify_ip_address(conn, str(literal))
    except (VerificationError, CertificateError) as exc:
        code = 62 if literal is None else 64  # as OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH / IP_ADDRESS_MISMATCH
        what = "Hostname" if literal is None else "IP address"
        raise CertificateRefused(code, f"{what} mismatch, certificate is not valid for {host!r} ({exc})") from None


def _os_error(exc: Exception) -> OSError:
    """An ``SSL.Error`` as the ``OSError`` the blocking client handles (a lost connection)."""
    if isinstance(exc, SSL.SysCallError) and exc.args and isinstance(exc.args[0], int) and exc.args[0] > 0:
        return OSError(exc.args[0], str(exc.args[1]) if len(exc.args) > 1 else "TLS system call failed")
    reason = "TLS error"
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args and isinstance(args[-1], tuple) and args[-1]:
        reason = f"TLS error: {str(args[-1][-1]).lower()}"
    elif exc.args:
        reason = f"TLS error: {exc.args[-1]}"
    return ConnectionError(reason)
