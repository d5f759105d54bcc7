"""Issue 10, item 12: scoped tokens end to end, on a real server process.

The data port knows no tokens: it authenticates by session key. A session carries the
scope of the token that opened it, so a session of an upload token cannot download and
one of a read token cannot upload, whichever dialect or verb it tries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest

from filedock import digest
from filedock.client.http import ApiClient
from filedock.errors import FiledockError
from tests.integration.test_dataport import recv_line, wait_closed


def digest_of(data: bytes) -> str:
    h = digest.ContentHasher()
    h.update(data)
    return h.hexdigest()


def token(server, scope: str, job: str | None = None) -> ApiClient:
    """An API client with a new token of ``scope`` (for ``job`` only, if given)."""
    body = {"scope": scope, **({"job": job} if job else {})}
    return ApiClient(server.url, server.api.post("/v1/tokens", body)["token"])


def put_whole(server, session: str, key: str, data: bytes) -> bytes:
    """A versioned PUT of all of ``data``; returns the last reply line."""
    sock = server.connect()
    try:
        sock.sendall(f"FILEDOCK/1 PUT {session} {key} {len(data)}\r\n".encode())
        line = recv_line(sock)
        if not line.startswith(b"OFFSET"):
            return line
        sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
        return recv_line(sock)
    finally:
        sock.close()


def get_first_line(server, session: str, key: str) -> bytes:
    sock = server.connect()
    try:
        sock.sendall(f"FILEDOCK/1 GET {session} {key} 0\r\n".encode())
        return recv_line(sock)
    finally:
        sock.close()


def test_upload_sessions_cannot_download_and_read_sessions_cannot_upload(server):
    """upload token for job J: declare, open a session, PUT, check; GET is refused (forbidden).
    read token for J: open a session, GET; PUT, BATCH, ABORT and a 2007 upload are refused."""
    data = os.urandom(200_000)
    job = server.api.create_job("j")
    uploader = token(server, "upload", "j")
    reader = token(server, "read", "j")

    record = uploader.add_file("j", "a.bin", len(data))
    up = uploader.open_session("j")
    assert up["scope"] == "upload"
    assert put_whole(server, up["key"], record["key"], data).startswith(b"STORED ")
    assert uploader.file(record["key"])["state"] == "complete"
    assert get_first_line(server, up["key"], record["key"]).startswith(b"ERR forbidden ")

    rd = reader.open_session("j")
    assert rd["scope"] == "read"
    line = get_first_line(server, rd["key"], record["key"])
    assert line == f"DATA {len(data)} 0 {zlib.crc32(data):08x} {digest_of(data)}".encode()

    other = server.api.add_file(job["id"], "b.bin", 10)
    assert put_whole(server, rd["key"], other["key"], b"x" * 10).startswith(b"ERR forbidden ")
    for request in (f"FILEDOCK/1 BATCH {rd['key']} 1\r\n", f"FILEDOCK/1 ABORT {rd['key']} {other['key']}\r\n"):
        sock = server.connect()
        sock.sendall(request.encode())
        assert recv_line(sock).startswith(b"ERR forbidden "), request
        sock.close()
    sock = server.connect()  # the 2007 dialect is told nothing and nothing is written
    sock.sendall(f"{rd['key']} {other['key']} 10\r\n".encode() + b"y" * 10)
    wait_closed(sock)
    sock.close()
    assert server.api.file(other["key"])["state"] == "pending"
    assert server.api.file(other["key"])["received"] == 0


def test_upload_token_reaches_its_job_only_and_changes_nothing_else(server):
    """An upload token for job J cannot create jobs, delete, mint tokens or touch another job."""
    server.api.create_job("j")
    other = server.api.create_job("k")
    uploader = token(server, "upload", "j")
    attempts = [("POST", "/v1/jobs", {"name": "new"}), ("DELETE", "/v1/jobs/j", None),
                ("POST", "/v1/tokens", {}), ("POST", "/v1/jobs/k/files", {"name": "x", "size": 1}),
                ("POST", "/v1/jobs/k/sessions", {}), ("GET", f"/v1/jobs/{other['id']}", None),
                ("GET", "/v1/jobs", None)]
    for method, path, body in attempts:
        with pytest.raises(FiledockError) as caught:
            uploader.request(method, path, body)
        assert caught.value.code_str == "forbidden", (method, path)
    assert [j["name"] for j in server.api.get("/v1/jobs")["jobs"]] == ["j", "k"]


def test_cli_token_create_with_scope_and_job(server):
    """`filedock token create --scope upload --job J` prints a token that can upload to J and
    nothing more; the default is still an admin token."""
    server.api.create_job("cli-job")
    run = [sys.executable, "-m", "filedock", "token", "create", "--data-dir", str(server.data_dir), "--json"]
    made = json.loads(subprocess.run(run + ["--scope", "upload", "--job", "cli-job"], check=True,
                                     capture_output=True, text=True).stdout)
    assert made["scope"] == "upload" and made["job"] == server.api.job("cli-job")["id"]
    client = ApiClient(server.url, made["token"])
    client.add_file("cli-job", "f", 1)
    with pytest.raises(FiledockError) as caught:
        client.create_job("nope")
    assert caught.value.code_str == "forbidden"
    admin = json.loads(subprocess.run(run, check=True, capture_output=True, text=True).stdout)
    assert admin["scope"] == "admin" and admin["job"] is None
    ApiClient(server.url, admin["token"]).create_job("yes")
    missing = subprocess.run(run + ["--job", "no-such-job"], capture_output=True, text=True)
    assert missing.returncode != 0 and "no-such-job" in missing.stderr
