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
                 log_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.limits = limits or []
        self.extra = extra or []
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.token: str | None = None

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
        return ApiClient(self.url, self.token)

    def connect(self, timeout: float = 30.0) -> socket.socket:
        """A plain TCP connection to the data port."""
        return socket.create_connection(self.data_addr, timeout=timeout)

    def env(self) -> dict[str, str]:
        """Environment for running the CLI against this server."""
        return {**os.environ, "FILEDOCK_URL": self.url, "FILEDOCK_TOKEN": self.token or ""}

    def job_with_files(self, name: str, sizes: dict[str, int], ttl: float | None = None):
        """Create a job, declare files and open a session: (job, {name: file}, session)."""
        job = self.api.create_job(name)
        files = {n: self.api.add_file(job["id"], n, s) for n, s in sizes.items()}
        session = self.api.open_session(job["id"], ttl)
        return job, files, session
