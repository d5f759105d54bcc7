"""A real filedock server process for integration tests: start, SIGKILL, restart.

The server listens on loopback ports the OS picks and reports them through a
ready file; the data dir (with its SQLite file) outlives restarts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from filedock.client.http import ApiClient


class ServerProcess:
    """``with ServerProcess(tmp_path / "data") as server: server.api.get(...)``."""

    def __init__(self, data_dir: Path, limits: list[str] | None = None, extra: list[str] | None = None,
                 log_path: Path | None = None, tls: tuple[Path, Path] | None = None,
                 metadata: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.metadata = metadata  # --metadata URL (None: the data dir's SQLite database)
        self.limits = limits or []
        self.extra = extra or []
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.token: str | None = None
        self.tls = tls  # (key, certificate): both ports speak TLS

    # -- life cycle

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        ready = self.data_dir.parent / f"{self.data_dir.name}-ready.json"
        ready.unlink(missing_ok=True)
        # a restart comes back on the same ports, so clients holding the address reconnect
        api_port = urlsplit(self.info["api_url"]).port if self.info else 0
        data_port = self.info.get("data_port", 0)
        cmd = [sys.executable, "-m", "filedock", "serve", "--data-dir", str(self.data_dir),
               "--api-listen", f"tcp:{api_port}:interface=127.0.0.1",
               "--data-listen", f"tcp:{data_port}:interface=127.0.0.1:backlog=1024",
               "--ready-file", str(ready)]
        if self.token is None:
            cmd.append("--issue-admin-token")
        for limit in self.limits:
            cmd += ["--limit", limit]
        if self.tls:
            key, cert = self.tls
            cmd += ["--api-listen", f"ssl:{api_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
                    "--data-listen", f"ssl:{data_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]
        if self.metadata:
            cmd += ["--metadata", self.metadata]
        cmd += self.extra
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())
        if self.info.get("token"):
            self.token = self.info["token"]
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, no last checkpoint; what is durable is all that survives."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    # -- conveniences

    @property
    def url(self) -> str:
        return self.info["api_url"]

    @property
    def data_addr(self) -> tuple[str, int]:
        return self.info["data_host"], self.info["data_port"]

    @property
    def api(self) -> ApiClient:
        if self.tls:
            import ssl

            return ApiClient(self.url, self.token, ssl_context=ssl.create_default_context(cafile=str(self.tls[1])))
        return ApiClient(self.url, self.token)

    def blob_path(self, job_id: str, key: str) -> Path:
        """Where the complete file of ``key`` lives in the data dir: ``jobs/<job>/<file id>`` (its
        ``.part`` and ``.blocks`` sit beside it). The id is read from the database (read-only)."""
        import hashlib
        import sqlite3

        if self.metadata and self.metadata.startswith("postgres"):
            import psycopg

            with psycopg.connect(self.metadata) as conn:
                row = conn.execute("SELECT id FROM files WHERE key_hash = %s",
                                   (hashlib.sha256(key.encode()).hexdigest(),)).fetchone()
            assert row is not None, f"no file of key {key[:8]}"
            return self.data_dir / "jobs" / job_id / row[0]
        db = sqlite3.connect(f"file:{self.data_dir / 'filedock.sqlite3'}?mode=ro", uri=True, timeout=10)
        try:
            row = db.execute("SELECT id FROM files WHERE key_hash = ?",
                             (hashlib.sha256(key.encode()).hexdigest(),)).fetchone()
        finally:
            db.close()
        assert row is not None, f"no file of key {key[:8]}"
        return self.data_dir / "jobs" / job_id / row[0]

    def connect(self, timeout: float = 30.0) -> socket.socket:
        """A plain TCP connection to the data port."""
        return socket.create_connection(self.data_addr, timeout=timeout)

    def env(self) -> dict[str, str]:
        """Environment for running the CLI against this server."""
        env = {**os.environ, "FILEDOCK_URL": self.url, "FILEDOCK_TOKEN": self.token or ""}
        if self.tls:
            env["FILEDOCK_CACERT"] = str(self.tls[1])
        return env

    def job_with_files(self, name: str, sizes: dict[str, int], ttl: float | None = None):
        """Create a job, declare files and open a session: (job, {name: file}, session)."""
        job = self.api.create_job(name)
        files = {n: self.api.add_file(job["id"], n, s) for n, s in sizes.items()}
        session = self.api.open_session(job["id"], ttl)
        return job, files, session


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate (PEM) valid for ``localhost`` and ``127.0.0.1``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "filedock test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "tls-key.pem", directory / "tls-cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path
