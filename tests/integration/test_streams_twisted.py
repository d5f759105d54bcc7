"""Ranged uploads (``PUTR``) from the Twisted client (``TxDataPortClient(streams=...)``) against real
server processes: byte-identical, a resume after SIGKILL sends only the missing ranges, and
``streams="auto"`` on loopback is one plain ``PUT`` on one connection."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from filedock import digest
from filedock.client.model import SENT
from filedock.client.txclient import TxDataPortClient
from filedock.errors import FiledockError
from filedock.wire import RANGE_ALIGN
from tests.integration.harness import ServerProcess
from tests.integration.test_client_twisted import in_reactor
from tests.integration.test_streams import random_file

MiB = 1 << 20


@pytest.fixture
def server(tmp_path):
    """A server recording ranged progress every MiB."""
    proc = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"])
    proc.start()
    yield proc
    proc.stop()


def client_for(reactor: Any, server: ServerProcess, streams: int | str | None, **kwargs: Any) -> TxDataPortClient:
    host, port = server.data_addr
    return TxDataPortClient(reactor, host, port, streams=streams, **kwargs)


def count_connections(client: TxDataPortClient) -> list[int]:
    """One entry for every data connection ``client`` opens from now on."""
    endpoint = client._endpoint
    opened: list[int] = []

    def counting_endpoint() -> Any:
        opened.append(1)
        return endpoint()

    client._endpoint = counting_endpoint
    return opened


def upload_auto(server: ServerProcess, reactor: Any, tmp_path: Path, size: int):
    """A new random file of ``size`` bytes uploaded with ``streams="auto"`` under the reactor -> (its path,
    the job, the file key, the result, one entry per data connection opened)."""
    src = random_file(tmp_path / "a.bin", size)
    job, files, session = server.job_with_files("j", {"a.bin": size})
    key = files["a.bin"]["key"]
    client = client_for(reactor, server, "auto")
    opened = count_connections(client)
    result = in_reactor(reactor, client.upload_file, session["key"], key, src, timeout=120)
    return src, job, key, result, opened


def test_four_streams_from_twisted_are_byte_identical(server, reactor_thread, tmp_path):
    """K=4 under the reactor: four ranges on four connections into one partial; the server's CRC-32 and
    digest equal the local ones, one range completes the file and the stored bytes equal the local."""
    size = 37 * MiB + 12345
    src = random_file(tmp_path / "big.bin", size)
    job, files, session = server.job_with_files("j", {"big.bin": size})
    key = files["big.bin"]["key"]
    client = client_for(reactor_thread, server, 4)
    result = in_reactor(reactor_thread, client.upload_file, session["key"], key, src, timeout=120)
    local = digest.hash_file(src)
    assert (result.state, result.crc32, result.digest) == ("complete", local.crc32, local.hexdigest())
    assert (result.sent, result.resumed_from) == (size, 0)
    assert result.streams["streams"] == 4 and result.streams["chosen"] == "fixed"
    assert [(r["start"], r["end"]) for r in result.streams["ranges"]] == [
        (0, 8 * MiB), (8 * MiB, 20 * MiB), (20 * MiB, 28 * MiB), (28 * MiB, size)]
    assert sorted(r["reply"] for r in result.streams["ranges"]) == ["durable"] * 3 + ["stored"]
    assert server.blob_path(job["id"], key).read_bytes() == src.read_bytes()


def test_sigkill_mid_upload_then_only_missing_ranges_are_sent(server, reactor_thread, tmp_path):
    """The server is SIGKILLed in the middle of a two-stream upload, once it has recorded some blocks;
    after the restart the same upload sends exactly the bytes the server does not hold durably (each
    range from its durable prefix), and the stored file is byte-identical."""
    size = 96 * MiB + 5
    src = random_file(tmp_path / "take.bin", size)
    job, files, session = server.job_with_files("j", {"take.bin": size})
    key = files["take.bin"]["key"]

    def progress(stage: str, done: int, total: int) -> None:
        if stage == SENT and done >= 16 * MiB:
            time.sleep(0.02)  # in the reactor thread: the rest goes at about 12 MB/s, so the kill is mid-upload

    first = client_for(reactor_thread, server, 2, attempts=1)
    answers: queue.Queue = queue.Queue()
    reactor_thread.callFromThread(lambda: defer.maybeDeferred(
        first.upload_file, session["key"], key, src, progress).addBoth(answers.put))
    deadline = time.monotonic() + 60
    while server.api.file(key)["received"] < 8 * MiB:
        assert time.monotonic() < deadline and answers.empty(), "no block recorded mid-upload"
        time.sleep(0.02)
    server.kill()
    failure = answers.get(timeout=120)
    assert isinstance(failure, Failure) and failure.check(FiledockError), failure
    server.start()
    durable = server.api.file(key)["received"]
    assert 8 * MiB <= durable < size and durable % RANGE_ALIGN == 0

    second = client_for(reactor_thread, server, 2)
    result = in_reactor(reactor_thread, second.upload_file, session["key"], key, src, timeout=120)
    assert result.state == "complete"
    assert result.sent == size - durable  # not a byte the server held durably was sent again
    ranges = result.streams["ranges"]
    assert [(r["start"], r["end"]) for r in ranges] == [(0, 48 * MiB), (48 * MiB, size)]
    assert sum(r["from"] - r["start"] for r in ranges) == durable
    assert server.blob_path(job["id"], key).read_bytes() == src.read_bytes()


def test_auto_on_loopback_is_one_put_on_one_connection(server, reactor_thread, tmp_path):
    """``streams="auto"`` on loopback: the RTT of the upload's own first connection (TCP_INFO) is far below
    LAN_RTT, so that same connection carries one plain PUT: one connection in all, no range."""
    size = 24 * MiB + 3
    src, job, key, result, opened = upload_auto(server, reactor_thread, tmp_path, size)
    assert (result.state, result.sent) == ("complete", size)
    assert result.streams["chosen"] == "auto" and result.streams["streams"] == 1
    assert result.streams["ranges"] == []
    assert 0 < result.streams["rtt_ms"] < 2
    assert len(opened) == 1
    assert server.blob_path(job["id"], key).read_bytes() == Path(src).read_bytes()


def test_auto_on_a_long_path_carries_many_ranges_on_few_connections(server, reactor_thread, tmp_path, monkeypatch):
    """``streams="auto"`` on a path it measures as long (the RTT reader made to say 40 ms): more ranges
    than streams, each stream sending its ranges one after another on the connection it opened (the
    next ``PUTR`` asked right behind ``DONE``), so fewer connections than ranges; byte-identical."""
    from filedock.client.ranges import MAX_STREAMS
    from filedock.client.streams_policy import chunk_plan
    from filedock.client.twisted import ranged

    monkeypatch.setattr(ranged, "transport_rtt", lambda transport: 0.040)
    size = 96 * MiB + 77
    src, job, key, result, opened = upload_auto(server, reactor_thread, tmp_path, size)
    local = digest.hash_file(src)
    assert (result.state, result.sent, result.digest) == ("complete", size, local.hexdigest())
    ranges = result.streams["ranges"]
    assert result.streams["chosen"] == "auto" and len(ranges) >= 8
    planned = {start for start, _ in chunk_plan(size, MAX_STREAMS)}
    splits = sum(1 for r in ranges if r["start"] not in planned)  # a split's victim reconnects once
    assert len(opened) <= result.streams["streams"] + splits < len(ranges)
    assert sorted(r["reply"] for r in ranges).count("stored") == 1
    assert server.blob_path(job["id"], key).read_bytes() == Path(src).read_bytes()
