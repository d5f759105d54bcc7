"""The data port on real loopback sockets against a real server process and SQLite file.

These tests speak the protocol by hand (no filedock client), byte for byte, as an
old 2007 client or a hostile peer would.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import zlib

import pytest

from filedock import digest
from tests.integration.harness import ServerProcess


def recv_line(sock: socket.socket, limit: int = 8192) -> bytes:
    """One reply line (without CRLF), or b"" if the server closed first."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf.rstrip(b"\r\n")


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server still sends until it closes."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def file_state(server: ServerProcess, key: str) -> dict:
    return server.api.file(key)


def put(server: ServerProcess, session: str, key: str, size: int) -> tuple[socket.socket, bytes]:
    """Open a versioned upload; returns the socket and the server's first reply line."""
    sock = server.connect()
    sock.sendall(f"FILEDOCK/1 PUT {session} {key} {size}\r\n".encode())
    return sock, recv_line(sock)


@pytest.fixture
def payload() -> bytes:
    return os.urandom(3 * 1024 * 1024 + 12345)


def test_2007_byte_stream_is_committed(server, payload):
    """An unchanged 2007 client (header, raw bytes, close) gets its file recorded with size and CRC."""
    _, files, session = server.job_with_files("legacy", {"a.wav": len(payload)})
    key = files["a.wav"]["key"]
    sock = server.connect()
    sock.sendall(f"{session['key']} {key} {len(payload)}\r\n".encode() + payload)
    sock.close()
    record = wait_for(lambda: (r := file_state(server, key))["state"] == "complete" and r)
    assert record["size"] == len(payload)
    assert record["crc32"] == f"{zlib.crc32(payload):08x}"
    assert record["digest"] == digest_of(payload)
    assert record["uploaded_at"] is not None
    job = server.api.job(files["a.wav"]["job"])
    assert job["state"] == "complete"


def test_2007_bare_newline_header_is_accepted(server):
    """The 2007 header may end in a bare LF."""
    data = b"x" * 1000
    _, files, session = server.job_with_files("lf", {"f": len(data)})
    sock = server.connect()
    sock.sendall(f"{session['key']} {files['f']['key']} {len(data)}\n".encode() + data)
    sock.close()
    wait_for(lambda: file_state(server, files["f"]["key"])["state"] == "complete")


def test_2007_short_upload_is_kept_as_partial_not_complete(server, payload):
    """Fewer bytes than announced: never complete; the bytes stay as a resumable partial."""
    _, files, session = server.job_with_files("short", {"f": len(payload)})
    key = files["f"]["key"]
    sock = server.connect()
    sock.sendall(f"{session['key']} {key} {len(payload)}\r\n".encode() + payload[:1_000_000])
    time.sleep(0.2)
    sock.close()
    record = wait_for(lambda: (r := file_state(server, key))["state"] == "partial" and r)
    assert record["received"] == 1_000_000
    assert record["digest"] is None
    # ...and a versioned client resumes it from exactly there
    sock, line = put(server, session["key"], key, len(payload))
    assert line == b"OFFSET 1000000"
    sock.sendall(payload[1_000_000:] + f"DONE {digest_of(payload)}\r\n".encode())
    assert recv_line(sock) == f"STORED {len(payload)} {zlib.crc32(payload):08x} {digest_of(payload)}".encode()


def test_2007_long_upload_is_discarded(server):
    """More bytes than announced: the upload is thrown away, nothing is recorded complete."""
    data = os.urandom(100_000)
    _, files, session = server.job_with_files("long", {"f": len(data)})
    key = files["f"]["key"]
    sock = server.connect()
    sock.sendall(f"{session['key']} {key} {len(data)}\r\n".encode() + data + b"extra bytes")
    assert wait_closed(sock) == b""  # a 2007 client is sent nothing
    job_dir = server.data_dir / "jobs" / files["f"]["job"]
    blob = server.blob_path(files["f"]["job"], key).name
    wait_for(lambda: not list(job_dir.glob(f"{blob}*")))  # the partial is deleted...
    record = file_state(server, key)  # ...and the record says nothing was received
    assert record["state"] == "pending" and record["received"] == 0


def digest_of(data: bytes) -> str:
    h = digest.ContentHasher()
    h.update(data)
    return h.hexdigest()


def test_versioned_upload_answers_only_when_durable(server, payload):
    """PUT -> OFFSET 0, body, DONE digest -> STORED with size, CRC and digest; file on disk matches."""
    job, files, session = server.job_with_files("v1", {"f": len(payload)})
    key = files["f"]["key"]
    sock, line = put(server, session["key"], key, len(payload))
    assert line == b"OFFSET 0"
    sock.sendall(payload)
    sock.sendall(f"DONE {digest_of(payload)}\r\n".encode())
    assert recv_line(sock) == f"STORED {len(payload)} {zlib.crc32(payload):08x} {digest_of(payload)}".encode()
    record = file_state(server, key)  # recorded before the reply
    assert record["state"] == "complete" and record["digest"] == digest_of(payload)
    final = server.blob_path(job["id"], key)
    assert final.read_bytes() == payload
    assert not final.with_name(key + ".part").exists()


@pytest.mark.parametrize("header, code", [
    (b"hello world\r\n", "malformed-header"),
    (b"FILEDOCK/9 PUT a b 1\r\n", "malformed-header"),
    (b"FILEDOCK/1 PUT 1234 5678 -5\r\n", "malformed-header"),
    (b"FILEDOCK/1 PUT %s %s 99999999999999999999999\r\n" % (str(uuid.uuid4()).encode(),
                                                           str(uuid.uuid4()).encode()), "malformed-header"),
    (b"\xff\xfe\x00garbage\n", "malformed-header"),
    (b"A" * 5000, "header-too-long"),
])
def test_bad_headers_get_one_error_line_and_close(server, header, code):
    """Malformed and oversized headers: `ERR <code> <message>` then close; the server lives on."""
    sock = server.connect()
    sock.sendall(header)
    reply = wait_closed(sock)
    assert reply.startswith(f"ERR {code} ".encode()), reply
    assert reply.count(b"\n") == 1
    assert server.api.info()["data_port"]["port"] == server.data_addr[1]


def test_refusals_have_the_right_codes_and_record_nothing(server):
    """Unknown session, unknown file, file of another job, wrong size, expired and closed sessions."""
    job, files, session = server.job_with_files("a", {"f": 10})
    _, other_files, _ = server.job_with_files("b", {"g": 10})
    expired = server.api.open_session(job["id"], 0.5)
    closed = server.api.open_session(job["id"])
    server.api.close_session(closed["key"])
    time.sleep(0.6)
    key = files["f"]["key"]
    cases = [
        (str(uuid.uuid4()), key, 10, "unknown-session"),
        (session["key"], str(uuid.uuid4()), 10, "unknown-file"),
        (session["key"], other_files["g"]["key"], 10, "unknown-file"),
        (session["key"], key, 11, "size-mismatch"),
        (expired["key"], key, 10, "session-expired"),
        (closed["key"], key, 10, "session-closed"),
    ]
    for sess, fkey, size, code in cases:
        sock, line = put(server, sess, fkey, size)
        assert line.startswith(f"ERR {code} ".encode()), (code, line)
        sock.close()
    assert file_state(server, key)["state"] == "pending"
    assert file_state(server, other_files["g"]["key"])["state"] == "pending"


def test_complete_file_refuses_a_second_upload(server):
    """A duplicate upload of a complete file: already-complete, and the stored file is untouched."""
    data = os.urandom(5000)
    job, files, session = server.job_with_files("dup", {"f": len(data)})
    key = files["f"]["key"]
    sock, line = put(server, session["key"], key, len(data))
    sock.sendall(data + b"DONE\r\n")
    assert recv_line(sock).startswith(b"STORED ")
    sock, line = put(server, session["key"], key, len(data))
    assert line.startswith(b"ERR already-complete ")
    assert server.blob_path(job["id"], key).read_bytes() == data


def test_digest_mismatch_is_refused_and_not_recorded(server):
    """A client digest that differs from the server's: digest-mismatch, file not complete."""
    data = os.urandom(5000)
    _, files, session = server.job_with_files("mm", {"f": len(data)})
    key = files["f"]["key"]
    sock, _ = put(server, session["key"], key, len(data))
    sock.sendall(data + b"DONE " + b"0" * 64 + b"\r\n")
    assert recv_line(sock).startswith(b"ERR digest-mismatch ")
    record = wait_for(lambda: (r := file_state(server, key))["state"] == "pending" and r)
    assert record["received"] == 0


def test_resume_on_new_connection_at_server_offset(server, payload):
    """A dropped versioned upload resumes at the durable offset the server announces."""
    _, files, session = server.job_with_files("resume", {"f": len(payload)})
    key = files["f"]["key"]
    sock, line = put(server, session["key"], key, len(payload))
    assert line == b"OFFSET 0"
    sock.sendall(payload[:2_000_000])
    time.sleep(0.2)
    sock.close()
    wait_for(lambda: file_state(server, key)["received"] == 2_000_000)
    sock, line = put(server, session["key"], key, len(payload))
    assert line == b"OFFSET 2000000"
    sock.sendall(payload[2_000_000:] + f"DONE {digest_of(payload)}\r\n".encode())
    assert recv_line(sock).startswith(f"STORED {len(payload)} {zlib.crc32(payload):08x}".encode())


def test_takeover_of_a_stalled_connection(server, payload):
    """A second connection for a file being uploaded takes over: the old one is closed, no stale lock."""
    _, files, session = server.job_with_files("takeover", {"f": len(payload)})
    key = files["f"]["key"]
    old, line = put(server, session["key"], key, len(payload))
    old.sendall(payload[:1_500_000])
    time.sleep(0.3)  # the old connection now stalls, still open
    new, line = put(server, session["key"], key, len(payload))
    assert line == b"OFFSET 1500000"
    assert wait_closed(old).startswith(b"ERR taken-over ")
    new.sendall(payload[1_500_000:] + f"DONE {digest_of(payload)}\r\n".encode())
    assert recv_line(new).startswith(b"STORED ")


def test_idle_connection_is_closed(tmp_path):
    """A connection that never sends a header is closed with idle-timeout."""
    with ServerProcess(tmp_path / "data", limits=["header_timeout=0.5"]) as server:
        sock = server.connect()
        started = time.monotonic()
        assert wait_closed(sock).startswith(b"ERR idle-timeout ")
        assert time.monotonic() - started < 5


def test_download_from_offset(server, payload):
    """GET streams a complete file from an offset with its size, CRC and digest."""
    _, files, session = server.job_with_files("dl", {"f": len(payload)})
    key = files["f"]["key"]
    sock, _ = put(server, session["key"], key, len(payload))
    sock.sendall(payload + b"DONE\r\n")
    assert recv_line(sock).startswith(b"STORED")
    sock = server.connect()
    sock.sendall(f"FILEDOCK/1 GET {session['key']} {key} 1000\r\n".encode())
    assert recv_line(sock) == f"DATA {len(payload)} 1000 {zlib.crc32(payload):08x} {digest_of(payload)}".encode()
    assert wait_closed(sock) == payload[1000:]


def test_sigkill_mid_upload_then_resume_to_a_correct_file(tmp_path):
    """SIGKILL during an upload; after restart the upload resumes from a durable offset to a verified file."""
    data = os.urandom(24 * 1024 * 1024 + 777)
    with ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"]) as server:
        job, files, session = server.job_with_files("crash", {"f": len(data)})
        key = files["f"]["key"]
        sock, line = put(server, session["key"], key, len(data))
        sock.sendall(data[:15_000_000])
        wait_for(lambda: file_state(server, key)["received"] >= 8_000_000)
        server.kill()
        sock.close()
        server.start()
        sock, line = put(server, session["key"], key, len(data))
        offset = int(line.split()[1])
        assert 0 < offset <= 15_000_000
        sock.sendall(data[offset:] + f"DONE {digest_of(data)}\r\n".encode())
        assert recv_line(sock) == f"STORED {len(data)} {zlib.crc32(data):08x} {digest_of(data)}".encode()
        assert server.blob_path(job["id"], key).read_bytes() == data


def test_sigterm_checkpoints_uploads_in_flight(tmp_path):
    """A clean stop (SIGTERM) records every byte received so far, even between checkpoints."""
    data = os.urandom(6 * 1024 * 1024)
    with ServerProcess(tmp_path / "data") as server:  # default checkpoint_bytes: far above 1.5 MB
        job, files, session = server.job_with_files("term", {"f": len(data)})
        key = files["f"]["key"]
        sock, line = put(server, session["key"], key, len(data))
        sock.sendall(data[:1_500_000])
        wait_for(lambda: server.api.get("/v1/uploads")["uploads"]
                 and server.api.get("/v1/uploads")["uploads"][0]["received"] == 1_500_000)
        server.stop()
        assert server.proc.returncode == 0
        server.start()
        assert server.api.file(key)["received"] == 1_500_000
        sock, line = put(server, session["key"], key, len(data))
        assert line == b"OFFSET 1500000"


def test_header_trickled_byte_by_byte_still_times_out(tmp_path):
    """header_timeout bounds the whole header, not the silence between bytes (no slow-loris)."""
    with ServerProcess(tmp_path / "data", limits=["header_timeout=1"]) as server:
        sock = server.connect()
        started = time.monotonic()
        reply = b""
        sock.settimeout(0.3)
        for ch in b"FILEDOCK/1 PUT 00000000-0000-4000-8000-000000000000":
            try:
                sock.sendall(bytes([ch]))
                reply += sock.recv(200)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if reply:
                break
        assert reply.startswith(b"ERR idle-timeout "), reply
        assert time.monotonic() - started < 3
