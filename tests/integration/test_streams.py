"""Ranged uploads (``FILEDOCK/1 PUTR``, ``filedock upload --streams K``) against real server processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from filedock import wire
from filedock.client.blocking import DataPortClient
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
