"""Several filedock servers behind HAProxy, sharing PostgreSQL and one blob store.

Real processes throughout: a private PostgreSQL (``postgres_dsn``), two ``filedock
serve`` processes on ``haproxy:tcp:...`` endpoints with ``--metadata postgresql://...``,
HAProxy in front (``tests/engines/haproxy.py``), and the CLI as the client. Servers
are SIGKILLed and restarted while bytes flow.

The blob store is one parameter (``blob_setup``): today both servers are given the
same data dir; an S3 bucket is another value of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psycopg
import pytest

from filedock.client.http import ApiClient
from filedock.server.pg_registry import PostgresUploadRegistry
from tests.engines.haproxy import BalancerConfig, HAProxy, free_port
from tests.integration.harness import ServerProcess

MB = 1_000_000


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


BLOB_SETUPS: dict[str, Callable[[Path, int], tuple[Path, list[str]]]] = {"shared-dir": shared_data_dir}
"""How server ``n`` keeps its blobs: (its data dir, extra ``serve`` arguments)."""


@pytest.fixture(params=sorted(BLOB_SETUPS))
def blob_setup(request):
    return BLOB_SETUPS[request.param]


class Cluster:
    """Two servers behind one HAProxy, metadata in PostgreSQL."""

    def __init__(self, tmp_path: Path, dsn: str, blob_setup, limits: list[str], count: int = 2) -> None:
        self.dsn = dsn
        ports = [(free_port(), free_port()) for _ in range(count)]
        self.balancer = HAProxy(BalancerConfig(ports), tmp_path / "haproxy")
        self.servers = []
        for n, (api, data) in enumerate(ports):
            data_dir, extra = blob_setup(tmp_path, n)
            self.servers.append(ServerProcess(
                data_dir, limits=limits, metadata=dsn, log_path=tmp_path / f"server{n}.log",
                extra=[*extra, "--api-listen", f"haproxy:tcp:{api}:interface=127.0.0.1",
                       "--data-listen", f"haproxy:tcp:{data}:interface=127.0.0.1",
                       "--public-host", "127.0.0.1", "--public-data-port", str(self.balancer.config.data_port)]))

    def start(self) -> "Cluster":
        self.servers[0].start()  # first: it makes the schema and the admin token the others reuse
        for server in self.servers[1:]:
            server.token = self.servers[0].token
            server.start()
        self.balancer.start()
        self.balancer.wait_backends("UP")
        return self

    def stop(self) -> None:
        self.balancer.stop()
        for server in self.servers:
            server.stop()

    @property
    def token(self) -> str:
        return self.servers[0].token

    @property
    def api(self) -> ApiClient:
        return ApiClient(self.balancer.api_url, self.token)

    def env(self) -> dict[str, str]:
        return {**os.environ, "FILEDOCK_URL": self.balancer.api_url, "FILEDOCK_TOKEN": self.token}

    def holders(self) -> dict[str, int]:
        """{file hash: pid of the server holding it} from the shared registry."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT c.file_hash, s.label FROM upload_claims c "
                                "JOIN registry_servers s USING (server_id)").fetchall()
        return {h: int(label.rsplit(" ", 1)[1]) for h, label in rows}

    def server_of_pid(self, pid: int) -> ServerProcess:
        return next(s for s in self.servers if s.proc and s.proc.pid == pid)

    def logs(self) -> str:
        return "".join(s.log_path.read_text(errors="replace") for s in self.servers if s.log_path.exists())


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "filedock", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_random(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; returns its SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 << 20))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def partial_bytes(data_dir: Path) -> int:
    """Bytes in the partials of the shared data dir (what has arrived and not finished yet)."""
    jobs = data_dir / "jobs"
    total = 0
    for part in jobs.rglob("*.part") if jobs.exists() else []:
        try:
            total += part.stat().st_size
        except FileNotFoundError:
            pass
    return total


UPLOAD_LINE = re.compile(r"upload (?P<result>[\w-]+): job=\S+ file='(?P<name>[^']+)' key=\S+ size=\d+ "
                         r"from=(?P<start>\d+) bytes=(?P<sent>\d+)")


def starts_by_file(log_text: str) -> dict[str, list[int]]:
    """{file name: [the offset each logged upload connection started at]}."""
    starts: dict[str, list[int]] = {}
    for m in UPLOAD_LINE.finditer(log_text):
        starts.setdefault(m["name"], []).append(int(m["start"]))
    return starts


LIMITS = ["checkpoint_bytes=8M", "checkpoint_seconds=1"]


def test_four_uploads_ride_through_repeated_sigkills_of_the_server_they_are_on(tmp_path, postgres_dsn, blob_setup):
    """Four 300 MB uploads through HAProxy; each time, the server carrying uploads is SIGKILLed mid-stream
    and restarted (four kills, alternating). Every CLI finishes by itself through the other server,
    resuming (no connection after the first starts at 0, and the bytes sent stay far below twice the
    file), every file downloads byte-identical from either server, and fsck is clean."""
    size = 300 * MB
    sources = tmp_path / "in"
    sources.mkdir()
    sums = {f"big{i}.bin": write_random(sources / f"big{i}.bin", size + i) for i in range(4)}
    cluster = Cluster(tmp_path, postgres_dsn, blob_setup, LIMITS).start()
    shared = cluster.servers[0].data_dir
    try:
        cluster.api.create_job("several")  # four clients creating one job at once would conflict
        clients = {name: subprocess.Popen(
            [sys.executable, "-m", "filedock", "upload", "--job", "several", "--json",
             str(sources / name)], env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in sums}
        kills: list[int] = []
        total = sum(size + i for i in range(4))
        for n, fraction in enumerate((0.12, 0.3, 0.48, 0.66)):
            deadline = time.monotonic() + 120
            while partial_bytes(shared) < fraction * total and time.monotonic() < deadline:
                if all(c.poll() is not None for c in clients.values()):
                    break
                time.sleep(0.02)
            holders = set(cluster.holders().values())
            victim = next((s for s in cluster.servers if s.proc.pid in holders), cluster.servers[n % 2])
            victim.kill()
            kills.append(cluster.servers.index(victim))
            victim.start()  # its ports again; HAProxy's health check takes it back
        results = {}
        for name, client in clients.items():
            out, err = client.communicate(timeout=600)
            assert client.returncode == 0, f"{name}: exit {client.returncode}\n{err}\n{cluster.logs()[-3000:]}"
            results[name] = json.loads(out.strip().splitlines()[-1])
        logs = cluster.logs()
        starts = starts_by_file(logs)
        print(f"FIGURES several_servers {json.dumps({'kills': kills, 'sent': {n: r['sent'] for n, r in results.items()}, 'starts': starts})}")
        assert len(kills) == 4 and set(kills) == {0, 1}, kills
        for name, row in results.items():
            assert row["state"] == "complete", row
            # a restart from 0 after a kill would send at least the whole file again
            assert row["sent"] < 1.5 * size, f"{name}: {row['sent']} bytes sent for {size}"
            assert starts.get(name), f"no upload of {name} finished on a live server"
            assert starts[name].count(0) <= 1 and starts[name][-1] > 0, f"{name} started again from 0: {starts[name]}"
        # every file from either server: the other one is stopped while it downloads
        for n, server in enumerate(cluster.servers):
            other = cluster.servers[1 - n]
            other.stop()
            cluster.balancer.wait_backends("DOWN", names=[f"fd{1 - n}"])
            back = tmp_path / f"back{n}"
            down = cli(cluster.env(), "download", "--job", "several", "--all", str(back))
            assert down.returncode == 0, down.stderr
            for name, digest in sums.items():
                assert sha256_of(back / name) == digest, f"{name} from server {n}"
            other.start()
            cluster.balancer.wait_backends("UP")
        check = cli(cluster.env(), "fsck", "--data-dir", str(shared), "--metadata", postgres_dsn, "--json")
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        cluster.stop()


def recv_line(sock: socket.socket, limit: int = 8192) -> bytes:
    """One reply line (without CRLF), or b"" if the peer closed first."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf.rstrip(b"\r\n")


def test_a_client_reconnecting_through_the_other_server_takes_over_at_once(tmp_path, postgres_dsn, blob_setup):
    """A CLI uploading through server A is stopped (SIGSTOP) mid-file; a new connection for the same
    file arrives through HAProxy at server B (least connections). B asks A to let go; A checkpoints,
    records and closes its connection, and B answers OFFSET with A's bytes well under the lease. The
    stopped CLI, continued, finds its connection gone, resumes, and ends with the file complete."""
    size = 200 * MB
    source = tmp_path / "stalled.bin"
    digest = write_random(source, size)
    cluster = Cluster(tmp_path, postgres_dsn, blob_setup, LIMITS).start()
    shared = cluster.servers[0].data_dir
    try:
        stalled = subprocess.Popen([sys.executable, "-m", "filedock", "upload", "--job", "takeover", "--create",
                                    "--json", str(source)], env=cluster.env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while partial_bytes(shared) < 40 * MB and time.monotonic() < deadline:
            time.sleep(0.01)
        stalled.send_signal(signal.SIGSTOP)
        try:
            (holder_pid,) = cluster.holders().values()
            old = cluster.server_of_pid(holder_pid)
            api = cluster.api
            job = api.job("takeover")
            (entry,) = job["files"]
            session = api.open_session(job["id"])
            with socket.create_connection(("127.0.0.1", cluster.balancer.config.data_port), timeout=30) as sock:
                began = time.monotonic()
                sock.sendall(f"FILEDOCK/1 PUT {session['key']} {entry['key']} {size}\r\n".encode())
                reply = recv_line(sock)
                waited = time.monotonic() - began
                assert reply.startswith(b"OFFSET "), reply
                offset = int(reply.split()[1])
                (new_pid,) = cluster.holders().values()
            print(f"FIGURES takeover_across_servers {json.dumps({'seconds': round(waited, 3), 'offset': offset})}")
            assert new_pid != holder_pid, "the new connection reached the same server"
            assert offset >= 8 * MB, f"B did not resume from A's bytes: OFFSET {offset}"
            assert waited < PostgresUploadRegistry.LEASE_SECONDS / 2, f"takeover took {waited:.2f} s"
            old_log = old.log_path.read_text(errors="replace")
            assert "taken over by a new connection" in old_log
            assert re.search(r"upload taken-over: job=\S+ file='stalled.bin'", old_log), old_log[-2000:]
        finally:
            stalled.send_signal(signal.SIGCONT)
        out, err = stalled.communicate(timeout=300)
        assert stalled.returncode == 0, err
        row = json.loads(out.strip().splitlines()[-1])
        assert row["state"] == "complete" and row["sent"] < 1.5 * size, row
        back = tmp_path / "back"
        down = cli(cluster.env(), "download", "--job", "takeover", "--all", str(back))
        assert down.returncode == 0, down.stderr
        assert sha256_of(back / "stalled.bin") == digest
    finally:
        cluster.stop()
