"""``filedock upload`` / ``download`` / ``status`` end to end against a real server process.

The CLI runs as a user runs it (``python -m filedock ...`` with FILEDOCK_URL and
FILEDOCK_TOKEN in the environment), except for the Ctrl-C test, which runs
``filedock.cli.main`` in this process so that SIGINT can arrive at a known moment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from filedock import cli
from filedock.client.blocking import DataPortClient
from filedock.client.model import SENT
from filedock.digest import hash_file
from filedock.wire import format_crc
from tests.integration.harness import ServerProcess

MiB = 1 << 20


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server with progress made durable every MiB; the user's own config file kept out of the way."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    proc = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"])
    proc.start()
    yield proc
    proc.stop()


def filedock(server: ServerProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "filedock", *args], env=server.env(), capture_output=True,
                          text=True, timeout=timeout)


def json_lines(stdout: str) -> dict[str, dict]:
    """``--json`` output: one object per file, by name."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {row["name"]: row for row in rows}


def local_values(path: Path) -> tuple[str, str]:
    hasher = hash_file(path)
    return format_crc(hasher.crc32), hasher.hexdigest()


def make_tree(root: Path) -> dict[str, Path]:
    """A directory with nested files, two of them empty and one of 20 MiB; {job file name: path}."""
    sizes = {"top.bin": MiB + 3, "empty": 0, "nested/small.txt": 17, "nested/zero": 0,
             "nested/deeper/big.bin": 20 * MiB}
    tree = {}
    for name, size in sizes.items():
        path = root.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        tree[name] = path
    return tree


def test_directory_upload_then_download_is_byte_identical(server, tmp_path):
    """A nested directory (empty files, a 20 MiB file) uploaded with --create --parallel 3 --json:
    one complete line per file named by its relative "/" path with the local CRC-32 and digest;
    a second run verifies without sending; each file downloads byte-identical with `filedock download`."""
    tree = make_tree(tmp_path / "in")
    run = filedock(server, "upload", "--job", "tree", "--create", "--parallel", "3", "--json", str(tmp_path / "in"))
    assert run.returncode == 0, run.stderr
    rows = json_lines(run.stdout)
    assert set(rows) == set(tree)
    for name, path in tree.items():
        row = rows[name]
        assert (row["state"], row["size"], row["resumed_from"], row["sent"]) == \
            ("complete", path.stat().st_size, 0, path.stat().st_size)
        assert (row["crc32"], row["digest"]) == local_values(path)
    job = server.api.job("tree")
    assert {f["name"]: (f["state"], f["digest"]) for f in job["files"]} == \
        {name: ("complete", rows[name]["digest"]) for name in tree}

    again = filedock(server, "upload", "--job", "tree", "--json", str(tmp_path / "in"))
    assert again.returncode == 0, again.stderr
    for name, row in json_lines(again.stdout).items():  # complete on the server: verified, not sent
        assert (row["state"], row["sent"], row["resumed_from"], row["digest"]) == \
            ("complete", 0, tree[name].stat().st_size, rows[name]["digest"])
    human = filedock(server, "upload", "--job", "tree", str(tmp_path / "in"))
    assert human.returncode == 0 and "5/5 files complete" in human.stdout

    out = tmp_path / "out"
    out.mkdir()
    for name, path in tree.items():
        dest = out / name.replace("/", "_")
        run = filedock(server, "download", "--job", "tree", name, str(dest), "--json")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["digest"] == rows[name]["digest"]
        assert dest.read_bytes() == path.read_bytes()
        assert not dest.with_name(dest.name + ".part").exists()

    status = filedock(server, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {"uploads": []}


def test_second_run_after_ctrl_c_resumes(server, tmp_path, monkeypatch, capsys):
    """Ctrl-C (a real SIGINT) once 8 MiB of 24 MiB are sent: exit 130 with a resume hint; running the
    same command again resumes (resumed_from > 0, only the rest sent) and ends with the local digest."""
    path = tmp_path / "in" / "movie.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(24 * MiB))
    size = path.stat().st_size
    monkeypatch.setenv("FILEDOCK_URL", server.url)
    monkeypatch.setenv("FILEDOCK_TOKEN", server.token)
    upload = DataPortClient.upload_file

    def interrupted_upload(self, *args, progress=None, **kwargs):
        def hook(stage: str, done: int, total: int) -> None:
            if progress is not None:
                progress(stage, done, total)
            if stage == SENT and done >= 8 * MiB:
                signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C: a real SIGINT, to this thread

        return upload(self, *args, progress=hook, **kwargs)

    monkeypatch.setattr(DataPortClient, "upload_file", interrupted_upload)
    # Ctrl-C must raise KeyboardInterrupt here even if this process was started with SIGINT ignored
    # (a test run in the background of a non-interactive shell is): Python then installs no handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    args = ["upload", "--job", "resumable", "--create", "--json", str(path)]
    try:
        assert cli.main(args) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    captured = capsys.readouterr()
    assert "run the same command again to resume" in captured.err
    assert "Traceback" not in captured.err
    monkeypatch.setattr(DataPortClient, "upload_file", upload)

    key = server.api.job("resumable")["files"][0]["key"]
    held = server.api.file(key)["received"]
    run = filedock(server, *args)
    assert run.returncode == 0, run.stderr
    row = json_lines(run.stdout)["movie.bin"]
    assert row["state"] == "complete"
    assert 0 < row["resumed_from"] < size
    assert row["resumed_from"] >= held  # at least what the server had recorded when we looked
    assert row["sent"] == size - row["resumed_from"]
    assert (row["crc32"], row["digest"]) == local_values(path)


def test_unknown_job_without_create_fails_with_not_found(server, tmp_path):
    """No such job and no --create: exit 1, `error: not-found: ...` on stderr, no traceback, no job made."""
    (tmp_path / "f").write_bytes(b"data")
    run = filedock(server, "upload", "--job", "no-such-job", str(tmp_path / "f"))
    assert run.returncode == 1
    assert run.stderr.startswith("error: not-found: ") and "no-such-job" in run.stderr
    assert "Traceback" not in run.stderr
    assert [j["name"] for j in server.api.get("/v1/jobs")["jobs"]] == []


def test_same_name_with_another_size_is_a_conflict(server, tmp_path):
    """A second run whose local file changed size: exit 1 with `error: conflict: ...` and nothing sent."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    assert filedock(server, "upload", "--job", "j", "--create", "--json", str(path)).returncode == 0
    path.write_bytes(b"x" * 1001)
    run = filedock(server, "upload", "--job", "j", str(path))
    assert run.returncode == 1
    assert "\nerror: conflict: " in "\n" + run.stderr and "f.bin" in run.stderr and "1001" in run.stderr
    (record,) = server.api.job("j")["files"]
    assert (record["size"], record["state"]) == (1000, "complete")
