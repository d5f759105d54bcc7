"""Several filedock servers behind one HAProxy, metadata in PostgreSQL: for tests and benchmarks.

``Cluster(tmp, dsn, blob_setup, limits)`` makes ``count`` servers (``ServerProcess``) on
``haproxy:tcp:...`` endpoints with ``--metadata DSN`` and the balancer's data port as
their public one, and a ``HAProxy`` in front; ``start()`` starts them (the first one
first: it makes the schema and the admin token the others reuse) and waits for the
health checks. ``blob_setup(tmp, n)`` says where server ``n`` keeps its blobs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import psycopg

from filedock.client.http import ApiClient
from tests.engines.haproxy import BalancerConfig, HAProxy, free_port
from tests.integration.harness import ServerProcess


def shared_data_dir(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    """Both servers get the same data dir (blobs and the key secret); the second reaches it through
    a symbolic link so that each has its own ready file and log beside it."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if n == 0:
        return data, []
    alias = tmp_path / f"data-{n}"
    if not alias.exists():
        alias.symlink_to(data, target_is_directory=True)
    return alias, []


class BucketBlobs:
    """Each server its own data dir (the first one's key secret copied in by ``Cluster.start``), the
    blobs in one S3 bucket (``--blobs s3://...``, credentials in the servers' environment)."""

    def __init__(self, target) -> None:
        self.target = target  # an S3Target (tests/engines/seaweedfs.py)
        self.url = target.blobs_url()
        self.env = target.env()

    def __call__(self, tmp_path: Path, n: int) -> tuple[Path, list[str]]:
        return tmp_path / f"data-{n}", ["--blobs", self.url]


BLOB_SETUPS: dict[str, Callable[[Path, int], tuple[Path, list[str]]]] = {"shared-dir": shared_data_dir}
"""How server ``n`` keeps its blobs: (its data dir, extra ``serve`` arguments). The test module adds
``s3`` (``BucketBlobs``), which needs the session's SeaweedFS."""


class Cluster:
    """``count`` servers behind one HAProxy, metadata in PostgreSQL (see the module)."""

    def __init__(self, tmp_path: Path, dsn: str, blob_setup, limits: list[str], count: int = 2) -> None:
        self.dsn = dsn
        ports = [(free_port(), free_port()) for _ in range(count)]
        self.balancer = HAProxy(BalancerConfig(ports), tmp_path / "haproxy")
        self.servers = []
        for n, (api, data) in enumerate(ports):
            data_dir, extra = blob_setup(tmp_path, n)
            self.servers.append(ServerProcess(
                data_dir, limits=limits, metadata=dsn, log_path=tmp_path / f"server{n}.log",
                server_env=getattr(blob_setup, "env", None),
                extra=[*extra, "--api-listen", f"haproxy:tcp:{api}:interface=127.0.0.1",
                       "--data-listen", f"haproxy:tcp:{data}:interface=127.0.0.1",
                       "--public-host", "127.0.0.1", "--public-data-port", str(self.balancer.config.data_port)]))

    def start(self) -> "Cluster":
        """Start the servers (the first one first: it makes the schema and the admin token the others
        reuse), then the balancer; on a failure, stop whatever did start."""
        try:
            first = self.servers[0]
            first.start()
            for server in self.servers[1:]:
                server.token = first.token
                if server.data_dir.resolve() != first.data_dir.resolve():
                    # one store, one key secret: a server with another one is refused at start
                    server.data_dir.mkdir(parents=True, exist_ok=True)
                    secret = server.data_dir / "filedock.secret"
                    secret.write_bytes((first.data_dir / "filedock.secret").read_bytes())
                    secret.chmod(0o600)
                server.start()
            self.balancer.start()
            self.balancer.wait_backends("UP")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the balancer, then every server (SIGTERM: they drain and let go)."""
        self.balancer.stop()
        for server in self.servers:
            server.stop()

    @property
    def token(self) -> str:
        """The admin token every server accepts (one store)."""
        return self.servers[0].token

    @property
    def api(self) -> ApiClient:
        """The control API through the balancer."""
        return ApiClient(self.balancer.api_url, self.token)

    @property
    def data_addr(self) -> tuple[str, int]:
        """The balancer's data port (what the servers advertise)."""
        return "127.0.0.1", self.balancer.config.data_port

    def job_with_files(self, name: str, sizes: dict[str, int]):
        """Create a job, declare files and open a session through the balancer: (job, {name: file}, session)."""
        api = self.api
        job = api.create_job(name)
        files = {n: api.add_file(job["id"], n, s) for n, s in sizes.items()}
        return job, files, api.open_session(job["id"])

    def env(self) -> dict[str, str]:
        """Environment for the CLI, through the balancer."""
        return {**os.environ, "FILEDOCK_URL": self.balancer.api_url, "FILEDOCK_TOKEN": self.token}

    def received_bytes(self) -> int:
        """Bytes the shared store records as received, over every file (durable offsets; any blob store)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            (total,) = conn.execute("SELECT COALESCE(SUM(received), 0) FROM files").fetchone()
        return int(total)

    def received_by_name(self) -> dict[str, int]:
        """{file name: its durable bytes} over every job."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return {name: int(received) for name, received in conn.execute("SELECT name, received FROM files")}

    def holders(self) -> dict[str, int]:
        """{file hash: pid of the server holding it} from the shared registry."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT c.file_hash, s.label FROM upload_claims c "
                                "JOIN registry_servers s USING (server_id)").fetchall()
        return {h: int(label.rsplit(" ", 1)[1]) for h, label in rows}

    def server_of_pid(self, pid: int) -> ServerProcess:
        """The server whose process is ``pid``."""
        return next(s for s in self.servers if s.proc and s.proc.pid == pid)

    def logs(self) -> str:
        """Every server's log, one after the other."""
        return "".join(s.log_path.read_text(errors="replace") for s in self.servers if s.log_path.exists())
