"""Client safety against a real server: files that change while they upload, downloads over existing
files, names and conflicts in a directory upload.

The CLI runs as a user runs it (``python -m filedock`` with FILEDOCK_URL/FILEDOCK_TOKEN);
the library tests change the file from the progress callback, at a known moment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import defer

from filedock.client.blocking import DataPortClient
from filedock.client.model import SENT, SourceStamp
from filedock.client.txclient import TxDataPortClient
from filedock.client.uploader import JobUploader
from filedock.digest import hash_file
from filedock.errors import ErrorCode, FiledockError
from tests.integration.harness import ServerProcess
from tests.integration.test_client_twisted import in_reactor
from tests.integration.test_upload_cli import filedock, server  # noqa: F401 (server is a fixture)

MiB = 1 << 20


def json_rows(stdout: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {row["name"]: row for row in rows if "name" in row}


def declared(server: ServerProcess, path: Path, job: str = "j"):
    """A job with ``path`` declared under its name and a session: (file key, session key)."""
    _, files, session = server.job_with_files(job, {path.name: path.stat().st_size})
    return files[path.name]["key"], session["key"]


# ---------------------------------------------------------------- issue 10 item 2: changed during upload


def test_cli_file_that_grows_during_upload_is_not_reported_complete(server, tmp_path):
    """The CLI is paused (SIGSTOP) mid-upload, the file grows, the CLI goes on: exit 1,
    `changed-during-upload` naming the change, never `complete`; the server holds no complete copy
    and no partial (before the fix: the declared prefix was stored complete and the exit was 0)."""
    src = tmp_path / "growing.log"
    src.write_bytes(os.urandom(48 * MiB))
    size = src.stat().st_size
    cli = subprocess.Popen([sys.executable, "-m", "filedock", "upload", "--job", "logs", "--create", "--json",
                            str(src)], env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = server.data_dir / "jobs"
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 0 for p in parts.rglob("*.part")) if parts.exists() else True:
        assert cli.poll() is None and time.monotonic() < deadline, "the upload never started"
        time.sleep(0.005)
    cli.send_signal(signal.SIGSTOP)
    with open(src, "ab") as f:
        f.write(b"appended while uploading\n")
    cli.send_signal(signal.SIGCONT)
    stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 1, stderr
    (row,) = json_rows(stdout).values()
    assert row["state"] == "changed-during-upload"
    assert f"grew from {size} to {size + 25} bytes" in row["message"]
    assert "error: changed-during-upload: growing.log: " in stderr
    (record,) = server.api.job("logs")["files"]
    assert record["state"] != "complete" and record["received"] == 0
    assert not list(parts.rglob("*.part")) or all(p.stat().st_size == 0 for p in parts.rglob("*.part"))


def test_blocking_client_rewrite_in_place_is_caught_before_done(server, tmp_path):
    """Same size, other bytes, written from the progress callback mid-upload: `changed-during-upload`
    ("was modified"), the partial is dropped, nothing complete; a later upload of the new bytes works."""
    src = tmp_path / "take.bin"
    src.write_bytes(os.urandom(8 * MiB))
    key, session = declared(server, src)
    stamp = SourceStamp.of(os.stat(src))
    rewritten = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == SENT and done >= 2 * MiB and not rewritten:
            with open(src, "r+b") as f:
                f.write(b"\0" * 4096)
            os.utime(src, ns=(stamp.mtime_ns + 10**9,) * 2)
            rewritten.append(done)

    client = DataPortClient(*server.data_addr)
    with pytest.raises(FiledockError) as info:
        client.upload_file(session, key, src, progress=progress, expect=stamp)
    assert rewritten and info.value.code is ErrorCode.CHANGED_DURING_UPLOAD
    assert "take.bin: the local file was modified during the upload" in info.value.message
    record = server.api.file(key)
    assert (record["state"], record["received"]) == ("pending", 0)
    result = client.upload_file(session, key, src)
    assert result.state == "complete" and result.digest == hash_file(src).hexdigest()


def test_blocking_client_file_replaced_before_the_upload_starts(server, tmp_path):
    """A file replaced (new inode, same size) between declaring and sending: refused before a byte is sent."""
    src = tmp_path / "take.bin"
    src.write_bytes(os.urandom(MiB))
    key, session = declared(server, src)
    stamp = SourceStamp.of(os.stat(src))
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(MiB))
    os.replace(other, src)
    with pytest.raises(FiledockError) as info:
        DataPortClient(*server.data_addr).upload_file(session, key, src, expect=stamp)
    assert info.value.code is ErrorCode.CHANGED_DURING_UPLOAD and "replaced" in info.value.message
    assert server.api.file(key)["state"] == "pending"


def test_twisted_client_file_that_grows_fails_changed_during_upload(server, reactor_thread, tmp_path):
    """TxDataPortClient: the file grows mid-upload (from the progress callback): the Deferred fails with
    `changed-during-upload`, no DONE was sent, the partial is dropped."""
    src = tmp_path / "grow.bin"
    src.write_bytes(os.urandom(6 * MiB))
    key, session = declared(server, src)
    grown = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == SENT and done >= MiB and not grown:
            with open(src, "ab") as f:
                f.write(b"x")
            grown.append(done)

    client = TxDataPortClient(reactor_thread, *server.data_addr)
    with pytest.raises(FiledockError) as info:
        in_reactor(reactor_thread, client.upload_file, session, key, src, progress)
    assert grown and info.value.code is ErrorCode.CHANGED_DURING_UPLOAD and "grew" in info.value.message
    record = server.api.file(key)
    assert (record["state"], record["received"]) == ("pending", 0)


def test_batch_file_changed_after_declaring_is_left_out_and_the_rest_stored(server, tmp_path):
    """Three small files planned in one batch; one is modified before the run: it is
    `changed-during-upload` and not stored, the other two are complete (blocking), and the Twisted
    batch does the same with stamps taken before the change."""
    root = tmp_path / "small"
    root.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / name).write_bytes(os.urandom(1000))
    uploader = JobUploader(server.api)
    plan = uploader.prepare("batchy", [root], create=True)
    before = os.stat(root / "b.txt").st_mtime_ns
    (root / "b.txt").write_bytes(os.urandom(1000))
    os.utime(root / "b.txt", ns=(before + 10**9,) * 2)
    results = {r.name: r for r in uploader.run(plan)}
    assert {n: r.state for n, r in results.items()} == {"a.txt": "complete", "b.txt": "changed-during-upload",
                                                       "c.txt": "complete"}
    states = {f["name"]: f["state"] for f in server.api.job("batchy")["files"]}
    assert states == {"a.txt": "complete", "b.txt": "pending", "c.txt": "complete"}


def test_twisted_batch_leaves_out_a_changed_file(server, reactor_thread, tmp_path):
    paths = {n: tmp_path / n for n in ("x.txt", "y.txt")}
    for p in paths.values():
        p.write_bytes(os.urandom(500))
    _, files, session = server.job_with_files("txbatch", {n: 500 for n in paths})
    stamps = {files[n]["key"]: SourceStamp.of(os.stat(p)) for n, p in paths.items()}
    with open(paths["y.txt"], "ab") as f:
        f.write(b"!")
    client = TxDataPortClient(reactor_thread, *server.data_addr)
    results = in_reactor(reactor_thread, client.upload_batch, session["key"],
                         [(files[n]["key"], p, n) for n, p in paths.items()], None, stamps)
    assert [(r.name, r.state) for r in results] == [("x.txt", "complete"), ("y.txt", "changed-during-upload")]
    assert server.api.file(files["y.txt"]["key"])["state"] == "pending"


# ---------------------------------------------------------------- issue 10 item 3: download over a file


def test_single_download_refuses_other_bytes_verifies_same_bytes_and_force_replaces(server, tmp_path):
    """DEST with other bytes: exit 1 `conflict` naming --force, DEST untouched (before: overwritten, exit 0).
    DEST with the job's bytes: exit 0, nothing fetched. --force: replaced with the job's bytes, no .part left."""
    src = tmp_path / "take.bin"
    src.write_bytes(os.urandom(3 * MiB + 5))
    assert filedock(server, "upload", "--job", "dl", "--create", "--json", str(src)).returncode == 0
    dest = tmp_path / "mine.bin"
    mine = os.urandom(1234)
    dest.write_bytes(mine)
    run = filedock(server, "download", "--job", "dl", "take.bin", str(dest))
    assert run.returncode == 1
    assert run.stderr.startswith("error: conflict: ") and "exists with other bytes" in run.stderr
    assert "--force" in run.stderr and dest.read_bytes() == mine
    forced = filedock(server, "download", "--job", "dl", "--force", "--json", "take.bin", str(dest))
    assert forced.returncode == 0, forced.stderr
    assert dest.read_bytes() == src.read_bytes() and not (tmp_path / "mine.bin.part").exists()
    again = filedock(server, "download", "--job", "dl", "--json", "take.bin", str(dest))
    assert again.returncode == 0, again.stderr
    row = json.loads(again.stdout)
    assert (row["state"], row["sent"], row["digest"]) == ("complete", 0, hash_file(src).hexdigest())


def test_download_all_with_force_replaces_only_regular_files(server, tmp_path):
    """--all --force replaces a local file with other bytes; without --force it stays a conflict."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"job's a")
    assert filedock(server, "upload", "--job", "all", "--create", "--json", str(src)).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_bytes(b"mine")
    assert filedock(server, "download", "--job", "all", "--all", str(out)).returncode == 1
    assert (out / "a.txt").read_bytes() == b"mine"
    run = filedock(server, "download", "--job", "all", "--all", "--force", str(out))
    assert run.returncode == 0, run.stderr
    assert (out / "a.txt").read_bytes() == b"job's a"


# ---------------------------------------------------------------- issue 15 item 5: names and changes


def test_prefix_keeps_a_subdirectory_where_it_belongs(server, tmp_path):
    """A job holds sub1/a.txt; uploading session-42/sub1 alone would make a second a.txt at the top,
    with --prefix sub1/ it lands on sub1/a.txt (verified, not sent again) and the new file next to it.
    `upload --help` states the rule."""
    tree = tmp_path / "session-42"
    (tree / "sub1").mkdir(parents=True)
    (tree / "sub1" / "a.txt").write_bytes(b"alpha")
    assert filedock(server, "upload", "--job", "s42", "--create", "--json", str(tree)).returncode == 0
    (tree / "sub1" / "b.txt").write_bytes(b"beta")
    run = filedock(server, "upload", "--job", "s42", "--prefix", "sub1/", "--json", str(tree / "sub1"))
    assert run.returncode == 0, run.stderr
    rows = json_rows(run.stdout)
    assert (rows["sub1/a.txt"]["state"], rows["sub1/a.txt"]["sent"]) == ("complete", 0)
    assert sorted(f["name"] for f in server.api.job("s42")["files"]) == ["sub1/a.txt", "sub1/b.txt"]
    bad = filedock(server, "upload", "--job", "s42", "--prefix", "../up", str(tree / "sub1"))
    assert bad.returncode == 1 and bad.stderr.startswith("error: bad-request: --prefix")
    helptext = filedock(server, "upload", "--help").stdout
    assert "--prefix" in helptext and "without DIR's own name" in " ".join(helptext.split())


def test_conflicting_files_are_named_and_the_rest_of_the_directory_goes_on(server, tmp_path):
    """After an upload, one file changes size and one changes bytes (same size), and a new one appears:
    the new file is uploaded, both changed files are `conflict` with "differs from the job's copy"
    (before: the whole upload stopped at the first, and a same-size change read `digest-mismatch`)."""
    root = tmp_path / "dir"
    root.mkdir()
    for name in ("grown.txt", "same.txt", "kept.txt"):
        (root / name).write_bytes(name.encode() * 10)
    assert filedock(server, "upload", "--job", "cj", "--create", "--json", str(root)).returncode == 0
    (root / "grown.txt").write_bytes(b"longer now" * 20)
    (root / "same.txt").write_bytes(b"X" * len(b"same.txt" * 10))
    (root / "new.txt").write_bytes(b"new")
    run = filedock(server, "upload", "--job", "cj", str(root))
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(e.split(":")[1].strip() + ":" + e.split(":")[2].strip() for e in errors) == \
        ["conflict:grown.txt", "conflict:same.txt"]
    assert all("differs from the job's copy" in e and "--replace" in e for e in errors)
    states = {f["name"]: f["state"] for f in server.api.job("cj")["files"]}
    assert states == {"grown.txt": "complete", "same.txt": "complete", "kept.txt": "complete",
                      "new.txt": "complete"}
    assert "conflict" in run.stdout  # the summary table lists them


def test_replace_uploads_new_versions_and_the_old_ones_stay_until_then(server, tmp_path):
    """`upload --replace` after one file grew and one changed bytes (same size): exit 0, both complete
    with the new bytes, each name once in the job, the old versions' bytes gone from the data dir
    (fsck clean). While a new version is only partly sent, the job still lists and serves the old one."""
    root = tmp_path / "dir"
    root.mkdir()
    (root / "grown.bin").write_bytes(os.urandom(2 * MiB))
    (root / "same.bin").write_bytes(os.urandom(3 * MiB))
    (root / "kept.txt").write_bytes(b"kept")
    assert filedock(server, "upload", "--job", "rj", "--create", "--json", str(root)).returncode == 0
    old_same = server.api.job("rj")["files"][2]
    assert old_same["name"] == "same.bin"
    (root / "grown.bin").write_bytes(os.urandom(4 * MiB))
    (root / "same.bin").write_bytes(os.urandom(3 * MiB))

    # a new version cut short: the old one is still what the job has
    uploader = JobUploader(server.api)
    plan = uploader.prepare("rj", [root / "grown.bin"], replace=True)
    uploader.close()  # this test sends the file itself, below
    (planned,) = plan.files
    assert planned.key != server.api.job("rj")["files"][0]["key"] and planned.state == "pending"
    session = server.api.open_session(plan.job_id)
    cancel_at = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == SENT and done >= MiB:
            cancel_at.append(done)
            raise KeyboardInterrupt  # as Ctrl-C would

    from filedock.client.model import Cancelled
    with pytest.raises(Cancelled):
        DataPortClient(*server.data_addr).upload_file(session["key"], planned.key, root / "grown.bin",
                                                      progress=progress, expect=planned.local.stamp)
    listed = {f["name"]: f for f in server.api.job("rj")["files"]}
    assert sorted(listed) == ["grown.bin", "kept.txt", "same.bin"]
    assert (listed["grown.bin"]["state"], listed["grown.bin"]["size"]) == ("complete", 2 * MiB)
    assert server.api.job("rj")["state"] == "complete"

    run = filedock(server, "upload", "--job", "rj", "--replace", "--json", str(root))
    assert run.returncode == 0, run.stderr
    rows = json_rows(run.stdout)
    assert {n: r["state"] for n, r in rows.items()} == {"grown.bin": "complete", "same.bin": "complete",
                                                        "kept.txt": "complete"}
    assert rows["grown.bin"]["resumed_from"] > 0  # the cut-short new version was resumed
    job = server.api.job("rj")
    assert [f["name"] for f in job["files"]] == ["grown.bin", "kept.txt", "same.bin"]
    assert {f["name"]: f["digest"] for f in job["files"]} == \
        {n: hash_file(root / n).hexdigest() for n in ("grown.bin", "kept.txt", "same.bin")}
    assert job["state"] == "complete" and job["files_total"] == 3
    blobs = sorted(p.name for p in (server.data_dir / "jobs" / job["id"]).iterdir())
    # the old versions' bytes are gone: what is left is the three files' blobs (named by file id)
    assert blobs == sorted(server.blob_path(job["id"], f["key"]).name for f in job["files"])
    back = tmp_path / "back"
    assert filedock(server, "download", "--job", "rj", "--all", str(back)).returncode == 0
    for name in ("grown.bin", "same.bin"):
        assert (back / name).read_bytes() == (root / name).read_bytes()
    fsck = subprocess.run([sys.executable, "-m", "filedock", "fsck", "--data-dir", str(server.data_dir), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert json.loads(fsck.stdout.splitlines()[-1])["findings"] == [], fsck.stdout
