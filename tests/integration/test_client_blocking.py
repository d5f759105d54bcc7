"""The blocking data-port client against a real server process on loopback.

Each test drives ``DataPortClient`` through a real failure (cancel, SIGKILL of the
server, a partial corrupted on disk, a dead port) and checks the values that come
out: offsets, byte counts, CRC-32 and digest, the server's own record.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from filedock.client.blocking import DataPortClient
from filedock.client.model import DURABLE, SENT, VERIFIED, Cancelled
from filedock.digest import hash_file
from filedock.errors import ErrorCode, FiledockError
from filedock.wire import format_crc
from tests.integration.harness import ServerProcess

MiB = 1 << 20


@pytest.fixture
def server(tmp_path):
    """A server that makes progress durable every MiB, so an interrupted upload leaves a resumable prefix."""
    proc = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"])
    proc.start()
    yield proc
    proc.stop()


def make_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def local_values(path: Path) -> tuple[str, str]:
    """(crc32 as 8 hex digits, blake3-4m digest) of a local file."""
    hasher = hash_file(path)
    return format_crc(hasher.crc32), hasher.hexdigest()


def client_for(server: ServerProcess, **kwargs) -> DataPortClient:
    host, port = server.data_addr
    return DataPortClient(host, port, **kwargs)


def wait_settled(server: ServerProcess, key: str, timeout: float = 15.0) -> dict:
    """The file's record once no connection holds it any more (its last checkpoint is recorded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.api.get("/v1/uploads")["uploads"]:
            return server.api.file(key)
        time.sleep(0.05)
    raise AssertionError("the upload was still active on the server")


def cancel_after(cancel: threading.Event, threshold: int, seen: list):
    """A progress callback that records every call and sets ``cancel`` once ``threshold`` bytes are sent."""
    def progress(stage: str, done: int, total: int) -> None:
        seen.append((stage, done, total))
        if stage == SENT and done >= threshold:
            cancel.set()

    return progress


def cancelled_upload(server, client, session, key, path, threshold) -> dict:
    """Upload until ``threshold`` bytes are sent, cancel, and return the server's settled record."""
    cancel, seen = threading.Event(), []
    with pytest.raises(Cancelled):
        client.upload_file(session["key"], key, path, cancel=cancel,
                           progress=cancel_after(cancel, threshold, seen))
    return wait_settled(server, key)


def test_upload_stages_arrive_in_order_and_values_match(server, tmp_path):
    """SENT reports climb from 0 to the size, then one DURABLE, then one VERIFIED; the result's
    CRC-32 and digest equal the local file's and the server's record, and the stored bytes are identical."""
    path = make_file(tmp_path / "f.bin", 5 * MiB + 123)
    size = path.stat().st_size
    job, files, session = server.job_with_files("stages", {"f.bin": size})
    key = files["f.bin"]["key"]
    seen: list = []
    result = client_for(server).upload_file(session["key"], key, path,
                                            progress=lambda *event: seen.append(event))
    stages = [stage for stage, _, _ in seen]
    assert stages[-2:] == [DURABLE, VERIFIED]
    assert set(stages[:-2]) == {SENT} and len(stages) >= 3
    sent = [done for stage, done, _ in seen if stage == SENT]
    assert sent[0] == 0 and sent[-1] == size
    assert sent == sorted(sent)
    assert all(total == size for _, _, total in seen)
    crc, digest = local_values(path)
    assert (result.state, result.size, result.sent, result.resumed_from) == ("complete", size, size, 0)
    assert (format_crc(result.crc32), result.digest) == (crc, digest)
    record = server.api.file(key)
    assert (record["state"], record["crc32"], record["digest"]) == ("complete", crc, digest)
    assert server.blob_path(job["id"], key).read_bytes() == path.read_bytes()


def test_cancel_then_second_call_resumes_from_the_durable_offset(server, tmp_path):
    """cancel.set() mid-upload raises Cancelled promptly; the server keeps the partial, and the next
    call starts at the server's offset, sends only the rest and ends with the local digest."""
    path = make_file(tmp_path / "big.bin", 24 * MiB + 5)
    size = path.stat().st_size
    _, files, session = server.job_with_files("resume", {"big.bin": size})
    key = files["big.bin"]["key"]
    client = client_for(server)
    cancel, seen = threading.Event(), []
    started = time.monotonic()
    with pytest.raises(Cancelled):
        client.upload_file(session["key"], key, path, cancel=cancel, progress=cancel_after(cancel, 8 * MiB, seen))
    assert time.monotonic() - started < 5
    assert DURABLE not in [stage for stage, _, _ in seen]
    record = wait_settled(server, key)
    assert record["state"] == "partial" and 0 < record["received"] < size

    result = client.upload_file(session["key"], key, path)
    assert result.resumed_from == record["received"]
    assert result.sent == size - record["received"] < size
    assert (format_crc(result.crc32), result.digest) == local_values(path)
    assert server.api.file(key)["digest"] == result.digest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_sigkilled_mid_upload_client_reconnects_and_finishes(tmp_path):
    """A thread SIGKILLs the server while ~40 MiB are being sent and starts it again on the same ports;
    the client reconnects on its own, resumes from the durable offset (> 0) and finishes verified."""
    api_port, data_port = free_port(), free_port()
    server = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"],
                           extra=["--api-listen", f"tcp:{api_port}:interface=127.0.0.1",
                                  "--data-listen", f"tcp:{data_port}:interface=127.0.0.1"])
    server.start()
    try:
        path = make_file(tmp_path / "forty.bin", 40 * MiB)
        size = path.stat().st_size
        _, files, session = server.job_with_files("crash", {"forty.bin": size})
        key = files["forty.bin"]["key"]
        kill_now, killed, restarted = threading.Event(), threading.Event(), threading.Event()

        def killer() -> None:
            kill_now.wait(60)
            # kill once the server has made some of what it received durable (that is what must survive)
            deadline = time.monotonic() + 20
            while server.api.file(key)["received"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            server.kill()
            killed.set()
            time.sleep(0.3)
            server.start()
            restarted.set()

        thread = threading.Thread(target=killer)
        thread.start()
        seen: list = []

        def progress(stage: str, done: int, total: int) -> None:
            seen.append((stage, done, killed.is_set()))
            if stage == SENT and done >= 12 * MiB and not kill_now.is_set():
                kill_now.set()
                assert killed.wait(30)  # hold the sender until the server is dead: the kill is mid-upload

        client = DataPortClient("127.0.0.1", data_port, attempts=10, backoff=0.2, stall_timeout=20)
        result = client.upload_file(session["key"], key, path, progress=progress)
        thread.join(30)
        assert restarted.is_set()
        assert result.state == "complete" and result.resumed_from == 0
        assert (format_crc(result.crc32), result.digest) == local_values(path)
        after_kill = [done for stage, done, was_killed in seen if stage == SENT and was_killed]
        resumed_at = after_kill[0]  # the first report after the kill: the restarted server's OFFSET
        assert 0 < resumed_at <= 12 * MiB + 8 * MiB  # durable progress survived the SIGKILL
        assert result.sent == seen_before_kill(seen) + size - resumed_at
        record = server.api.file(key)
        assert (record["state"], record["digest"]) == ("complete", result.digest)
    finally:
        server.stop()


def seen_before_kill(seen: list) -> int:
    """Bytes the client had sent when the server was killed (the report that triggered it)."""
    return max(done for stage, done, was_killed in seen if stage == SENT and not was_killed)


def test_corrupted_partial_is_detected_as_digest_mismatch(server, tmp_path):
    """Bytes flipped in the stored .part after a cancelled upload: the resumed upload ends in a
    digest-mismatch error (never success), the server drops the partial, and a new upload from 0 works."""
    path = make_file(tmp_path / "c.bin", 12 * MiB)
    size = path.stat().st_size
    job, files, session = server.job_with_files("corrupt", {"c.bin": size})
    key = files["c.bin"]["key"]
    client = client_for(server)
    record = cancelled_upload(server, client, session, key, path, 6 * MiB)
    assert record["received"] > 4096
    part = server.blob_path(job["id"], key).with_suffix(".part")
    time.sleep(0.05)  # a later mtime, as any real change would leave
    with open(part, "r+b") as f:
        f.seek(1000)
        original = f.read(16)
        f.seek(1000)
        f.write(bytes(b ^ 0xFF for b in original))

    with pytest.raises(FiledockError) as info:
        client.upload_file(session["key"], key, path)
    assert info.value.code is ErrorCode.DIGEST_MISMATCH
    assert "c.bin" in info.value.message
    after = wait_settled(server, key)
    assert (after["state"], after["received"], after["digest"]) == ("pending", 0, None)
    assert not part.exists()

    result = client.upload_file(session["key"], key, path)
    assert (result.resumed_from, result.sent) == (0, size)
    assert (format_crc(result.crc32), result.digest) == local_values(path)


def test_download_resumes_its_part_file_and_verifies(server, tmp_path):
    """A cancelled download leaves DEST.part (and no DEST); the next call resumes from its size,
    receives only the rest, and DEST ends byte-identical with no .part left."""
    path = make_file(tmp_path / "d.bin", 10 * MiB + 77)
    size = path.stat().st_size
    _, files, session = server.job_with_files("down", {"d.bin": size})
    key = files["d.bin"]["key"]
    client = client_for(server)
    client.upload_file(session["key"], key, path)
    dest = tmp_path / "out" / "d.bin"
    dest.parent.mkdir()
    cancel, seen = threading.Event(), []
    with pytest.raises(Cancelled):
        client.download_file(session["key"], key, dest, cancel=cancel, progress=cancel_after(cancel, 4 * MiB, seen))
    part = dest.with_name("d.bin.part")
    have = part.stat().st_size
    assert 4 * MiB <= have < size and not dest.exists()

    seen = []
    result = client.download_file(session["key"], key, dest, progress=lambda *event: seen.append(event))
    assert (result.resumed_from, result.sent, result.size) == (have, size - have, size)
    assert [stage for stage, _, _ in seen][-2:] == [DURABLE, VERIFIED]
    assert dest.read_bytes() == path.read_bytes() and not part.exists()
    assert (format_crc(result.crc32), result.digest) == local_values(path)


def test_abort_deletes_the_partial(server, tmp_path):
    """abort_file after a cancelled upload: the server forgets the partial; the next upload starts at 0."""
    path = make_file(tmp_path / "a.bin", 6 * MiB)
    size = path.stat().st_size
    job, files, session = server.job_with_files("abort", {"a.bin": size})
    key = files["a.bin"]["key"]
    client = client_for(server)
    assert cancelled_upload(server, client, session, key, path, 3 * MiB)["received"] > 0
    client.abort_file(session["key"], key)
    record = server.api.file(key)
    assert (record["state"], record["received"]) == ("pending", 0)
    assert not server.blob_path(job["id"], key).with_suffix(".part").exists()
    result = client.upload_file(session["key"], key, path)
    assert (result.resumed_from, result.sent) == (0, size)


def test_final_refusals_raise_at_once_without_retrying(server, tmp_path):
    """unknown-session and session-closed are final: raised on the first connection, no backoff."""
    path = make_file(tmp_path / "r.bin", 1000)
    job, files, session = server.job_with_files("refuse", {"r.bin": 1000})
    key = files["r.bin"]["key"]
    client = client_for(server, attempts=5, backoff=2.0)
    started = time.monotonic()
    with pytest.raises(FiledockError) as info:
        client.upload_file("00000000-0000-4000-8000-000000000000", key, path)
    assert info.value.code is ErrorCode.UNKNOWN_SESSION
    server.api.close_session(session["key"])
    with pytest.raises(FiledockError) as info:
        client.upload_file(session["key"], key, path)
    assert info.value.code is ErrorCode.SESSION_CLOSED
    assert time.monotonic() - started < 1.5  # a single retry would have slept at least 1 s


def test_unreachable_port_gives_up_after_the_attempts(tmp_path):
    """Nothing listening: the client tries `attempts` times with backoff, then raises a FiledockError."""
    path = make_file(tmp_path / "x.bin", 10)
    client = DataPortClient("127.0.0.1", free_port(), attempts=3, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(FiledockError) as info:
        client.upload_file("00000000-0000-4000-8000-000000000000", "00000000-0000-4000-8000-000000000001", path)
    elapsed = time.monotonic() - started
    assert "gave up after 3 attempts" in info.value.message
    assert 0.05 <= elapsed < 5  # two backoff sleeps of 0.025..0.15 s, not one attempt and not forever


def test_tls_upload_resume_and_download(tmp_path):
    """Over a TLS data port (certificate checked): a cancelled upload resumes from the server's offset
    through the buffered TLS sender, and the download round trip is byte-identical."""
    import ssl

    from tests.integration.test_client_twisted import self_signed

    key_path, cert_path = self_signed(tmp_path)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    with ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"], extra=["--data-listen", listen]) as server:
        assert server.api.info()["data_port"]["tls"] is True
        path = make_file(tmp_path / "t.bin", 6 * MiB + 1)
        size = path.stat().st_size
        _, files, session = server.job_with_files("tls", {"t.bin": size})
        key = files["t.bin"]["key"]
        context = ssl.create_default_context(cafile=str(cert_path))
        client = DataPortClient("localhost", server.data_addr[1], ssl_context=context)
        held = cancelled_upload(server, client, session, key, path, 2 * MiB)["received"]
        assert held > 0
        result = client.upload_file(session["key"], key, path)
        assert (result.resumed_from, result.sent) == (held, size - held)
        assert (format_crc(result.crc32), result.digest) == local_values(path)
        dest = tmp_path / "t.out"
        assert client.download_file(session["key"], key, dest).digest == result.digest
        assert dest.read_bytes() == path.read_bytes()

        untrusting = DataPortClient("localhost", server.data_addr[1], ssl_context=ssl.create_default_context())
        with pytest.raises(FiledockError) as info:
            untrusting.upload_file(session["key"], key, path)
        assert info.value.code is ErrorCode.TLS_FAILED  # not "unauthorized": no key was refused


class StallingPeer:
    """A fake data port that answers every PUT with OFFSET 0 and then reads nothing more."""

    def __init__(self, receive_buffer: int | None = None) -> None:
        self.receive_buffer = receive_buffer
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
            if self.receive_buffer:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            self.connections.append(conn)
            header = b""
            while not header.endswith(b"\n"):
                header += conn.recv(1)
            conn.sendall(b"OFFSET 0\r\n")

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


SESSION, FILE = "00000000-0000-4000-8000-000000000000", "00000000-0000-4000-8000-000000000001"


def test_stalled_connection_is_abandoned_and_retried(tmp_path):
    """A peer that answers OFFSET 0 and then never reads: after `stall_timeout` seconds without a byte
    moving the client drops the connection and tries a new one; after `attempts` (no offset ever
    advanced, so no progress) it gives up."""
    peer = StallingPeer(receive_buffer=4096)
    path = make_file(tmp_path / "s.bin", 32 * MiB)
    client = DataPortClient("127.0.0.1", peer.port, stall_timeout=1.0, attempts=2, backoff=0.05)
    started = time.monotonic()
    try:
        with pytest.raises(FiledockError) as info:
            client.upload_file(SESSION, FILE, path)
    finally:
        peer.close()
    elapsed = time.monotonic() - started
    assert "nothing moved for 1 seconds" in info.value.message
    assert "gave up after 2 attempts" in info.value.message
    assert len(peer.connections) == 2
    assert 2.0 <= elapsed < 10


def test_cancel_from_another_thread_is_prompt_while_blocked(tmp_path):
    """cancel.set() from another thread while the sender is blocked on a full socket: Cancelled
    within a fraction of a second, and the connection is closed (the peer sees EOF or a reset)."""
    peer = StallingPeer()
    path = make_file(tmp_path / "s.bin", 32 * MiB)
    client = DataPortClient("127.0.0.1", peer.port, stall_timeout=60.0)
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def press_cancel() -> None:
        cancelled_at.append(time.monotonic())
        cancel.set()

    timer = threading.Timer(0.5, press_cancel)
    timer.start()
    try:
        with pytest.raises(Cancelled):
            client.upload_file(SESSION, FILE, path, cancel=cancel)
        latency = time.monotonic() - cancelled_at[0]
        (conn,) = peer.connections
        conn.settimeout(5)
        received = 0
        try:
            while chunk := conn.recv(1 << 20):
                received += len(chunk)  # what the client's kernel still held; then EOF
        except ConnectionResetError:
            pass
    finally:
        timer.cancel()
        peer.close()
    assert latency < 1.0
    assert 0 < received < 32 * MiB
