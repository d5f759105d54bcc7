"""BatchWriter on a real directory: staging lanes, backpressure, errors, publish and discard."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from filedock.digest import ContentHasher
from filedock.store import blobs as blobs_module
from filedock.store.blobs import BlobStore
from filedock.store.work_queue import WorkQueue


class HeldPool(WorkQueue):
    """A work queue whose work waits until ``release``; after that it runs at once."""

    def __init__(self) -> None:
        super().__init__(threads=1)
        self.held: list = []
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


def digest_of(data: bytes) -> str:
    h = ContentHasher()
    h.update(data)
    return h.hexdigest()


def staged(root) -> list:
    return sorted(p.name for p in (root / "staging").glob("*/*"))


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "data")


def test_files_spread_over_lanes_then_publish_into_the_job(store):
    """Each file lands in the next lane's staging directory; publish renames them into the job's
    directory with the right bytes and leaves nothing staged."""
    job = str(uuid.uuid4())
    batch = store.open_batch(job)
    datas = {str(uuid.uuid4()): os.urandom(1000 + i) for i in range(10)}
    for key, data in datas.items():
        batch.begin(key, len(data), digest_of(data))
        batch.write(data[:500])
        batch.write(data[500:])
    entries = batch.seal()
    lanes = [e.temp.parent.name for e in entries]
    assert lanes == [str(i % BlobStore.STAGING_LANES) for i in range(10)]
    assert len(staged(store.root)) == 10
    assert [e.digest for e in entries] == [digest_of(d) for d in datas.values()]
    batch.publish(entries[:7])
    for key, data in list(datas.items())[:7]:
        assert store.final_path(job, key).read_bytes() == data
    assert not staged(store.root)
    assert sorted(p.name for p in store.job_dir(job).iterdir()) == sorted(list(datas)[:7])


def test_publish_removes_an_older_partial_of_the_same_file(store):
    job, key = str(uuid.uuid4()), str(uuid.uuid4())
    store.job_dir(job).mkdir(parents=True)
    store.part_path(job, key).write_bytes(b"old")
    store.blocks_path(job, key).write_bytes(b"")
    batch = store.open_batch(job)
    batch.begin(key, 3, digest_of(b"new"))
    batch.write(b"new")
    batch.publish(batch.seal())
    assert sorted(p.name for p in store.job_dir(job).iterdir()) == [key]


def test_write_asks_for_a_pause_past_high_water_and_drain_says_when_to_go_on(store, monkeypatch):
    """While the pool has not run, queued bytes pile up: write answers True past HIGH_WATER; once the
    pool catches up below LOW_WATER, on_drain is called once, and the bytes are all on disk."""
    pool = HeldPool()
    store = BlobStore(store.root, pool)
    batch = store.open_batch(str(uuid.uuid4()))
    batch.HIGH_WATER, batch.LOW_WATER = 100_000, 10_000
    drained = []
    batch.on_drain = lambda: drained.append(True)
    key, chunk = str(uuid.uuid4()), os.urandom(30_000)
    batch.begin(key, 4 * len(chunk), digest_of(chunk * 4))
    answers = [batch.write(chunk) for _ in range(4)]
    assert answers == [False, False, False, True]
    assert not drained and not staged(store.root)  # nothing done yet, not even the create
    pool.release()
    assert drained == [True]
    (entry,) = batch.seal()
    assert entry.digest == digest_of(chunk * 4)
    batch.discard()
    assert not staged(store.root)


def test_a_write_error_surfaces_on_the_next_call_and_discard_cleans_up(store):
    """A lane that cannot create its file (its directory replaced by a file) records the error: the next
    begin or write raises it, seal raises it, and discard still removes what was made."""
    lane = store.staging[1]
    lane.rmdir()
    lane.write_bytes(b"not a directory")
    batch = store.open_batch(str(uuid.uuid4()))
    batch.begin(str(uuid.uuid4()), 3, digest_of(b"abc"))  # lane 0: fine
    batch.write(b"abc")
    batch.begin(str(uuid.uuid4()), 3, digest_of(b"def"))  # lane 1: cannot be created
    batch.write(b"def")
    with pytest.raises(OSError):
        batch.seal()
    with pytest.raises(OSError):
        batch.begin(str(uuid.uuid4()), 1, digest_of(b"x"))
    batch.discard()
    assert not list(store.staging[0].iterdir())
    assert all(e.fd == -1 for e in batch.entries)


def test_discard_mid_stream_waits_for_the_lanes(store):
    """Discarding while lanes still hold work: no descriptor stays open, no staging file stays."""
    batch = store.open_batch(str(uuid.uuid4()))
    for i in range(40):
        data = os.urandom(20_000)
        batch.begin(str(uuid.uuid4()), len(data), digest_of(data))
        batch.write(data)
    before = len(os.listdir("/proc/self/fd"))
    done = threading.Event()
    threading.Thread(target=lambda: (batch.discard(), done.set())).start()
    assert done.wait(10)
    assert not staged(store.root)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_sweep_staging_keeps_active_and_recent_files(store):
    old, active, recent = (store.staging[0] / f"{tag}-0" for tag in ("a" * 12, "b" * 12, "c" * 12))
    for path in (old, active, recent):
        path.write_bytes(b"x")
    os.utime(old, (1000, 1000))
    os.utime(active, (1000, 1000))
    assert store.sweep_staging({"b" * 12}, older_than=2000) == 1
    assert staged(store.root) == [active.name, recent.name]


def test_without_syncfs_each_file_is_fsynced(store, monkeypatch):
    """Where syncfs is not to be trusted (old kernels, not Linux) seal fsyncs every file instead."""
    from filedock import durability

    synced = []
    monkeypatch.setattr(durability, "sync_filesystem", lambda fd: False)
    monkeypatch.setattr(blobs_module.os, "fsync", lambda fd: synced.append(fd))
    batch = store.open_batch(str(uuid.uuid4()))
    for i in range(5):
        batch.begin(str(uuid.uuid4()), 1, digest_of(b"x"))
        batch.write(b"x")
    batch._wait_lanes()
    fds = [e.fd for e in batch.entries]
    batch.seal()
    assert sorted(synced) == sorted(fds)


def test_with_syncfs_one_call_covers_the_batch(store, monkeypatch):
    from filedock import durability

    calls = []
    monkeypatch.setattr(durability, "sync_filesystem", lambda fd: calls.append(fd) or True)
    monkeypatch.setattr(blobs_module.os, "fsync", lambda fd: pytest.fail("no per-file fsync after syncfs"))
    batch = store.open_batch(str(uuid.uuid4()))
    for i in range(5):
        batch.begin(str(uuid.uuid4()), 1, digest_of(b"x"))
        batch.write(b"x")
    batch.seal()
    assert len(calls) == 1


def test_sync_filesystem_reports_errors():
    from filedock import durability

    fd = os.open("/", os.O_RDONLY)
    try:
        if not durability.sync_filesystem(fd):
            pytest.skip("syncfs is not used on this kernel (before Linux 5.17, or not Linux)")
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        durability.sync_filesystem(-1)


class StepPool(WorkQueue):
    """A work queue that gives one strand in line its turn per ``step()``, as a queue thread would."""

    def __init__(self) -> None:
        super().__init__(threads=1)
        self.queue: list = []

    def _schedule(self, strand):
        self.queue.append(strand)

    def step(self):
        strand = self.queue.pop(0)
        if strand._service(strand.quantum):
            self.queue.append(strand)
        return (strand,)


def test_pool_threads_take_turns_between_batches(store, monkeypatch):
    """Two batches with 8 MiB queued each: a pool thread does about SERVICE_BYTES of one batch's lane and
    then lets the other batch's lane go first, instead of draining one lane while the other waits."""
    pool = StepPool()
    store = BlobStore(store.root, pool)
    a, b = store.open_batch(str(uuid.uuid4())), store.open_batch(str(uuid.uuid4()))
    chunk = os.urandom(1 << 20)
    for batch in (a, b):
        batch.begin(str(uuid.uuid4()), 8 * len(chunk), digest_of(chunk * 8))
        for _ in range(8):
            batch.write(chunk)
    served = []
    while pool.queue:
        (strand,) = pool.step()
        served.append("a" if strand in [lane.strand for lane in a._lanes] else "b")
    assert served[:4] == ["a", "b", "a", "b"]
    assert served.count("a") >= 8 and served.count("b") >= 8
    for batch in (a, b):
        (entry,) = batch.seal()
        assert entry.digest == digest_of(chunk * 8)
        batch.discard()


def test_seal_of_a_finished_batch_needs_no_pool_thread(store, monkeypatch):
    """Once every lane is idle, seal and discard wait for nothing: no pool work is queued for them."""
    pool = StepPool()
    store = BlobStore(store.root, pool)
    batch = store.open_batch(str(uuid.uuid4()))
    batch.begin(str(uuid.uuid4()), 3, digest_of(b"abc"))
    batch.write(b"abc")
    while pool.queue:
        pool.step()
    batch.seal()
    assert pool.queue == []
    batch.discard()
    assert pool.queue == []
