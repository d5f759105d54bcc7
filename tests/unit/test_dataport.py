"""The Twisted data-port adapter, driven through StringTransport and a memory clock.

Disk work runs inline (``run_blocking``) so every step is deterministic; the
session authority is the embedding example's own (examples/embed_dataport.py), which
proves a Twisted application can mount the data port without filedock's API.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
import zlib
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport

from filedock.config import Limits
from filedock.digest import ContentHasher
from filedock.server.dataport import DataPortFactory
from filedock.store.blobs import BlobStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embed_dataport.py"


def load_example():
    spec = importlib.util.spec_from_file_location("embed_dataport", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def digest_of(data: bytes) -> str:
    h = ContentHasher()
    h.update(data)
    return h.hexdigest()


class Harness:
    """A data-port factory on a memory reactor with the example's authority."""

    def __init__(self, tmp_path: Path, limits: Limits = Limits(disk_reserve=0)) -> None:
        self.app = load_example().AppSessions()
        self.clock = MemoryReactorClock()
        self.blobs = BlobStore(tmp_path)
        self.factory = DataPortFactory(self.app, self.blobs, limits, self.clock,
                                       run_blocking=lambda fn, *a: defer.maybeDeferred(fn, *a))
        self.job = str(uuid.uuid4())
        self.session = self.app.open_session(self.job)

    def connect(self):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def close(self, proto, transport):
        transport.loseConnection()
        proto.connectionLost(None)


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def test_legacy_upload_commits_on_close(h):
    """2007 dialect: header + bytes + close -> recorded complete with the CRC, no reply sent."""
    data = os.urandom(200_000)
    key = h.app.expect_file(h.job, "a", len(data))
    proto, transport = h.connect()
    proto.dataReceived(f"{h.session} {key} {len(data)}\r\n".encode())
    for i in range(0, len(data), 65536):
        proto.dataReceived(data[i:i + 65536])
    assert not h.app.files[key].complete  # not before the client closes
    h.close(proto, transport)
    assert h.app.files[key].complete
    assert h.app.files[key].crc32 == zlib.crc32(data)
    assert h.app.files[key].digest == digest_of(data)
    assert transport.value() == b""
    assert h.blobs.final_path(h.job, key).read_bytes() == data


def test_versioned_upload_replies_stored_after_record(h):
    """PUT, body, DONE -> OFFSET 0 then STORED, and the authority saw the completion first."""
    data = os.urandom(70_000)
    key = h.app.expect_file(h.job, "b", len(data))
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode())
    assert transport.value() == b"OFFSET 0\r\n"
    proto.dataReceived(data + f"DONE {digest_of(data)}\r\n".encode())
    assert transport.value().endswith(
        f"STORED {len(data)} {zlib.crc32(data):08x} {digest_of(data)}\r\n".encode())
    assert h.app.completed == [key]
    assert transport.disconnecting


def test_unknown_session_gets_error_line(h):
    """An unknown session is refused with its stable code."""
    key = h.app.expect_file(h.job, "c", 10)
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 PUT {uuid.uuid4()} {key} 10\r\n".encode())
    assert transport.value().startswith(b"ERR unknown-session ")
    assert transport.disconnecting


def test_disconnect_mid_body_checkpoints_the_partial(h):
    """A dropped connection records the bytes written so far as durable, for a resume."""
    data = os.urandom(300_000)
    key = h.app.expect_file(h.job, "d", len(data))
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode() + data[:123_456])
    h.close(proto, transport)
    assert h.app.files[key].received == 123_456
    assert h.app.files[key].crc32 == zlib.crc32(data[:123_456])
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode())
    assert transport.value() == b"OFFSET 123456\r\n"
    proto.dataReceived(data[123_456:] + b"DONE\r\n")
    assert transport.value().endswith(f"{digest_of(data)}\r\n".encode())


def test_takeover_closes_the_older_connection(h):
    """A second PUT for the same file closes the first with taken-over and continues from its offset."""
    data = os.urandom(100_000)
    key = h.app.expect_file(h.job, "e", len(data))
    old, old_t = h.connect()
    old.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode() + data[:40_000])
    new, new_t = h.connect()
    new.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode())
    assert b"ERR taken-over " in old_t.value()
    old.connectionLost(None)  # the transport's abort, delivered
    assert new_t.value() == b"OFFSET 40000\r\n"
    new.dataReceived(data[40_000:] + b"DONE\r\n")
    assert new_t.value().endswith(f"{digest_of(data)}\r\n".encode())


def test_header_timeout_closes_idle_connection(h):
    """No header within header_timeout: idle-timeout error and close."""
    proto, transport = h.connect()
    h.clock.advance(Limits().header_timeout + 1)
    assert transport.value().startswith(b"ERR idle-timeout ")


def test_no_idle_timeout_while_our_own_disk_holds_the_client_back(h):
    """Reading paused because the server's writes are behind ("hashing") is the server being slow, not the
    client: the idle timeout does not fire however long that lasts; once reading resumes it counts again."""
    data = os.urandom(50_000)
    key = h.app.expect_file(h.job, "f", len(data))
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode() + data[:10_000])
    proto.pause_reading("hashing")
    for _ in range(30):
        h.clock.advance(Limits().idle_timeout / 10)
    assert b"ERR" not in transport.value()
    proto.resume_reading("hashing")  # what the writer's on_drain does, from the reactor thread
    for _ in range(20):
        h.clock.advance(Limits().idle_timeout / 10)
    assert b"ERR idle-timeout " in transport.value()
    proto.connectionLost(None)


def test_stalled_body_times_out_and_keeps_partial(h):
    """A body that stops arriving is closed after idle_timeout; what arrived stays resumable."""
    data = os.urandom(50_000)
    key = h.app.expect_file(h.job, "f", len(data))
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode() + data[:10_000])
    for _ in range(20):
        h.clock.advance(Limits().idle_timeout / 10)
    assert b"ERR idle-timeout " in transport.value()
    proto.connectionLost(None)
    assert h.app.files[key].received == 10_000
