"""The data port's own TLS (``filedock.server.tls_fast``): the same ``ssl:`` listener, served through
pyOpenSSL on memory BIOs (``cryptography``'s OpenSSL); uploads, resumes, aborts and both dialects
behave as on plain TCP."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import time

import pytest

from filedock import wire
from filedock.client.blocking import DataPortClient
from filedock.digest import ContentHasher
from filedock.errors import ErrorCode, FiledockError
from tests.integration.harness import ServerProcess, tls_files

MiB = 1 << 20


@pytest.fixture
def tls_server(tmp_path):
    key, cert = tls_files(tmp_path)
    with ServerProcess(tmp_path / "data", tls=(key, cert), limits=["header_timeout=2"]) as server:
        yield server, cert


def tls_connect(server: ServerProcess, cert, timeout: float = 30.0) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cert))
    return ctx.wrap_socket(server.connect(timeout), server_hostname="127.0.0.1")


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_data_port_serves_tls_itself_on_cryptographys_openssl(tls_server):
    """The ``ssl:`` data listener is the module's own path, not Twisted's protocol, on the OpenSSL that
    ``cryptography`` ships (the server's log names it); the session is TLS 1.2+ with an AEAD suite."""
    from OpenSSL import SSL

    server, cert = tls_server
    with tls_connect(server, cert) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert "GCM" in sock.cipher()[0] or "CHACHA20" in sock.cipher()[0]
    bundled = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    assert f"data port: TLS by pyOpenSSL on memory BIOs ({bundled})" in server.log()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # refusing TLS 1.0/1.1 is tested
def test_tls12_client_gets_an_aes_gcm_suite(tls_server):
    """A TLS 1.2 client gets an AES-GCM suite; a client that offers only TLS 1.0/1.1 is refused."""
    server, cert = tls_server
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with ctx.wrap_socket(server.connect(), server_hostname="127.0.0.1") as sock:
        assert sock.version() == "TLSv1.2"
        assert "AES" in sock.cipher()[0] and "GCM" in sock.cipher()[0]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(server.connect(), server_hostname="127.0.0.1")


def test_versioned_upload_resume_and_download_over_tls(tls_server, tmp_path):
    """A library upload over TLS is stored with the right digest; cut mid-body, the partial is
    checkpointed like plaintext and the next PUT resumes exactly there."""
    server, cert = tls_server
    size = 12 * MiB + 5
    data = os.urandom(size)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    job, files, session = server.job_with_files("fast", {"big.bin": size})
    key = files["big.bin"]["key"]
    # a first connection sends 5 MiB and is cut (RST, no close_notify)
    sock = tls_connect(server, cert)
    conn = wire.ClientConnection()
    sock.sendall(conn.send(wire.UploadRequest(session["key"], key, size)))
    assert read_line(sock) == b"OFFSET 0\r\n"
    sock.sendall(data[: 5 * MiB])
    time.sleep(0.5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, no close_notify
    sock.close()
    record = wait_for(lambda: (r := server.api.file(key))["received"] == 5 * MiB and r, what="checkpoint")
    assert record["state"] != "complete"
    # the library resumes from there
    client = DataPortClient(*server.data_addr, ssl_context=ssl.create_default_context(cafile=str(cert)))
    result = client.upload_file(session["key"], key, src)
    assert result.state == "complete"
    assert result.digest == hash_bytes(data).hexdigest()
    assert server.api.file(key)["state"] == "complete"
    assert "from=5242880" in server.log()  # it resumed, not restarted
    dest = tmp_path / "back.bin"
    client.download_file(session["key"], key, dest)
    assert dest.read_bytes() == data


def test_2007_dialect_over_tls(tls_server):
    """The 2007 header and body over TLS, then close: the file is stored complete."""
    server, cert = tls_server
    data = os.urandom(3 * MiB + 17)
    job, files, session = server.job_with_files("old", {"f": len(data)})
    key = files["f"]["key"]
    with tls_connect(server, cert) as sock:
        sock.sendall(f"{session['key']} {key} {len(data)}\r\n".encode() + data)
        sock.unwrap()  # close_notify, as a TLS client that finished cleanly sends
    record = wait_for(lambda: (r := server.api.file(key))["state"] == "complete" and r, what="complete")
    assert record["digest"] == hash_bytes(data).hexdigest()


def test_abort_over_tls(tls_server):
    """ABORT over TLS drops a partial the way it does on plain TCP."""
    server, cert = tls_server
    job, files, session = server.job_with_files("ab", {"f": 4 * MiB})
    key = files["f"]["key"]
    with tls_connect(server, cert) as sock:
        conn = wire.ClientConnection()
        sock.sendall(conn.send(wire.UploadRequest(session["key"], key, 4 * MiB)))
        assert read_line(sock) == b"OFFSET 0\r\n"
        sock.sendall(os.urandom(2 * MiB))
    wait_for(lambda: server.api.file(key)["received"] == 2 * MiB, what="checkpoint")
    with tls_connect(server, cert) as sock:
        conn = wire.ClientConnection()
        sock.sendall(conn.send(wire.AbortRequest(session["key"], key)))
        assert read_line(sock) == b"ABORTED\r\n"
    assert server.api.file(key)["received"] == 0


def test_untrusted_certificate_is_refused_by_the_data_client(tls_server, tmp_path):
    """A client that does not trust the server's certificate stops at the handshake: a clear
    ``tls-failed``, nothing sent, nothing recorded."""
    server, cert = tls_server
    other = tmp_path / "other"
    other.mkdir()
    _, other_cert = tls_files(other)
    job, files, session = server.job_with_files("bad", {"f": 10})
    src = tmp_path / "f"
    src.write_bytes(b"0123456789")
    client = DataPortClient(*server.data_addr, ssl_context=ssl.create_default_context(cafile=str(other_cert)),
                            attempts=1)
    with pytest.raises(FiledockError) as caught:
        client.upload_file(session["key"], files["f"]["key"], src)
    assert caught.value.code is ErrorCode.TLS_FAILED
    assert "certificate" in caught.value.message
    assert server.api.file(files["f"]["key"])["received"] == 0


def test_server_with_a_key_that_does_not_match_its_certificate_says_so(tmp_path):
    """``serve`` with a data listener whose key is not the certificate's exits with a clear message."""
    key, cert = tls_files(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_key, _ = tls_files(other)
    proc = subprocess.run([sys.executable, "-m", "filedock", "serve", "--data-dir", str(tmp_path / "data"),
                           "--api-listen", "tcp:0:interface=127.0.0.1",
                           "--data-listen", f"ssl:0:interface=127.0.0.1:privateKey={other_key}:certKey={cert}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "key" in proc.stderr.lower() and str(cert) in proc.stderr


def test_garbage_instead_of_a_handshake_is_dropped_and_the_server_keeps_serving(tls_server):
    """Bytes that are not a ClientHello end that connection at once; the next client is served."""
    server, cert = tls_server
    sock = server.connect(timeout=10)
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(4096))
    t0 = time.monotonic()
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    assert time.monotonic() - t0 < 1.5  # closed at once, not at the header time-out
    assert b"OFFSET" not in got and b"ERR" not in got  # at most a TLS alert
    sock.close()
    with tls_connect(server, cert) as ok:
        assert ok.version()
    assert "TLS handshake from" in server.log() and "Traceback" not in server.log()


def test_a_stalled_handshake_meets_the_header_timeout(tls_server):
    """A client that opens TCP and sends half a ClientHello (or nothing) is dropped at the
    unauthenticated time-out (2 s here), as a silent plaintext client is."""
    server, cert = tls_server
    silent = server.connect(timeout=10)
    half = server.connect(timeout=10)
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
    t0 = time.monotonic()
    for sock in (silent, half):
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 10
    silent.close()
    half.close()


def hash_bytes(data: bytes) -> ContentHasher:
    hasher = ContentHasher()
    hasher.update(data)
    return hasher


def _chain(directory):
    """root CA -> intermediate CA -> leaf for 127.0.0.1: (root.pem, leaf key, leaf cert, intermediate.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, public_key, signing_key, ca, sans=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        if ca:
            builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                            critical=True)
        return builder.sign(signing_key, hashes.SHA256())

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = cert(name("root"), name("root"), root_key.public_key(), root_key, True)
    mid = cert(name("mid"), name("root"), mid_key.public_key(), root_key, True)
    leaf = cert(name("leaf"), name("mid"), leaf_key.public_key(), mid_key, False,
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = [directory / n for n in ("root.pem", "leaf-key.pem", "leaf.pem", "mid.pem")]
    paths[0].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    paths[2].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[3].write_bytes(mid.public_bytes(serialization.Encoding.PEM))
    return paths


def test_extra_cert_chain_is_sent_after_the_leaf(tmp_path):
    """``extraCertChain=`` (as documented for Twisted's ssl:) works on the fast path: a client that
    trusts only the root verifies a leaf signed by an intermediate the server sends."""
    root, key, leaf, mid = _chain(tmp_path)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={leaf}:extraCertChain={mid}"
    with ServerProcess(tmp_path / "data", extra=["--data-listen", listen]) as server:
        ctx = ssl.create_default_context(cafile=str(root))
        with ctx.wrap_socket(server.connect(), server_hostname="127.0.0.1") as sock:
            assert sock.version()
        assert "data port: TLS by pyOpenSSL on memory BIOs" in server.log()


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_closed_tls_connections_keep_no_buffers(tls_server, tmp_path):
    """Each TLS upload decrypts into up to 8 MiB of reusable buffers; once its connection closes
    they go, whatever still refers to the connection: ten uploads in a row leave the server's
    memory where two left it (they used to add about 10 MiB each)."""
    server, cert = tls_server
    size = 24 * MiB
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    client = DataPortClient(*server.data_addr, ssl_context=ssl.create_default_context(cafile=str(cert)))
    job, files, session = server.job_with_files("mem", {f"f{i}": size for i in range(10)})
    rss = []
    for i in range(10):
        assert client.upload_file(session["key"], files[f"f{i}"]["key"], src).state == "complete"
        rss.append(_rss_kib(server.proc.pid))
    print("server VmRSS after each upload (KiB):", rss)
    assert rss[-1] - rss[1] < 32 * 1024, rss
