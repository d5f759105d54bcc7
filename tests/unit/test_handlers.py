"""Each request kind (Upload, Download, Abort, BatchUpload) driven without a connection.

A recording channel stands in for the data port's connection (or a future HTTP
request), a recording in-memory authority for the metadata store, a temp-dir
BlobStore holds the bytes, and blocking work runs inline: each test reads what
the request asked of its collaborators, in order.
"""

from __future__ import annotations

import uuid
import zlib
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from filedock import wire
from filedock.config import Limits
from filedock.digest import ContentHasher
from filedock.errors import ErrorCode, FiledockError
from filedock.server.authority import DownloadSource, IBatchAuthority, ISessionAuthority, UploadTarget
from filedock.server.dataport import (Abort, BatchUpload, DataPortProtocol, DataPortStats, Download,
                                      IRequestChannel, RequestServices, Upload)
from filedock.server.registry import InProcessUploadRegistry
from filedock.store.blobs import BlobStore


def digest_of(data: bytes) -> str:
    h = ContentHasher()
    h.update(data)
    return h.hexdigest()


@implementer(IRequestChannel)
class RecordingChannel:
    """Records what a request told it; ends as a connection would."""

    peer = "127.0.0.1"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.body = bytearray()
        self.producer = None
        self.paused: set[str] = set()
        self._ended = False

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def ended(self):
        return self._ended

    def authorized(self, job_id, session_key):
        self.calls.append(("authorized", job_id, session_key))

    def accepted_upload(self, offset):
        self.calls.append(("accepted_upload", offset))

    def stored(self, size, crc32, digest):
        self.calls.append(("stored", size, crc32, digest))
        self._ended = True

    def accepted_abort(self):
        self.calls.append(("accepted_abort",))
        self._ended = True

    def accepted_batch(self):
        self.calls.append(("accepted_batch",))

    def batch_results(self, lines):
        self.calls.append(("batch_results", lines))
        self._ended = True

    def accepted_download(self, size, crc32, digest):
        self.calls.append(("accepted_download", size, crc32, digest))

    def stream(self, producer):
        self.calls.append(("stream",))
        self.producer = producer

    def write_body(self, data):
        self.body += data

    def finished(self):
        self.calls.append(("finished",))
        self._ended = True

    def refused(self, code, message):
        self.calls.append(("refused", code))
        self._ended = True

    def interrupt(self, code, message):
        self.calls.append(("interrupt", code))
        self._ended = True

    def pause_reading(self, reason):
        self.paused.add(reason)

    def resume_reading(self, reason):
        self.paused.discard(reason)

    def touch(self):
        pass

    def expect_within(self, seconds):
        self.calls.append(("expect_within", seconds))


@implementer(ISessionAuthority, IBatchAuthority)
class RecordingAuthority:
    """One session of one job, its files in a dict; every call recorded in order."""

    def __init__(self) -> None:
        self.job, self.session = str(uuid.uuid4()), str(uuid.uuid4())
        self.files: dict[str, dict] = {}
        self.calls: list[tuple] = []

    def expect(self, size: int) -> str:
        key = str(uuid.uuid4())
        self.files[key] = {"size": size, "received": 0, "crc32": 0, "stamp": None, "digest": None}
        return key

    def _target(self, key: str) -> UploadTarget:
        f = self.files[key]
        return UploadTarget(self.job, key, f["size"], f["received"], f["crc32"], f["stamp"], "n")

    def authorize_upload(self, session_key, file_key, size):
        self.calls.append(("authorize_upload", file_key))
        if session_key != self.session or file_key not in self.files:
            return defer.fail(FiledockError(ErrorCode.UNKNOWN_FILE, "no such file"))
        return defer.succeed(self._target(file_key))

    def authorize_download(self, session_key, file_key):
        f = self.files[file_key]
        return defer.succeed(DownloadSource(self.job, file_key, f["size"], f["crc32"], f["digest"], "n"))

    def record_progress(self, target, offset, crc32, stamp):
        self.calls.append(("record_progress", target.file_key, offset))
        self.files[target.file_key].update(received=offset, crc32=crc32, stamp=stamp)
        return defer.succeed(None)

    def record_complete(self, target, crc32, digest):
        self.calls.append(("record_complete", target.file_key))
        self.files[target.file_key].update(received=target.size, crc32=crc32, digest=digest)
        return defer.succeed(False)

    def record_discard(self, target):
        self.calls.append(("record_discard", target.file_key))
        self.files[target.file_key].update(received=0, crc32=0, stamp=None)
        return defer.succeed(None)

    def authorize_session(self, session_key):
        return defer.succeed(self.job)

    def authorize_batch(self, session_key, items):
        return defer.succeed({key: self._target(key) for key, _ in items if key in self.files})

    def record_batch(self, items):
        self.calls.append(("record_batch", [t.file_key for t, _, _ in items]))
        for target, crc, digest in items:
            self.files[target.file_key].update(received=target.size, crc32=crc, digest=digest)
        return defer.succeed(None)


class Parts:
    """The collaborators one front end hands its requests."""

    def __init__(self, tmp_path: Path, limits: Limits = Limits(disk_reserve=0)) -> None:
        self.authority = RecordingAuthority()
        self.blobs = BlobStore(tmp_path)
        self.registry = InProcessUploadRegistry()
        self.stats = DataPortStats()
        self.services = RequestServices(self.authority, self.blobs, limits, self.registry, self.stats,
                                        MemoryReactorClock(), lambda fn, *a: defer.maybeDeferred(fn, *a), set())

    def upload(self, key: str, size: int, legacy: bool = False):
        channel = RecordingChannel()
        req = wire.UploadRequest(self.authority.session, key, size, legacy=legacy)
        return Upload(self.services, channel, req), channel

    def close(self, request) -> None:
        """What the connection does when it closes: settle, then release."""
        request.settle().addErrback(request.settle_failed)
        request.release()


def fired(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


@pytest.fixture
def parts(tmp_path):
    return Parts(tmp_path)


def test_the_data_port_connection_is_a_request_channel():
    """The connection provides the whole channel interface the requests use (and nothing else is needed)."""
    assert IRequestChannel.implementedBy(DataPortProtocol)
    assert verifyObject(IRequestChannel, RecordingChannel())


def test_upload_claims_accepts_at_zero_and_stores_only_after_recording(parts):
    """A new upload: authorized, claimed, accepted at 0; its bytes go to disk; finish records it complete
    and only then tells the channel STORED with the CRC and digest; release lets go of the claim."""
    data = b"x" * 300_000
    key = parts.authority.expect(len(data))
    upload, channel = parts.upload(key, len(data))
    assert fired(upload.start()) is None
    assert channel.calls == [("authorized", parts.authority.job, parts.authority.session), ("accepted_upload", 0)]
    assert fired(parts.registry.is_held(key)) is True
    upload.receive(data[:100_000])
    upload.receive(memoryview(data)[100_000:])
    assert fired(upload.finish(digest_of(data))) is None
    assert parts.authority.calls[-1] == ("record_complete", key)
    assert channel.calls[-1] == ("stored", len(data), zlib.crc32(data), digest_of(data))
    assert parts.blobs.final_path(parts.authority.job, key).read_bytes() == data
    assert parts.stats.uploads_completed == 1 and parts.stats.bytes_received == len(data)
    parts.close(upload)
    assert fired(parts.registry.is_held(key)) is False
    assert parts.stats.uploads_failed == {}


def test_upload_reports_itself_to_the_status_view_and_its_bytes_to_come_to_the_registry(parts):
    """Status and promised disk space come from what the upload reported, not from its internals."""
    key = parts.authority.expect(1000)
    upload, _ = parts.upload(key, 1000)
    fired(upload.start())
    upload.receive(b"y" * 400)
    (row,) = parts.stats.status()
    assert row["received"] == 400 and row["size"] == 1000 and key not in str(row)
    assert fired(parts.registry.bytes_promised()) == 600
    assert fired(parts.registry.bytes_promised(exclude=upload)) == 0
    parts.close(upload)
    assert parts.stats.status() == []
    assert fired(parts.registry.bytes_promised()) == 0


def test_a_closed_upload_checkpoints_and_a_new_one_resumes_at_the_recorded_offset(parts):
    """Closing mid-body records what is durable; the next upload of the file is accepted at that offset."""
    data = b"z" * 50_000
    key = parts.authority.expect(len(data))
    first, _ = parts.upload(key, len(data))
    fired(first.start())
    first.receive(data[:12_345])
    parts.close(first)
    assert parts.authority.files[key]["received"] == 12_345
    assert parts.stats.uploads_failed["disconnected"] == 1
    second, channel = parts.upload(key, len(data))
    fired(second.start())
    assert channel.calls[-1] == ("accepted_upload", 12_345)
    assert parts.stats.resumes == 1
    second.receive(data[12_345:])
    fired(second.finish(None))
    assert channel.names()[-1] == "stored"
    assert parts.blobs.final_path(parts.authority.job, key).read_bytes() == data


def test_a_newer_upload_takes_over_after_the_older_one_recorded_and_let_go(parts):
    """The registry asks the older upload to let go (its channel is interrupted with taken-over); the newer
    one is accepted only after the older one settled, at the offset the older one recorded."""
    data = b"t" * 80_000
    key = parts.authority.expect(len(data))
    older, older_channel = parts.upload(key, len(data))
    fired(older.start())
    older.receive(data[:30_000])
    newer, newer_channel = parts.upload(key, len(data))
    starting = newer.start()
    assert older_channel.calls[-1] == ("interrupt", ErrorCode.TAKEN_OVER)
    assert not starting.called and "accepted_upload" not in newer_channel.names()
    assert parts.stats.takeovers == 1
    parts.close(older)
    assert fired(starting) is None
    assert newer_channel.calls[-1] == ("accepted_upload", 30_000)


def test_a_2007_upload_records_zero_before_it_rewrites_a_partial(parts):
    """The legacy dialect always starts at 0: the record goes back to 0 before the writer opens."""
    data = b"l" * 40_000
    key = parts.authority.expect(len(data))
    first, _ = parts.upload(key, len(data))
    fired(first.start())
    first.receive(data[:10_000])
    parts.close(first)
    parts.authority.calls.clear()
    legacy, channel = parts.upload(key, len(data), legacy=True)
    fired(legacy.start())
    assert parts.authority.calls[:2] == [("authorize_upload", key), ("record_discard", key)]
    assert channel.calls[-1] == ("accepted_upload", 0)


def test_a_digest_mismatch_discards_the_partial_and_records_zero_first(parts):
    """finish fails with digest-mismatch; closing records 0 and then deletes the partial: nothing is stored."""
    data = b"d" * 10_000
    key = parts.authority.expect(len(data))
    upload, channel = parts.upload(key, len(data))
    fired(upload.start())
    upload.receive(data)
    failure = fired(upload.finish("0" * 64))
    assert isinstance(failure, Failure) and failure.value.code is ErrorCode.DIGEST_MISMATCH
    assert "stored" not in channel.names()
    parts.close(upload)
    assert parts.authority.calls[-1] == ("record_discard", key)
    assert not parts.blobs.part_path(parts.authority.job, key).exists()
    assert not parts.blobs.final_path(parts.authority.job, key).exists()
    assert parts.stats.uploads_failed["digest-mismatch"] == 1


def test_an_upload_of_a_deleted_job_keeps_and_records_nothing(parts):
    """After end_job the clean-up deletes the partial and writes no record."""
    key = parts.authority.expect(5000)
    upload, _ = parts.upload(key, 5000)
    fired(upload.start())
    upload.receive(b"g" * 2000)
    upload.end_job()
    before = list(parts.authority.calls)
    parts.close(upload)
    assert parts.authority.calls == before
    assert not parts.blobs.part_path(parts.authority.job, key).exists()


def test_an_upload_the_disk_cannot_hold_is_refused_before_a_byte_is_written(tmp_path):
    """Free space less the reserve and what other uploads still have to write must hold the file."""
    parts = Parts(tmp_path, Limits(disk_reserve=0))
    parts.blobs.free_bytes = lambda: 1000
    parts.registry.promise("another upload", lambda: 600)
    key = parts.authority.expect(500)
    upload, channel = parts.upload(key, 500)
    failure = fired(upload.start())
    assert failure.value.code is ErrorCode.NO_SPACE and "600 are promised" in failure.value.message
    assert "accepted_upload" not in channel.names()
    assert not parts.blobs.part_path(parts.authority.job, key).exists()


def test_download_streams_the_file_from_the_offset_then_finishes(parts):
    """A download announces size, CRC and digest, streams from the asked offset through the channel,
    and tells the channel it finished."""
    data = bytes(range(256)) * 100
    key = parts.authority.expect(len(data))
    upload, _ = parts.upload(key, len(data))
    fired(upload.start())
    upload.receive(data)
    fired(upload.finish(None))
    parts.close(upload)
    channel = RecordingChannel()
    download = Download(parts.services, channel, wire.DownloadRequest(parts.authority.session, key, 1000))
    d = download.start()
    assert channel.names() == ["authorized", "accepted_download", "stream"]
    assert channel.calls[1] == ("accepted_download", len(data), zlib.crc32(data), digest_of(data))
    while not d.called:
        channel.producer.resumeProducing()
    assert bytes(channel.body) == data[1000:]
    assert channel.names()[-1] == "finished"
    assert parts.stats.bytes_sent == len(data) - 1000


def test_abort_records_zero_before_it_deletes_the_partial(parts):
    """ABORT claims the file like an upload, records 0 first, deletes the partial, then confirms."""
    key = parts.authority.expect(9000)
    upload, _ = parts.upload(key, 9000)
    fired(upload.start())
    upload.receive(b"a" * 4000)
    parts.close(upload)
    channel = RecordingChannel()
    abort = Abort(parts.services, channel, wire.AbortRequest(parts.authority.session, key))
    fired(abort.start())
    assert parts.authority.calls[-1] == ("record_discard", key)
    assert not parts.blobs.part_path(parts.authority.job, key).exists()
    assert channel.names()[-1] == "accepted_abort"
    abort.release()
    assert fired(parts.registry.is_held(key)) is False


def test_batch_stores_its_items_and_records_them_at_once(parts):
    """A batch: accepted, items streamed, then all published and recorded in one call; one result line each."""
    items = [b"first file", b"second, longer file"]
    keys = [parts.authority.expect(len(d)) for d in items]
    channel = RecordingChannel()
    batch = BatchUpload(parts.services, channel, wire.BatchRequest(parts.authority.session, len(items)))
    fired(batch.start())
    assert channel.names() == ["authorized", "accepted_batch", "expect_within"]
    assert batch.header_pending()
    for key, data in zip(keys, items):
        assert batch.item(wire.BatchItem(key, len(data), digest_of(data))) is None
        batch.receive(data)
    assert not batch.header_pending()
    fired(batch.finish(None))
    assert parts.authority.calls[-1] == ("record_batch", keys)
    (_, lines), = [c for c in channel.calls if c[0] == "batch_results"]
    assert [type(line) for line in lines] == [wire.ItemStored, wire.ItemStored]
    for key, data in zip(keys, items):
        assert parts.blobs.final_path(parts.authority.job, key).read_bytes() == data
    parts.close(batch)
    assert parts.services.batch_tags == set()


def test_batch_refuses_an_item_the_disk_cannot_hold(tmp_path):
    """An item beyond the room the batch was given asks the disk again, and is refused with no-space."""
    parts = Parts(tmp_path, Limits(disk_reserve=0))
    parts.blobs.free_bytes = lambda: 100
    key = parts.authority.expect(500)
    channel = RecordingChannel()
    batch = BatchUpload(parts.services, channel, wire.BatchRequest(parts.authority.session, 1))
    fired(batch.start())
    d = batch.item(wire.BatchItem(key, 500, "0" * 64))
    assert d is not None and fired(d) is None
    assert channel.calls[-1] == ("refused", ErrorCode.NO_SPACE)
    parts.close(batch)
    assert parts.stats.uploads_failed["disconnected"] == 1


# ---------------------------------------------------------------- the connection as their channel


@pytest.fixture
def errors_logged():
    """Every log event at ERROR or CRITICAL (log.failure) while the test runs."""
    from twisted.logger import LogLevel, globalLogPublisher

    events = []

    def observe(event):
        if event.get("log_level") in (LogLevel.critical, LogLevel.error):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def connect(tmp_path: Path):
    from tests.unit.test_dataport import Harness

    h = Harness(tmp_path)
    proto, transport = h.connect()
    return h, proto, transport


def test_a_2007_upload_finished_when_its_client_closes_says_nothing_and_logs_no_failure(tmp_path, errors_logged):
    """The legacy dialect finishes after the peer is gone: recorded complete, no reply attempted, no error."""
    from filedock.server.dataport import Lifecycle

    h, proto, transport = connect(tmp_path)
    data = b"legacy" * 1000
    key = h.app.expect_file(h.job, "l", len(data))
    proto.dataReceived(f"{h.session} {key} {len(data)}\r\n".encode() + data)
    assert proto.phase is Lifecycle.TRANSFERRING
    h.close(proto, transport)
    assert h.app.files[key].complete
    assert transport.value() == b""
    assert proto.phase is Lifecycle.CLOSED and proto.released.called
    assert not errors_logged


def test_the_connection_lifecycle_runs_request_to_closed(tmp_path):
    """AWAITING_REQUEST (counted as unauthenticated) -> TRANSFERRING -> FINISHING/ENDING -> LOST -> CLOSED,
    and the status view and the registry are empty once it closed."""
    from filedock.server.dataport import Lifecycle

    h, proto, transport = connect(tmp_path)
    assert proto.phase is Lifecycle.AWAITING_REQUEST and h.factory.unauthenticated_count == 1
    data = b"v" * 5000
    key = h.app.expect_file(h.job, "v", len(data))
    proto.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode())
    assert proto.phase is Lifecycle.TRANSFERRING and h.factory.unauthenticated_count == 0
    assert [u["size"] for u in h.factory.active_uploads()] == [len(data)]
    proto.dataReceived(data + f"DONE {digest_of(data)}\r\n".encode())
    assert proto.phase is Lifecycle.ENDING
    assert transport.value().split(b"\r\n")[1].startswith(b"STORED 5000 ")
    h.close(proto, transport)
    assert proto.phase is Lifecycle.CLOSED
    assert h.factory.active_uploads() == []
    assert fired(h.factory.registry.is_held(key)) is False


def test_the_factory_takes_another_registry(tmp_path):
    """Upload ownership is whatever IUploadRegistry the factory is given: the requests ask it, not the factory."""
    from tests.unit.test_dataport import load_example
    from filedock.server.dataport import DataPortFactory

    class Counting(InProcessUploadRegistry):
        acquired = 0

        def acquire(self, *args):
            Counting.acquired += 1
            return super().acquire(*args)

    app = load_example().AppSessions()
    registry = Counting()
    factory = DataPortFactory(app, BlobStore(tmp_path), Limits(disk_reserve=0), MemoryReactorClock(),
                              run_blocking=lambda fn, *a: defer.maybeDeferred(fn, *a), registry=registry)
    job = str(uuid.uuid4())
    session, key = app.open_session(job), app.expect_file(job, "r", 10)
    from twisted.internet.testing import StringTransport

    proto, transport = factory.buildProtocol(None), StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(f"FILEDOCK/1 PUT {session} {key} 10\r\n".encode())
    assert transport.value() == b"OFFSET 0\r\n"
    assert Counting.acquired == 1 and fired(registry.is_held(key)) is True
