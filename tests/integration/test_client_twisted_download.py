"""The Twisted download follows the same rules as the blocking one (issue 11 item 3): it reconnects
with the client's retry policy after a drop, abandons a stalled connection, and never follows a
symbolic link in place of its ``.part``.

A fake data port on loopback serves one file's ``GET``s, each connection cut short in the way the
test asks, so every failure happens at a known byte.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from pathlib import Path

import pytest

from filedock import digest
from filedock.client.blocking import DataPortClient
from filedock.client.model import DownloadResult, Outcome
from filedock.client.txclient import TxDataPortClient
from filedock.errors import FiledockError, LocalFileError
from tests.integration.test_client_twisted import in_reactor

SESSION, FILE = "00000000-0000-4000-8000-000000000000", "00000000-0000-4000-8000-000000000001"


class ServingPeer:
    """A fake data port with one file. Connection ``i`` follows ``plan[i]`` (the last entry after that):
    ``("drop", n)`` sends the DATA line and body bytes up to absolute position ``n``, then closes;
    ``("stall", n)`` sends up to ``n`` and then nothing (the socket stays open); ``("serve", None)``
    sends the rest and closes. ``offsets`` records each GET's offset."""

    def __init__(self, content: bytes, plan: list[tuple[str, int | None]]) -> None:
        self.content, self.plan = content, plan
        hasher = digest.ContentHasher()
        hasher.update(content)
        self.crc, self.digest = zlib.crc32(content), hasher.hexdigest()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.offsets: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._one, args=(conn, len(self.connections) - 1), daemon=True).start()

    def _one(self, conn: socket.socket, index: int) -> None:
        header = b""
        while not header.endswith(b"\n"):
            piece = conn.recv(1)
            if not piece:
                return
            header += piece
        offset = int(header.split()[-1])
        self.offsets.append(offset)
        how, upto = self.plan[min(index, len(self.plan) - 1)]
        size = len(self.content)
        conn.sendall(f"DATA {size} {offset} {self.crc:08x} {self.digest}\r\n".encode())
        end = size if upto is None else max(offset, upto)
        conn.sendall(self.content[offset:end])
        if how != "stall":
            conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def content() -> bytes:
    return os.urandom(3 * 1024 * 1024 + 4321)


def test_twisted_download_reconnects_after_a_drop_and_resumes(reactor_thread, tmp_path, content):
    """Two connections cut short at 1 MiB and 2 MiB: the download reconnects (with backoff) each
    time from what its .part holds, and ends byte-identical and verified (before: the first drop
    failed it with internal-error)."""
    peer = ServingPeer(content, [("drop", 1 << 20), ("drop", 2 << 20), ("serve", None)])
    dest = tmp_path / "out.bin"
    client = TxDataPortClient(reactor_thread, "127.0.0.1", peer.port, attempts=2, backoff=0.05)
    try:
        result = in_reactor(reactor_thread, client.download_file, SESSION, FILE, dest)
    finally:
        peer.close()
    assert peer.offsets == [0, 1 << 20, 2 << 20]
    assert isinstance(result, DownloadResult) and result.outcome is Outcome.COMPLETE
    assert (result.resumed_from, result.sent, result.size) == (0, len(content), len(content))
    assert result.crc32_hex == f"{zlib.crc32(content):08x}"
    assert dest.read_bytes() == content and not Path(f"{dest}.part").exists()


def test_twisted_download_gives_up_after_the_attempts_without_progress(reactor_thread, tmp_path, content):
    """A peer that drops every connection before the first body byte: no progress, so the download
    gives up after ``attempts`` connections, and keeps its (empty) .part for the next call."""
    peer = ServingPeer(content, [("drop", 0)])
    dest = tmp_path / "out.bin"
    client = TxDataPortClient(reactor_thread, "127.0.0.1", peer.port, attempts=3, backoff=0.05)
    try:
        with pytest.raises(FiledockError) as info:
            in_reactor(reactor_thread, client.download_file, SESSION, FILE, dest)
    finally:
        peer.close()
    assert "gave up after 3 attempts" in info.value.message
    assert len(peer.offsets) == 3 and not dest.exists()


def test_twisted_download_abandons_a_stalled_connection(reactor_thread, tmp_path, content):
    """A peer that sends 1 MiB and then nothing: after ``stall_timeout`` the client drops the silent
    connection and resumes on a new one (before: it waited forever)."""
    peer = ServingPeer(content, [("stall", 1 << 20), ("serve", None)])
    dest = tmp_path / "out.bin"
    client = TxDataPortClient(reactor_thread, "127.0.0.1", peer.port, attempts=2, backoff=0.05,
                              stall_timeout=1.0)
    started = time.monotonic()
    try:
        result = in_reactor(reactor_thread, client.download_file, SESSION, FILE, dest, timeout=30)
    finally:
        peer.close()
    assert peer.offsets == [0, 1 << 20]
    assert 1.0 <= time.monotonic() - started < 20
    assert result.resumed_from == 0 and dest.read_bytes() == content


def test_twisted_download_refuses_a_symlinked_part_like_the_blocking_one(reactor_thread, tmp_path, content):
    """``dest.part`` is a symbolic link to another file: both clients refuse it before connecting and
    the link's target is untouched (before: the Twisted client appended the download to the target)."""
    peer = ServingPeer(content, [("serve", None)])
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    dest = tmp_path / "out.bin"
    os.symlink(victim, f"{dest}.part")
    client = TxDataPortClient(reactor_thread, "127.0.0.1", peer.port)
    try:
        with pytest.raises(LocalFileError) as info:
            in_reactor(reactor_thread, client.download_file, SESSION, FILE, dest)
        with pytest.raises(OSError):
            DataPortClient("127.0.0.1", peer.port).download_file(SESSION, FILE, dest)
    finally:
        peer.close()
    assert "symbolic link" in info.value.message
    assert victim.read_bytes() == b"precious" and not dest.exists() and peer.offsets == []


class AnsweringPeer:
    """A fake data port that answers every request line with ``reply`` and then holds the connection."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            header = b""
            while not header.endswith(b"\n"):
                piece = conn.recv(1)
                if not piece:
                    break
                header += piece
            conn.sendall(self.reply)

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


def test_a_local_file_the_twisted_client_cannot_read_is_not_retried(reactor_thread, tmp_path, monkeypatch):
    """Reading back the resumed prefix fails (EACCES): the upload fails at once with a LocalFileError on
    its first connection (before: ``internal-error``, retried until the attempts ran out)."""
    from filedock.client.twisted import streaming

    def unreadable(self, start, length):
        raise PermissionError(13, "Permission denied", self._path)

    monkeypatch.setattr(streaming.OrderedHasher, "_hash_range", unreadable)
    peer = AnsweringPeer(b"OFFSET 5\r\n")
    src = tmp_path / "x.bin"
    src.write_bytes(b"0123456789")
    client = TxDataPortClient(reactor_thread, "127.0.0.1", peer.port, attempts=3, backoff=0.05)
    try:
        with pytest.raises(LocalFileError) as info:
            in_reactor(reactor_thread, client.upload_file, SESSION, FILE, src, timeout=30)
    finally:
        peer.close()
    assert info.value.code_str == "internal-error" and "Permission denied" in info.value.message
    assert len(peer.connections) == 1


def test_a_garbled_reply_is_the_servers_fault_and_final_in_both_clients(reactor_thread, tmp_path):
    """A reply that is not the protocol's: ``bad-reply`` (RemoteProtocolError), not ``malformed-header``
    (which blames the client's header), and not retried, by the blocking and the Twisted client alike."""
    from filedock.errors import ErrorCode, RemoteProtocolError

    peer = AnsweringPeer(b"HELLO\r\n")
    src = tmp_path / "x.bin"
    src.write_bytes(b"0123456789")
    try:
        with pytest.raises(RemoteProtocolError) as blocking_error:
            DataPortClient("127.0.0.1", peer.port, attempts=3, backoff=0.05).upload_file(SESSION, FILE, src)
        twisted = TxDataPortClient(reactor_thread, "127.0.0.1", peer.port, attempts=3, backoff=0.05)
        with pytest.raises(RemoteProtocolError) as twisted_error:
            in_reactor(reactor_thread, twisted.upload_file, SESSION, FILE, src, timeout=30)
    finally:
        peer.close()
    for error in (blocking_error.value, twisted_error.value):
        assert error.code is ErrorCode.BAD_REPLY and "HELLO" in error.message
    assert len(peer.connections) == 2  # one each
