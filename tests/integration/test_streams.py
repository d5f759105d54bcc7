"""Ranged uploads (``FILEDOCK/1 PUTR``, ``filedock upload --streams K``) against real server processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from filedock import wire
from filedock.digest import hash_file
from filedock.wire import RANGE_ALIGN, format_crc
from tests.integration.harness import ServerProcess

MiB = 1 << 20


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server recording progress every MiB; the user's own config kept out of the way."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    proc = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"])
    proc.start()
    yield proc
    proc.stop()


def filedock(server: ServerProcess, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "filedock", *args], env=server.env(), capture_output=True,
                          text=True, timeout=timeout)


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


def stored_path(server: ServerProcess, job_id: str, key: str) -> Path:
    return server.blob_path(job_id, key)


def one_json(stdout: str) -> dict:
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert len(rows) == 1, stdout
    return rows[0]


def test_four_streams_upload_is_byte_identical(server, tmp_path):
    """K=4: four ranges over four connections into one partial; the stored file equals the local one,
    the server's CRC-32 (combined from the ranges) and digest (block tree) equal the local ones."""
    src = random_file(tmp_path / "big.bin", 37 * MiB + 12345)
    run = filedock(server, "upload", "--job", "j", "--create", "--streams", "4", "--json", str(src))
    assert run.returncode == 0, run.stderr
    row = one_json(run.stdout)
    local = hash_file(src)
    assert (row["state"], row["crc32"], row["digest"]) == ("complete", format_crc(local.crc32), local.hexdigest())
    assert row["streams"]["streams"] == 4
    assert [(r["start"], r["end"]) for r in row["streams"]["ranges"]] == [
        (0, 8 * MiB), (8 * MiB, 20 * MiB), (20 * MiB, 28 * MiB), (28 * MiB, 37 * MiB + 12345)]
    assert sum(r["sent"] for r in row["streams"]["ranges"]) == src.stat().st_size
    assert sorted(r["reply"] for r in row["streams"]["ranges"]) == ["durable"] * 3 + ["stored"]
    assert row["streams"]["congestion_control"]
    stored = next((server.data_dir / "jobs").glob("*/*"))
    assert not stored.name.endswith(".part")
    assert stored.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------- a raw ranged client, for what the CLI cannot stage


class RawRange:
    """One ``PUTR`` connection driven by hand: the request, the reply, some bytes, maybe ``DONE``."""

    def __init__(self, server: ServerProcess, session_key: str, file_key: str, size: int, start: int, end: int):
        self.sock = server.connect()
        self.conn = wire.ClientConnection()
        self.start, self.end = start, end
        self.sock.sendall(self.conn.send(wire.RangedUploadRequest(session_key, file_key, size, start, end)))
        self.reply = self.event()

    def event(self):
        while True:
            event = self.conn.next_event()
            if event is not wire.NEED_DATA:
                return event
            self.conn.receive_data(self.sock.recv(65536))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def done(self, digest: str | None = None):
        self.sock.sendall(self.conn.send(wire.Done(digest)))
        return self.event()

    def close(self) -> None:
        self.sock.close()


def wait_received(server: ServerProcess, key: str, at_least: int, timeout: float = 30.0) -> int:
    """Poll the file's record until it counts ``at_least`` durable bytes."""
    deadline = time.monotonic() + timeout
    while True:
        received = server.api.file(key)["received"]
        if received >= at_least or time.monotonic() > deadline:
            return received
        time.sleep(0.05)


def test_sigkill_then_resume_sends_only_missing_ranges(server, tmp_path):
    """Range 0 durable, range 1 half sent (one block recorded), then the server is SIGKILLed. After the
    restart, the same two-stream plan resumes: range 0 sends nothing (its reply lists it durable), range 1
    resumes past its recorded block; the stored file is byte-identical."""
    size = 24 * MiB + 777
    src = random_file(tmp_path / "take.bin", size)
    data = src.read_bytes()
    job, files, session = server.job_with_files("j", {"take.bin": size})
    key = files["take.bin"]["key"]
    first = RawRange(server, session["key"], key, size, 0, 12 * MiB)
    assert first.reply == wire.RangeOffset(0, ())
    first.send(data[:12 * MiB])
    assert first.done() == wire.RangeStored(0, 12 * MiB)
    first.close()
    second = RawRange(server, session["key"], key, size, 12 * MiB, size)
    assert second.reply == wire.RangeOffset(12 * MiB, ((0, 12 * MiB),))
    second.send(data[12 * MiB:12 * MiB + 6 * MiB])  # one whole block and a half
    assert wait_received(server, key, 16 * MiB) >= 16 * MiB  # the checkpoint recorded the whole block
    server.kill()
    second.close()
    server.start()
    run = filedock(server, "upload", "--job", "j", "--streams", "2", "--json", str(src))
    assert run.returncode == 0, run.stderr
    row = one_json(run.stdout)
    ranges = {(r["start"], r["end"]): r for r in row["streams"]["ranges"]}
    assert set(ranges) == {(0, 12 * MiB), (12 * MiB, size)}
    assert (ranges[(0, 12 * MiB)]["from"], ranges[(0, 12 * MiB)]["sent"]) == (12 * MiB, 0)  # not resent
    resumed = ranges[(12 * MiB, size)]
    assert resumed["from"] >= 16 * MiB and resumed["sent"] == size - resumed["from"]
    assert row["sent"] == size - resumed["from"] and row["state"] == "complete"
    stored = server.blob_path(job["id"], key)
    assert stored.read_bytes() == data
    assert "range-start" in server.log() or "ranged upload of" in server.log()


def test_takeover_of_a_stalled_range(server, tmp_path):
    """A connection holding range 1 stalls mid-body; the client's new connection for that range takes it
    over (the old one is told ``taken-over``) and the upload completes."""
    size = 16 * MiB
    src = random_file(tmp_path / "t.bin", size)
    data = src.read_bytes()
    job, files, session = server.job_with_files("j", {"t.bin": size})
    key = files["t.bin"]["key"]
    stalled = RawRange(server, session["key"], key, size, 8 * MiB, size)
    assert isinstance(stalled.reply, wire.RangeOffset)
    stalled.send(data[8 * MiB:9 * MiB])
    run = filedock(server, "upload", "--job", "j", "--streams", "2", "--json", str(src))
    assert run.returncode == 0, run.stderr
    assert one_json(run.stdout)["state"] == "complete"
    stalled.sock.settimeout(10)
    error = stalled.event()
    assert isinstance(error, wire.ServerError) and error.code == "taken-over"
    stalled.close()
    assert server.blob_path(job["id"], key).read_bytes() == data


def test_plain_put_after_ranged_progress_starts_again(server, tmp_path):
    """A plain PUT on a file with ranged progress: the ranged blocks are dropped (the record back at 0
    first) and the plain upload sends the whole file from 0; the result is byte-identical."""
    size = 12 * MiB + 5
    src = random_file(tmp_path / "p.bin", size)
    data = src.read_bytes()
    job, files, session = server.job_with_files("j", {"p.bin": size})
    key = files["p.bin"]["key"]
    tail = RawRange(server, session["key"], key, size, 8 * MiB, size)
    tail.send(data[8 * MiB:])
    assert tail.done() == wire.RangeStored(8 * MiB, size)
    tail.close()
    assert server.api.file(key)["received"] == size - 8 * MiB
    run = filedock(server, "upload", "--job", "j", "--json", str(src))
    assert run.returncode == 0, run.stderr
    row = one_json(run.stdout)
    assert (row["state"], row["resumed_from"], row["sent"]) == ("complete", 0, size)
    assert server.blob_path(job["id"], key).read_bytes() == data


def test_ranged_after_plain_progress_and_overlap_rules(server, tmp_path):
    """A ranged upload on a file with a plain prefix starts again from 0 (the prefix's block hashes are
    not recorded); a misaligned range is refused with ``bad-range``."""
    size = 8 * MiB + 1
    src = random_file(tmp_path / "q.bin", size)
    data = src.read_bytes()
    job, files, session = server.job_with_files("j", {"q.bin": size})
    key = files["q.bin"]["key"]
    with server.connect() as bad:
        bad.sendall(f"FILEDOCK/1 PUTR {session['key']} {key} {size} 1 {size}\r\n".encode())
        assert bad.recv(4096).startswith(b"ERR bad-range ")
    sock = server.connect()
    conn = wire.ClientConnection()
    sock.sendall(conn.send(wire.UploadRequest(session["key"], key, size)))
    sock.sendall(data[:5 * MiB])
    assert wait_received(server, key, 1 * MiB) >= 1 * MiB
    sock.close()
    time.sleep(0.5)
    r = RawRange(server, session["key"], key, size, 0, 4 * MiB)
    assert r.reply == wire.RangeOffset(0, ())
    r.send(data[:4 * MiB])
    assert r.done() == wire.RangeStored(0, 4 * MiB)
    r.close()
    assert server.api.file(key)["received"] == 4 * MiB  # the plain prefix's 5 MiB no longer counted


def test_streams_auto_on_loopback_picks_one_and_completes(server, tmp_path):
    """``--streams auto`` on loopback measures a sub-millisecond RTT, keeps one stream (never slower than
    one stream on a clean fast link) and says so in --json."""
    src = random_file(tmp_path / "a.bin", 20 * MiB)
    run = filedock(server, "upload", "--job", "j", "--create", "--streams", "auto", "--json", str(src))
    assert run.returncode == 0, run.stderr
    row = one_json(run.stdout)
    assert row["state"] == "complete"
    assert row["streams"]["chosen"] == "auto" and row["streams"]["streams"] == 1
    assert 0 < row["streams"]["rtt_ms"] < 2
    assert row["streams"]["congestion_control"]


def test_2007_upload_over_ranged_progress_replaces_it(server, tmp_path):
    """A 2007 client (no reply, ever) uploading a file with ranged progress: the blocks are dropped, its
    bytes from 0 make the file, which is complete and byte-identical."""
    size = 8 * MiB + 3
    src = random_file(tmp_path / "old.bin", size)
    data = src.read_bytes()
    job, files, session = server.job_with_files("j", {"old.bin": size})
    key = files["old.bin"]["key"]
    head = RawRange(server, session["key"], key, size, 0, 4 * MiB)
    head.send(bytes(4 * MiB))  # other bytes than the file's: they must not survive
    assert head.done() == wire.RangeStored(0, 4 * MiB)
    head.close()
    with server.connect() as sock:
        sock.sendall(wire.legacy_header(session["key"], key, size) + data)
    deadline = time.monotonic() + 30
    while server.api.file(key)["state"] != "complete" and time.monotonic() < deadline:
        time.sleep(0.05)
    record = server.api.file(key)
    assert (record["state"], record["digest"]) == ("complete", hash_file(src).hexdigest())
    assert server.blob_path(job["id"], key).read_bytes() == data
