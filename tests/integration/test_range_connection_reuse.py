"""A connection carries ranges one after another: after ``DURABLE`` the server reads the next request
on it (docs/protocol.md, "Ranged upload"), so a client keeps its congestion window from range to range
instead of paying a handshake and a slow start for each. Real server processes, raw sockets and the
blocking client."""

from __future__ import annotations

import os
import time
import urllib.request
import uuid

import pytest

from filedock import wire
from filedock.client import blocking
from filedock.client.ranges import MAX_STREAMS
from filedock.client.streams_policy import chunk_plan
from filedock.digest import hash_file
from tests.integration.harness import ServerProcess
from tests.integration.test_streams_adaptive import upload_auto

A = wire.RANGE_ALIGN
MiB = 1 << 20


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    proc = ServerProcess(tmp_path / "data", limits=["header_timeout=2"])
    proc.start()
    yield proc
    proc.stop()


class Kept:
    """One data connection driven by hand, request after request."""

    def __init__(self, server: ServerProcess) -> None:
        self.sock = server.connect()
        self.conn = wire.ClientConnection()

    def event(self):
        while (event := self.conn.next_event()) is wire.NEED_DATA:
            self.conn.receive_data(self.sock.recv(65536))
        return event

    def putr(self, session: str, key: str, size: int, start: int, end: int, data: bytes):
        """One whole range: ``PUTR``, the bytes from the server's offset, ``DONE`` -> (RANGES, final reply)."""
        self.sock.sendall(self.conn.send(wire.RangedUploadRequest(session, key, size, start, end)))
        offset = self.event()
        if not isinstance(offset, wire.RangeOffset):
            return offset, None
        self.sock.sendall(data[offset.offset:end])
        self.sock.sendall(self.conn.send(wire.Done(None)))
        return offset, self.event()


def metrics(server: ServerProcess) -> str:
    req = urllib.request.Request(server.url + "metrics", headers={"Authorization": f"Bearer {server.token}"})
    return urllib.request.urlopen(req, timeout=10).read().decode()


def failures(server: ServerProcess) -> list[str]:
    return [line for line in metrics(server).splitlines() if line.startswith("filedock_uploads_failed_total{")]


def test_one_connection_carries_every_range_of_a_file_in_turn(server, tmp_path):
    """Three ranges on one socket: ``DURABLE``, ``DURABLE``, then ``STORED``, after which the server
    closes. The file is byte-identical, the record complete, and no upload counts as failed."""
    size = 2 * A + 12345
    data = os.urandom(size)
    job, files, session = server.job_with_files("kept", {"a.bin": size})
    key = files["a.bin"]["key"]
    link = Kept(server)
    replies = [link.putr(session["key"], key, size, a, b, data) for a, b in ((A, 2 * A), (0, A), (2 * A, size))]
    assert [type(r[0]) for r in replies] == [wire.RangeOffset] * 3
    assert replies[0][0].durable == () and replies[1][0].durable == ((A, 2 * A),)
    assert replies[2][0].durable == ((0, 2 * A),)
    assert replies[0][1] == wire.RangeStored(A, 2 * A) and replies[1][1] == wire.RangeStored(0, A)
    assert isinstance(replies[2][1], wire.Stored) and replies[2][1].size == size
    link.sock.settimeout(10)
    assert link.sock.recv(1) == b""  # STORED ends the connection as before
    assert server.blob_path(job["id"], key).read_bytes() == data
    assert replies[2][1].digest == hash_file(server.blob_path(job["id"], key)).hexdigest()
    assert server.api.file(key)["state"] == "complete"
    assert failures(server) == []


def first_range_kept(server: ServerProcess, name: str, size: int = 2 * A):
    """A new job with one file of ``size`` random bytes whose first block is sent on a ``Kept``
    connection and answered ``DURABLE`` -> (session key, file key, data, the connection)."""
    data = os.urandom(size)
    job, files, session = server.job_with_files(name, {"a.bin": size})
    key = files["a.bin"]["key"]
    link = Kept(server)
    assert link.putr(session["key"], key, size, 0, A, data)[1] == wire.RangeStored(0, A)
    return session["key"], key, data, link


def test_a_kept_connection_closed_by_the_client_is_a_clean_end(server, tmp_path):
    """A client that closes after ``DURABLE`` (as filedock's clients before this did) fails nothing: the
    range stays durable, the connection count returns to zero."""
    _, key, _, link = first_range_kept(server, "closed")
    link.sock.close()
    deadline = time.monotonic() + 10
    while "filedock_active_connections 0" not in metrics(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "filedock_active_connections 0" in metrics(server)
    assert failures(server) == []
    assert server.api.file(key)["received"] == A


def test_the_next_request_is_authorized_afresh_and_an_idle_kept_connection_times_out(server, tmp_path):
    """The request after ``DURABLE`` is checked like a first one (an unknown session is refused on the
    kept connection), and a kept connection that sends nothing is closed after the header timeout with
    ``idle-timeout``."""
    size = 2 * A
    session, key, data, link = first_range_kept(server, "fresh", size)
    refused, _ = link.putr(str(uuid.uuid4()), key, size, A, size, data)
    assert isinstance(refused, wire.ServerError) and refused.code == "unknown-session"
    assert Kept(server).putr(session, key, size, A, size, data)[1].__class__ is wire.Stored

    started = time.monotonic()
    *_, idle = first_range_kept(server, "idle", size)
    idle.sock.settimeout(15)
    event = idle.event()
    waited = time.monotonic() - started
    assert isinstance(event, wire.ServerError) and event.code == "idle-timeout"
    assert 1.5 < waited < 10
    assert idle.sock.recv(1) == b""


def test_auto_sends_many_ranges_on_few_connections(server, tmp_path, monkeypatch):
    """``--streams auto`` on a path it measures as long (the RTT reader made to say 40 ms): the file is
    cut into more ranges than streams, and each stream sends its ranges on the connection it opened,
    so fewer connections reach the data port than ranges are sent; every byte is sent once."""
    monkeypatch.setattr(blocking, "_link_rtt", lambda sock: 0.040)
    size = 96 * MiB + 77
    src, job, key, result, opened = upload_auto(server, tmp_path, monkeypatch, size)
    assert (result.state, result.digest) == ("complete", hash_file(src).hexdigest())
    ranges = result.streams["ranges"]
    assert result.streams["chosen"] == "auto" and len(ranges) >= 8
    planned = {start for start, _ in chunk_plan(size, MAX_STREAMS)}
    splits = sum(1 for r in ranges if r["start"] not in planned)  # a split's second half: its victim reconnects
    assert len(opened) <= result.streams["streams"] + splits < len(ranges)
    assert result.sent == size
    assert server.blob_path(job["id"], key).read_bytes() == src.read_bytes()
    assert failures(server) == []


def test_the_next_range_sent_ahead_of_durable_is_read_once_the_range_is_answered(server, tmp_path):
    """``DONE`` and the next ``PUTR`` in one write: the server answers ``DURABLE`` for the first range,
    then ``RANGES`` for the next (no ``excess-data``); after ``STORED`` a request sent ahead is never
    read (the connection closes) and nothing fails."""
    size = 3 * A
    data = os.urandom(size)
    job, files, session = server.job_with_files("ahead", {"a.bin": size})
    key = files["a.bin"]["key"]
    link = Kept(server)
    send = link.conn.send
    link.sock.sendall(send(wire.RangedUploadRequest(session["key"], key, size, 0, A)))
    assert link.event() == wire.RangeOffset(0, ())
    link.sock.sendall(data[:A] + send(wire.Done(None)) + send(wire.RangedUploadRequest(session["key"], key, size,
                                                                                        A, 2 * A)))
    assert link.event() == wire.RangeStored(0, A)
    assert link.event() == wire.RangeOffset(A, ((0, A),))
    link.sock.sendall(data[A:2 * A] + send(wire.Done(None)))
    assert link.event() == wire.RangeStored(A, 2 * A)
    assert link.putr(session["key"], key, size, 2 * A, size, data)[1].__class__ is wire.Stored

    other, other_files, other_session = server.job_with_files("ahead2", {"b.bin": A})
    link = Kept(server)
    other_key = other_files["b.bin"]["key"]
    link.sock.sendall(link.conn.send(wire.RangedUploadRequest(other_session["key"], other_key, A, 0, A)))
    assert link.event() == wire.RangeOffset(0, ())
    link.sock.sendall(data[:A] + link.conn.send(wire.Done(None)))
    ahead = link.conn.send(wire.RangedUploadRequest(other_session["key"], other_key, A, 0, A))
    link.sock.sendall(ahead)
    stored = link.event()
    assert isinstance(stored, wire.Stored) and stored.size == A and link.conn.closed
    link.sock.settimeout(10)
    assert link.sock.recv(100) == b""
    assert server.blob_path(job["id"], key).read_bytes() == data
    assert server.blob_path(other["id"], other_key).read_bytes() == data[:A]
    assert failures(server) == []
