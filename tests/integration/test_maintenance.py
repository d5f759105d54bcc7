"""Keeping a data dir healthy: the partial sweeper and ``filedock fsck``, on real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, put, recv_line, wait_for


def fsck(data_dir, *flags):
    """Run ``filedock fsck --json`` and return (exit status, parsed report)."""
    proc = subprocess.run([sys.executable, "-m", "filedock", "fsck", "--data-dir", str(data_dir), "--json", *flags],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout)


def test_sweeper_removes_abandoned_partials(tmp_path):
    """A partial untouched for partial_ttl is deleted and its file goes back to pending."""
    data = os.urandom(500_000)
    with ServerProcess(tmp_path / "data", limits=["partial_ttl=1", "sweep_interval=0.3"]) as server:
        job, files, session = server.job_with_files("sweep", {"f": len(data)})
        key = files["f"]["key"]
        sock, line = put(server, session["key"], key, len(data))
        sock.sendall(data[:200_000])
        time.sleep(0.2)
        sock.close()
        part = server.blob_path(job["id"], key).with_suffix(".part")
        wait_for(lambda: server.api.file(key)["state"] == "partial")
        assert part.exists()
        record = wait_for(lambda: (r := server.api.file(key))["state"] == "pending" and r, timeout=20)
        assert record["received"] == 0
        assert not part.exists()


def test_fsck_finds_and_repairs_damage(tmp_path):
    """fsck reports a corrupted complete file and an orphan; --repair quarantines both; then clean."""
    data = os.urandom(300_000)
    server = ServerProcess(tmp_path / "data")
    with server:
        job, files, session = server.job_with_files("fsck", {"f": len(data)})
        key = files["f"]["key"]
        sock, _ = put(server, session["key"], key, len(data))
        sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
        assert recv_line(sock).startswith(b"STORED")
    status, report = fsck(server.data_dir)
    assert status == 0 and report["findings"] == [] and report["bytes_verified"] == len(data)

    final = server.blob_path(job["id"], key)
    with open(final, "r+b") as f:
        f.seek(1234)
        f.write(b"\x00\xff\x00")
    (final.parent / "stray-file").write_bytes(b"who put this here")
    status, report = fsck(server.data_dir)
    kinds = sorted(f["kind"] for f in report["findings"])
    assert status == 1 and kinds == ["digest-mismatch", "orphan"]

    status, report = fsck(server.data_dir, "--repair")
    assert status == 0 and all(f["repaired"] for f in report["findings"])
    assert len(list((server.data_dir / "lost+found").iterdir())) == 2
    status, report = fsck(server.data_dir)
    assert status == 0 and report["findings"] == []
    with server:
        assert server.api.file(key)["state"] == "pending"


def test_one_server_per_data_dir_and_no_repair_under_a_live_one(tmp_path):
    """A second `filedock serve` on a data dir in use exits 1 with a clear `conflict` error (and the first
    server's admin token still works); `fsck --repair` refuses while the server runs, plain fsck reads;
    once the server is gone (even SIGKILLed) both work."""
    with ServerProcess(tmp_path / "data") as server:
        second = subprocess.run([sys.executable, "-m", "filedock", "serve", "--data-dir", str(server.data_dir),
                                 "--api-listen", "tcp:0:interface=127.0.0.1",
                                 "--data-listen", "tcp:0:interface=127.0.0.1", "--issue-admin-token"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "error: conflict: another filedock process is using" in second.stderr
        assert "Traceback" not in second.stderr
        assert server.api.get("/v1/jobs")["jobs"] == []  # the first server's token was left alone
        repair = subprocess.run([sys.executable, "-m", "filedock", "fsck", "--data-dir", str(server.data_dir),
                                 "--repair"], capture_output=True, text=True, timeout=60)
        assert repair.returncode == 1 and "error: conflict:" in repair.stderr
        assert fsck(server.data_dir) == (0, {"files": 0, "bytes_verified": 0, "findings": []})
        server.kill()
    assert fsck(tmp_path / "data", "--repair")[0] == 0
