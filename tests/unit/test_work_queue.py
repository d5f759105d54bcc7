"""The work queue the blob store's writers share: order per strand, fairness by bytes, stop, the
inline double, and the flow control both writers share."""

from __future__ import annotations

import os
import threading
import uuid
import zlib

import pytest

from filedock.digest import ContentHasher
from filedock.store.blobs import BlobStore, FlowControl, PartialWriter
from filedock.store.work_queue import InlineWorkQueue, WorkQueue


def digest_of(data: bytes) -> str:
    h = ContentHasher()
    h.update(data)
    return h.hexdigest()


class RecordingQueue(WorkQueue):
    """A real queue that notes every strand handed to its threads (who asked it for work)."""

    def __init__(self) -> None:
        super().__init__(threads=2)
        self.scheduled = []

    def _schedule(self, strand):
        self.scheduled.append(strand)
        super()._schedule(strand)


class HeldQueue(WorkQueue):
    """Work waits until ``release``; after that it runs at once on the caller's thread."""

    def __init__(self) -> None:
        super().__init__(threads=1)
        self.held = []
        self.running = False

    def _schedule(self, strand):
        if self.running:
            strand._service(None)
        else:
            self.held.append(strand)

    def release(self) -> None:
        self.running = True
        while self.held:
            self.held.pop(0)._service(None)


@pytest.fixture
def work():
    q = WorkQueue(threads=4)
    yield q
    q.stop()


def test_a_strand_runs_its_items_in_order_one_at_a_time(work):
    """Four threads and one strand of 2,000 items: they run in the order put, never two at once."""
    seen, active, overlap = [], [0], []

    def run(i):
        active[0] += 1
        if active[0] > 1:
            overlap.append(i)
        seen.append(i)
        active[0] -= 1

    strand = work.strand(run, quantum=10)
    for i in range(2000):
        strand.put(i, 1)
    strand.wait()
    assert seen == list(range(2000))
    assert overlap == []


def test_strands_take_turns_by_bytes_on_one_thread():
    """One thread, two strands with 8 MiB each and a 2 MiB quantum: each runs about 2 MiB, then the
    other goes first, instead of one strand draining while the other waits."""
    q = WorkQueue(threads=1, quantum=2 << 20)
    gate, order = threading.Event(), []
    try:
        blocker = q.strand(lambda _: gate.wait(5))
        blocker.put(None)  # holds the only thread while the line fills up
        a, b = q.strand(order.append), q.strand(order.append)
        for _ in range(8):
            a.put("a", 1 << 20)
            b.put("b", 1 << 20)
        gate.set()
        a.wait()
        b.wait()
    finally:
        q.stop()
    assert "".join(order) == "aabbaabbaabbaabb"


def test_wait_sees_exactly_the_work_put_before_it(work):
    """``wait(capture)`` returns ``capture()`` taken after the earlier items and before later ones."""
    total, release = [0], threading.Event()
    strand = work.strand(lambda n: (release.wait(5), total.__setitem__(0, total[0] + n)))
    strand.put(1)
    strand.put(2)
    result = []
    waiter = threading.Thread(target=lambda: result.append(strand.wait(lambda: total[0])))
    waiter.start()
    while len(strand._items) < 2:  # the mark is in line behind item 2
        pass
    strand.put(100)
    release.set()
    waiter.join(5)
    assert result == [3]
    strand.wait()
    assert total[0] == 103


def test_waiting_on_an_idle_strand_needs_no_thread():
    """A queue no one gave work to starts no thread, even when asked to wait."""
    q = WorkQueue(threads=4)
    strand = q.strand(lambda _: None)
    assert strand.wait(lambda: "now") == "now"
    assert q._threads == []
    q.stop()


def test_stop_lets_queued_work_finish_then_runs_late_work_inline():
    """``stop`` returns once every queued item ran and the threads are gone; an item put afterwards
    (a writer closed late) still runs, on the caller's thread."""
    q = WorkQueue(threads=2, quantum=1)
    ran, threads = [], set()

    def run(i):
        ran.append(i)
        threads.add(threading.current_thread().name)

    strands = [q.strand(run) for _ in range(3)]
    for i in range(300):
        strands[i % 3].put(i, 1)
    q.stop()
    assert sorted(ran) == list(range(300))
    assert not any(t.is_alive() for t in q._threads)
    threads.clear()
    strands[0].put("late")
    assert ran[-1] == "late" and threads == {threading.current_thread().name}
    assert q.stopped


def test_run_each_runs_everything_then_raises_the_first_error(work):
    """Every item runs even if one fails; the error comes after all of them (no descriptor in use)."""
    done = []

    def fn(i):
        if i == 3:
            raise OSError(5, "I/O error")
        done.append(i)

    with pytest.raises(OSError):
        work.run_each(fn, range(10))
    assert sorted(done) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_a_failing_item_does_not_stop_its_strand(work, caplog):
    """An exception escaping ``run`` (a bug) is logged; the items after it still run."""
    seen = []

    def run(i):
        if i == 1:
            raise RuntimeError("bug")
        seen.append(i)

    strand = work.strand(run)
    for i in range(3):
        strand.put(i)
    strand.wait()
    assert seen == [0, 2]
    assert "work item failed" in caplog.text


def test_inline_queue_runs_each_item_on_the_callers_thread_as_it_is_put():
    q = InlineWorkQueue()
    seen = []
    strand = q.strand(lambda i: seen.append((i, threading.current_thread())))
    strand.put(1)
    assert seen == [(1, threading.current_thread())]
    assert q._threads == []


def test_the_store_hands_its_writers_the_queue_it_was_given(tmp_path):
    """Partial and batch writers do their disk work on the store's queue, not on one of their own."""
    q = RecordingQueue()
    store = BlobStore(tmp_path, q)
    job = str(uuid.uuid4())
    w = store.open_partial(job, str(uuid.uuid4()), 0, 0, None)
    data = os.urandom(PartialWriter.INLINE_BYTES + 1000)
    w.write(data[:PartialWriter.INLINE_BYTES])
    assert q.scheduled == []  # the inline phase needs no queue
    w.write(data[PartialWriter.INLINE_BYTES:])
    assert q.scheduled == [w._strand]
    assert w.finish(digest_of(data))[1] == digest_of(data)
    batch = store.open_batch(job)
    batch.begin(str(uuid.uuid4()), 3, digest_of(b"abc"))
    batch.write(b"abc")
    assert q.scheduled[1] is batch._lanes[0].strand
    batch.publish(batch.seal())
    store.close()  # not ours to stop
    assert not q.stopped
    q.stop()


def test_a_store_without_a_queue_makes_one_and_close_stops_it(tmp_path):
    store = BlobStore(tmp_path)
    assert isinstance(store.work_queue, WorkQueue) and not store.work_queue.stopped
    store.close()
    assert store.work_queue.stopped


@pytest.mark.parametrize("direct_io", [False, True])
def test_inline_store_writes_past_the_inline_phase_on_the_callers_thread(tmp_path, direct_io):
    """With ``InlineWorkQueue`` every byte is on disk when ``write`` returns: nothing to wait for (through
    O_DIRECT too, where the filesystem has it: a writer that has caught up writes what it holds, and
    3 MiB leaves no unaligned rest)."""
    store = BlobStore(tmp_path, InlineWorkQueue(), direct_io=direct_io)
    job, key = str(uuid.uuid4()), str(uuid.uuid4())
    w = store.open_partial(job, key, 0, 0, None)
    data = os.urandom(3 * PartialWriter.INLINE_BYTES)
    for i in range(0, len(data), 65536):
        assert w.write(data[i:i + 65536]) is False
    assert os.pread(w._fd, len(data), 0) == data
    assert w.hasher.offset == len(data)
    assert w.snapshot() == (len(data), zlib.crc32(data))
    w.finish(digest_of(data))
    assert store.final_path(job, key).read_bytes() == data


@pytest.mark.parametrize("kind", ["partial", "batch"])
def test_flow_control_is_the_same_for_both_writers(tmp_path, kind):
    """Both writers: write answers True once more than HIGH_WATER bytes wait and keeps answering True
    until the queue brings them down to LOW_WATER; then on_drain is called once."""
    q = HeldQueue()
    store = BlobStore(tmp_path, q)
    job = str(uuid.uuid4())
    chunk = os.urandom(30_000)
    if kind == "partial":
        writer = store.open_partial(job, str(uuid.uuid4()), 0, 0, None)
        writer.write(os.urandom(PartialWriter.INLINE_BYTES))  # past the inline phase
    else:
        writer = store.open_batch(job)
        writer.begin(str(uuid.uuid4()), 5 * len(chunk), digest_of(chunk * 5))
    assert isinstance(writer, FlowControl)
    writer.HIGH_WATER, writer.LOW_WATER = 100_000, 10_000
    drained = []
    writer.on_drain = lambda: drained.append(True)
    answers = [writer.write(chunk) for _ in range(5)]
    assert answers == [False, False, False, True, True]
    assert drained == []
    q.release()
    assert drained == [True]
    assert writer.write(b"x") is False


def test_a_queue_that_drains_at_once_never_leaves_the_caller_paused(tmp_path):
    """A chunk bigger than HIGH_WATER on an inline queue: written (and drained) before write returns,
    so write answers False; a True there would wait for an on_drain that already happened."""
    store = BlobStore(tmp_path, InlineWorkQueue())
    batch = store.open_batch(str(uuid.uuid4()))
    batch.HIGH_WATER, batch.LOW_WATER = 1000, 100
    drained = []
    batch.on_drain = lambda: drained.append(True)
    batch.begin(str(uuid.uuid4()), 5000, digest_of(b"y" * 5000))
    assert batch.write(b"y" * 5000) is False
    assert drained == [True]
    batch.discard()


def test_the_server_makes_the_queue_hands_it_to_the_blob_store_and_stops_it_at_shutdown(tmp_path):
    """The server, not an import, creates the work queue; its blob store uses that one; the queue
    stops after the reactor's shutdown (after the reactor's threads, which may still be writing)."""
    from twisted.internet.testing import MemoryReactorClock

    from filedock.server.service import FiledockServer, ServerOptions

    reactor = MemoryReactorClock()
    server = FiledockServer(ServerOptions(data_dir=str(tmp_path), umask=None), reactor=reactor)
    try:
        assert server.blobs.work_queue is server.work_queue
        assert not server.work_queue.stopped
        assert (server.work_queue.stop, (), {}) in reactor.triggers["after"]["shutdown"]
    finally:
        for phase in ("before", "during", "after"):  # as the reactor would at shutdown
            for fn, args, kwargs in reactor.triggers.get(phase, {}).get("shutdown", []):
                if phase != "before":  # "before" is drain(), which needs a started server
                    fn(*args, **kwargs)
        server.sqlite.close()
    assert server.work_queue.stopped
