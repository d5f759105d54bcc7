"""Safety of the data port's records and connections, driven through StringTransport and a memory clock.

Each test pins one finding of the outside audit (issue 10): a record must never claim bytes
the disk does not hold, a complete file whose record failed is not sent again, a takeover of a
connection still waiting is quiet, a deleted job ends its uploads with ``gone``, and
connections without a request share a budget fairly between peers.
"""

from __future__ import annotations

import os
import zlib

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from filedock.config import Limits
from filedock.errors import ErrorCode, FiledockError
from tests.unit.test_dataport import Harness, digest_of


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def put_header(h: Harness, key: str, size: int) -> bytes:
    return f"FILEDOCK/1 PUT {h.session} {key} {size}\r\n".encode()


def leave_a_partial(h: Harness, key: str, data: bytes, upto: int) -> None:
    """A versioned upload that sends ``upto`` bytes and drops: its partial is recorded at ``upto``."""
    proto, transport = h.connect()
    proto.dataReceived(put_header(h, key, len(data)) + data[:upto])
    h.close(proto, transport)
    assert h.app.files[key].received == upto


def test_2007_upload_over_a_partial_records_the_reset_before_rewriting_it(h):
    """A 2007 upload onto a file with a partial sets the record back to 0 before the .part is truncated:
    at no instant does the record claim the earlier client's prefix while the disk holds other bytes."""
    first, second = os.urandom(300_000), os.urandom(300_000)
    key = h.app.expect_file(h.job, "f", len(first))
    leave_a_partial(h, key, first, 200_000)
    part = h.blobs.part_path(h.job, key)
    seen = []
    record_discard = h.app.record_discard

    def watch(target):
        seen.append(part.stat().st_size)  # what the disk held when the reset was recorded
        return record_discard(target)

    h.app.record_discard = watch
    proto, transport = h.connect()
    proto.dataReceived(f"{h.session} {key} {len(second)}\r\n".encode() + second[:250_000])
    assert seen == [200_000], "the record must go back to 0 before the partial is rewritten"
    assert h.app.files[key].received == 0  # what a SIGKILL now would leave: nothing claimed
    assert part.read_bytes() == second[:250_000]
    proto.dataReceived(second[250_000:])
    h.close(proto, transport)
    assert h.app.files[key].complete and h.app.files[key].crc32 == zlib.crc32(second)


def test_put_over_a_partial_shorter_than_its_record_records_the_reset_first(h):
    """A partial cut short behind the server's back: the PUT starts at 0, and the record is at 0 (with no
    stamp) before the first new byte is written, so a crash cannot pair the old CRC with new bytes."""
    data = os.urandom(300_000)
    key = h.app.expect_file(h.job, "g", len(data))
    leave_a_partial(h, key, data, 200_000)
    os.truncate(h.blobs.part_path(h.job, key), 1000)
    proto, transport = h.connect()
    proto.dataReceived(put_header(h, key, len(data)))
    assert transport.value() == b"OFFSET 0\r\n"
    record = h.app.files[key]
    assert (record.received, record.crc32, record.stamp) == (0, 0, None)
    proto.dataReceived(data + f"DONE {digest_of(data)}\r\n".encode())
    assert transport.value().endswith(f"STORED {len(data)} {zlib.crc32(data):08x} {digest_of(data)}\r\n".encode())


def test_a_complete_file_whose_record_failed_for_space_resumes_at_its_end(h):
    """The disk fills between the rename and the record: the client gets ERR no-space (not internal-error),
    the bytes stay, and the retry is offered the whole file (OFFSET size), not 0: no byte is sent again."""
    data = os.urandom(500_000)
    key = h.app.expect_file(h.job, "h", len(data))
    record_complete = h.app.record_complete
    h.app.record_complete = lambda *a: defer.fail(FiledockError(ErrorCode.NO_SPACE, "the server's disk is full"))
    proto, transport = h.connect()
    proto.dataReceived(put_header(h, key, len(data)) + data + f"DONE {digest_of(data)}\r\n".encode())
    assert transport.value().split(b"\r\n")[1].startswith(b"ERR no-space "), transport.value()
    h.close(proto, transport)
    assert not h.app.files[key].complete
    h.app.record_complete = record_complete
    proto, transport = h.connect()
    proto.dataReceived(put_header(h, key, len(data)))
    assert transport.value() == f"OFFSET {len(data)}\r\n".encode()
    assert h.app.files[key].received == len(data)  # recorded before the offer was made
    proto.dataReceived(f"DONE {digest_of(data)}\r\n".encode())
    assert transport.value().endswith(f"STORED {len(data)} {zlib.crc32(data):08x} {digest_of(data)}\r\n".encode())
    assert h.blobs.final_path(h.job, key).read_bytes() == data


@pytest.fixture
def critical_log():
    """Every log event at CRITICAL (log.failure) while the test runs."""
    events = []

    def observe(event):
        if event.get("log_level") in (LogLevel.critical, LogLevel.error):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_takeover_of_a_connection_still_waiting_for_its_predecessor_is_quiet(h, critical_log):
    """A holds the file, B takes it over and waits for A to let go, C takes it over from B meanwhile:
    B ends with taken-over, C wins with A's durable offset, and nothing is logged as a failure
    (before: RuntimeError 'no pending UploadRequest (state closed)' at CRITICAL)."""
    data = os.urandom(400_000)
    key = h.app.expect_file(h.job, "t", len(data))
    a, ta = h.connect()
    a.dataReceived(put_header(h, key, len(data)) + data[:100_000])
    b, tb = h.connect()
    b.dataReceived(put_header(h, key, len(data)))  # waits: A has not let go (its transport is still open)
    c, tc = h.connect()
    c.dataReceived(put_header(h, key, len(data)))
    assert tb.value().startswith(b"ERR taken-over "), tb.value()
    h.close(a, ta)  # A lets go; B's step resumes and must stop quietly
    h.close(b, tb)
    assert tc.value() == b"OFFSET 100000\r\n"
    c.dataReceived(data[100_000:] + f"DONE {digest_of(data)}\r\n".encode())
    assert tc.value().endswith(f"STORED {len(data)} {zlib.crc32(data):08x} {digest_of(data)}\r\n".encode())
    assert not critical_log, [e.get("log_format") for e in critical_log]


def test_deleting_the_job_ends_its_uploads_with_gone_and_keeps_nothing(h, critical_log):
    """end_job (the API's delete hook) ends the job's upload at once with ERR gone; its partial is
    deleted, nothing is recorded, and nothing is logged as a failure."""
    data = os.urandom(300_000)
    key = h.app.expect_file(h.job, "d", len(data))
    proto, transport = h.connect()
    proto.dataReceived(put_header(h, key, len(data)) + data[:120_000])
    assert h.factory.end_job(h.job) == 1
    assert transport.value().split(b"\r\n")[1].startswith(b"ERR gone "), transport.value()
    h.close(proto, transport)
    assert not h.blobs.part_path(h.job, key).exists()
    assert not h.blobs.job_dir(h.job).exists()
    assert h.app.files[key].received == 0
    assert not critical_log


def test_closing_the_session_ends_its_uploads_and_keeps_the_partial(h):
    """end_session (the API's close hook) ends the session's upload with ERR session-closed; the partial
    is checkpointed and recorded for a later session to resume."""
    data = os.urandom(300_000)
    key = h.app.expect_file(h.job, "s", len(data))
    proto, transport = h.connect()
    proto.dataReceived(put_header(h, key, len(data)) + data[:120_000])
    assert h.factory.end_session(h.session) == 1
    assert transport.value().split(b"\r\n")[1].startswith(b"ERR session-closed "), transport.value()
    h.close(proto, transport)
    assert h.app.files[key].received == 120_000


def connect_from(h: Harness, host: str):
    proto = h.factory.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_connections_without_a_request_have_a_budget_shared_fairly_between_peers(tmp_path):
    """Per address at most max_unauthenticated_per_address wait for a request; when the budget is spent,
    a newcomer from a lighter peer takes the slot of the heaviest peer's oldest silent connection."""
    h = Harness(tmp_path, Limits(disk_reserve=0, max_unauthenticated=5, max_unauthenticated_per_address=3))
    flood = [connect_from(h, "10.0.0.1") for _ in range(3)]
    assert all(t.value() == b"" for _, t in flood)
    _, refused = connect_from(h, "10.0.0.1")
    assert refused.value().startswith(b"ERR too-many-connections "), refused.value()
    others = [connect_from(h, "10.0.0.2") for _ in range(2)]
    assert all(t.value() == b"" for _, t in others)
    assert h.factory.unauthenticated_count == 5
    _, newcomer = connect_from(h, "10.0.0.3")  # the budget is spent: 10.0.0.1 (3) gives up its oldest
    assert newcomer.value() == b""
    assert flood[0][1].value().startswith(b"ERR too-many-connections ")
    assert all(t.value() == b"" for _, t in flood[1:] + others)
    key = h.app.expect_file(h.job, "u", 10)
    proto, transport = others[0]
    proto.dataReceived(put_header(h, key, 10))  # a whole request line: no longer counted
    assert transport.value() == b"OFFSET 0\r\n"
    assert h.factory.unauthenticated_count == 4


def test_every_listen_string_gets_a_large_backlog_unless_it_names_one():
    """tcp, ssl and unix endpoints without a backlog get backlog=1024 (Twisted's default of 50 lost
    bursts of 2007 uploads); one that names a backlog, or another kind of endpoint, is left alone; the
    defaults of `filedock serve` carry it for both ports."""
    from filedock.cli import build_parser
    from filedock.server.service import ServerOptions, with_backlog

    assert with_backlog("tcp:7481:interface=127.0.0.1") == "tcp:7481:interface=127.0.0.1:backlog=1024"
    assert with_backlog("ssl:7481:privateKey=a\\:b.pem:certKey=c.pem") == \
        "ssl:7481:privateKey=a\\:b.pem:certKey=c.pem:backlog=1024"
    assert with_backlog("unix:/run/filedock.sock") == "unix:/run/filedock.sock:backlog=1024"
    assert with_backlog("tcp:0:backlog=5") == "tcp:0:backlog=5"
    assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"
    options = ServerOptions()
    assert "backlog=1024" in options.api_listen and "backlog=1024" in options.data_listen
    args = build_parser().parse_args(["serve"])
    assert "backlog=1024" in args.api_listen and "backlog=1024" in args.data_listen


def test_a_full_database_is_no_space_and_the_store_works_again_after(tmp_path):
    """SQLite's "database or disk is full" (here: max_page_count reached, the same SQLITE_FULL a full disk
    gives) is FiledockError(no-space) from the store, not a raw OperationalError the API answers with
    500; the failed transaction is rolled back, and once there is room the store writes again."""
    from filedock.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "db.sqlite3")
    job = store.create_job("first", {})
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(FiledockError) as exc:
        store.add_files(job.id, [(f"file-{i:05d}-" + "x" * 200, 1) for i in range(2000)])
    assert exc.value.code is ErrorCode.NO_SPACE
    assert not store._db.in_transaction
    assert store.list_files(job.id) == []
    store._db.execute("PRAGMA max_page_count = 1073741823")
    assert len(store.add_files(job.id, [("a", 1)])) == 1
    store.close()


def test_abort_and_a_digest_mismatch_record_the_reset_before_deleting_the_partial(h):
    """Whatever deletes a partial records the file back at 0 first: a crash in between leaves a record at
    0 and a partial to be overwritten, never a record claiming bytes that are gone."""
    data = os.urandom(200_000)
    key = h.app.expect_file(h.job, "x", len(data))
    part = h.blobs.part_path(h.job, key)
    seen = []
    record_discard = h.app.record_discard

    def watch(target):
        seen.append(part.exists())
        return record_discard(target)

    h.app.record_discard = watch
    leave_a_partial(h, key, data, 100_000)
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 ABORT {h.session} {key}\r\n".encode())
    assert transport.value() == b"ABORTED\r\n"
    h.close(proto, transport)
    leave_a_partial(h, key, data, 100_000)
    proto, transport = h.connect()
    proto.dataReceived(put_header(h, key, len(data)) + data[100_000:] + b"DONE " + b"0" * 64 + b"\r\n")
    assert b"ERR digest-mismatch " in transport.value()
    h.close(proto, transport)
    assert seen == [True, True]
    assert not part.exists() and h.app.files[key].received == 0
