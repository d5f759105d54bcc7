"""BATCH against a real server: many small files on one connection, durable together, answered per file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import zlib

from filedock import wire
from filedock.digest import hash_file
from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, put, recv_line, wait_closed, wait_for


def send_batch(server, session: str, items: list[tuple[str, bytes, str | None]], close_after: int | None = None):
    """Send a batch (key, bytes, digest or None for the right one); returns the reply events."""
    client = wire.ClientConnection()
    sock = server.connect()
    out = bytearray(client.send(wire.BatchRequest(session, len(items))))
    for key, data, digest in items:
        out += client.send(wire.BatchItem(key, len(data), digest or digest_of(data))) + data
    if close_after is not None:
        sock.sendall(out[:close_after])
        sock.close()
        return []
    out += client.send(wire.Done(None))
    sock.sendall(out)
    client.receive_data(wait_closed(sock))
    client.receive_data(b"")
    events = []
    while (event := client.next_event()) not in (wire.NEED_DATA,) and not isinstance(event, wire.EndOfStream):
        events.append(event)
    return events


def start_batch(server, session: str, keys: list[str], datas: list[bytes], send: int):
    """Open a BATCH of ``len(keys)`` files and send the first ``send`` of them, no DONE:
    (the client connection, the socket)."""
    client = wire.ClientConnection()
    sock = server.connect()
    head = client.send(wire.BatchRequest(session, len(keys)))
    for key, data in list(zip(keys, datas))[:send]:
        head += client.send(wire.BatchItem(key, len(data), digest_of(data))) + data
    sock.sendall(head)
    return client, sock


def staged(data_dir) -> list:
    """The files in the data dir's staging directories (a batch's files before it commits)."""
    return [p for p in (data_dir / "staging").glob("*/*")]


def test_batch_stores_every_file_and_completes_the_job_once(server):
    """50 small files in one BATCH: each answered STORED with its CRC and digest, on disk, recorded;
    the job becomes complete, with one completion event in the outbox."""
    datas = {f"f{i:02d}": os.urandom(i * 997) for i in range(50)}
    job, files, session = server.job_with_files("batched", {n: len(d) for n, d in datas.items()})
    events = send_batch(server, session["key"], [(files[n]["key"], d, None) for n, d in datas.items()])
    assert events[-1] == wire.BatchEnd(50)
    stored = {e.file_key: e for e in events[:-1]}
    for name, data in datas.items():
        key = files[name]["key"]
        assert stored[key] == wire.ItemStored(key, len(data), zlib.crc32(data), digest_of(data))
        assert server.blob_path(job["id"], key).read_bytes() == data
    shown = server.api.job(job["id"])
    assert shown["state"] == "complete" and all(f["state"] == "complete" for f in shown["files"])
    assert not [p for p in (server.data_dir / "jobs" / job["id"]).iterdir() if "." in p.name]  # no temp files
    assert not staged(server.data_dir)


def test_batch_answers_each_file_on_its_own(server):
    """Unknown file, wrong size, wrong digest, a duplicate, complete-with-same-bytes and complete-with-other
    bytes are each answered for themselves; the good files are stored all the same."""
    good, done_same, done_other, wrong_size, wrong_digest = (os.urandom(1000) for _ in range(5))
    sizes = {"good": 1000, "same": 1000, "other": 1000, "size": 999, "digest": 1000}
    job, files, session = server.job_with_files("mixed", sizes)
    key = {n: f["key"] for n, f in files.items()}
    for name in ("same", "other"):  # complete them first, the ordinary way
        sock, _ = put(server, session["key"], key[name], 1000)
        sock.sendall(done_same + b"DONE\r\n")
        assert recv_line(sock).startswith(b"STORED")
    stranger = str(uuid.uuid4())
    events = send_batch(server, session["key"], [
        (key["good"], good, None), (stranger, b"x", None), (key["size"], wrong_size + b"!", None),
        (key["digest"], wrong_digest, "0" * 64), (key["same"], done_same, None),
        (key["other"], done_other, None), (key["good"], good, None)])
    by = [(type(e).__name__, getattr(e, "code", None)) for e in events]
    assert by == [("ItemStored", None), ("ItemFailed", "unknown-file"), ("ItemFailed", "size-mismatch"),
                  ("ItemFailed", "digest-mismatch"), ("ItemStored", None), ("ItemFailed", "already-complete"),
                  ("ItemFailed", "conflict"), ("BatchEnd", None)]
    state = {n: server.api.file(k)["state"] for n, k in key.items()}
    assert state == {"good": "complete", "same": "complete", "other": "complete", "size": "pending",
                     "digest": "pending"}
    assert server.blob_path(job["id"], key["other"]).read_bytes() == done_same  # untouched


def test_batch_cut_off_stores_nothing_and_leaves_no_trace(server):
    """A client gone mid-batch: no file recorded, no temporary file left, the server fine."""
    datas = [os.urandom(5000) for _ in range(10)]
    job, files, session = server.job_with_files("cut", {f"f{i}": 5000 for i in range(10)})
    items = [(files[f"f{i}"]["key"], d, None) for i, d in enumerate(datas)]
    send_batch(server, session["key"], items, close_after=30_000)
    wait_for(lambda: server.api.get("/v1/uploads") == {"uploads": []})
    job_dir = server.data_dir / "jobs" / job["id"]
    wait_for(lambda: not job_dir.exists() or not list(job_dir.iterdir()))
    wait_for(lambda: not staged(server.data_dir))
    assert all(server.api.file(f["key"])["state"] == "pending" for f in files.values())
    assert send_batch(server, session["key"], items)[-1] == wire.BatchEnd(10)  # and it still works


def test_batch_refusals_for_the_whole_batch(tmp_path):
    """Unknown session and an item over batch_item_max refuse the batch with one ERR line; nothing stored."""
    with ServerProcess(tmp_path / "data", limits=["batch_item_max=4K"]) as server:
        job, files, session = server.job_with_files("refused", {"a": 10, "big": 5000})
        sock = server.connect()
        sock.sendall(f"FILEDOCK/1 BATCH {uuid.uuid4()} 1\r\n".encode())
        assert wait_closed(sock).startswith(b"ERR unknown-session ")
        client = wire.ClientConnection()
        sock = server.connect()
        sock.sendall(client.send(wire.BatchRequest(session["key"], 2))
                     + client.send(wire.BatchItem(files["a"]["key"], 10, digest_of(b"0" * 10))) + b"0" * 10
                     + client.send(wire.BatchItem(files["big"]["key"], 5000, digest_of(b"1" * 5000))))
        assert wait_closed(sock).startswith(b"ERR too-large ")
        assert {server.api.file(f["key"])["state"] for f in files.values()} == {"pending"}


def test_cli_batches_small_files_and_sends_big_ones_alone(server, tmp_path):
    """`filedock upload` of a directory: small files go in batches, a big one by PUT; all verified."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(40):
        (tree / "sub" / f"s{i}.bin").write_bytes(os.urandom(i * 100))
    (tree / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    proc = subprocess.run([sys.executable, "-m", "filedock", "upload", "--job", "tree", "--create", "--json",
                           str(tree)], capture_output=True, text=True, timeout=120, env=server.env())
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 41 and {r["state"] for r in rows} == {"complete"}
    for row in rows:
        assert row["digest"] == hash_file(tree / row["name"]).hexdigest()
    assert "batch complete: 40 of 40 files stored" in server.log()
    again = subprocess.run([sys.executable, "-m", "filedock", "upload", "--job", "tree", "--json", str(tree)],
                           capture_output=True, text=True, timeout=120, env=server.env())
    assert again.returncode == 0 and {json.loads(l)["sent"] for l in again.stdout.splitlines()} == {0}


def test_batch_in_flight_shows_in_uploads(server):
    """GET /v1/uploads lists a batch while it streams (files arrived, bytes), and not after it ends."""
    datas = [os.urandom(2000) for _ in range(5)]
    job, files, session = server.job_with_files("watched", {f"f{i}": 2000 for i in range(5)})
    client, sock = start_batch(server, session["key"], [files[f"f{i}"]["key"] for i in range(5)], datas, send=3)
    (entry,) = wait_for(lambda: server.api.get("/v1/uploads")["uploads"])
    assert entry["job"] == job["id"] and entry["files"] == 5
    wait_for(lambda: server.api.get("/v1/uploads")["uploads"][0]["files_arrived"] == 3)
    assert server.api.get("/v1/uploads")["uploads"][0]["received"] == 6000
    rest = b"".join(client.send(wire.BatchItem(files[f"f{i}"]["key"], 2000, digest_of(d))) + d
                    for i, d in enumerate(datas) if i >= 3)
    sock.sendall(rest + client.send(wire.Done(None)))
    assert wait_closed(sock).endswith(b"END 5\r\n")
    wait_for(lambda: server.api.get("/v1/uploads") == {"uploads": []})


def test_batch_leftovers_of_a_killed_server_are_reported_and_swept(tmp_path):
    """SIGKILL mid-batch leaves staging files and records nothing; fsck reports them, and the restarted
    server's first sweep deletes them. The files then go again in a new batch."""
    from tests.integration.test_reliability import run_fsck

    with ServerProcess(tmp_path / "data") as server:
        datas = [os.urandom(3000) for _ in range(8)]
        job, files, session = server.job_with_files("killed", {f"f{i}": 3000 for i in range(8)})
        _, sock = start_batch(server, session["key"], [files[f"f{i}"]["key"] for i in range(8)], datas, send=6)
        wait_for(lambda: len(staged(server.data_dir)) == 6)
        server.kill()
        sock.close()
        status, report = run_fsck(server.data_dir)
        kinds = [f["kind"] for f in report["findings"]]
        assert kinds == ["staging-leftover"] * 6 and status != 0
        server.start()
        wait_for(lambda: not staged(server.data_dir))
        wait_for(lambda: "swept 6 staging files" in server.log())  # logged after the deletions, a moment later
        assert {server.api.file(f["key"])["state"] for f in files.values()} == {"pending"}
        items = [(files[f"f{i}"]["key"], d, None) for i, d in enumerate(datas)]
        assert send_batch(server, session["key"], items)[-1] == wire.BatchEnd(8)
