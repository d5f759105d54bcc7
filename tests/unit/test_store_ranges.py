"""Ranged progress in the metadata store (``range_blocks``), on SQLite and on PostgreSQL."""

from __future__ import annotations

from filedock.digest import BLOCK_SIZE
from filedock.store.model import FILE_COMPLETE, FILE_PARTIAL, FILE_PENDING, RANGED_STAMP
from tests.unit.test_store import clock, store  # noqa: F401 (fixtures: both backends)


def test_range_blocks_record_count_and_reset(store):  # noqa: F811
    """Blocks recorded in any order come back by index; ``received`` counts their bytes (the last block
    short); the stamp says ranged; a reset (a plain upload taking over, a discard) drops them."""
    job = store.create_job("j", {})
    size = 3 * BLOCK_SIZE + 10
    f = store.add_file(job.id, "a", size)
    store.record_range_blocks(f.key, [(3, "d" * 64, 7), (0, "a" * 64, 1)])
    store.record_range_blocks(f.key, [(0, "a" * 64, 1)])  # a block recorded twice (a resent range)
    assert store.range_blocks(f.key) == [(0, "a" * 64, 1), (3, "d" * 64, 7)]
    got = store.get_file(f.key)
    assert (got.received, got.part_stamp, got.state) == (BLOCK_SIZE + 10, RANGED_STAMP, FILE_PARTIAL)
    store.record_range_blocks(f.key, [(1, "b" * 64, 0xFFFFFFFF)])
    assert store.range_blocks(f.key)[1] == (1, "b" * 64, 0xFFFFFFFF)
    store.reset_file(f.key)
    assert store.range_blocks(f.key) == []
    got = store.get_file(f.key)
    assert (got.received, got.part_stamp, got.state) == (0, None, FILE_PENDING)


def test_range_blocks_of_a_complete_file_change_nothing(store):  # noqa: F811
    job = store.create_job("j", {})
    f = store.add_file(job.id, "a", 10)
    store.record_complete(f.key, 5, "e" * 64)
    store.record_range_blocks(f.key, [(0, "a" * 64, 1)])
    assert store.range_blocks(f.key) == []
    got = store.get_file(f.key)
    assert (got.state, got.crc32, got.part_stamp) == (FILE_COMPLETE, 5, None)


def test_range_blocks_go_with_the_job(store):  # noqa: F811
    job = store.create_job("j", {})
    f = store.add_file(job.id, "a", 2 * BLOCK_SIZE)
    store.record_range_blocks(f.key, [(0, "a" * 64, 1), (1, "b" * 64, 2)])
    store.delete_job(job.id)
    assert store.range_blocks(f.key) == []
