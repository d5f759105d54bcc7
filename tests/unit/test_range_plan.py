"""The client's range planner (``client/ranges.py``) and the server's block arithmetic (``store/ranged.py``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from filedock.client.ranges import LAN_RTT, MAX_STREAMS, auto_streams, missing, plan_ranges
from filedock.store.ranged import durable_runs, resume_offset
from filedock.wire import RANGE_ALIGN, range_error

A = RANGE_ALIGN


@given(st.integers(1, 2**44), st.integers(1, 64))
def test_plan_covers_the_file_with_aligned_ranges(size, k):
    """At most K ranges, contiguous from 0 to size, each a valid PUTR range, sizes within one block."""
    plan = plan_ranges(size, k)
    assert 1 <= len(plan) <= k
    assert plan[0][0] == 0 and plan[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    assert all(range_error(size, s, e) is None for s, e in plan)
    lengths = [e - s for s, e in plan[:-1]]
    assert not lengths or max(lengths) - min(lengths) <= A
    assert len(plan) == min(k, -(-size // A))


def test_plan_examples():
    assert plan_ranges(0, 4) == []
    assert plan_ranges(10, 4) == [(0, 10)]
    assert plan_ranges(4 * A + 1, 2) == [(0, 2 * A), (2 * A, 4 * A + 1)]


@given(st.integers(1, 256), st.integers(1, 16), st.sets(st.integers(0, 255)))
def test_missing_is_the_plan_less_the_durable_ranges(blocks, k, durable_blocks):
    size = blocks * A - 7
    durable_blocks = {b for b in durable_blocks if b < blocks}
    durable = durable_runs(durable_blocks, size)
    gaps = missing(plan_ranges(size, k), durable)
    covered = set()
    for s, e in gaps:
        covered |= set(range(s // A, -(-e // A)))
    assert covered == set(range(blocks)) - durable_blocks


@given(st.integers(1, 64), st.sets(st.integers(0, 63)), st.data())
def test_resume_offset_skips_the_durable_blocks_a_range_begins_with(blocks, durable, data):
    size = blocks * A
    first = data.draw(st.integers(0, blocks - 1))
    last = data.draw(st.integers(first + 1, blocks))
    offset = resume_offset(durable, size, first * A, last * A)
    assert offset % A == 0 and first * A <= offset <= last * A
    assert all(i in durable for i in range(first, offset // A))
    assert offset == last * A or offset // A not in durable


def test_auto_keeps_one_stream_on_a_short_path_and_adds_them_with_rtt():
    big = 2 << 30
    assert auto_streams(0.00005, big) == 1
    assert auto_streams(LAN_RTT / 2, big) == 1
    assert auto_streams(0.1, big) == 8
    assert auto_streams(0.02, big) == 2
    assert auto_streams(1.0, big) == MAX_STREAMS
    assert auto_streams(0.1, 3 * A) == 3  # never more streams than blocks
