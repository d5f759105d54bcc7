"""Issue 12: tus 1.0 and the IETF draft at /files/ on the API port, against real server processes.

curl speaks both protocols by hand, tuspy uploads in chunks and resumes; SIGKILL,
takeover, checksums, CORS and every error path are checked on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from filedock import digest
from tests.integration.harness import ServerProcess

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def blake(data: bytes) -> str:
    h = digest.ContentHasher()
    h.update(data)
    return h.hexdigest()


def call(server, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
         token: str | None = "admin"):
    """One request on its own connection: (status, lower-case headers, body)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {server.token if token == 'admin' else token}"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def create(server, name: str, size: int, job: str = "j1", token: str | None = "admin", extra: dict | None = None):
    """tus creation: the upload's path."""
    meta = f"job {b64(job)},filename {b64(name)}"
    status, headers, body = call(server, "POST", "/files/", {**TUS, "Upload-Length": str(size),
                                                             "Upload-Metadata": meta, **(extra or {})}, token=token)
    assert status == 201, (status, body)
    return urlsplit(headers["location"]).path


def head(server, path: str, **kw) -> int:
    status, headers, _ = call(server, "HEAD", path, TUS, **kw)
    assert status == 200, status
    return int(headers["upload-offset"])


def patch(server, path: str, offset: int, data: bytes, extra: dict | None = None, **kw):
    return call(server, "PATCH", path, {**TUS, **OCTETS, "Upload-Offset": str(offset), **(extra or {})}, data, **kw)


def no_traceback(server) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def file_record(server, path: str) -> dict:
    return server.api.file(path.rsplit("/", 1)[1])


@pytest.fixture
def tus_server(tmp_path):
    """A server with a job ``j1`` and a CORS origin."""
    proc = ServerProcess(tmp_path / "data", extra=["--cors-origin", "http://app.example"])
    proc.start()
    proc.api.create_job("j1")
    yield proc
    proc.stop()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=120)


# ------------------------------------------------------------ by hand


def test_curl_speaks_tus_by_hand_and_the_file_is_a_file_of_the_job(tus_server, tmp_path):
    """curl: OPTIONS, creation, two PATCHes (curl -T), HEAD; the file is in the job, complete,
    its blake3-4m in the last response and the API, and downloads byte-identical."""
    server = tus_server
    data = os.urandom(3_000_000)
    (tmp_path / "a").write_bytes(data[:1_000_000])
    (tmp_path / "b").write_bytes(data[1_000_000:])
    auth = f"Authorization: Bearer {server.token}"
    out = curl("-i", "-X", "OPTIONS", server.url + "files/").stdout.decode()
    assert "Tus-Version: 1.0.0" in out and "checksum" in out
    out = curl("-i", "-X", "POST", server.url + "files/", "-H", auth, "-H", "Tus-Resumable: 1.0.0",
               "-H", "Upload-Length: 3000000", "-H", f"Upload-Metadata: job {b64('j1')},filename {b64('big.bin')}"
               ).stdout.decode()
    assert out.startswith("HTTP/1.1 201")
    location = re.search(r"Location: (\S+)", out).group(1)
    for offset, part in ((0, "a"), (1_000_000, "b")):
        out = curl("-i", "-X", "PATCH", location, "-H", auth, "-H", "Tus-Resumable: 1.0.0", "-H",
                   "Content-Type: application/offset+octet-stream", "-H", f"Upload-Offset: {offset}",
                   "-T", str(tmp_path / part)).stdout.decode()
        assert "204 No Content" in out
    assert "Upload-Offset: 3000000" in out
    assert f"Filedock-Digest: blake3-4m={blake(data)}" in out
    out = curl("-I", location, "-H", auth, "-H", "Tus-Resumable: 1.0.0").stdout.decode()
    assert "Upload-Offset: 3000000" in out and "Filedock-Upload-State: complete" in out
    record = file_record(server, urlsplit(location).path)
    assert (record["state"], record["name"], record["digest"]) == ("complete", "big.bin", blake(data))
    job = server.api.job("j1")
    assert job["state"] == "complete"
    status, _, body = call(server, "GET", f"/v1/files/{record['key']}/content")
    assert status == 200 and body == data
    env = server.env()
    shown = json.loads(filedock_cli("job", "show", "j1", "--json", env=env).stdout)
    (entry,) = shown["files"]
    assert (entry["name"], entry["state"], entry["digest"]) == ("big.bin", "complete", blake(data))
    assert int(entry["crc32"], 16) == zlib.crc32(data)
    filedock_cli("download", "--job", "j1", "big.bin", str(tmp_path / "dl.bin"), env=env)
    assert (tmp_path / "dl.bin").read_bytes() == data
    no_traceback(server)


def filedock_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "filedock", *args], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_curl_speaks_the_draft_by_hand_and_reads_the_104(tus_server, tmp_path):
    """The draft (interop 6 and 8): creation with Upload-Complete: ?0 and a 104 with Location, HEAD,
    an append (partial-upload) with Upload-Complete: ?1, 409 with the right offset, DELETE."""
    server = tus_server
    data = os.urandom(200_000)
    (tmp_path / "a").write_bytes(data[:80_000])
    (tmp_path / "b").write_bytes(data[80_000:])
    auth = f"Authorization: Bearer {server.token}"
    for version in ("6", "8"):
        name = f"d{version}.bin"
        run = curl("-v", "-X", "POST", server.url + "files/", "-H", auth, "-H", f"Upload-Draft-Interop-Version: {version}",
                   "-H", "Upload-Complete: ?0", "-H", "Upload-Length: 200000", "-H",
                   f"Upload-Metadata: job {b64('j1')},filename {b64(name)}", "--data-binary", f"@{tmp_path / 'a'}")
        trace = run.stderr.decode()
        assert "< HTTP/1.1 104 Upload Resumption Supported" in trace
        location = re.search(r"< Location: (\S+)", trace).group(1)
        assert re.search(r"< HTTP/1.1 201.*?< Upload-Offset: 80000", trace, re.S)
        out = curl("-I", location, "-H", auth, "-H", f"Upload-Draft-Interop-Version: {version}").stdout.decode()
        assert "Upload-Offset: 80000" in out and "Upload-Complete: ?0" in out and "no-store" in out
        out = curl("-i", "-X", "PATCH", location, "-H", auth, "-H", f"Upload-Draft-Interop-Version: {version}",
                   "-H", "Upload-Complete: ?1", "-H", "Upload-Offset: 5", "-H",
                   "Content-Type: application/partial-upload", "--data-binary", f"@{tmp_path / 'b'}").stdout.decode()
        assert "409 Conflict" in out and "Upload-Offset: 80000" in out and "mismatching-upload-offset" in out
        out = curl("-i", "-X", "PATCH", location, "-H", auth, "-H", f"Upload-Draft-Interop-Version: {version}",
                   "-H", "Upload-Complete: ?1", "-H", "Upload-Offset: 80000", "-H",
                   "Content-Type: application/partial-upload", "--data-binary", f"@{tmp_path / 'b'}").stdout.decode()
        assert out.startswith("HTTP/1.1 200") and "Upload-Complete: ?1" in out, out
        assert f"blake3-4m={blake(data)}" in out
        assert file_record(server, urlsplit(location).path)["state"] == "complete"
    # DELETE an unfinished draft upload: gone, and so is its file
    path = create(server, "gone.bin", 10)
    status, _, _ = call(server, "DELETE", path, {"Upload-Draft-Interop-Version": "8"})
    assert status == 204
    assert call(server, "HEAD", path, TUS)[0] == 404
    no_traceback(server)


# ------------------------------------------------------------ real clients


def test_tuspy_uploads_in_chunks_and_resumes_after_an_interrupted_upload(tus_server, tmp_path):
    """tuspy with 1 MiB chunks; a first uploader stops after 3 chunks; a second one with the stored URL
    resumes from the server's offset (not 0) and the file completes byte-identical."""
    from tusclient import client as tus_client

    server = tus_server
    data = os.urandom(5 * 1024 * 1024 + 123)
    src = tmp_path / "t.bin"
    src.write_bytes(data)
    tc = tus_client.TusClient(server.url + "files/", headers={"Authorization": f"Bearer {server.token}"})
    first = tc.uploader(str(src), chunk_size=1 << 20, metadata={"job": "j1", "filename": "t.bin"})
    for _ in range(3):
        first.upload_chunk()
    url = first.url
    assert head(server, urlsplit(url).path) == 3 << 20
    second = tc.uploader(str(src), chunk_size=1 << 20, url=url)
    assert second.offset == 3 << 20
    second.upload()
    record = file_record(server, urlsplit(url).path)
    assert record["state"] == "complete" and record["digest"] == blake(data)
    assert call(server, "GET", f"/v1/files/{record['key']}/content")[2] == data
    no_traceback(server)


# ------------------------------------------------------------ durability and takeover


def test_sigkill_after_a_patch_response_then_restart_head_reports_at_least_that_offset(tmp_path):
    """An offset in a PATCH response is durable: SIGKILL at once, restart, HEAD says at least that much,
    and the rest completes byte-identical."""
    server = ServerProcess(tmp_path / "data")
    server.start()
    try:
        server.api.create_job("j1")
        data = os.urandom(6_000_000)
        path = create(server, "k.bin", len(data))
        status, headers, _ = patch(server, path, 0, data[:4_000_000])
        assert status == 204 and headers["upload-offset"] == "4000000"
        server.kill()
        server.start()
        offset = head(server, path)
        assert offset >= 4_000_000
        status, headers, _ = patch(server, path, offset, data[offset:])
        assert status == 204 and headers["filedock-digest"] == f"blake3-4m={blake(data)}"
        record = file_record(server, path)
        assert call(server, "GET", f"/v1/files/{record['key']}/content")[2] == data
    finally:
        server.stop()


def stalled_patch(server, path: str, offset: int, size: int, sent: bytes) -> socket.socket:
    """A PATCH that announces ``size`` bytes, sends ``sent`` and stalls."""
    url = urlsplit(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall((f"PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                  f"Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
                  f"Upload-Offset: {offset}\r\nContent-Length: {size}\r\n\r\n").encode() + sent)
    return sock


def test_a_new_head_and_patch_take_over_a_stalled_patch_at_once(tus_server):
    """A PATCH stalls midway; HEAD takes the file over at once (no 423, no 20 s wait) and reports the
    bytes that arrived (checkpointed and recorded); the new PATCH completes the file."""
    server = tus_server
    data = os.urandom(3_000_000)
    path = create(server, "s.bin", len(data))
    sock = stalled_patch(server, path, 0, len(data), data[:1_000_000])
    deadline = time.monotonic() + 10
    offset = 0
    t0 = time.monotonic()
    while offset < 1_000_000 and time.monotonic() < deadline:
        time.sleep(0.1)
        t0 = time.monotonic()
        offset = head(server, path)
    assert offset == 1_000_000
    assert time.monotonic() - t0 < 2.0
    reply = sock.recv(4096)
    assert reply == b"" or b"taken-over" in reply  # the older request was ended
    sock.close()
    sock = stalled_patch(server, path, 1_000_000, 2_000_000, data[1_000_000:1_500_000])
    time.sleep(0.5)
    t0 = time.monotonic()
    status, headers, _ = patch(server, path, 1_500_000, data[1_500_000:])
    assert time.monotonic() - t0 < 5.0
    assert status == 204 and headers["upload-offset"] == str(len(data)), (status, headers)
    sock.close()
    assert file_record(server, path)["digest"] == blake(data)
    no_traceback(server)


def test_a_checksum_mismatch_is_460_and_the_offset_stays_at_the_chunks_start(tus_server):
    """``Upload-Checksum`` (sha1, sha256, md5, crc32): a wrong one is 460 and nothing of the chunk counts;
    the right one is accepted."""
    server = tus_server
    data = os.urandom(600_000)
    path = create(server, "c.bin", len(data))
    assert patch(server, path, 0, data[:100_000])[0] == 204
    chunk = data[100_000:400_000]
    wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    status, headers, body = patch(server, path, 100_000, chunk, {"Upload-Checksum": f"sha1 {wrong}"})
    assert status == 460 and headers["filedock-error"] == "checksum-mismatch"
    assert head(server, path) == 100_000
    good = {"sha1": hashlib.sha1(chunk).digest(), "sha256": hashlib.sha256(chunk).digest(),
            "md5": hashlib.md5(chunk).digest(), "crc32": zlib.crc32(chunk).to_bytes(4, "big")}
    for algorithm in ("crc32", "md5"):  # wrong again, in other algorithms
        status, _, _ = patch(server, path, 100_000, chunk,
                             {"Upload-Checksum": f"{algorithm} {base64.b64encode(good['sha1'][:len(good[algorithm])]).decode()}"})
        assert status == 460
    assert head(server, path) == 100_000
    status, headers, _ = patch(server, path, 100_000, chunk,
                               {"Upload-Checksum": f"sha256 {base64.b64encode(good['sha256']).decode()}"})
    assert status == 204 and headers["upload-offset"] == "400000"
    rest = data[400_000:]
    status, headers, _ = patch(server, path, 400_000, rest,
                               {"Upload-Checksum": f"sha1 {base64.b64encode(hashlib.sha1(rest).digest()).decode()}"})
    assert status == 204 and file_record(server, path)["digest"] == blake(data)
    no_traceback(server)


# ------------------------------------------------------------ authority and CORS


def test_tokens_on_every_request_and_a_job_bound_upload_token_works(tus_server):
    """No token: 401 (HEAD and PATCH too); a read token or a token of another job: 403 ``forbidden``;
    an upload token bound to the job uploads."""
    server = tus_server
    other = server.api.create_job("j2")
    upload_j1 = server.api.post("/v1/tokens", {"scope": "upload", "job": "j1"})["token"]
    upload_j2 = server.api.post("/v1/tokens", {"scope": "upload", "job": other["id"]})["token"]
    read = server.api.post("/v1/tokens", {"scope": "read"})["token"]
    path = create(server, "x.bin", 10, token=upload_j1)
    for method, extra in (("HEAD", {}), ("PATCH", {**OCTETS, "Upload-Offset": "0"}), ("DELETE", {})):
        status, headers, _ = call(server, method, path, {**TUS, **extra}, b"" if method == "PATCH" else None,
                                  token=None)
        assert status == 401 and headers["filedock-error"] == "unauthorized"
        for token in (upload_j2, read):
            status, headers, _ = call(server, method, path, {**TUS, **extra}, b"" if method == "PATCH" else None,
                                      token=token)
            assert status == 403 and headers["filedock-error"] == "forbidden", (method, status)
    status, headers, _ = call(server, "POST", "/files/", {**TUS, "Upload-Length": "1", "Upload-Metadata":
                                                          f"job {b64('j1')},filename {b64('y')}"}, token=upload_j2)
    assert status == 403
    status, headers, _ = patch(server, path, 0, b"0123456789", token=upload_j1)
    assert status == 204 and headers["upload-offset"] == "10"
    # a job-bound token may leave the job out of the metadata; Uppy's 'name' names the file
    status, headers, _ = call(server, "POST", "/files/", {**TUS, "Upload-Length": "0",
                                                          "Upload-Metadata": f"name {b64('empty.txt')}"},
                              token=upload_j1)
    assert status == 201 and headers["filedock-digest"].startswith("blake3-4m=")
    names = {f["name"]: f["state"] for f in server.api.job("j1")["files"]}
    assert names == {"x.bin": "complete", "empty.txt": "complete"}
    no_traceback(server)


def test_cors_preflight_for_configured_origins_only(tus_server):
    """A preflight from a configured origin is answered with the methods, the tus and draft headers and
    Authorization; responses expose Location, Upload-Offset and the digest; other origins get nothing."""
    server = tus_server
    status, headers, _ = call(server, "OPTIONS", "/files/", {
        "Origin": "http://app.example", "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization,tus-resumable,upload-offset,content-type"}, token=None)
    assert status in (200, 204)
    assert headers["access-control-allow-origin"] == "http://app.example"
    assert "PATCH" in headers["access-control-allow-methods"]
    allowed = headers["access-control-allow-headers"].lower()
    for name in ("authorization", "tus-resumable", "upload-offset", "upload-metadata", "upload-checksum",
                 "upload-complete", "upload-draft-interop-version", "content-type", "upload-length"):
        assert name in allowed
    assert int(headers["access-control-max-age"]) > 0
    status, headers, _ = call(server, "POST", "/files/", {**TUS, "Origin": "http://app.example",
                                                          "Upload-Length": "5", "Upload-Metadata":
                                                              f"job {b64('j1')},filename {b64('c')}"})
    exposed = headers["access-control-expose-headers"]
    for name in ("Location", "Upload-Offset", "Upload-Length", "Tus-Resumable", "Upload-Expires", "Filedock-Digest"):
        assert name in exposed
    status, headers, _ = call(server, "OPTIONS", "/files/", {
        "Origin": "http://evil.example", "Access-Control-Request-Method": "PATCH"}, token=None)
    assert "access-control-allow-origin" not in headers
    status, headers, _ = call(server, "HEAD", "/files/x", {**TUS, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers


# ------------------------------------------------------------ errors


def test_every_error_path_has_its_status_and_code_and_no_traceback(tus_server):
    """412, 415, 400 (metadata, offset, checksum algorithm), 404 (job, upload), 409 (offset, name),
    413, 405, a PATCH past the end, DELETE of a complete upload: each its status and code."""
    server = tus_server
    meta = f"job {b64('j1')},filename {b64('e.bin')}"
    cases = [
        (("HEAD", "/files/abc", {"Tus-Resumable": "0.2.2"}), 412, "unsupported-version"),
        (("HEAD", "/files/abc", {"Upload-Draft-Interop-Version": "3"}), 412, "unsupported-version"),
        (("POST", "/files/", {**TUS, "Upload-Length": "5", "Upload-Metadata": "job !!!"}), 400, "bad-request"),
        (("POST", "/files/", {**TUS, "Upload-Length": "5", "Upload-Metadata": f"filename {b64('x')}"}),
         400, "bad-request"),
        (("POST", "/files/", {**TUS, "Upload-Length": "5", "Upload-Metadata": f"job {b64('nope')},name {b64('x')}"}),
         404, "not-found"),
        (("POST", "/files/", {**TUS, "Upload-Length": "5", "Upload-Metadata": f"job {b64('j1')},name {b64('../x')}"}),
         400, "bad-request"),
        (("POST", "/files/", {**TUS, "Upload-Length": str(1 << 60), "Upload-Metadata": meta}), 413, "too-large"),
        (("POST", "/files/", {**TUS, "Upload-Defer-Length": "2", "Upload-Metadata": meta}), 400,
         "bad-request"),
        (("HEAD", "/files/00000000-0000-4000-8000-000000000000", TUS), 404, "not-found"),
        (("GET", "/files/00000000-0000-4000-8000-000000000000", TUS), 405, "method-not-allowed"),
    ]
    for (method, path, headers), status, code in cases:
        got, got_headers, body = call(server, method, path, headers)
        assert (got, got_headers.get("filedock-error")) == (status, code), (method, path, headers, got, body)
    path = create(server, "e.bin", 10)
    assert call(server, "POST", "/files/", {**TUS, "Upload-Length": "5", "Upload-Metadata": meta})[0] == 409
    status, headers, _ = call(server, "PATCH", path, {**TUS, "Upload-Offset": "0", "Content-Type": "text/plain"}, b"x")
    assert (status, headers["filedock-error"]) == (415, "unsupported-media-type")
    status, headers, _ = patch(server, path, 0, b"x", {"Upload-Checksum": "sha3 AAAA"})
    assert (status, headers["filedock-error"]) == (400, "unsupported-checksum")
    status, headers, _ = patch(server, path, 3, b"x")
    assert (status, headers["upload-offset"]) == (409, "0")
    status, headers, _ = patch(server, path, 0, b"x" * 11)
    assert (status, headers["filedock-error"]) == (413, "too-large")
    assert head(server, path) == 0
    assert patch(server, path, 0, b"x" * 10)[0] == 204
    status, headers, _ = patch(server, path, 0, b"x")
    assert (status, headers["upload-offset"]) == (409, "10")
    assert call(server, "DELETE", path, TUS)[0] == 409
    no_traceback(server)


def test_an_expired_upload_is_410(tmp_path):
    """Past ``partial_ttl`` without progress an unfinished upload answers 410 (the sweeper takes its bytes);
    ``Upload-Expires`` said when."""
    server = ServerProcess(tmp_path / "data", limits=["partial_ttl=2", "sweep_interval=3600"])
    server.start()
    try:
        server.api.create_job("j1")
        path = create(server, "old.bin", 10)
        status, headers, _ = patch(server, path, 0, b"12345")
        assert status == 204 and "upload-expires" in headers
        time.sleep(2.5)
        status, headers, _ = call(server, "HEAD", path, TUS)
        assert (status, headers["filedock-error"]) == (410, "expired")
        assert patch(server, path, 5, b"67890")[0] == 410
        no_traceback(server)
    finally:
        server.stop()


def test_deleting_the_job_ends_its_http_upload_at_once(tus_server):
    """A job deleted while a PATCH streams into it: the PATCH ends with 410 ``gone`` at once, nothing is
    kept, and the upload URL is 404 after."""
    server = tus_server
    data = os.urandom(2_000_000)
    path = create(server, "d.bin", len(data))
    sock = stalled_patch(server, path, 0, len(data), data[:500_000])
    time.sleep(0.5)
    t0 = time.monotonic()
    server.api.request("DELETE", "/v1/jobs/j1")
    sock.settimeout(10)
    reply = sock.recv(65536)
    assert time.monotonic() - t0 < 5
    assert reply.startswith(b"HTTP/1.1 410") and b"gone" in reply, reply[:300]
    sock.close()
    assert call(server, "HEAD", path, TUS)[0] == 404
    no_traceback(server)


def test_an_upload_resumes_across_protocols(tus_server):
    """One file, three front ends: declared through the API, begun with a tus PATCH, continued on the
    data port (which offers the tus bytes' end), finished with an IETF-draft PATCH."""
    from tests.integration.test_dataport import put

    server = tus_server
    data = os.urandom(3_000_000)
    _, files, session = server.job_with_files("cross", {"x.bin": len(data)})
    key = files["x.bin"]["key"]
    path = f"/files/{key}"
    assert patch(server, path, 0, data[:1_000_000])[0] == 204
    sock, line = put(server, session["key"], key, len(data))
    assert line == b"OFFSET 1000000"
    sock.sendall(data[1_000_000:2_000_000])
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 10
    while server.api.file(key)["received"] < 2_000_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, headers, _ = call(server, "PATCH", path, {
        "Upload-Draft-Interop-Version": "8", "Upload-Complete": "?1", "Upload-Offset": "2000000",
        "Content-Type": "application/partial-upload"}, data[2_000_000:])
    assert status == 200 and headers["upload-complete"] == "?1"
    assert server.api.file(key)["digest"] == blake(data)
    no_traceback(server)


def test_creation_with_upload_and_draft_content_digest(tus_server):
    """tus creation-with-upload (201 with the offset of the bytes in the POST); the draft's Content-Digest:
    a wrong sha-256 is 400 ``checksum-mismatch`` and nothing of the body counts, the right one is kept."""
    server = tus_server
    data = os.urandom(500_000)
    meta = f"job {b64('j1')},filename {b64('w.bin')}"
    status, headers, _ = call(server, "POST", "/files/", {**TUS, **OCTETS, "Upload-Length": str(len(data)),
                                                          "Upload-Metadata": meta}, data[:200_000])
    assert status == 201 and headers["upload-offset"] == "200000"
    path = urlsplit(headers["location"]).path
    draft = {"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1", "Upload-Offset": "200000",
             "Content-Type": "application/partial-upload"}
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    status, headers, _ = call(server, "PATCH", path, {**draft, "Content-Digest": f"sha-256=:{wrong}:"},
                              data[200_000:])
    assert (status, headers["filedock-error"]) == (400, "checksum-mismatch")
    assert head(server, path) == 200_000
    right = base64.b64encode(hashlib.sha256(data[200_000:]).digest()).decode()
    status, headers, _ = call(server, "PATCH", path, {**draft, "Content-Digest": f"sha-256=:{right}:"},
                              data[200_000:])
    assert status == 200 and headers["filedock-digest"] == f"blake3-4m={blake(data)}"
    no_traceback(server)
