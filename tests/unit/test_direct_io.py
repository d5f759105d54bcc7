"""Large partials written through O_DIRECT (``store/direct_io.py``, ``PartialWriter``), on a real disk.

What must hold whatever the chunking: the file holds exactly the bytes sent, the digest and CRC-32 are
the reference ones, a checkpoint leaves the file exactly ``offset`` bytes long with those bytes, a
resume may start anywhere, and a filesystem or device that refuses O_DIRECT (at open, or with EINVAL
at a write) is written the ordinary way. After a failed write the writer's offset and CRC-32 still
describe what the file holds.
"""

from __future__ import annotations

import errno
import os
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filedock.digest import ContentHasher
from filedock.errors import ErrorCode, FiledockError
from filedock.store import direct_io
from filedock.store.blobs import BlobStore, PartialWriter
from filedock.store.blobstore import open_blob_store
from filedock.store.work_queue import InlineWorkQueue

SOURCE = os.urandom(24 << 20)
O_DIRECT = getattr(os, "O_DIRECT", 0)


def new_key() -> str:
    return str(uuid.uuid4())


def digest_of(data: bytes) -> str:
    hasher = ContentHasher()
    hasher.update(data)
    return hasher.hexdigest()


def direct_supported(directory: Path) -> bool:
    probe = directory / "o-direct-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o600) if O_DIRECT else -1
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    if fd < 0:
        return False
    os.close(fd)
    return True


@pytest.fixture
def disk(tmp_path) -> Path:
    """A directory on a filesystem with O_DIRECT (the data dir's usual case)."""
    if not direct_supported(tmp_path):
        pytest.skip("the filesystem under the test's temporary directory has no O_DIRECT (e.g. tmpfs "
                    "before Linux 6.6): the writer's fallback is tested separately")
    return tmp_path


def open_fds_with_direct(path: Path) -> int:
    """How many of this process's descriptors on ``path`` were opened with O_DIRECT (from /proc)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            continue
        if flags & O_DIRECT:
            count += 1
    return count


def write_in(writer: PartialWriter, data: bytes, sizes: list[int]) -> None:
    view = memoryview(data)
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        writer.write(view[pos:pos + n])
        pos += n
        i += 1


def test_a_large_upload_is_written_through_o_direct_and_is_exact(disk):
    """Past the inline MiB the partial has an O_DIRECT descriptor; the published file and digest are the reference."""
    blobs = BlobStore(disk / "data")
    job, key = new_key(), new_key()
    data = SOURCE[:13 * (1 << 20) + 1234]
    writer = blobs.open_partial(job, key, 0, 0, None)
    write_in(writer, data[:6 << 20], [65536, 1 << 20, 12345])
    writer.snapshot()  # the strand has run: the appender is open
    assert open_fds_with_direct(writer.part) == 1
    write_in(writer, data[6 << 20:], [1 << 20, 777, 300000])
    assert writer.finish(digest_of(data)) == (zlib.crc32(data), digest_of(data))
    assert open_fds_with_direct(writer.part) == 0  # closed with the writer
    assert blobs.final_path(job, key).read_bytes() == data
    blobs.close()


def test_direct_io_off_never_opens_o_direct(disk):
    """``BlobStore(direct_io=False)`` (``--blobs file:///dir?direct_io=off``) writes through the page cache only."""
    blobs = BlobStore(disk / "data", direct_io=False)
    job, key = new_key(), new_key()
    data = SOURCE[:9 << 20]
    writer = blobs.open_partial(job, key, 0, 0, None)
    write_in(writer, data, [1 << 20])
    writer.snapshot()
    assert open_fds_with_direct(writer.part) == 0
    assert writer.finish(digest_of(data))[1] == digest_of(data)
    assert blobs.final_path(job, key).read_bytes() == data
    blobs.close()


def test_each_checkpoint_leaves_exactly_the_offset_on_disk_and_a_resume_goes_on_from_it(disk):
    """Checkpoints between direct writes (unaligned offsets): size, bytes and CRC-32 are the offset's;
    a writer opened again at such an offset (unaligned) finishes the file exactly."""
    blobs = BlobStore(disk / "data")
    job, key = new_key(), new_key()
    data = SOURCE[:20 * (1 << 20) + 99]
    writer = blobs.open_partial(job, key, 0, 0, None)
    cuts = [(3 << 20) + 5, (7 << 20) + 4096, (7 << 20) + 4097, (11 << 20) + 1]
    pos = 0
    for cut in cuts:
        write_in(writer, data[pos:cut], [1 << 20, 4095])
        pos = cut
        cp = writer.checkpoint()
        assert cp.offset == cut and cp.crc32 == zlib.crc32(data[:cut])
        assert os.stat(writer.part).st_size == cut
        assert writer.part.read_bytes() == data[:cut]
    writer.close()
    resumed = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    assert not resumed.needs_record and resumed.offset == cuts[-1]
    write_in(resumed, data[pos:], [999999, 1 << 20])
    assert resumed.finish(digest_of(data)) == (zlib.crc32(data), digest_of(data))
    assert blobs.final_path(job, key).read_bytes() == data
    blobs.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(st.integers(1, 40000), st.just(0)), min_size=1, max_size=25),
       start=st.integers(0, 9000))
def test_any_chunking_and_checkpoints_give_the_exact_file(tmp_path, monkeypatch, ops, start):
    """Small buffer (16 KiB), no inline phase, writes of any size, checkpoints (0) anywhere, a start at any
    offset: after each checkpoint the file is the prefix; at the end the file and the digest are exact."""
    if not direct_supported(tmp_path):
        pytest.skip("no O_DIRECT under the test's temporary directory")
    monkeypatch.setattr(direct_io.DirectAppender, "SIZE", 16384)
    monkeypatch.setattr(PartialWriter, "INLINE_BYTES", 0)
    blobs = BlobStore(tmp_path / f"d-{uuid.uuid4().hex}", work_queue=InlineWorkQueue())
    job, key = new_key(), new_key()
    total = start + sum(ops)
    data = SOURCE[:total]
    first = blobs.open_partial(job, key, 0, 0, None)
    first.write(data[:start])
    cp = first.checkpoint()
    first.close()
    writer = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    pos = start
    for n in ops:
        if n == 0:
            cp = writer.checkpoint()
            assert cp.offset == pos and cp.crc32 == zlib.crc32(data[:pos])
            assert writer.part.read_bytes() == data[:pos]
        else:
            writer.write(data[pos:pos + n])
            pos += n
    assert writer.finish(digest_of(data)) == (zlib.crc32(data), digest_of(data))
    assert blobs.final_path(job, key).read_bytes() == data


def test_a_filesystem_without_o_direct_is_written_the_ordinary_way(tmp_path, monkeypatch):
    """Opening with O_DIRECT fails (EINVAL, as on tmpfs before Linux 6.6): the upload is exact all the same."""
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    blobs = BlobStore(tmp_path / "data")
    job, key = new_key(), new_key()
    data = SOURCE[:(6 << 20) + 3]
    writer = blobs.open_partial(job, key, 0, 0, None)
    write_in(writer, data, [1 << 20, 5])
    writer.snapshot()
    assert open_fds_with_direct(writer.part) == 0
    assert writer.finish(digest_of(data)) == (zlib.crc32(data), digest_of(data))
    assert blobs.final_path(job, key).read_bytes() == data
    blobs.close()


def fail_direct_writes(monkeypatch, from_nth: int, code: int) -> list[int]:
    """From the ``from_nth`` direct write on, ``os.pwrite`` (as ``direct_io`` calls it) raises ``code``;
    returns the offsets of the direct writes tried, as they are tried."""
    import fcntl

    real_pwrite = os.pwrite
    tried: list[int] = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            tried.append(offset)
            if len(tried) >= from_nth:
                raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    return tried


def test_a_device_refusing_the_alignment_mid_upload_is_written_the_ordinary_way(disk, monkeypatch):
    """The third direct write fails with EINVAL: that buffer and the rest go through the ordinary descriptor."""
    seen = fail_direct_writes(monkeypatch, 3, errno.EINVAL)
    blobs = BlobStore(disk / "data")
    job, key = new_key(), new_key()
    data = SOURCE[:(17 << 20) + 11]
    writer = blobs.open_partial(job, key, 0, 0, None)
    write_in(writer, data, [1 << 20, 3333])
    assert writer.finish(digest_of(data)) == (zlib.crc32(data), digest_of(data))
    assert len(seen) == 3  # two went directly, the third was refused, none was tried after it
    assert blobs.final_path(job, key).read_bytes() == data
    blobs.close()


def test_a_full_disk_during_a_direct_write_leaves_offset_and_crc_at_what_the_file_holds(disk, monkeypatch):
    """ENOSPC on a direct write: the next write says no-space, and the (offset, CRC-32) a checkpoint then
    records covers only bytes the file holds, so a resume from it is exact."""
    fail_direct_writes(monkeypatch, 2, errno.ENOSPC)
    blobs = BlobStore(disk / "data")
    job, key = new_key(), new_key()
    data = SOURCE[:16 << 20]
    writer = blobs.open_partial(job, key, 0, 0, None)
    with pytest.raises(FiledockError) as exc:  # at a write after the strand met it, or at the snapshot
        write_in(writer, data[:12 << 20], [1 << 20])
        writer.snapshot()
    assert exc.value.code is ErrorCode.NO_SPACE
    cp = writer.checkpoint()
    assert 1 << 20 <= cp.offset < 12 << 20
    assert cp.crc32 == zlib.crc32(data[:cp.offset])
    assert writer.part.read_bytes()[:cp.offset] == data[:cp.offset]
    writer.close()
    monkeypatch.undo()  # space again
    resumed = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    write_in(resumed, data[cp.offset:], [1 << 20])
    assert resumed.finish(digest_of(data)) == (zlib.crc32(data), digest_of(data))
    assert blobs.final_path(job, key).read_bytes() == data
    blobs.close()


@pytest.mark.parametrize("query, direct", [("", True), ("?direct_io=on", True), ("?direct_io=off", False),
                                           ("?direct_io=OFF", False)])
def test_the_file_url_names_direct_io(tmp_path, query, direct):
    blobs = open_blob_store(f"file://{tmp_path}/b{query}", tmp_path / "d")
    assert blobs.direct_io is direct
    blobs.close()


@pytest.mark.parametrize("query", ["?direct_io=maybe", "?direct_io", "?fsync=off", "?direct_io=on&x=1"])
def test_a_file_url_with_another_option_is_bad_blobs_url(tmp_path, query):
    with pytest.raises(FiledockError) as exc:
        open_blob_store(f"file://{tmp_path}/b{query}", tmp_path / "d")
    assert exc.value.code is ErrorCode.BAD_BLOBS_URL
    assert "direct_io=on or direct_io=off" in exc.value.message


def test_bytes_after_close_never_reach_the_file(disk):
    """A write after ``finish`` fails (EBADF) instead of opening the partial again: the published file is untouched."""
    blobs = BlobStore(disk / "data")
    job, key = new_key(), new_key()
    data = SOURCE[:(5 << 20) + 7]
    writer = blobs.open_partial(job, key, 0, 0, None)
    write_in(writer, data, [1 << 20])
    writer.finish(digest_of(data))
    with pytest.raises(OSError) as exc:
        writer.write(SOURCE[:2 << 20])
        writer.snapshot()
    assert exc.value.errno == errno.EBADF
    assert open_fds_with_direct(writer.part) == 0 and not writer.part.exists()
    assert blobs.final_path(job, key).read_bytes() == data
    blobs.close()


def test_a_writer_that_caught_up_has_its_bytes_in_the_file_without_a_checkpoint(disk):
    """Once the queue has written what arrived, the file holds it, less a rest under 4096 bytes (so a
    crash or a look at the partial sees what a page-cache write would have shown, not 4 MiB less)."""
    import time

    blobs = BlobStore(disk / "data")
    job, key = new_key(), new_key()
    data = SOURCE[:(6 << 20) + 100]
    writer = blobs.open_partial(job, key, 0, 0, None)
    write_in(writer, data, [300000])
    deadline = time.monotonic() + 10
    while os.stat(writer.part).st_size < 6 << 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.stat(writer.part).st_size == 6 << 20
    assert writer.part.read_bytes() == data[:6 << 20]
    assert writer.finish(digest_of(data))[1] == digest_of(data)
    blobs.close()


def test_settles_keep_two_writes_in_flight_and_the_third_waits(disk, monkeypatch):
    """``settle`` (the writer caught up) hands its write to the disk and returns: up to ``DEPTH`` (two)
    writes are in flight while the writer copies and hashes the next bytes. Two disk threads held inside
    their writes hold no ``settle``; the third waits for the oldest; ``written`` moves only past a write
    that was waited for, never past one still out; ``flush`` leaves the exact bytes."""
    import threading

    assert direct_io.DEPTH == 2
    real_write_out = direct_io.DirectAppender._write_out
    releases = [threading.Event() for _ in range(4)]
    entered = [threading.Event() for _ in range(4)]
    calls = iter(range(4))

    def held_write_out(self, view, length, offset):
        n = next(calls)
        entered[n].set()
        assert releases[n].wait(20)
        real_write_out(self, view, length, offset)

    monkeypatch.setattr(direct_io.DirectAppender, "_write_out", held_write_out)
    path = disk / "part"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    appender = direct_io.DirectAppender.open(path, fd, 0, 0)
    hasher = ContentHasher()
    data = SOURCE[:(3 << 20) + 5000]
    appender.append(data[:1 << 20], hasher)
    appender.settle(hasher)  # returns with its write held on a disk thread
    appender.append(data[1 << 20:2 << 20], hasher)
    appender.settle(hasher)  # the second one too
    assert entered[0].wait(20) and entered[1].wait(20)
    assert hasher.offset == 2 << 20 and appender.written == (0, 0)  # hashed; the file not known to hold it yet
    appender.append(data[2 << 20:], hasher)  # copied while both writes are held
    third = threading.Thread(target=appender.settle, args=(hasher,))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # the third settle waits for the oldest write
    releases[1].set()  # the second write completing first moves nothing: the first is still out
    third.join(0.3)
    assert third.is_alive() and appender.written == (0, 0)
    releases[0].set()
    third.join(20)
    assert not third.is_alive()
    assert appender.written == (1 << 20, zlib.crc32(data[:1 << 20]))  # the oldest, waited for: in order
    for release in releases[2:]:
        release.set()
    appender.flush(hasher)
    assert appender.written == (len(data), zlib.crc32(data))
    appender.close()
    os.close(fd)
    assert path.read_bytes() == data


def test_a_failed_write_holds_written_below_it_though_a_later_one_completed(disk, monkeypatch):
    """Two writes in flight may finish out of order. When the first fails (a full disk) after the second
    landed, ``written`` stays at the end of the last write whose predecessors all succeeded, the error
    surfaces, and a resume from a checkpoint then recorded cuts the bytes past it: the file is exact."""
    import threading

    real_write_out = direct_io.DirectAppender._write_out
    first_may_fail, second_done = threading.Event(), threading.Event()
    calls = iter(range(100))

    def out_of_order(self, view, length, offset):
        if next(calls) == 0:
            assert second_done.wait(20)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_out(self, view, length, offset)
        second_done.set()

    monkeypatch.setattr(direct_io.DirectAppender, "_write_out", out_of_order)
    blobs = BlobStore(disk / "data")
    job, key = new_key(), new_key()
    data = SOURCE[:8 << 20]
    writer = blobs.open_partial(job, key, 0, 0, None)
    with pytest.raises(FiledockError) as exc:
        write_in(writer, data[:6 << 20], [1 << 20])
        writer.snapshot()
    assert exc.value.code is ErrorCode.NO_SPACE
    cp = writer.checkpoint()
    assert cp.offset == 1 << 20  # the first MiB goes the ordinary way; the first direct write failed
    assert cp.crc32 == zlib.crc32(data[:cp.offset])
    on_disk = writer.part.read_bytes()
    assert len(on_disk) > cp.offset and on_disk[:cp.offset] == data[:cp.offset]  # a later write landed past a hole
    writer.close()
    monkeypatch.undo()
    resumed = blobs.open_partial(job, key, cp.offset, cp.crc32, cp.stamp)
    assert resumed.part.stat().st_size == cp.offset  # what lies past the recorded offset is cut
    write_in(resumed, data[cp.offset:], [1 << 20])
    assert resumed.finish(digest_of(data)) == (zlib.crc32(data), digest_of(data))
    assert blobs.final_path(job, key).read_bytes() == data
    blobs.close()
