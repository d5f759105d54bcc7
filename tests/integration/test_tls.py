"""TLS on both ports from endpoint strings; clients verify the server against configured roots."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys

import pytest

from filedock.digest import hash_file
from tests.integration.harness import ServerProcess, tls_files


@pytest.fixture
def tls_server(tmp_path):
    key, cert = tls_files(tmp_path)
    with ServerProcess(tmp_path / "data", tls=(key, cert)) as server:
        yield server, cert


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "filedock", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_upload_and_download_over_tls_on_both_ports(tls_server, tmp_path):
    """https API + TLS data port: `filedock upload --cacert` verifies the server and round-trips a file."""
    server, cert = tls_server
    assert server.url.startswith("https://")
    assert server.api.info()["data_port"]["tls"] is True
    src = tmp_path / "take.bin"
    src.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    env = {**server.env(), "FILEDOCK_CACERT": str(cert)}
    up = cli("upload", "--job", "secure", "--create", "--json", str(src), env=env)
    assert up.returncode == 0, up.stderr
    (row,) = [json.loads(line) for line in up.stdout.splitlines()]
    assert row["state"] == "complete" and row["digest"] == hash_file(src).hexdigest()
    dest = tmp_path / "back.bin"
    down = cli("download", "--job", "secure", "take.bin", str(dest), env=env)
    assert down.returncode == 0, down.stderr
    assert dest.read_bytes() == src.read_bytes()


def test_untrusted_server_certificate_is_refused(tls_server, tmp_path):
    """Without the test's trust root the client refuses the connection: clear error, exit 1, nothing sent."""
    server, _ = tls_server
    env = {k: v for k, v in server.env().items() if k != "FILEDOCK_CACERT"}
    proc = cli("jobs", "--json", env=env)
    assert proc.returncode == 1
    assert "certificate" in proc.stderr.lower() and "Traceback" not in proc.stderr
    assert server.api.get("/v1/jobs") == {"jobs": []}


def test_tls_flag_turns_an_http_url_into_https(tls_server):
    """`--tls` with an http:// URL speaks TLS to the API."""
    server, cert = tls_server
    url = server.url.replace("https://", "http://")
    env = {**server.env(), "FILEDOCK_CACERT": str(cert)}
    proc = cli("jobs", "--json", "--tls", "--server", url, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"jobs": []}


def test_plain_client_against_tls_data_port_gets_nothing_stored(tls_server):
    """A plaintext 2007 header sent to the TLS data port is not a TLS handshake: nothing is recorded."""
    server, cert = tls_server
    job, files, session = server.job_with_files("plain", {"f": 10})
    sock = server.connect()
    sock.sendall(f"{session['key']} {files['f']['key']} 10\r\n".encode() + b"0123456789")
    sock.close()
    ctx = ssl.create_default_context(cafile=str(cert))
    with ctx.wrap_socket(server.connect(), server_hostname="127.0.0.1") as tls:
        tls.sendall(b"FILEDOCK/1 PUT " + session["key"].encode() + b" " + files["f"]["key"].encode() + b" 10\r\n")
        assert tls.recv(100) == b"OFFSET 0\r\n"
    assert server.api.file(files["f"]["key"])["state"] != "complete"
