"""Review findings, each driven through the data port on a memory reactor (or the piece it is about).

Every test here failed before its fix: deleting a job forgot partials before the delete
committed, a closed session left its downloads running, dead 2007 waiters recursed, a stalled
download never timed out, the sweeper deleted before resetting the record, a resume's space was
promised only after its partial opened, and a short secret file was used as is.
"""

from __future__ import annotations

import os
import types

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from filedock import wire
from filedock.client.retry import RetryPolicy
from filedock.client.twisted import upload as tx_upload

from filedock.config import Limits
from filedock.errors import ErrorCode, FiledockError
from filedock.server.registry import InProcessUploadRegistry
from filedock.server.service import FiledockServer, _StoreTellingTheDataPort
from filedock.store.blobs import BlobStore
from filedock.store.sqlite import load_secret
from tests.unit.test_dataport import Harness, digest_of


def upload_complete(h: Harness, name: str, data: bytes) -> str:
    key = h.app.expect_file(h.job, name, len(data))
    p, t = h.connect()
    p.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode() + data
                   + f"DONE {digest_of(data)}\r\n".encode())
    h.close(p, t)
    assert h.app.files[key].complete, t.value()[:200]
    return key


# -- 1. deleting a job


class _DeleteFails:
    """A store whose delete does not commit (a full disk)."""

    def delete_job(self, job_id):
        return defer.fail(FiledockError(ErrorCode.NO_SPACE, "the disk is full"))


class _DeleteCommits:
    def delete_job(self, job_id):
        return defer.succeed([])


def test_failed_job_delete_keeps_uploads_partials(tmp_path):
    """A delete that fails (no space) interrupts the job's uploads with ``gone`` but forgets nothing:
    the partial stays on disk and its record keeps claiming exactly those bytes."""
    h = Harness(tmp_path)
    data = os.urandom(300_000)
    key = h.app.expect_file(h.job, "f", len(data))
    p, t = h.connect()
    p.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode() + data[:100_000])
    failed = _StoreTellingTheDataPort(_DeleteFails(), h.factory).delete_job(h.job)
    errors = []
    failed.addErrback(errors.append)
    assert errors and errors[0].value.code is ErrorCode.NO_SPACE
    assert b"gone" in t.value()
    h.close(p, t)
    assert h.blobs.part_path(h.job, key).stat().st_size == 100_000
    assert h.app.files[key].received == 100_000


def test_committed_job_delete_forgets_uploads_partials(tmp_path):
    """Once the delete committed, what the interrupted upload left is forgotten."""
    h = Harness(tmp_path)
    data = os.urandom(300_000)
    key = h.app.expect_file(h.job, "f", len(data))
    p, t = h.connect()
    p.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode() + data[:100_000])
    _StoreTellingTheDataPort(_DeleteCommits(), h.factory).delete_job(h.job)
    h.close(p, t)
    assert not h.blobs.part_path(h.job, key).exists()


def test_upload_interrupted_by_a_job_delete_settles_quietly_when_its_directory_is_gone(tmp_path):
    """Interrupted by a delete that then commits and removes the job's directory before the upload
    checkpointed: the upload settles with nothing kept and nothing logged as a failure."""
    import shutil

    errors = []

    def observe(event):
        if event.get("log_level") in (LogLevel.critical, LogLevel.error) or event.get("log_failure"):
            errors.append(event)

    h = Harness(tmp_path)
    data = os.urandom(300_000)
    key = h.app.expect_file(h.job, "f", len(data))
    p, t = h.connect()
    p.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode() + data[:100_000])
    deleting = defer.Deferred()
    store = types.SimpleNamespace(delete_job=lambda job_id: deleting)
    _StoreTellingTheDataPort(store, h.factory).delete_job(h.job)
    shutil.rmtree(h.blobs.job_dir(h.job))  # the API removes the directory once the delete committed
    globalLogPublisher.addObserver(observe)
    try:
        h.close(p, t)
        deleting.callback([])
    finally:
        globalLogPublisher.removeObserver(observe)
    assert p.released.called
    assert not errors


# -- 2. closing a session


def test_end_session_ends_its_downloads(tmp_path):
    """docs/protocol.md: a closed session ends its connections; a download is one of them."""
    h = Harness(tmp_path)
    key = upload_complete(h, "d", os.urandom(300_000))
    p, t = h.connect()
    p.dataReceived(f"FILEDOCK/1 GET {h.session} {key} 0\r\n".encode())
    assert h.factory.end_session(h.session) == 1
    assert t.disconnecting


# -- 3. dead 2007 waiters


def test_many_dead_legacy_waiters_are_all_released(tmp_path):
    """400 2007 uploads wait for their session's one slot and their clients go away; when the slot
    frees, every one is released, without a RecursionError (the slot was passed on recursively)."""
    errors = []

    def observe(event):
        if event.get("log_level") in (LogLevel.critical, LogLevel.error) or event.get("log_failure"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        h = Harness(tmp_path, Limits(disk_reserve=0, max_connections_per_session=1))
        data = os.urandom(1000)
        k0 = h.app.expect_file(h.job, "holder", len(data))
        p0, t0 = h.connect()
        p0.dataReceived(f"{h.session} {k0} {len(data)}\r\n".encode())
        waiters = []
        for i in range(400):
            k = h.app.expect_file(h.job, f"w{i}", len(data))
            p, t = h.connect()
            p.dataReceived(f"{h.session} {k} {len(data)}\r\n".encode())
            waiters.append((p, t))
        for p, t in waiters:
            h.close(p, t)
        h.close(p0, t0)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert sum(1 for p, _ in waiters if p.released.called) == 400
    assert not errors
    assert h.factory.registry.session_slots(h.session) == 0


def test_pass_slot_on_skips_cancelled_waiters():
    """A cancelled waiter is skipped; the slot goes to the next live one."""
    registry = InProcessUploadRegistry()
    claim = registry.acquire("f0", "s", 1, lambda: None).result
    dead = registry.wait_for_slot("s", "f1", 1)
    dead.addErrback(lambda f: None)
    live = registry.wait_for_slot("s", "f2", 1)
    dead.cancel()
    registry.release(claim)
    assert live.called


# -- 4. a stalled download


def test_download_whose_client_stops_reading_times_out(tmp_path):
    """A download's stream is one step; if its producer is never pulled (the client reads nothing)
    the connection is cut after idle_timeout, while a download that makes progress is not."""
    h = Harness(tmp_path)
    key = upload_complete(h, "d", os.urandom(3_000_000))
    idle = h.factory.limits.idle_timeout
    moving, moving_t = h.connect()
    moving.dataReceived(f"FILEDOCK/1 GET {h.session} {key} 0\r\n".encode())
    stalled, stalled_t = h.connect()
    stalled.dataReceived(f"FILEDOCK/1 GET {h.session} {key} 0\r\n".encode())
    for _ in range(2):
        h.clock.advance(idle / 2)
        moving_t.producer.resumeProducing()  # the client reads a chunk
    h.clock.advance(idle / 2)
    assert stalled_t.disconnecting
    assert not moving_t.disconnecting


# -- 5. the sweeper


class _SweepStore:
    def __init__(self, record, registry, part, fail=False):
        self.record, self.registry, self.part, self.fail = record, registry, part, fail
        self.seen = None

    def stale_partials(self, cutoff):
        return defer.succeed([self.record])

    def reset_file(self, key):
        self.seen = (self.registry.is_held(key).result, self.part.exists())
        if self.fail:
            return defer.fail(FiledockError(ErrorCode.NO_SPACE, "the disk is full"))
        return defer.succeed(None)


def _sweeper(tmp_path, fail):
    blobs = BlobStore(tmp_path)
    job, key = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    part = blobs.part_path(job, key)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"x" * 1000)
    registry = InProcessUploadRegistry()
    record = types.SimpleNamespace(key=key, job_id=job, blob_name=key, received=1000)
    store = _SweepStore(record, registry, part, fail)
    dataport = types.SimpleNamespace(registry=registry, batch_tags=set(),
                                     in_thread=lambda fn, *a: defer.maybeDeferred(fn, *a))
    server = types.SimpleNamespace(limits=Limits(), store=store, dataport=dataport, blobs=blobs,
                                   _started_at=0.0, STAGING_GRACE=60.0)
    return server, store, registry, part, key


def test_sweeper_holds_the_file_and_resets_the_record_before_deleting(tmp_path):
    """The sweeper claims the file (a new upload waits), resets the record while the bytes are still
    there, then deletes them, then lets go."""
    server, store, registry, part, key = _sweeper(tmp_path, fail=False)
    assert FiledockServer.sweep(server).result == 1
    assert store.seen == (True, True)
    assert not part.exists()
    assert not registry.is_held(key).result


def test_sweeper_keeps_bytes_whose_record_could_not_be_reset(tmp_path):
    """If the record cannot go back to 0 (a full disk), the bytes it claims stay."""
    server, store, registry, part, key = _sweeper(tmp_path, fail=True)
    d = FiledockServer.sweep(server)
    errors = []
    d.addErrback(errors.append)
    assert errors and errors[0].value.code is ErrorCode.NO_SPACE
    assert part.exists()
    assert not registry.is_held(key).result


# -- 6. space promised by resumes


def test_resume_promises_its_space_before_its_partial_opens(tmp_path):
    """Two resumes whose partials open in a thread: the first's need counts as promised at once, so
    the second, which would fit alone, is refused for lack of space."""
    h = Harness(tmp_path)
    size = 1_000_000
    keys = []
    for name in ("a", "b"):
        key = h.app.expect_file(h.job, name, size)
        p, t = h.connect()
        p.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {size}\r\n".encode() + os.urandom(100_000))
        h.close(p, t)
        assert h.app.files[key].received == 100_000
        keys.append(key)
    pending = []

    def later(fn, *args):
        d = defer.Deferred()
        pending.append((d, fn, args))
        return d

    h.factory._run_blocking = later
    h.blobs.free_bytes = lambda: 1_500_000  # room for one resume's 900 000 bytes, not two
    first, first_t = h.connect()
    first.dataReceived(f"FILEDOCK/1 PUT {h.session} {keys[0]} {size}\r\n".encode())
    assert pending and h.factory.registry.promised_now() == 900_000
    second, second_t = h.connect()
    second.dataReceived(f"FILEDOCK/1 PUT {h.session} {keys[1]} {size}\r\n".encode())
    assert b"no-space" in second_t.value()


# -- 7. the Twisted client's "already complete" query


class _AbortableTransport(StringTransport):
    """A connection whose abort is seen by its protocol at once, as a reactor would report it."""

    def abortConnection(self):
        super().abortConnection()
        self.protocol.connectionLost(Failure(ConnectionLost("aborted")))


class _SilentThenAnsweringClient:
    """A TxDataPortClient stand-in: the first connection is accepted and never answered, the next
    one answers with the file's values."""

    def __init__(self, clock):
        self.reactor, self.stall_timeout, self.policy = clock, 5.0, RetryPolicy(3, 0.5)
        self.runs = 0

    def run(self, exchange):
        self.runs += 1
        if self.runs > 1:
            return defer.succeed(wire.Stored(10, 1, "d" * 64))
        transport = _AbortableTransport()
        transport.protocol = exchange
        exchange.makeConnection(transport)
        return exchange.result


def test_twisted_client_query_of_a_complete_file_is_stall_watched_and_retried():
    """The query for an already complete file's values is dropped after ``stall_timeout`` when the
    server never answers, and asked again on a new connection (as the blocking client does)."""
    clock = Clock()
    client = _SilentThenAnsweringClient(clock)
    d = defer.ensureDeferred(tx_upload._stored_values(client, "peer", "s", "f", 10))
    for _ in range(20):
        clock.advance(1.0)
    assert client.runs == 2
    assert d.result == wire.Stored(10, 1, "d" * 64)


# -- 8. the secret file


@pytest.mark.parametrize("content", ["", "00" * 16, "00" * 33, "not hex at all"])
def test_load_secret_refuses_a_secret_of_the_wrong_length(tmp_path, content):
    """A secret file that does not hold exactly 32 bytes (in hex) is refused with a message that
    names the file and what to do, instead of deriving every file key from it."""
    path = tmp_path / "filedock.secret"
    path.write_text(content + "\n")
    with pytest.raises(ValueError) as excinfo:
        load_secret(path)
    assert str(path) in str(excinfo.value) and "delete it" in str(excinfo.value)


def test_load_secret_reads_back_the_secret_it_made(tmp_path):
    path = tmp_path / "filedock.secret"
    made = load_secret(path)
    assert len(made) == 32 and load_secret(path) == made


# -- dead code and clean-up


def test_run_fsck_closes_the_blob_store_it_made(tmp_path, monkeypatch):
    """fsck's BlobStore makes its own work queue: run_fsck stops it (close) before returning."""
    from filedock import fsck

    closed = []

    class Recording(BlobStore):
        def close(self):
            closed.append(self)
            super().close()

    from filedock.store import blobs as blobs_module

    # open_blob_store (the --blobs URL's store) builds the data dir's store from its module
    monkeypatch.setattr(blobs_module, "BlobStore", Recording)
    monkeypatch.setattr(fsck, "BlobStore", Recording)
    fsck.run_fsck(tmp_path / "data")
    assert len(closed) == 1
