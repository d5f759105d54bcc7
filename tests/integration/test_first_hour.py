"""A first-time user's first hour (issue 15) and the dashboard's poll at scale (issue 10, item 10).

Real server processes on loopback, real SQLite files; what a person reads is checked
in a pseudo-terminal where a terminal changes it (tables, prompts, bars, the token).
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from twisted.internet import threads
from twisted.web.server import Site

from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, put, recv_line, wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


# ------------------------------------------------------------ helpers


def filedock(*args: str, env: dict[str, str], check: bool = True, stdin: str | None = None):
    """Run the CLI with pipes (not a terminal)."""
    proc = subprocess.run([sys.executable, "-m", "filedock", *args], capture_output=True, text=True,
                          timeout=120, env=env, input=stdin if stdin is not None else "")
    if check and proc.returncode != 0:
        raise AssertionError(f"filedock {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


class Terminal:
    """A command on a pseudo-terminal of a given width: what a person at a terminal sees."""

    def __init__(self, args: list[str], env: dict[str, str], columns: int = 100) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        env = {**env, "COLUMNS": str(columns), "TERM": "xterm-256color"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.output = b""

    def read_until(self, pattern: str, timeout: float = 60.0) -> str:
        """Read until the screen text matches ``pattern`` (or the command ends)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text) and time.monotonic() < deadline:
            if not self._read(0.2) and self.proc.poll() is not None:
                break
        return self.text

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the other side is closed
            return False
        self.output += chunk
        return bool(chunk)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 120.0) -> tuple[int, str]:
        """Wait for the command to end; its exit status and everything it showed."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.1):
            pass
        os.close(self.master)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10), self.text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    @property
    def text(self) -> str:
        return ANSI.sub("", self.output.decode("utf-8", "replace"))


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "filedock", *args]


def first_column(table: str) -> list[str]:
    """The first column of a rich table, a folded cell's lines joined again (a row starts where
    its second column has text)."""
    cells: list[str] = []
    for line in table.splitlines():
        parts = line.split("│")
        if not line.startswith("│") or len(parts) < 3:
            continue
        if parts[2].strip() or not cells:
            cells.append(parts[1].strip())
        else:
            cells[-1] += parts[1].strip()
    return cells


# ------------------------------------------------------------ item 1: the token


def test_first_run_token_survives_restarts_and_is_kept_owner_only(tmp_path):
    """`serve --issue-admin-token` (as `make run` does) twice: the same token, still valid, kept in
    <data>/admin-token with mode 0600; a piped log says where it is and never holds it whole."""
    data = tmp_path / "data"
    server = ServerProcess(data, extra=["--issue-admin-token"])
    server.start()
    try:
        token = server.token
        kept = data / "admin-token"
        assert kept.read_text().strip() == token
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        server.restart()
        assert server.info["token"] == token  # not replaced: an exported token keeps working
        assert server.api.get("/v1/jobs") == {"jobs": []}
        log = server.log()
        assert token not in log
        assert "Starting factory" not in log and " object at 0x" not in log  # no factory noise
        assert f"FILEDOCK_TOKEN=$(cat {kept.resolve()})" in log
        assert log.count(f"admin token: {token[:8]}…") == 2
    finally:
        server.stop()
    kept.unlink()  # gone: the next start makes a new one and revokes the old
    server.token = None
    server.start()
    try:
        assert server.token != token and kept.read_text().strip() == server.token
        assert server.api.get("/v1/jobs") == {"jobs": []}
        refused = filedock("jobs", env={**server.env(), "FILEDOCK_TOKEN": token}, check=False)
        assert refused.returncode == 1
    finally:
        server.stop()


def test_banner_on_a_terminal_prints_the_token_and_the_public_host(tmp_path):
    """On a terminal the banner has the whole token and the export line; the data port is shown
    with the host clients are told (--public-host), not the bind address."""
    data = tmp_path / "data"
    term = Terminal(cli_args("serve", "--data-dir", str(data), "--api-listen", "tcp:0:interface=127.0.0.1",
                             "--data-listen", "tcp:0:interface=127.0.0.1", "--public-host", "files.example.test",
                             "--issue-admin-token"), env=dict(os.environ))
    try:
        text = term.read_until(r"export FILEDOCK_URL=\S+ FILEDOCK_TOKEN=fdk_\S+")
    finally:
        term.stop()
    token = (data / "admin-token").read_text().strip()
    assert f"FILEDOCK_TOKEN={token}" in text, text
    assert re.search(r"filedock data port: files\.example\.test:\d+", text), text
    assert re.search(r"filedock API:\s+http://files\.example\.test:\d+/", text), text
    assert "listening on 127.0.0.1:" in text


def test_refused_or_missing_token_says_what_to_do(server):
    """A wrong token or none: the CLI says to set FILEDOCK_TOKEN or pass --token, and how to make one."""
    wrong = filedock("jobs", env={**server.env(), "FILEDOCK_TOKEN": "fdk_revoked"}, check=False)
    assert wrong.returncode == 1
    assert "FILEDOCK_TOKEN" in wrong.stderr and "--token" in wrong.stderr
    assert "filedock token create" in wrong.stderr and "Authorization" not in wrong.stderr
    env = {k: v for k, v in server.env().items() if k != "FILEDOCK_TOKEN"}
    env["XDG_CONFIG_HOME"] = str(Path(server.data_dir).parent / "no-config")
    missing = filedock("jobs", env=env, check=False)
    assert missing.returncode == 1 and "no API token" in missing.stderr
    assert "Bearer" not in missing.stderr


# ------------------------------------------------------------ item 3: output people read


def test_job_show_in_a_narrow_terminal_is_a_table_with_whole_names(server):
    """`job show` at a 60-column terminal: a table, readable text and dates, every name whole."""
    long_name = "session-42/" + "microphone-array-left/" * 4 + "take-01.wav"
    job = server.api.create_job("café-takes", {"studio": "Bühne 2"})
    server.api.add_file(job["id"], long_name, 10)
    server.api.add_file(job["id"], "b.wav", 20)
    rc, text = Terminal(cli_args("job", "show", "café-takes"), env=server.env(), columns=60).finish()
    assert rc == 0, text
    assert "café-takes" in text and "Bühne 2" in text and "\\u" not in text
    assert not re.search(r"\d{10}\.\d", text)  # no epoch floats
    assert long_name in first_column(text) and "b.wav" in first_column(text)
    piped = filedock("job", "show", "café-takes", env=server.env()).stdout
    assert long_name in piped.splitlines()[-3] + piped  # piped: the whole name on one line
    assert any(long_name in line for line in piped.splitlines())
    as_json = json.loads(filedock("--json", "job", "show", "café-takes", env=server.env()).stdout)
    assert as_json["metadata"] == {"studio": "Bühne 2"}


def test_job_delete_asks_at_a_terminal_and_refuses_without_one(server):
    """Deleting a job that holds files: a terminal asks (no keeps it, y deletes); piped without --yes
    is refused with a clear message; --yes deletes without asking."""
    for name in ("keep", "gone", "scripted"):
        job = server.api.create_job(name)
        server.api.add_file(job["id"], "a.wav", 10)
    term = Terminal(cli_args("job", "delete", "keep"), env=server.env())
    term.read_until(r"\[y/N\]")
    term.type("n\n")
    rc, text = term.finish()
    assert rc == 1 and "holds 1 file" in text and "not deleted" in text
    assert server.api.job("keep")["name"] == "keep"

    term = Terminal(cli_args("job", "delete", "gone"), env=server.env())
    term.read_until(r"\[y/N\]")
    term.type("y\n")
    rc, text = term.finish()
    assert rc == 0 and "deleted job gone" in text

    refused = filedock("job", "delete", "scripted", env=server.env(), check=False)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert server.api.job("scripted")["name"] == "scripted"
    done = json.loads(filedock("job", "delete", "scripted", "--yes", "--json", env=server.env()).stdout)
    assert "deleted" in done
    assert [j["name"] for j in server.api.get("/v1/jobs")["jobs"]] == ["keep"]


# ------------------------------------------------------------ item 4: progress that tells the truth early


def test_upload_says_resuming_at_the_start_and_shows_queued_files(server, tmp_path):
    """A big file half on the server, small files behind it with --parallel 1: the terminal says
    `resuming big.bin from ...` before the end, and the small ones are `queued`, not `0/... ? -:--:--`."""
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(24 * 1024 * 1024)
    (src / "big.bin").write_bytes(big)
    for i in range(3):
        (src / f"small{i}.txt").write_bytes(os.urandom(1000))
    job = server.api.create_job("progress")
    record = server.api.add_file(job["id"], "big.bin", len(big))
    session = server.api.open_session(job["id"])
    sock, line = put(server, session["key"], record["key"], len(big))
    assert line == b"OFFSET 0"
    sock.sendall(big[:12 * 1024 * 1024])
    sock.close()
    wait_for(lambda: server.api.file(record["key"])["received"] > 0)
    term = Terminal(cli_args("upload", "--job", "progress", "--parallel", "1", str(src / "big.bin"),
                             *(str(src / f"small{i}.txt") for i in range(3))), env=server.env(), columns=120)
    rc, text = term.finish()
    assert rc == 0, text
    assert re.search(r"resuming big\.bin from \d+(\.\d)? MB of 25\.2 MB", text), text
    assert "queued" in text
    assert not re.search(r"(?<![\d.])0/1\.0 kB\s+\?", text)  # a waiting file has no made-up rate
    assert not re.search(r"1\.0/1\.0 kB\s+\?", text)
    assert text.index("resuming big.bin") < text.index("4/4 files complete")


def test_download_says_resuming_when_it_starts(server, tmp_path):
    """A download with a .part from an earlier run: the terminal says `resuming NAME from ...` first."""
    data = os.urandom(8 * 1024 * 1024)
    job, files, session = server.job_with_files("dl-resume", {"big.bin": len(data)})
    sock, _ = put(server, session["key"], files["big.bin"]["key"], len(data))
    sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
    assert recv_line(sock).startswith(b"STORED")
    sock.close()
    dest = tmp_path / "big.bin"
    Path(f"{dest}.part").write_bytes(data[:3_000_000])
    rc, text = Terminal(cli_args("download", "--job", "dl-resume", "big.bin", str(dest)), env=server.env(),
                        columns=120).finish()
    assert rc == 0, text
    assert re.search(r"resuming big\.bin from 3\.0 MB of 8\.4 MB", text), text
    assert dest.read_bytes() == data


# ------------------------------------------------------------ item 6: a complete file over HTTP


def _get(url: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_file_content_streams_a_complete_file_with_ranges_and_signed_links(server):
    """GET /v1/files/<key>/content: the whole file, a Range of it, 409 while incomplete; a signed
    link from POST .../link works without a token until it expires, a forged one does not."""
    data = os.urandom(3 * 1024 * 1024 + 7)
    job, files, session = server.job_with_files("http-dl", {"a.bin": len(data), "b.bin": 10})
    sock, _ = put(server, session["key"], files["a.bin"]["key"], len(data))
    sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
    assert recv_line(sock).startswith(b"STORED")
    sock.close()
    auth = {"Authorization": f"Bearer {server.token}"}
    key = files["a.bin"]["key"]
    status, headers, body = _get(server.url, f"/v1/files/{key}/content", auth)
    assert status == 200 and body == data and "a.bin" in headers["Content-Disposition"]
    status, headers, body = _get(server.url, f"/v1/files/{key}/content", auth | {"Range": "bytes=100-199"})
    assert status == 206 and body == data[100:200]
    status, _, body = _get(server.url, f"/v1/files/{files['b.bin']['key']}/content", auth)
    assert status == 409 and json.loads(body)["error"]["code"] == "not-complete"
    assert _get(server.url, f"/v1/files/{key}/content", {})[0] == 401

    link = server.api.post(f"/v1/files/{key}/link")
    status, _, body = _get(server.url, link["url"], {})
    assert status == 200 and body == data
    forged = re.sub(r"sig=([0-9a-f])", lambda m: "sig=" + ("0" if m[1] != "0" else "1"), link["url"])
    assert _get(server.url, forged, {})[0] == 401
    other = link["url"].replace(key, files["b.bin"]["key"])
    assert _get(server.url, other, {})[0] == 401
    assert link["url"].split("sig=")[1] not in server.log()  # the access log cuts the signature


# ------------------------------------------------------------ issue 10, item 10: the dashboard's poll


class CountingStore:
    """A real SQLite store that counts the rows each read hands to Python."""

    def __init__(self, path: Path) -> None:
        from filedock.store.sqlite import SQLiteStore

        self.inner = SQLiteStore(path)
        self.rows = 0
        original = self.inner._read

        def counted(sql: str, args: tuple = ()) -> list[tuple]:
            result = original(sql, args)
            self.rows += len(result)
            return result
        self.inner._read = counted

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _fill(store: Any, jobs: int, files_per_job: int) -> None:
    for j in range(jobs):
        job = store.create_job(f"job-{j:03d}", {})
        for start in range(0, files_per_job, 1000):
            store.add_files(job.id, [(f"f{i:06d}", 1000) for i in range(start, min(start + 1000, files_per_job))])


@pytest.fixture
def dashboard_api(reactor_thread, tmp_path):
    """The control API over a counting store, on a loopback port: (store, url, token)."""
    from filedock.config import Limits
    from filedock.server.api import ControlAPI
    from filedock.store.blobs import BlobStore
    from filedock.store.metadata import DeferredStore

    store = CountingStore(tmp_path / "meta.db")
    token = store.create_token("test")

    def listen():
        api = ControlAPI(DeferredStore(store, reactor_thread), BlobStore(tmp_path / "blobs"), Limits(), None,
                         lambda: {})
        return reactor_thread.listenTCP(0, Site(api.resource()), interface="127.0.0.1")
    port = threads.blockingCallFromThread(reactor_thread, listen)
    yield store, f"http://127.0.0.1:{port.getHost().port}/", token
    threads.blockingCallFromThread(reactor_thread, port.stopListening)
    store.close()


def test_dashboard_poll_reads_what_is_on_screen_not_the_store(dashboard_api):
    """With 55,000 files the dashboard's poll (a page of jobs, a page of the open job's files) hands
    Python about one row per row on screen, the same as with 5,500; unchanged, it reads only the token (304)."""
    store, url, token = dashboard_api
    auth = {"Authorization": f"Bearer {token}"}

    def poll(path: str, headers: dict[str, str] | None = None) -> tuple[int, int, dict[str, str], bytes]:
        store.rows = 0
        status, got, body = _get(url, path, auth | (headers or {}))
        return status, store.rows, got, body

    _fill(store, 11, 500)  # 5,500 files
    small = [poll("/v1/jobs?limit=100")[1], poll("/v1/jobs/job-000?limit=200")[1]]
    _fill_more = [(f"job-{j:03d}", j) for j in range(11)]
    for name, _ in _fill_more:  # to 55,000 files: 5,000 a job
        job = store.find_job(name)
        for start in range(500, 5000, 1000):
            store.add_files(job.id, [(f"f{i:06d}", 1000) for i in range(start, min(start + 1000, 5000))])
    status, rows, headers, body = poll("/v1/jobs?limit=100")
    assert status == 200 and rows <= 11 + 2, rows
    jobs = json.loads(body)
    assert jobs["total"] == 11 and jobs["jobs"][0]["files_total"] == 5000
    assert jobs["jobs"][0]["bytes_total"] == 5_000_000
    status, job_rows, job_headers, body = poll("/v1/jobs/job-000?limit=200")
    assert status == 200 and len(json.loads(body)["files"]) == 200 and json.loads(body)["files_total"] == 5000
    assert job_rows <= 200 + 3, job_rows
    assert [rows, job_rows] == small  # the same cost with ten times the files

    status, rows, _, body = poll("/v1/jobs?limit=100", {"If-None-Match": headers["ETag"]})
    assert (status, rows, body) == (304, 1, b"")  # the token's row, nothing else
    status, rows, _, _ = poll("/v1/jobs/job-000?limit=200", {"If-None-Match": job_headers["ETag"]})
    assert (status, rows) == (304, 1)
    store.add_file(store.find_job("job-001").id, "new", 1)  # a change: a new tag, a fresh answer
    status, _, headers2, _ = poll("/v1/jobs?limit=100", {"If-None-Match": headers["ETag"]})
    assert status == 200 and headers2["ETag"] != headers["ETag"]


def _counted_in_full(store: Any, job_id: str) -> tuple[int, int, int, int]:
    files = store.list_files(job_id)
    return (len(files), sum(f.state == "complete" for f in files), sum(f.size for f in files),
            sum(f.received for f in files))


def test_job_counts_follow_every_change_and_an_upgrade_fills_them(tmp_path, monkeypatch):
    """The per-job counts the dashboard reads equal a full count after declaring, progress, completion,
    reset, batch completion and job deletion, and after upgrading a database that already held files."""
    from filedock.store import sqlite as sqlite_store
    from filedock.store.sqlite import MIGRATIONS, SQLiteStore

    path = tmp_path / "meta.sqlite3"
    counts_version = next(i for i, m in enumerate(MIGRATIONS) if "CREATE TABLE job_counts" in m)
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", MIGRATIONS[:counts_version])  # the schema just before
    old = SQLiteStore(path)
    before = old.create_job("before", {})
    a, b = old.add_files(before.id, [("a", 100), ("b", 50)])
    old.record_progress(a.key, 40, 1, None)
    old.record_complete(b.key, 2, "d" * 64)
    old.create_job("empty", {})
    old.close()
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", MIGRATIONS)
    store = SQLiteStore(path)
    assert store.job_counts(before.id) == _counted_in_full(store, before.id) == (2, 1, 150, 90)
    assert store.job_counts(store.find_job("empty").id) == (0, 0, 0, 0)

    job = store.create_job("after", {})
    files = store.add_files(job.id, [(f"f{i}", 10 * (i + 1)) for i in range(6)])
    store.record_progress(files[0].key, 5, 1, None)
    store.record_progress(files[0].key, 7, 1, None)
    store.record_complete(files[1].key, 3, "e" * 64)
    store.record_complete_many([(files[2].key, 4, "f" * 64), (files[3].key, 5, "a" * 64)])
    store.reset_file(files[0].key)
    store.reset_file(files[2].key, force=True)
    assert store.job_counts(job.id) == _counted_in_full(store, job.id)
    summaries = {j.name: counts for j, *counts in store.job_summaries(-1)}
    assert summaries == {name: list(_counted_in_full(store, store.find_job(name).id))
                         for name in ("before", "empty", "after")}
    store.delete_job(before.id)
    assert store.job_counts(before.id) == (0, 0, 0, 0)
    assert [j.name for j, *_ in store.job_summaries(-1)] == ["empty", "after"]
    store.close()


# ------------------------------------------------------------ item 7: docs in step


ROOT = Path(__file__).resolve().parents[2]


def test_docs_name_every_limit_and_the_package_metadata_is_current():
    """docs/deploy.md's table and docs/api.md's /v1/info example list every limit; pyproject's
    license is an SPDX string (setuptools >= 77: no deprecation warning at install)."""
    import tomllib
    from filedock.record import asdict

    from filedock.config import Limits

    deploy = (ROOT / "docs" / "deploy.md").read_text()
    api = (ROOT / "docs" / "api.md").read_text()
    example = json.loads(re.search(r"### GET /v1/info.*?```json\n(.*?)```", api, re.S)[1])
    for name in Limits.names():
        assert f"| `{name}`" in deploy or f"`{name}` /" in deploy or f"/ `{name}`" in deploy, name
    assert example["limits"] == asdict(Limits())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)", r) for r in project["build-system"]["requires"])


def test_the_test_certificate_recipe_in_deploy_md_works(tmp_path):
    """The openssl one-liner of docs/deploy.md makes a certificate a TLS server and the CLI accept."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("the recipe needs the openssl command")
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    recipe = re.search(r"(openssl req -x509 .*?)\n(?!\s)", deploy, re.S)[1].replace("\\\n", " ")
    subprocess.run(recipe, shell=True, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    tls = (tmp_path / "key.pem", tmp_path / "cert.pem")
    server = ServerProcess(tmp_path / "data", tls=tls, extra=["--public-host", "localhost"])
    server.start()
    try:
        env = {**server.env(), "FILEDOCK_URL": server.url.replace("127.0.0.1", "localhost")}
        assert filedock("--json", "jobs", env=env).stdout.strip() == '{"jobs": []}'
    finally:
        server.stop()
