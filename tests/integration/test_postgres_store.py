"""Real server processes with their metadata in a real PostgreSQL (``--metadata postgresql://...``).

A crash mid-upload resumes from the durable offset and fsck stays clean; two servers on one
database complete a job once and deliver its event once; processes starting at once migrate
once; a bad URL is a usage error; a database that goes away is ``store-unavailable`` (503).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from filedock.errors import FiledockError
from filedock.store.postgres import MIGRATIONS
from filedock.store.sqlite import load_secret
from tests.engines.postgres import running_postgres
from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, recv_line, wait_for
from tests.integration.test_reliability import Generation, ResumingUpload, Source, disk_values, final_path

MiB = 1 << 20


def fsck(data_dir: Path, metadata: str) -> tuple[int, dict]:
    """``filedock fsck --data-dir D --metadata URL --json``: (exit status, report)."""
    proc = subprocess.run([sys.executable, "-m", "filedock", "fsck", "--data-dir", str(data_dir),
                           "--metadata", metadata, "--json"], capture_output=True, text=True, timeout=300)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def second_server(first: ServerProcess, data_dir: Path, **kwargs) -> ServerProcess:
    """Another server on the first one's database: same file key secret, same admin token."""
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(first.data_dir / "filedock.secret", data_dir / "filedock.secret")
    other = ServerProcess(data_dir, metadata=first.metadata, **kwargs)
    other.token = first.token  # no --issue-admin-token: it would replace the first server's token
    return other


def test_sigkill_mid_upload_on_postgres_resumes_and_fsck_is_clean(tmp_path, postgres_dsn):
    """A server on PostgreSQL is SIGKILLed mid-upload and restarted: the client resumes from the
    durable offset the database holds (never from 0), the file ends complete and byte-identical,
    and fsck (reading the same database) finds nothing."""
    src = Source.make(tmp_path / "src" / "big.bin", 24 * MiB, random.Random(13))
    server = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"], metadata=postgres_dsn)
    server.start()
    try:
        job, files, session = server.job_with_files("pg-crash", {"big.bin": src.size})
        key = files["big.bin"]["key"]
        generation = Generation()
        upload = ResumingUpload(server, generation, session["key"], key, src, rate=16 * MiB,
                                deadline=time.monotonic() + 120)
        upload.start()
        wait_for(lambda: server.api.file(key)["received"] >= 4 * MiB, timeout=60, interval=0.01)
        recorded = server.api.file(key)["received"]
        server.kill()
        generation.bump()
        server.start()
        upload.join(120)
        assert upload.error is None and upload.outcome == "stored", (upload.error, upload.errors_seen)
        after_kill = [offset for gen, offset in upload.offsets if gen == 1]
        assert after_kill and after_kill[0] >= recorded > 0, (upload.offsets, recorded)
        record = server.api.file(key)
        assert (record["state"], record["crc32"], record["digest"]) == ("complete", src.crc32, src.digest)
        assert disk_values(final_path(server, job["id"], key)) == (src.size, src.crc32, src.digest)
        assert server.api.job(job["id"])["state"] == "complete"
        server.stop()
        status, report = fsck(server.data_dir, postgres_dsn)
        assert (status, report["findings"], report["files"]) == (0, [], 1), report
    finally:
        server.kill()


def _upload_whole(server: ServerProcess, session: str, key: str, data: bytes, digest: str,
                  barrier: threading.Barrier, replies: list) -> None:
    sock = server.connect()
    try:
        sock.sendall(f"FILEDOCK/1 PUT {session} {key} {len(data)}\r\n".encode())
        assert recv_line(sock) == b"OFFSET 0"
        sock.sendall(data)
        barrier.wait(30)  # both bodies are in: the two DONEs leave together
        sock.sendall(f"DONE {digest}\r\n".encode())
        replies.append(recv_line(sock))
    finally:
        sock.close()


def test_two_servers_completing_a_jobs_last_two_files_emit_one_event(tmp_path, postgres_dsn):
    """Two servers on one database each receive one of a job's two files, their DONEs sent at the
    same instant, for several jobs: every job is complete with exactly one job-complete event in the
    outbox, and each event is delivered once (both servers run the delivery command)."""
    out = tmp_path / "events.jsonl"
    command = f"cat >> {out} && echo >> {out}"
    a = ServerProcess(tmp_path / "a", metadata=postgres_dsn, extra=["--on-complete", command])
    a.start()
    b = second_server(a, tmp_path / "b", extra=["--on-complete", command])
    b.start()
    try:
        rng = random.Random(5)
        jobs = []
        for round_ in range(8):
            job, files, session = a.job_with_files(f"two-{round_}", {"one": 256 * 1024, "two": 256 * 1024})
            jobs.append(job["id"])
            barrier, replies = threading.Barrier(2), []
            threads = []
            for server, name in ((a, "one"), (b, "two")):
                data = rng.randbytes(256 * 1024)
                threads.append(threading.Thread(target=_upload_whole, args=(
                    server, session["key"], files[name]["key"], data, digest_of(data), barrier, replies)))
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(replies) == 2 and all(r.startswith(b"STORED ") for r in replies), replies
            assert b.api.job(job["id"])["state"] == "complete"
        with psycopg.connect(postgres_dsn) as conn:
            counts = dict(conn.execute("SELECT job_id, COUNT(*) FROM events WHERE kind = 'job.complete' "
                                       "GROUP BY job_id").fetchall())
        assert counts == {job_id: 1 for job_id in jobs}

        def delivered():
            if not out.exists():
                return None
            lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
            return lines if len(lines) >= len(jobs) else None
        lines = wait_for(delivered, timeout=60, interval=0.2)
        time.sleep(3)  # a second delivery, if any, would come within a pass or two
        lines = delivered()
        assert sorted(e["job"]["id"] for e in lines) == sorted(jobs)
        assert len({e["id"] for e in lines}) == len(lines)
    finally:
        a.kill()
        b.kill()


def test_two_processes_starting_at_once_migrate_once(tmp_path, postgres_dsn):
    """Two ``filedock token create`` processes opening a new database at the same moment both
    succeed, and each migration is recorded once."""
    dirs = [tmp_path / "p1", tmp_path / "p2"]
    dirs[0].mkdir()
    load_secret(dirs[0] / "filedock.secret")
    dirs[1].mkdir()
    shutil.copy2(dirs[0] / "filedock.secret", dirs[1] / "filedock.secret")
    procs = [subprocess.Popen([sys.executable, "-m", "filedock", "token", "create", "--data-dir", str(d),
                               "--metadata", postgres_dsn, "--label", f"t{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, d in enumerate(dirs)]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    with psycopg.connect(postgres_dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
        labels = sorted(r[0] for r in conn.execute("SELECT label FROM tokens"))
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert labels == ["t0", "t1"]


@pytest.mark.parametrize("url", ["mysql://db/x", "postgresql://host:notaport/db", "postgresql://host:5432/",
                                 "sqlite:relative.db"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_bad_metadata_urls_are_usage_errors(tmp_path, url, how):
    """A metadata URL filedock cannot open (flag or FILEDOCK_METADATA) is exit 2 with the stable
    code and what a good one looks like, for serve and fsck alike; nothing is started."""
    env = {**os.environ, "FILEDOCK_METADATA": url} if how == "env" else dict(os.environ)
    extra = ["--metadata", url] if how == "flag" else []
    for command in (["serve", "--api-listen", "tcp:0:interface=127.0.0.1",
                     "--data-listen", "tcp:0:interface=127.0.0.1"], ["fsck"]):
        proc = subprocess.run([sys.executable, "-m", "filedock", *command, "--data-dir", str(tmp_path / "d"),
                               *extra], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.startswith("error: bad-request: ") and "Traceback" not in proc.stderr, proc.stderr


def test_a_lost_database_is_503_store_unavailable_and_the_server_recovers(tmp_path):
    """PostgreSQL stops under a running server: API calls are 503 ``store-unavailable`` (no
    traceback, the server stays up); once PostgreSQL is back, the same server answers again."""
    with running_postgres() as pg:
        dsn = pg.create_database("down")
        server = ServerProcess(tmp_path / "data", metadata=dsn)
        server.start()
        try:
            job = server.api.create_job("kept")
            pg.stop("immediate")
            with pytest.raises(FiledockError) as exc:
                server.api.get("/v1/jobs")
            assert exc.value.code_str == "store-unavailable"
            assert server.proc.poll() is None
            pg.start()
            assert wait_for(lambda: server.api.job(job["id"]), timeout=30)["name"] == "kept"
            assert "Traceback" not in server.log()
        finally:
            server.kill()
