"""The blocking client's TLS on its data connections (``client/tls.py``): a context filedock made
itself (``trust.client_context``: the CLI's, the uploader's) is rebuilt on pyOpenSSL, any other
``ssl.SSLContext`` keeps the standard library's socket; both verify the certificate and the name,
upload exactly, resume, and fail with the same clear errors. Real server process, real sockets."""

from __future__ import annotations

import os
import socket
import ssl
import time

import pytest

from filedock import wire
from filedock.client import tls
from filedock.client.blocking import DataPortClient
from filedock.client.trust import TrustedContext, client_context
from filedock.digest import ContentHasher
from filedock.errors import ErrorCode, FiledockError
from tests.integration.harness import ServerProcess, tls_files

MiB = 1 << 20


@pytest.fixture
def tls_server(tmp_path):
    key, cert = tls_files(tmp_path)
    with ServerProcess(tmp_path / "data", tls=(key, cert), limits=["header_timeout=3"]) as server:
        yield server, cert


@pytest.fixture
def fast_connects(monkeypatch):
    """How many data connections took pyOpenSSL (``TLSSocket.connect``), counted as they are made."""
    made: list[str] = []
    real = tls.TLSSocket.connect.__func__

    def connect(cls, sock, context, host, timeout):
        made.append(host)
        return real(cls, sock, context, host, timeout)

    monkeypatch.setattr(tls.TLSSocket, "connect", classmethod(connect))
    return made


def _upload(server, client, tmp_path, size: int, name: str = "f.bin"):
    data = os.urandom(size)
    src = tmp_path / name
    src.write_bytes(data)
    job, files, session = server.job_with_files(f"job-{name}", {name: size})
    result = client.upload_file(session["key"], files[name]["key"], src)
    return result, data, files[name]["key"]


def test_filedocks_own_context_uploads_through_pyopenssl_exactly(tls_server, tmp_path, fast_connects):
    """``client_context(cafile)``, as the CLI makes it for --cacert: the data connection is pyOpenSSL's,
    the upload is complete with the reference digest, and the suite is the server's AES-128-GCM."""
    server, cert = tls_server
    ctx = client_context(str(cert))
    assert type(ctx) is TrustedContext and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    client = DataPortClient(*server.data_addr, ssl_context=ctx)
    result, data, key = _upload(server, client, tmp_path, 24 * MiB + 7)
    assert result.state == "complete"
    assert result.digest == hash_bytes(data).hexdigest()
    assert server.api.file(key)["state"] == "complete"
    assert fast_connects == ["127.0.0.1"]
    raw = socket.create_connection(server.data_addr, timeout=10)
    with tls.TLSSocket.connect(raw, tls.fast_context(ctx), "127.0.0.1", 10) as sock:
        assert sock.version() == "TLSv1.3"
        assert sock.cipher()[0] == "TLS_AES_128_GCM_SHA256"


def test_a_callers_own_ssl_context_keeps_the_standard_library(tls_server, tmp_path, fast_connects):
    """A library caller's ``ssl.SSLContext`` (it may hold client certificates or pinned suites) is used
    as it is: no pyOpenSSL connection, the same exact upload."""
    server, cert = tls_server
    client = DataPortClient(*server.data_addr, ssl_context=ssl.create_default_context(cafile=str(cert)))
    result, data, _ = _upload(server, client, tmp_path, 3 * MiB)
    assert result.state == "complete" and result.digest == hash_bytes(data).hexdigest()
    assert fast_connects == []


def test_filedock_client_tls_stdlib_keeps_the_standard_library(tls_server, tmp_path, fast_connects, monkeypatch):
    """``FILEDOCK_CLIENT_TLS=stdlib``: filedock's own context on the standard library's socket (the A/B)."""
    monkeypatch.setenv("FILEDOCK_CLIENT_TLS", "stdlib")
    server, cert = tls_server
    client = DataPortClient(*server.data_addr, ssl_context=client_context(str(cert)))
    result, data, _ = _upload(server, client, tmp_path, 2 * MiB)
    assert result.state == "complete" and result.digest == hash_bytes(data).hexdigest()
    assert fast_connects == []


def test_an_upload_cut_mid_body_resumes_over_pyopenssl(tls_server, tmp_path, fast_connects):
    """The server checkpoints what came before a cut; the fast client resumes from there, not from 0."""
    server, cert = tls_server
    size = 12 * MiB + 3
    data = os.urandom(size)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    job, files, session = server.job_with_files("cut", {"big.bin": size})
    key = files["big.bin"]["key"]
    ctx = client_context(str(cert))
    sock = tls.TLSSocket.connect(socket.create_connection(server.data_addr, timeout=10), tls.fast_context(ctx),
                                 "127.0.0.1", 10)
    conn = wire.ClientConnection()
    sock.send(conn.send(wire.UploadRequest(session["key"], key, size)))
    assert sock.recv(100) == b"OFFSET 0\r\n"
    view = memoryview(data)[:5 * MiB]
    while len(view):
        view = view[sock.send(view):]
    deadline = time.monotonic() + 20
    while server.api.file(key)["received"] < 5 * MiB and time.monotonic() < deadline:
        time.sleep(0.05)  # the connection stays open: the server checkpoints on its own time
    sock._sock.close()  # TCP closed with no close_notify
    while server.api.file(key)["received"] != 5 * MiB and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.api.file(key)["received"] == 5 * MiB
    result = DataPortClient(*server.data_addr, ssl_context=ctx).upload_file(session["key"], key, src)
    assert result.state == "complete" and result.digest == hash_bytes(data).hexdigest()
    assert "from=5242880" in server.log()


def test_an_untrusted_certificate_is_refused_with_what_to_do(tls_server, tmp_path, fast_connects):
    """Trusting another CA: ``tls-failed`` saying the certificate is not trusted, OpenSSL's reason, and
    --cacert; nothing received."""
    server, cert = tls_server
    other = tmp_path / "other"
    other.mkdir()
    _, other_cert = tls_files(other)
    client = DataPortClient(*server.data_addr, ssl_context=client_context(str(other_cert)), attempts=1)
    with pytest.raises(FiledockError) as caught:
        _upload(server, client, tmp_path, 10)
    assert caught.value.code is ErrorCode.TLS_FAILED
    message = caught.value.message
    assert "is not trusted" in message and "--cacert" in message and "certificate verify failed" in message
    assert fast_connects == ["127.0.0.1"]


@pytest.mark.parametrize("host, code, words", [("not-this.example", 62, "Hostname mismatch"),
                                                ("127.0.0.2", 64, "IP address mismatch")])
def test_a_certificate_without_the_name_is_refused(tls_server, host, code, words):
    """The certificate names localhost and 127.0.0.1; a connection that expects another name or address
    is refused after the handshake with OpenSSL's code for it (the client's message for it says
    --public-host)."""
    server, cert = tls_server
    raw = socket.create_connection(server.data_addr, timeout=10)
    with pytest.raises(tls.CertificateRefused) as caught:
        tls.TLSSocket.connect(raw, tls.fast_context(client_context(str(cert))), host, 10)
    raw.close()
    assert caught.value.verify_code == code and words in caught.value.why


def test_the_tls_socket_times_out_blocks_and_reads_the_servers_close(tls_server):
    """Nothing to read: ``TimeoutError`` after the time-out, ``BlockingIOError`` when non-blocking; a bad
    request line: the server's ERR line, then ``b""`` once it closes."""
    server, cert = tls_server
    raw = socket.create_connection(server.data_addr, timeout=10)
    sock = tls.TLSSocket.connect(raw, tls.fast_context(client_context(str(cert))), "localhost", 10)
    sock.settimeout(0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sock.recv(100)
    assert 0.25 <= time.monotonic() - t0 < 2
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(100)
    sock.settimeout(10)
    sock.send(b"this is not a request\r\n")
    got = b""
    while chunk := sock.recv(1000):
        got += chunk
    assert got.startswith(b"ERR ") and got.endswith(b"\r\n")
    sock.close()


def test_fast_context_takes_only_filedocks_own_unchanged_context(tmp_path):
    """A plain ``ssl.SSLContext``, or filedock's with verification turned down, is not rebuilt."""
    _, cert = tls_files(tmp_path)
    assert tls.fast_context(ssl.create_default_context(cafile=str(cert))) is None
    assert tls.fast_context(None) is None
    relaxed = client_context(str(cert))
    relaxed.check_hostname = False
    assert tls.fast_context(relaxed) is None
    assert tls.fast_context(client_context(str(cert))) is not None


def hash_bytes(data: bytes) -> ContentHasher:
    hasher = ContentHasher()
    hasher.update(data)
    return hasher
