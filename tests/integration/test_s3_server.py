"""A real server process with its blobs in SeaweedFS (``--blobs s3://...``): crash, resume, download, fsck."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from filedock.digest import ContentHasher
from tests.engines.seaweedfs import S3Target
from tests.integration.harness import ServerProcess

MiB = 1 << 20


def _digest(data: bytes) -> str:
    h = ContentHasher()
    h.update(data)
    return h.hexdigest()


def _line(sock) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        got = sock.recv(1)
        assert got, f"connection closed after {out!r}"
        out += got
    return out.strip()


def _server(tmp_path, bucket: S3Target, name: str = "data") -> ServerProcess:
    return ServerProcess(tmp_path / name, limits=["checkpoint_bytes=8M", "checkpoint_seconds=0.5"],
                         blobs=bucket.blobs_url(), server_env=bucket.env())


def _fsck(server: ServerProcess, bucket: S3Target, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "filedock", "fsck", "--data-dir", str(server.data_dir), "--json",
                           "--blobs", bucket.blobs_url(), *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **bucket.env()})
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout.splitlines()[0])


def _uploads(bucket: S3Target) -> list[dict]:
    return bucket.client().list_multipart_uploads(Bucket=bucket.bucket).get("Uploads", [])


def test_sigkill_mid_upload_resumes_from_the_bucket_and_downloads_identical(tmp_path, s3_bucket):
    data = os.urandom(45 * MiB + 4321)
    server = _server(tmp_path, s3_bucket)
    server.start()
    try:
        job, files, session = server.job_with_files("s3", {"big.bin": len(data)})
        key = files["big.bin"]["key"]
        sock = server.connect()
        sock.sendall(f"FILEDOCK/1 PUT {session['key']} {key} {len(data)}\r\n".encode())
        assert _line(sock) == b"OFFSET 0"
        sent = 29 * MiB + 77  # three full parts and a tail
        sock.sendall(data[:sent])
        deadline = time.monotonic() + 60
        while server.api.file(key)["received"] < 24 * MiB and time.monotonic() < deadline:
            time.sleep(0.1)
        recorded = server.api.file(key)["received"]
        assert recorded >= 24 * MiB, recorded
        server.kill()
        sock.close()

        server.start()
        sock = server.connect()
        sock.sendall(f"FILEDOCK/1 PUT {session['key']} {key} {len(data)}\r\n".encode())
        reply = _line(sock)
        offset = int(reply.split()[1])
        assert recorded <= offset <= sent, reply  # resumed from the bucket, never from 0
        sock.sendall(data[offset:])
        sock.sendall(f"DONE {_digest(data)}\r\n".encode())
        stored = _line(sock).split()
        assert stored[0] == b"STORED" and stored[3].decode() == _digest(data), stored
        sock.close()
        assert server.api.file(key)["state"] == "complete"

        # the data port's GET and the API's content route, both streamed from the bucket
        with urllib.request.urlopen(urllib.request.Request(
                f"{server.url}v1/files/{key}/content", headers={"Authorization": f"Bearer {server.token}"})) as r:
            assert r.read() == data
        sock = server.connect()
        sock.sendall(f"FILEDOCK/1 GET {session['key']} {key} {5 * MiB}\r\n".encode())
        header = _line(sock)
        assert header.split()[:3] == [b"DATA", str(len(data)).encode(), str(5 * MiB).encode()], header
        got = bytearray()
        while len(got) < len(data) - 5 * MiB:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        sock.close()
        assert bytes(got[:len(data) - 5 * MiB]) == data[5 * MiB:]
    finally:
        server.stop()
    assert _uploads(s3_bucket) == []
    names = [o["Key"] for o in s3_bucket.client().list_objects_v2(Bucket=s3_bucket.bucket).get("Contents", [])]
    assert not [n for n in names if n.endswith((".part", ".blocks"))], names
    status, report = _fsck(server, s3_bucket)
    assert (status, report["findings"]) == (0, []), report
    assert report["bytes_verified"] == len(data)


def test_fsck_reports_and_repairs_an_orphan_multipart_upload(tmp_path, s3_bucket):
    server = _server(tmp_path, s3_bucket)
    server.start()
    server.stop()
    client = s3_bucket.client()
    orphan = "filedock/jobs/00000000-0000-4000-8000-000000000000/11111111-1111-4111-8111-111111111111"
    upload = client.create_multipart_upload(Bucket=s3_bucket.bucket, Key=orphan)["UploadId"]
    client.upload_part(Bucket=s3_bucket.bucket, Key=orphan, UploadId=upload, PartNumber=1, Body=b"x" * 1000)
    client.put_object(Bucket=s3_bucket.bucket, Key=orphan + ".part", Body=b"tail")
    status, report = _fsck(server, s3_bucket)
    assert status == 1
    kinds = sorted(f["kind"] for f in report["findings"])
    assert kinds == ["orphan-upload", "stray-partial"], report
    assert len(_uploads(s3_bucket)) == 1  # a check changes nothing
    status, report = _fsck(server, s3_bucket, "--repair")
    assert status == 0, report
    assert sorted(f["repaired"] for f in report["findings"]) == ["aborted", "deleted"]
    assert _uploads(s3_bucket) == []
    status, report = _fsck(server, s3_bucket)
    assert (status, report["findings"]) == (0, [])


@pytest.mark.parametrize("url, code", [
    ("s3://Not_A_Bucket/x", "bad-blobs-url"),
    ("s3://no-such-bucket-here/x?endpoint={endpoint}", "blob-store-unavailable"),
    ("s3://bucket/x?endpoint=http://127.0.0.1:9", "blob-store-unavailable"),
])
def test_a_bad_blobs_url_or_unreachable_bucket_stops_the_server_with_exit_2(tmp_path, s3_bucket, url, code):
    url = url.format(endpoint=s3_bucket.endpoint)
    for command in (["serve", "--api-listen", "tcp:0:interface=127.0.0.1",
                     "--data-listen", "tcp:0:interface=127.0.0.1"], ["fsck"]):
        proc = subprocess.run([sys.executable, "-m", "filedock", *command, "--data-dir", str(tmp_path / "d"),
                               "--blobs", url], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **s3_bucket.env(), "AWS_MAX_ATTEMPTS": "1"})
        assert proc.returncode == 2, (command, proc.stderr)
        assert f"error: {code}: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert s3_bucket.secret_key not in proc.stderr
