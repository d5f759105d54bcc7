"""tus concatenation and creation-defer-length at /files/, against a real server process.

curl by hand: two partial uploads PATCHed, then the final; the file downloads byte-identical
with ``filedock download``, the parts are never listed, the job completes once (its event
counted by an ``--on-complete`` command). A final over an unknown, foreign or unfinished part
is refused with a stable code. A deferred length is told by a later PATCH. (tuspy 1.1 has no
deferred length; tus-js-client's ``parallelUploads`` is tests/integration/test_tus_js_client.py.)
"""

from __future__ import annotations

import json
import os
import re
import uuid
import subprocess
import sys
import time
import zlib
from urllib.parse import urlsplit

import pytest

from filedock.digest import ContentHasher
from filedock.store.concat import PartSource, concatenate
from tests.engines.seaweedfs import S3Target
from tests.integration.harness import ServerProcess
from tests.integration.test_blobstores import backend, blob_store_factory  # noqa: F401 (fixtures)
from tests.integration.test_http_upload import TUS, b64, blake, call, head, patch

MiB = 1 << 20


def curl(*args: str) -> str:
    """curl -i: the response head and body as text."""
    proc = subprocess.run(["curl", "-sS", "-i", *args], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode("latin-1")


def cli(server, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "filedock", *args], capture_output=True, text=True, timeout=120,
                          env=server.env())
    assert proc.returncode == 0, proc.stderr
    return proc


def header(out: str, name: str) -> str | None:
    found = re.search(rf"^{name}: (.*?)\r?$", out, re.M | re.I)
    return found.group(1) if found else None


@pytest.fixture
def concat_server(tmp_path):
    """A server with jobs ``j1`` and ``other`` whose job completion events go to ``events.jsonl``."""
    events = tmp_path / "events.jsonl"
    proc = ServerProcess(tmp_path / "data", extra=["--on-complete", f"cat >> {events}; echo >> {events}"])
    proc.start()
    proc.api.create_job("j1")
    proc.api.create_job("other")
    proc.events_path = events
    yield proc
    proc.stop()


def completion_events(server, wait: float = 3.0) -> list[dict]:
    """The job completion events the server's command received (after waiting for stragglers)."""
    time.sleep(wait)
    if not server.events_path.exists():
        return []
    return [json.loads(line) for line in server.events_path.read_text().splitlines() if line.strip()]


def create_part(server, size: int, job: str = "j1", token: str = "admin") -> str:
    status, headers, body = call(server, "POST", "/files/", {**TUS, "Upload-Concat": "partial",
                                                             "Upload-Length": str(size),
                                                             "Upload-Metadata": f"job {b64(job)}"}, token=token)
    assert status == 201, (status, body)
    assert headers["upload-concat"] == "partial"
    return urlsplit(headers["location"]).path


def final(server, parts: list[str], name: str, job: str = "j1"):
    return call(server, "POST", "/files/", {**TUS, "Upload-Concat": "final;" + " ".join(server.url.rstrip("/") + p
                                                                                        for p in parts),
                                            "Upload-Metadata": f"job {b64(job)},filename {b64(name)}"})


def test_curl_two_parts_and_a_final_make_one_file(concat_server, tmp_path):
    """By hand with curl: OPTIONS advertises concatenation; two parts created and PATCHed (in the
    reverse order), the final made of them; HEAD of the final reports Upload-Concat; `job show` lists
    the final alone, one job completion event names it alone; `filedock download` gives the bytes of the
    parts in order; a PATCH to the final is 403; the parts are gone; the final sent again (a lost
    response) gets the same 201 and no second event."""
    server = concat_server
    auth = f"Authorization: Bearer {server.token}"
    data = os.urandom(6 * MiB + 12345)
    cut = 5 * MiB + 1
    (tmp_path / "p1").write_bytes(data[:cut])
    (tmp_path / "p2").write_bytes(data[cut:])
    out = curl("-X", "OPTIONS", server.url + "files/")
    extensions = header(out, "Tus-Extension").split(",")
    assert "concatenation" in extensions and "creation-defer-length" in extensions
    locations = []
    for name in ("p1", "p2"):
        out = curl("-X", "POST", server.url + "files/", "-H", auth, "-H", "Tus-Resumable: 1.0.0",
                   "-H", "Upload-Concat: partial", "-H", f"Upload-Length: {(tmp_path / name).stat().st_size}",
                   "-H", f"Upload-Metadata: job {b64('j1')}")
        assert out.startswith("HTTP/1.1 201"), out
        locations.append(header(out, "Location"))
    for location, name in reversed(list(zip(locations, ("p1", "p2")))):
        out = curl("-X", "PATCH", location, "-H", auth, "-H", "Tus-Resumable: 1.0.0", "-H",
                   "Content-Type: application/offset+octet-stream", "-H", "Upload-Offset: 0",
                   "-T", str(tmp_path / name))
        assert "204 No Content" in out, out
    assert [f["name"] for f in server.api.job("j1")["files"]] == []  # parts are hidden
    assert server.api.job("j1")["state"] != "complete"
    out = curl("-X", "POST", server.url + "files/", "-H", auth, "-H", "Tus-Resumable: 1.0.0",
               "-H", "Upload-Concat: final;" + " ".join(locations),
               "-H", f"Upload-Metadata: job {b64('j1')},filename {b64('whole.bin')}")
    assert out.startswith("HTTP/1.1 201"), out
    location = header(out, "Location")
    assert header(out, "Upload-Offset") == str(len(data))
    assert header(out, "Filedock-Digest") == f"blake3-4m={blake(data)}"
    out = curl("-I", location, "-H", auth, "-H", "Tus-Resumable: 1.0.0")
    assert header(out, "Upload-Concat") == "final;" + " ".join(urlsplit(p).path for p in locations)
    assert header(out, "Upload-Offset") == header(out, "Upload-Length") == str(len(data))
    out = curl("-X", "PATCH", location, "-H", auth, "-H", "Tus-Resumable: 1.0.0", "-H",
               "Content-Type: application/offset+octet-stream", "-H", f"Upload-Offset: {len(data)}",
               "--data-binary", "x")
    assert out.startswith("HTTP/1.1 403") and header(out, "Filedock-Error") == "forbidden", out

    shown = json.loads(cli(server, "job", "show", "j1", "--json").stdout)
    (entry,) = shown["files"]
    assert (entry["name"], entry["state"], entry["size"]) == ("whole.bin", "complete", len(data))
    assert entry["digest"] == blake(data) and int(entry["crc32"], 16) == zlib.crc32(data)
    cli(server, "download", "--job", "j1", "whole.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    events = completion_events(server)
    assert len(events) == 1 and [f["name"] for f in events[0]["files"]] == ["whole.bin"]
    for part in locations:  # the parts went, record and bytes
        assert call(server, "HEAD", urlsplit(part).path, TUS)[0] == 404
    out = curl("-X", "POST", server.url + "files/", "-H", auth, "-H", "Tus-Resumable: 1.0.0",
               "-H", "Upload-Concat: final;" + " ".join(locations),
               "-H", f"Upload-Metadata: job {b64('j1')},filename {b64('whole.bin')}")
    assert out.startswith("HTTP/1.1 201") and header(out, "Location") == location, out  # sent again: same answer
    assert len(completion_events(server, wait=0.5)) == 1
    job_dir = server.data_dir / "jobs" / server.api.job("j1")["id"]
    assert len(list(job_dir.iterdir())) == 1  # the final's bytes alone: no part, no partial
    assert "Traceback" not in server.log_path.read_text(errors="replace")


def test_a_final_over_bad_parts_is_refused_with_a_stable_code(concat_server):
    """Unknown part: 404 unknown-file; a part of another job: 403 forbidden; a plain file: 400; a part not
    complete: 400 not-complete (concatenation-unfinished is not served); a token of another job: 403.
    Nothing is made, and the parts stay usable."""
    server = concat_server
    unknown = "/files/00000000-0000-4000-8000-000000000000"
    mine = create_part(server, 3)
    assert patch(server, mine, 0, b"abc")[0] == 204
    theirs = create_part(server, 3, job="other")
    assert patch(server, theirs, 0, b"xyz")[0] == 204
    unfinished = create_part(server, 5)
    assert patch(server, unfinished, 0, b"12")[0] == 204
    plain_status, plain_headers, _ = call(server, "POST", "/files/", {**TUS, "Upload-Length": "1",
                                          "Upload-Metadata": f"job {b64('j1')},filename {b64('plain')}"})
    plain = urlsplit(plain_headers["location"]).path
    cases = [([mine, unknown], 404, "unknown-file"), ([mine, theirs], 403, "forbidden"),
             ([mine, plain], 400, "bad-request"), ([mine, unfinished], 400, "not-complete")]
    for parts, status, code in cases:
        got, headers, body = final(server, parts, "f.bin")
        assert (got, headers.get("filedock-error")) == (status, code), (parts, got, body)
    token = server.api.post("/v1/tokens", {"scope": "upload", "job": server.api.job("other")["id"]})["token"]
    got, headers, _ = call(server, "POST", "/files/", {**TUS, "Upload-Concat": f"final;{mine}",
                                                       "Upload-Metadata": f"job {b64('other')},filename {b64('x')}"},
                           token=token)
    assert (got, headers.get("filedock-error")) == (403, "forbidden")
    assert [f["name"] for f in server.api.job("j1")["files"]] == ["plain"]
    got, headers, _ = final(server, [mine], "ok.bin")  # the part is still there, and whole
    assert got == 201
    assert server.api.file(urlsplit(headers["location"]).path.rsplit("/", 1)[1])["size"] == 3
    assert "Traceback" not in server.log_path.read_text(errors="replace")


def test_a_part_may_be_terminated_and_is_deleted_with_its_job(concat_server):
    """DELETE of a complete part: 204, it is gone; a job's deletion takes its parts' bytes too."""
    server = concat_server
    part = create_part(server, 4)
    assert patch(server, part, 0, b"abcd")[0] == 204
    assert call(server, "DELETE", part, TUS)[0] == 204
    assert call(server, "HEAD", part, TUS)[0] == 404
    other = create_part(server, 4, job="other")
    assert patch(server, other, 0, b"ab")[0] == 204
    job_id = server.api.job("other")["id"]
    server.api.request("DELETE", f"/v1/jobs/{job_id}")
    assert call(server, "HEAD", other, TUS)[0] == 404
    assert not (server.data_dir / "jobs" / job_id).exists()


def test_abandoned_parts_are_swept(tmp_path):
    """A part no final came for is deleted by the sweeper after partial_ttl, record and bytes."""
    with ServerProcess(tmp_path / "data", limits=["partial_ttl=1", "sweep_interval=0.3"]) as server:
        server.api.create_job("j1")
        part = create_part(server, 4)
        assert patch(server, part, 0, b"abcd")[0] == 204
        deadline = time.monotonic() + 20
        while call(server, "HEAD", part, TUS)[0] != 404:
            assert time.monotonic() < deadline, "the part was never swept"
            time.sleep(0.5)
        assert list((server.data_dir / "jobs" / server.api.job("j1")["id"]).glob("*")) == []
        assert server.api.job("j1")["state"] != "complete"


def test_deferred_length_by_hand(concat_server, tmp_path):
    """Upload-Defer-Length: 1; HEAD has no Upload-Length; a PATCH without it stores bytes durably; the
    PATCH with Upload-Length completes the file; the quota is checked when the length is told."""
    server = concat_server
    data = os.urandom(3 * MiB + 77)
    status, headers, body = call(server, "POST", "/files/", {**TUS, "Upload-Defer-Length": "1",
                                 "Upload-Metadata": f"job {b64('j1')},filename {b64('later.bin')}"})
    assert status == 201, body
    path = urlsplit(headers["location"]).path
    status, headers, _ = call(server, "HEAD", path, TUS)
    assert status == 200 and "upload-length" not in headers and headers["upload-defer-length"] == "1"
    status, headers, _ = patch(server, path, 0, data[:MiB])
    assert status == 204 and headers["upload-offset"] == str(MiB) and "upload-length" not in headers
    assert head(server, path) == MiB
    status, headers, _ = patch(server, path, MiB, data[MiB:], {"Upload-Length": str(len(data))})
    assert status == 204 and headers["upload-offset"] == headers["upload-length"] == str(len(data))
    assert headers["filedock-digest"] == f"blake3-4m={blake(data)}"
    cli(server, "download", "--job", "j1", "later.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    assert len(completion_events(server, wait=1)) == 1


def test_deferred_length_is_quota_checked_when_told(tmp_path):
    """A length over the job's quota, told by a PATCH: 413 quota-exceeded, the upload stays deferred."""
    with ServerProcess(tmp_path / "data", limits=[f"job_quota={10 * MiB}"]) as server:
        server.api.create_job("j1")
        status, headers, _ = call(server, "POST", "/files/", {**TUS, "Upload-Defer-Length": "1",
                                  "Upload-Metadata": f"job {b64('j1')},filename {b64('q.bin')}"})
        path = urlsplit(headers["location"]).path
        server.api.add_file("j1", "big", 6 * MiB)  # declared while q.bin's length was unknown
        status, headers, _ = patch(server, path, 0, b"abc", {"Upload-Length": str(5 * MiB)})
        assert (status, headers.get("filedock-error")) == (413, "quota-exceeded")
        status, headers, _ = call(server, "HEAD", path, TUS)
        assert headers["upload-defer-length"] == "1" and headers["upload-offset"] == "0"
        status, headers, _ = patch(server, path, 0, b"abc", {"Upload-Length": "3"})
        assert status == 204 and headers["upload-offset"] == "3"
        assert [(f["name"], f["size"], f["state"]) for f in server.api.job("j1")["files"]] == \
            [("big", 6 * MiB, "pending"), ("q.bin", 3, "complete")]


def test_concatenate_on_every_blob_store(blob_store_factory):
    """The data dir (kernel copy, read back) and S3 (SeaweedFS: copied through a multipart upload): the
    final holds the parts' bytes in order (a part under 5 MiB first, as tus-js-client's last part may be
    anywhere), its CRC-32 and blake3-4m are the whole's, and a part whose bytes changed is refused."""
    store = blob_store_factory()
    job = str(uuid.uuid4())
    datas = [os.urandom(n) for n in (3 * MiB + 1, 6 * MiB + 5, 17)]
    parts = []
    for data in datas:
        key = str(uuid.uuid4())
        writer = store.open_partial(job, key, 0, 0, None)
        writer.write(data)
        writer.finish()
        parts.append(PartSource(key, len(data), zlib.crc32(data)))
    final_key = str(uuid.uuid4())
    crc, digest = concatenate(store, job, final_key, parts)
    whole = b"".join(datas)
    hasher = ContentHasher()
    hasher.update(whole)
    assert (crc, digest) == (zlib.crc32(whole), hasher.hexdigest())
    with blob_store_factory().open_complete(job, final_key) as f:
        back = bytearray()
        while piece := f.read(MiB):
            back += piece
    assert bytes(back) == whole
    lying = [parts[0], PartSource(parts[1].blob_name, parts[1].size, parts[1].crc32 ^ 1)]
    with pytest.raises(Exception) as info:
        concatenate(store, job, str(uuid.uuid4()), lying)
    assert getattr(info.value, "code", None) is not None and info.value.code.value == "digest-mismatch"


def test_a_final_cut_short_by_a_crash_is_made_again_when_sent_again(concat_server, tmp_path):
    """SIGKILL after the final's record was made, before its bytes were (the state is written as the
    server leaves it); after a restart the same final POST makes it from its parts, byte-identical, and
    the job completes once."""
    from filedock.store.sqlite import SQLiteStore

    server = concat_server
    datas = [os.urandom(2 * MiB + 3), os.urandom(MiB + 9)]
    parts = []
    for data in datas:
        path = create_part(server, len(data))
        assert patch(server, path, 0, data)[0] == 204
        parts.append(path)
    server.kill()
    store = SQLiteStore(server.data_dir / "filedock.sqlite3")
    job_id = store.find_job("j1").id
    cut_short = store.add_file(job_id, "whole.bin", sum(map(len, datas)))
    store.set_upload_info(cut_short.key, False, "final;" + " ".join(parts))
    store.close()
    server.start()
    status, headers, body = final(server, parts, "whole.bin")
    assert status == 201, body
    assert urlsplit(headers["location"]).path.endswith(cut_short.key)
    cli(server, "download", "--job", "j1", "whole.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == b"".join(datas)
    assert len(completion_events(server)) == 1


def test_deferred_length_told_by_an_empty_last_patch(concat_server):
    """tus-js-client's way (uploadLengthDeferred): every byte sent with the length unknown, then an empty
    PATCH at the end carrying Upload-Length: the file completes, its job once."""
    server = concat_server
    data = os.urandom(2 * MiB + 5)
    status, headers, _ = call(server, "POST", "/files/", {**TUS, "Upload-Defer-Length": "1",
                              "Upload-Metadata": f"job {b64('j1')},filename {b64('end.bin')}"})
    path = urlsplit(headers["location"]).path
    assert patch(server, path, 0, data[:MiB])[0] == 204
    status, headers, _ = patch(server, path, MiB, data[MiB:])
    assert status == 204 and headers["upload-offset"] == str(len(data)) and "upload-length" not in headers
    assert server.api.job("j1")["state"] != "complete"
    status, headers, _ = patch(server, path, len(data), b"", {"Upload-Length": str(len(data))})
    assert status == 204 and headers["upload-length"] == str(len(data))
    assert headers["filedock-digest"] == f"blake3-4m={blake(data)}"
    status, _, body = call(server, "GET", f"/v1/files/{path.rsplit('/', 1)[1]}/content")
    assert status == 200 and body == data
    assert len(completion_events(server, wait=1)) == 1
