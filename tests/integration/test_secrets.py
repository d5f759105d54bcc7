"""Issue 10, item 11, end to end: a data dir made by an older version (world-readable database with
keys in clear, blobs named by key) still works after the upgrade, owner-only and with no live key in
its database; and a new data dir is owner-only from the start."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import zlib

from filedock import digest
from filedock.store.sqlite import MIGRATIONS
from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import recv_line, wait_closed


def digest_of(data: bytes) -> str:
    h = digest.ContentHasher()
    h.update(data)
    return h.hexdigest()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def old_data_dir(data_dir, complete: bytes) -> dict:
    """A data dir as the schema-3 server left it: 0755, database 0644 with keys in clear, a complete
    file named by its key on disk, a pending file."""
    job, done_key, pending_key = ("2f1e0c9a-5b7d-4e3f-8a2b-1c0d9e8f7a6b", "7c3e9a1d-2b4f-4a6e-9d8c-3f2e1d0c9b8a",
                                  "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    db = sqlite3.connect(data_dir / "filedock.sqlite3", isolation_level=None)
    for version, script in enumerate(MIGRATIONS[:3], start=1):
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
        if version == 1:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
    db.execute("INSERT INTO jobs VALUES (?, 'old-job', '{}', 1.0, 2.0, 'open')", (job,))
    db.execute("INSERT INTO files VALUES (?, ?, 'done.bin', ?, ?, 'complete', ?, ?, 2.0, 2.0, NULL)",
               (done_key, job, len(complete), len(complete), zlib.crc32(complete), digest_of(complete)))
    db.execute("INSERT INTO files VALUES (?, ?, 'todo.bin', 10, 0, 'pending', 0, NULL, NULL, 2.0, NULL)",
               (pending_key, job))
    db.close()
    os.chmod(data_dir / "filedock.sqlite3", 0o644)
    (data_dir / "jobs" / job).mkdir(parents=True)
    (data_dir / "jobs" / job / done_key).write_bytes(complete)
    return {"job": job, "done": done_key, "pending": pending_key}


def test_an_old_data_dir_works_after_the_upgrade_and_is_closed(tmp_path):
    """The server converts the old data dir: it becomes 0700 and its database 0600; the complete file
    downloads with the key the API lists now (its bytes stay where they were); the pending file uploads;
    the old keys open nothing; fsck is clean; no live key is in the database files."""
    complete = os.urandom(300_000)
    data = tmp_path / "data"
    old = old_data_dir(data, complete)
    with ServerProcess(data) as server:
        assert mode(data) == 0o700 and mode(data / "filedock.sqlite3") == 0o600
        files = {f["name"]: f for f in server.api.job("old-job")["files"]}
        assert files["done.bin"]["key"] != old["done"] and files["todo.bin"]["key"] != old["pending"]
        session = server.api.open_session("old-job")
        sock = server.connect()
        sock.sendall(f"FILEDOCK/1 GET {session['key']} {files['done.bin']['key']} 0\r\n".encode())
        assert recv_line(sock) == (f"DATA {len(complete)} 0 {zlib.crc32(complete):08x} "
                                   f"{digest_of(complete)}").encode()
        assert wait_closed(sock) == complete
        sock.close()
        for stale in (old["done"], old["pending"]):
            sock = server.connect()
            sock.sendall(f"FILEDOCK/1 GET {session['key']} {stale} 0\r\n".encode())
            assert recv_line(sock).startswith(b"ERR unknown-file ")
            sock.close()
        sock = server.connect()
        sock.sendall(f"FILEDOCK/1 PUT {session['key']} {files['todo.bin']['key']} 10\r\n".encode())
        assert recv_line(sock) == b"OFFSET 0"
        sock.sendall(b"0123456789" + f"DONE {digest_of(b'0123456789')}\r\n".encode())
        assert recv_line(sock).startswith(b"STORED 10 ")
        sock.close()
        keys = [files["done.bin"]["key"], files["todo.bin"]["key"], session["key"], server.token]
    raw = b"".join(p.read_bytes() for p in data.iterdir() if p.name.startswith("filedock.sqlite3"))
    for key in keys:
        assert key.encode() not in raw
    fsck = subprocess.run([sys.executable, "-m", "filedock", "fsck", "--data-dir", str(data), "--json"],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_new_data_dir_is_owner_only(tmp_path):
    """After an upload, every file the server made is 0600 and every directory 0700, but the lock file,
    which holds nothing and which any user may lock (0644)."""
    with ServerProcess(tmp_path / "data") as server:
        job, files, session = server.job_with_files("j", {"f": 5})
        sock = server.connect()
        sock.sendall(f"FILEDOCK/1 PUT {session['key']} {files['f']['key']} 5\r\n".encode())
        assert recv_line(sock) == b"OFFSET 0"
        sock.sendall(b"abcde" + f"DONE {digest_of(b'abcde')}\r\n".encode())
        assert recv_line(sock).startswith(b"STORED ")
        sock.close()
        seen = []
        for root, dirs, names in os.walk(server.data_dir):
            for d in dirs:
                assert mode(os.path.join(root, d)) == 0o700, d
            for name in names:
                want = 0o644 if name == "filedock.lock" else 0o600
                assert mode(os.path.join(root, name)) == want, name
                seen.append(name)
        assert mode(server.data_dir) == 0o700
        assert "filedock.secret" in seen and "filedock.sqlite3" in seen
        assert server.blob_path(job["id"], files["f"]["key"]).name in seen
