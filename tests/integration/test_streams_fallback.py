"""``--streams K`` where the server takes no ranged uploads: blobs in object storage. The server
refuses ``PUTR`` with ``ranges-unsupported`` and the client sends the file with one ``PUT``:
complete, byte-identical. Metadata in PostgreSQL (its registry shares range claims) takes the
ranges like SQLite does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from filedock.digest import hash_file
from filedock.wire import format_crc
from tests.integration.harness import ServerProcess
from tests.integration.test_streams import random_file

MiB = 1 << 20


@pytest.fixture(params=["postgresql", "s3"])
def server(request, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    if request.param == "postgresql":
        proc = ServerProcess(tmp_path / "data", metadata=request.getfixturevalue("postgres_dsn"))
    else:
        bucket = request.getfixturevalue("s3_bucket")
        proc = ServerProcess(tmp_path / "data", blobs=bucket.blobs_url(), server_env=bucket.env())
    proc.start()
    yield proc
    proc.stop()


def test_streams_fall_back_to_one_put_where_ranges_are_not_taken(server, tmp_path):
    src = random_file(tmp_path / "big.bin", 21 * MiB + 7)
    run = subprocess.run([sys.executable, "-m", "filedock", "upload", "--job", "j", "--create", "--streams", "4",
                          "--json", str(src)], env=server.env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout.strip().splitlines()[-1])
    local = hash_file(src)
    assert (row["state"], row["crc32"], row["digest"]) == ("complete", format_crc(local.crc32), local.hexdigest())
    if server.metadata:  # PostgreSQL: the ranges were taken, one of them completed the file
        assert all(r["sent"] > 0 for r in row["streams"]["ranges"]), row["streams"]
        assert sorted(r["reply"] for r in row["streams"]["ranges"]) == ["durable"] * 3 + ["stored"]
    else:  # every range refused before a byte went: the file went as one PUT
        assert [(r["reply"], r["sent"]) for r in row["streams"]["ranges"]] == [(None, 0)] * len(row["streams"]["ranges"])
    back = tmp_path / "back"
    down = subprocess.run([sys.executable, "-m", "filedock", "download", "--job", "j", "--all", str(back)],
                          env=server.env(), capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    assert (back / "big.bin").read_bytes() == src.read_bytes()
