"""The 2007-dialect client against our server: old clients keep working.

The dialect has no acknowledgement, so every check of what the server made of an
upload goes through the control API (``GET /v1/files/<key>``), polled until the
server has finished with the connection.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from twisted.internet import endpoints

from filedock import digest
from filedock.client.legacy import CHUNK_SIZE, LegacyJobUploader, LegacyUploadProtocol
from filedock.client.model import SENT, Cancelled
from tests.integration.test_client_twisted import in_reactor, random_file, wait_for


def uploader(reactor: Any, server: Any, session_key: str, files: list, progress=None) -> LegacyJobUploader:
    host, port = server.data_addr
    return LegacyJobUploader(reactor, host, port, session_key, files, progress)


def test_2007_client_file_is_committed(server, reactor_thread, tmp_path):
    """One file sent by the 2007 client is recorded complete with the file's size, zlib CRC-32
    and digest; the client itself can only say "sent", in 64 KiB writes."""
    size = 3 * 1024 * 1024 + 777
    src = random_file(tmp_path / "a.wav", size)
    _, files, session = server.job_with_files("legacy-one", {"a.wav": size})
    key = files["a.wav"]["key"]
    seen: list[tuple] = []
    job = uploader(reactor_thread, server, session["key"], [(key, src)], lambda *p: seen.append(p))

    [result] = in_reactor(reactor_thread, job.start)

    assert (result.state, result.size, result.sent, result.key) == (SENT, size, size, key)
    record = wait_for(lambda: (r := server.api.file(key))["state"] == "complete" and r)
    assert record["size"] == size
    assert record["crc32"] == f"{zlib.crc32(src.read_bytes()):08x}"
    assert record["digest"] == digest.hash_file(src).hexdigest() == result.digest
    steps = [done for _, _, done, _ in seen]
    assert steps[-1] == size and steps[0] == CHUNK_SIZE and len(steps) == -(-size // CHUNK_SIZE)


def test_2007_upload_cut_short_is_not_complete(server, reactor_thread, tmp_path):
    """Cancelling a 2007 upload mid-stream fails ``start()`` with Cancelled, and the server keeps
    what arrived as a partial: never complete, fewer bytes than the file."""
    size = 8 * 1024 * 1024
    src = random_file(tmp_path / "long.wav", size)
    _, files, session = server.job_with_files("legacy-cut", {"long.wav": size})
    key = files["long.wav"]["key"]
    holder: list[LegacyJobUploader] = []

    def cancel_after_a_mib(name, stage, done, total):
        if done >= 1024 * 1024:
            holder[0].cancel()

    def start():
        holder.append(uploader(reactor_thread, server, session["key"], [(key, src)], cancel_after_a_mib))
        return holder[0].start()

    with pytest.raises(Cancelled):
        in_reactor(reactor_thread, start)

    record = wait_for(lambda: (r := server.api.file(key))["state"] == "partial" and r)
    assert 0 < record["received"] < size
    assert record["digest"] is None and record["crc32"] is None


def test_2007_job_of_three_files_one_after_another(server, reactor_thread, tmp_path):
    """LegacyJobUploader sends three files in order, one connection each, fires its callback
    with three "sent" results, and the server records all three (and the job) complete."""
    sizes = {"one.wav": 300_000, "two.wav": 1_200_000, "three.wav": 65_536}
    paths = {name: random_file(tmp_path / name, size) for name, size in sizes.items()}
    job, files, session = server.job_with_files("legacy-three", sizes)
    order: list[str] = []

    def progress(name, stage, done, total):
        if not order or order[-1] != name:
            order.append(name)

    plan = [(files[name]["key"], paths[name]) for name in sizes]
    job_uploader = uploader(reactor_thread, server, session["key"], plan, progress)
    results = in_reactor(reactor_thread, job_uploader.start)

    assert order == list(sizes)
    assert job_uploader.job_total == sum(sizes.values())
    assert [(r.name, r.state, r.sent) for r in results] == [(n, SENT, s) for n, s in sizes.items()]
    for name in sizes:
        record = wait_for(lambda: (r := server.api.file(files[name]["key"]))["state"] == "complete" and r)
        assert record["crc32"] == f"{zlib.crc32(paths[name].read_bytes()):08x}"
    assert wait_for(lambda: server.api.job(job["id"])["state"] == "complete")


def test_2007_protocol_alone_sends_header_then_bytes(server, reactor_thread, tmp_path):
    """LegacyUploadProtocol can be connected by hand (as a 2007 application would) and its
    ``done`` fires once the file is sent; the server commits it."""
    size = 100_000
    src = random_file(tmp_path / "p.bin", size)
    _, files, session = server.job_with_files("legacy-proto", {"p.bin": size})
    key = files["p.bin"]["key"]
    host, port = server.data_addr

    def send():
        proto = LegacyUploadProtocol(reactor_thread, session["key"], key, src)
        endpoint = endpoints.TCP4ClientEndpoint(reactor_thread, host, port)
        return endpoints.connectProtocol(endpoint, proto).addCallback(lambda _: proto.done)

    result = in_reactor(reactor_thread, send)

    assert (result.state, result.crc32) == (SENT, zlib.crc32(src.read_bytes()))
    record = wait_for(lambda: (r := server.api.file(key))["state"] == "complete" and r)
    assert record["crc32"] == f"{result.crc32:08x}"
