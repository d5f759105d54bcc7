"""The single-stream upload's fast path (issue 14, sections 1 and 4): what makes ``filedock upload``
cheaper stays correct.

* TLS on the data port prefers AES-128-GCM (TLS 1.3 and 1.2);
* a TLS upload reads each byte of the file once: the digest thread reads and hashes, the sender
  encrypts the same buffer; a sender cut off mid-way leaves the digest thread to finish alone;
* ``filedock upload`` hashes its first file from the start (``hash_ahead``), and an upload takes
  that digest over only while the file is still the one it hashed;
* ``python -m filedock upload`` leaves without interpreter finalization but with all its output.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading

import pytest

from filedock.client import blocking
from filedock.client.blocking import DataPortClient, _LocalDigest, hash_ahead
from filedock.digest import ContentHasher
from filedock.server import tls_fast
from tests.integration.harness import ServerProcess, tls_files

MiB = 1 << 20


def hash_bytes(data: bytes) -> ContentHasher:
    hasher = ContentHasher()
    hasher.update(data)
    return hasher


@pytest.fixture
def tls_server(tmp_path):
    key, cert = tls_files(tmp_path)
    with ServerProcess(tmp_path / "data", tls=(key, cert)) as server:
        yield server, cert


def test_tls13_data_port_negotiates_aes_128_gcm(tls_server):
    """A default client (OpenSSL offers AES-256-GCM first) gets AES-128-GCM from the data port."""
    server, cert = tls_server
    ctx = ssl.create_default_context(cafile=str(cert))
    with ctx.wrap_socket(server.connect(), server_hostname="127.0.0.1") as sock:
        assert sock.version() == "TLSv1.3"
        assert sock.cipher()[0] == "TLS_AES_128_GCM_SHA256"


def test_tls12_data_port_negotiates_aes_128_gcm(tls_server):
    server, cert = tls_server
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with ctx.wrap_socket(server.connect(), server_hostname="127.0.0.1") as sock:
        assert sock.version() == "TLSv1.2"
        assert sock.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"


def _memory_pair(tmp_path):
    """A data-port server context's connection and a client's, both on memory BIOs, handshaken."""
    from OpenSSL import SSL

    key, cert = tls_files(tmp_path)
    server = SSL.Connection(tls_fast.server_context(str(key), str(cert)), None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(6):
        for end in (client, server):
            try:
                end.do_handshake()
            except SSL.WantReadError:
                pass
        for src, dst in ((client, server), (server, client)):
            try:
                dst.bio_write(src.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
    return server, client


@pytest.mark.parametrize("fast", [True, False], ids=["ssl-read-into-the-view", "pyopenssl-recv-into"])
def test_the_data_port_decrypts_into_the_callers_buffer_exactly(tmp_path, monkeypatch, fast):
    """``tls_fast.read_into`` fills the given view with the plaintext, record by record, whether it
    calls ``SSL_read`` on the view or falls back to pyOpenSSL's ``recv_into``; no whole record: it
    says so (``WantReadError``); the client's close_notify: ``ZeroReturnError``. The suite is
    TLS 1.3 AES-128-GCM, the server's preference."""
    from OpenSSL import SSL

    if not fast:
        monkeypatch.setattr(tls_fast, "_READ_INTO", None)
    else:
        assert tls_fast._READ_INTO is not None  # this pyOpenSSL has the fast path
    server, client = _memory_pair(tmp_path)
    assert server.get_cipher_name() == "TLS_AES_128_GCM_SHA256"
    data = os.urandom(3 * (1 << 20) + 12345)
    client.sendall(data)
    server.bio_write(client.bio_read(8 << 20))
    out = bytearray(len(data) + 100)
    view, got = memoryview(out), 0
    with pytest.raises(SSL.WantReadError):
        while True:
            n = tls_fast.read_into(server, view[got:])
            assert 0 < n <= 16384  # one record at most
            got += n
    assert got == len(data) and bytes(out[:got]) == data
    client.shutdown()
    server.bio_write(client.bio_read(1 << 16))
    with pytest.raises(SSL.ZeroReturnError):
        tls_fast.read_into(server, view)


class _CountingPreadv:
    """``os.preadv`` that counts the bytes read from one descriptor's file (by inode)."""

    def __init__(self, path, monkeypatch) -> None:
        self.inode = os.stat(path).st_ino
        self.bytes = 0
        self._real = os.preadv
        self._lock = threading.Lock()
        monkeypatch.setattr(os, "preadv", self)

    def __call__(self, fd, buffers, offset):
        n = self._real(fd, buffers, offset)
        if os.fstat(fd).st_ino == self.inode:
            with self._lock:
                self.bytes += n
        return n


def test_tls_upload_reads_the_file_once(tls_server, tmp_path, monkeypatch):
    """Before: the sender and the digest thread each read the whole file (2x its size)."""
    server, cert = tls_server
    size = 9 * MiB + 123
    data = os.urandom(size)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    job, files, session = server.job_with_files("once", {"f.bin": size})
    reads = _CountingPreadv(src, monkeypatch)
    client = DataPortClient(*server.data_addr, ssl_context=ssl.create_default_context(cafile=str(cert)))
    result = client.upload_file(session["key"], files["f.bin"]["key"], src)
    assert result.state == "complete"
    assert result.digest == hash_bytes(data).hexdigest()
    assert reads.bytes == size


def test_a_sender_that_stops_sharing_leaves_the_digest_thread_to_finish(tmp_path):
    """The sender takes two chunks and abandons (its connection dropped): the digest thread reads the
    rest alone and the digest is the whole file's."""
    data = os.urandom(7 * blocking.CHUNK + 99)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    with open(src, "rb", buffering=0) as f:
        local = _LocalDigest(f, len(data), "t", paired=True)
        chunks = local.share(0)
        assert chunks is not None
        got = bytearray()
        for _ in range(2):
            buf, n = chunks.take(lambda: None)
            got += buf[:n]
            chunks.give_back(buf)
        chunks.abandon()
        assert bytes(got) == data[: 2 * blocking.CHUNK]
        hasher = local.wait(30)
        local.stop()
    assert hasher is not None and hasher.hexdigest() == hash_bytes(data).hexdigest()
    assert local.share(0) is None  # only the first sender shares


def test_a_paired_digest_nobody_shares_hashes_alone_when_waited_for(tmp_path):
    """A resume (sender from an offset past 0), or no connection at all: ``wait`` releases the thread."""
    data = os.urandom(3 * blocking.CHUNK + 5)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    with open(src, "rb", buffering=0) as f:
        local = _LocalDigest(f, len(data), "t", paired=True)
        assert local.share(blocking.CHUNK) is None
        hasher = local.wait(30)
        local.stop()
    assert hasher.crc32 == hash_bytes(data).crc32


def test_upload_takes_over_the_digest_hashed_ahead(server, tmp_path, monkeypatch):
    """``hash_ahead`` then ``upload_file`` of the same file: one digest, read once, complete."""
    size = 10 * MiB + 7
    data = os.urandom(size)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    job, files, session = server.job_with_files("ahead", {"f.bin": size})
    reads = _CountingPreadv(src, monkeypatch)
    assert hash_ahead(src)
    result = DataPortClient(*server.data_addr).upload_file(session["key"], files["f.bin"]["key"], src)
    assert result.state == "complete"
    assert result.digest == hash_bytes(data).hexdigest()
    assert reads.bytes == size  # the upload did not start a second digest
    assert not blocking._AHEAD


def test_a_file_changed_after_hash_ahead_is_hashed_again(server, tmp_path):
    """Rewritten (same size, other bytes, new mtime) between ``hash_ahead`` and the upload: the upload
    hashes what it sends, and the server agrees."""
    size = 9 * MiB
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(size))
    assert hash_ahead(src)
    data = os.urandom(size)
    src.write_bytes(data)
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 1_000_000_000))
    job, files, session = server.job_with_files("changed", {"f.bin": size})
    result = DataPortClient(*server.data_addr).upload_file(session["key"], files["f.bin"]["key"], src)
    assert result.state == "complete"
    assert result.digest == hash_bytes(data).hexdigest()
    assert server.api.file(files["f.bin"]["key"])["digest"] == result.digest
    for stale in list(blocking._AHEAD.values()):
        stale.stop()
    blocking._AHEAD.clear()


def test_cli_upload_prints_everything_and_keeps_its_exit_status(server, tmp_path):
    """``python -m filedock upload`` leaves by ``os._exit``: the JSON line still arrives whole on a pipe,
    and a failure still exits 1 with its message."""
    src = tmp_path / "big.bin"
    data = os.urandom(9 * MiB)
    src.write_bytes(data)
    env = server.env()
    done = subprocess.run([sys.executable, "-m", "filedock", "upload", "--job", "cli", "--create", "--json",
                           str(src)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["state"] == "complete" and row["digest"] == hash_bytes(data).hexdigest()
    failed = subprocess.run([sys.executable, "-m", "filedock", "upload", "--job", "no-such-job", "--json",
                             str(src)], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "no-such-job" in failed.stderr


def test_a_plain_upload_loads_neither_ssl_nor_http_client(server, tmp_path):
    """``filedock upload`` to a plain-TCP server imports neither ``ssl`` nor ``http.client`` (nor the
    ``email`` package it brings): 20-25 ms of every command's start-up (``client/http11.py``); nor
    ``shutil`` (``argparse``'s width, ``cli.HelpWithDefaults``) nor the ``idna`` codec (``http11.address``)."""
    src = tmp_path / "f.bin"
    data = os.urandom(9 * MiB + 1)
    src.write_bytes(data)
    program = (
        "import json, sys\n"
        "from filedock import cli\n"
        f"code = cli.main(['upload', '--job', 'no-ssl', '--create', '--json', {str(src)!r}])\n"
        "print(json.dumps({'code': code, 'loaded': sorted(m for m in ('ssl', '_ssl', 'http.client', 'email', 'shutil',"
        " 'encodings.idna') if m in sys.modules)}))\n")
    done = subprocess.run([sys.executable, "-c", program], env=server.env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    *rows, report = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert rows[-1]["state"] == "complete" and rows[-1]["digest"] == hash_bytes(data).hexdigest()
    assert report == {"code": 0, "loaded": []}


def test_commands_run_with_the_garbage_collector_on(monkeypatch):
    """``python -m filedock`` starts with the cyclic GC off (start-up only); a command such as ``serve``
    runs with it on again, and ``upload`` turns it on itself once its imports are done."""
    import argparse
    import gc

    from filedock import cli

    seen = {}

    def command(args):
        seen["gc"] = gc.isenabled()
        return 0

    class Parser:
        def __init__(self, **defaults):
            self.defaults = defaults

        def parse_known_args(self, argv):
            return argparse.Namespace(func=command, **self.defaults), []

    monkeypatch.setattr(cli, "build_parser", lambda: Parser())
    gc.disable()
    try:
        assert cli._run([], gc_on=True)[0] == 0
        assert seen["gc"] is True
        gc.disable()
        monkeypatch.setattr(cli, "build_parser", lambda: Parser(enables_gc=True))
        cli._run([], gc_on=True)
        assert seen["gc"] is False  # left to the command
    finally:
        gc.enable()


def test_cli_upload_hashes_ahead_before_the_api_client_with_a_short_switch_interval(server, tmp_path, monkeypatch,
                                                                                    capsys):
    """``filedock upload`` of a plain-TCP upload starts hashing its first file before it builds the API
    client (whose import is part of the head start), lets the digest thread have the GIL every 0.5 ms
    while the API is asked, puts the switch interval back before the bytes flow, and reads the file once."""
    import sys

    from filedock import cli
    from filedock.client import commands, uploader

    size = 9 * MiB + 3
    data = os.urandom(size)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    reads = _CountingPreadv(src, monkeypatch)
    seen = {}
    real_api_client, real_prepare = cli.api_client, uploader.JobUploader.prepare

    def api_client(args):
        seen["ahead"] = [digest._size for digest in blocking._AHEAD.values()]
        seen["switch at api"] = sys.getswitchinterval()
        return real_api_client(args)

    def prepare(self, *args, **kwargs):
        seen["switch at prepare"] = sys.getswitchinterval()
        return real_prepare(self, *args, **kwargs)

    monkeypatch.setattr(cli, "api_client", api_client)
    monkeypatch.setattr(uploader.JobUploader, "prepare", prepare)
    before = sys.getswitchinterval()
    code = cli.main(["upload", "--job", "ahead-cli", "--create", "--json", "--server", server.url,
                     "--token", server.token, str(src)])
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["state"] == "complete" and row["digest"] == hash_bytes(data).hexdigest()
    assert seen["ahead"] == [size]  # hashing had started when the API client was made
    assert seen["switch at api"] == seen["switch at prepare"] == commands.AHEAD_SWITCH_INTERVAL
    assert sys.getswitchinterval() == before  # back before the bytes flow
    assert reads.bytes == size  # the upload took over the digest hashed ahead
    assert not blocking._AHEAD


def test_cli_tls_upload_reads_the_file_once(tls_server, tmp_path, monkeypatch, capsys):
    """``filedock upload`` over TLS does not hash ahead (that digest would leave the sender to read the
    file again): the file is read once in all."""
    from filedock import cli

    server, cert = tls_server
    size = 12 * MiB + 1
    data = os.urandom(size)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    reads = _CountingPreadv(src, monkeypatch)
    code = cli.main(["upload", "--job", "tls-once", "--create", "--json", "--server", server.url,
                     "--token", server.token, "--cacert", str(cert), str(src)])
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["state"] == "complete" and row["digest"] == hash_bytes(data).hexdigest()
    assert reads.bytes == size
