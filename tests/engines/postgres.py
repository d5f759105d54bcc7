"""A private PostgreSQL server for tests and benchmarks.

``running_postgres()`` is a plain context manager (benchmarks use it): it runs
``initdb -A trust`` into a temporary directory owned by the ``postgres`` user,
starts ``postgres`` on a free loopback port with ``fsync=on`` (the durability the
store promises is measured as deployed), and stops it and removes the directory
at the end. As root (the CI image) the binaries run as ``postgres`` through
``runuser``; as any other user they run as that user.

The pytest fixtures (registered in ``tests/conftest.py``):

- ``postgres_server``: one server for the whole session (start-up is the slow part);
- ``postgres_dsn``: a fresh, empty database on it for one test, dropped afterwards,
  so tests never see each other's rows.

If the binaries are missing a test is skipped with how to install them, but when
the environment variable ``CI`` is set it fails instead: CI must never pass by
not running the PostgreSQL tests.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

PG_VERSION = "15"
INSTALL_HINT = ("PostgreSQL 15 server binaries are missing: apt-get install -y postgresql "
                "(or set FILEDOCK_PG_BIN to the directory holding initdb and pg_ctl)")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries (or the ``postgres`` user, as root) are not on this machine."""


def pg_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``; PostgreSQL 15 preferred."""
    configured = os.environ.get("FILEDOCK_PG_BIN")
    candidates = [configured] if configured else (
        [f"/usr/lib/postgresql/{PG_VERSION}/bin"] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise PostgresUnavailable(INSTALL_HINT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One private PostgreSQL server: its directory, port, and databases on it."""

    def __init__(self, fsync: bool = True) -> None:
        self.bindir = pg_bindir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self._pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root, but there is no 'postgres' user to run PostgreSQL as; "
                                          + INSTALL_HINT) from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root, but runuser (util-linux) is missing")
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="filedock-pg-"))
        self.datadir = self.root / "data"
        self.port = 0
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        if self.as_root:
            os.chown(self.root, self._pw.pw_uid, self._pw.pw_gid)

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def init(self) -> None:
        """``initdb`` the data directory (trust authentication: loopback, private, throw-away)."""
        done = self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-A", "trust",
                         "-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")

    def start(self, attempts: int = 5) -> None:
        """Start on a free loopback port (a new one if the port was taken meanwhile)."""
        last = ""
        for _ in range(attempts):
            port = self.port or free_port()
            options = (f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 "
                       f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 "
                       f"-c shared_buffers=64MB")
            done = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "log"),
                             "-w", "-t", "60", "-o", options, "start")
            if done.returncode == 0:
                self.port = port
                return
            last = done.stdout + done.stderr + self.log()
            self.port = 0
        raise RuntimeError(f"pg_ctl start failed: {last}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash: no checkpoint, recovery at the next start)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop (if running) and delete every file of this server."""
        if (self.datadir / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        """The server's log so far (for failure messages)."""
        try:
            return (self.root / "log").read_text(errors="replace")
        except OSError:
            return ""

    def dsn(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        with self._lock:
            name = name or f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, dsn_or_name: str) -> None:
        """Drop a database, ending any connection still open on it."""
        import psycopg

        name = dsn_or_name.rsplit("/", 1)[-1]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running_postgres(fsync: bool = True) -> Iterator[PostgresServer]:
    """A running private PostgreSQL server, removed on exit; raises ``PostgresUnavailable``."""
    server = PostgresServer(fsync=fsync)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and PostgreSQL cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL 15 for the whole test session (see the module's docstring)."""
    try:
        manager = running_postgres()
        server = manager.__enter__()
    except PostgresUnavailable as exc:
        _unavailable(str(exc))
        return
    try:
        yield server
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test (dropped after it): its DSN."""
    dsn = postgres_server.create_database()
    try:
        yield dsn
    finally:
        postgres_server.drop_database(dsn)
