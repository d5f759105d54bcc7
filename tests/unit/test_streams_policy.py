"""``--streams auto``'s pure logic (``client/streams_policy.py``): the RTT from ``TCP_INFO``, the range
queue the streams take their work from, and the controller that decides how many streams run."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from filedock.client.streams_policy import (CHUNKS_PER_STREAM, MAX_CHUNK, MIN_CHUNK, QUEUE_GROWTH, SPLIT_LEAST,
                                            STEAL_MARGIN, ControllerTiming, RangeQueue, RangeSchedule, StreamController,
                                            acked_from_tcp_info,
                                            best_split, chunk_plan, chunk_size, queueing, rtt_from_tcp_info,
                                            rtts_from_tcp_info, split_point)
from filedock.errors import ErrorCode, FiledockError, RefusedByServer, TransportFailure
from filedock.store.ranged import durable_runs
from filedock.wire import RANGE_ALIGN, Stored, range_error

A = RANGE_ALIGN
TIMING = ControllerTiming(settle=1.0, measure=2.0)


def tcp_info(rtt_us: int, min_rtt_us: int | None, acked: int = 0) -> bytes:
    raw = bytearray(232 if min_rtt_us is not None else 104)
    struct.pack_into("=I", raw, 68, rtt_us)
    if len(raw) >= 128:
        struct.pack_into("=Q", raw, 120, acked)
    if min_rtt_us is not None:
        struct.pack_into("=I", raw, 148, min_rtt_us)
    return bytes(raw)


def test_rtt_from_tcp_info_prefers_the_minimum_and_falls_back_to_the_smoothed_rtt():
    """``tcpi_min_rtt`` where the kernel gives it, ``tcpi_rtt`` on older kernels or before a minimum,
    None when the reply carries no sample."""
    assert rtt_from_tcp_info(tcp_info(100_000, 98_500)) == 0.0985
    assert rtt_from_tcp_info(tcp_info(100_000, None)) == 0.1
    assert rtt_from_tcp_info(tcp_info(42, 0)) == 0.000042
    assert rtt_from_tcp_info(tcp_info(0, 0)) is None
    assert rtt_from_tcp_info(b"\0" * 20) is None


def test_acked_bytes_from_tcp_info():
    """``tcpi_bytes_acked`` (Linux 4.2+): what the peer has, not what sits in the send buffer."""
    assert acked_from_tcp_info(tcp_info(1, 1, acked=5 << 32 | 7)) == 5 << 32 | 7
    assert acked_from_tcp_info(tcp_info(1, None)) is None


@given(st.integers(1, 2**44), st.integers(1, 64))
def test_chunk_plan_covers_the_file_once_on_the_grid(size, limit):
    """Contiguous from 0 to size, every range a valid PUTR range of MIN..MAX_CHUNK (but the last),
    about CHUNKS_PER_STREAM per stream where the size allows."""
    plan = chunk_plan(size, limit)
    assert plan[0][0] == 0 and plan[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    assert all(range_error(size, s, e) is None for s, e in plan)
    step = chunk_size(size, limit)
    assert step % A == 0 and min(MIN_CHUNK, -(-size // A) * A) <= step <= MAX_CHUNK or size <= step
    assert all(e - s == step for s, e in plan[:-1])
    per = CHUNKS_PER_STREAM * limit
    if MIN_CHUNK * per <= size <= MAX_CHUNK * per:  # the grid multiple nearest size / (CHUNKS_PER_STREAM limit)
        assert step - A < -(-size // per) <= step


@given(st.integers(1, 400), st.integers(1, 16), st.sets(st.integers(0, 399)), st.data())
def test_queue_hands_out_every_missing_byte_exactly_once(blocks, limit, durable_blocks, data):
    """Whatever the server holds durably (learnt at any moment, in several replies), the ranges handed
    out cover exactly the bytes not durable when they were handed out, each once, each on the grid."""
    size = blocks * A - data.draw(st.integers(0, A - 1))
    durable_blocks = {b for b in durable_blocks if b < blocks}
    queue = RangeQueue(chunk_plan(size, limit))
    handed: list[tuple[int, int]] = []
    learnt: set[int] = set()
    steps = data.draw(st.lists(st.sampled_from(["take", "learn"]), max_size=200))
    for step in steps + ["take"] * (blocks + 1):
        if step == "learn":
            some = {b for b in durable_blocks if data.draw(st.booleans())}
            learnt |= some
            queue.learn(durable_runs(learnt, size))
        else:
            piece = queue.take()
            if piece is not None:
                handed.append(piece)
    assert queue.take() is None and len(queue) == 0 and queue.pending_bytes == 0
    assert all(range_error(size, s, e) is None for s, e in handed)
    covered: list[int] = []
    for s, e in handed:
        covered.extend(range(s // A, -(-e // A)))
    assert len(covered) == len(set(covered))  # no block twice
    assert set(covered) | learnt == set(range(blocks))  # every block sent or durable
    assert queue.handed_out == handed


def test_queue_resume_sends_only_the_suffix_of_each_range():
    """A new process plans the same ranges; each range's durable prefix (ranges are written in order)
    is skipped, and a range durable whole is never handed out."""
    size = 3 * MIN_CHUNK + 5
    plan = chunk_plan(size, 2)
    c = MIN_CHUNK
    assert plan == chunk_plan(size, 2) == [(0, c), (c, 2 * c), (2 * c, 3 * c), (3 * c, size)]
    queue = RangeQueue(plan)
    queue.learn(((0, c + A), (2 * c, 2 * c + A)))
    assert [queue.take() for _ in range(4)] == [(c + A, 2 * c), (2 * c + A, 3 * c), (3 * c, size), None]


def run_controller(start, limit, rate_of, seconds=120.0, tick=0.25):
    """Drive a controller with an aggregate goodput ``rate_of(K)`` (bytes per second) -> Ks over time."""
    controller = StreamController(start, limit, TIMING)
    sent, now, seen = 0.0, 0.0, []
    while now < seconds:
        k = controller.sample(now, int(sent))
        seen.append(k)
        sent += rate_of(k) * tick
        now += tick
    return controller, seen


@given(st.integers(1, 16), st.integers(1, 32), st.floats(1e3, 1e10), st.floats(0.0, 0.099))
def test_streams_never_above_the_cap_and_no_growth_without_gain(start, limit, rate, slope):
    """K never exceeds the cap; when more streams raise the aggregate by less than MIN_GAIN, the
    controller settles back on the K it started with after one probe."""
    controller, seen = run_controller(start, limit, lambda k: rate * (1 + slope * (k > start)))
    assert max(seen) <= limit
    assert controller.settled and controller.streams == min(start, limit)
    assert seen[-1] == min(start, limit)
    assert len(set(seen)) <= 2  # at most one probe above, and never again (the aggregate never falls)


@given(st.floats(1e3, 1e10))
def test_one_stream_stays_one_when_the_aggregate_does_not_rise(rate):
    """A full link (or a CPU-bound sender): one stream, one probe with two, then one for good."""
    controller, seen = run_controller(1, 16, lambda k: rate)
    assert seen[0] == 1 and seen[-1] == 1 and max(seen) == 2
    ks = [k for k, _ in controller.history]
    assert ks[:2] == [1, 2] and set(ks[2:]) == {1}  # holding: measured again and again, never added


@given(st.integers(1, 16), st.integers(2, 16), st.floats(1e3, 1e8), st.data())
def test_streams_grow_while_each_addition_pays_and_stop_at_the_full_link(start, limit, per_stream, data):
    """A link that takes ``full`` streams' worth: each stream adds its share until then, nothing after.
    The controller ends with at most one step (half again) past the full link, or where it started,
    and within the last step's required gain (12.5 %) of the best the cap allows."""
    full = data.draw(st.integers(1, 24))
    controller, seen = run_controller(start, limit, lambda k: per_stream * min(k, full))
    first = min(start, limit)
    assert max(seen) <= limit
    assert controller.settled
    assert controller.streams <= max(first, full + full // 2)
    assert min(controller.streams, full) * 1.125 >= min(full, limit) or first >= full


def test_a_long_link_example():
    """8 streams at the start (100 ms), each adds 10 MB/s up to a 120 MB/s link: 8 -> 12 -> 18 is capped
    at 16, which adds nothing over 12, so 12 it is."""
    controller, seen = run_controller(8, 16, lambda k: 10e6 * min(k, 12))
    assert [k for k, _ in controller.history][:4] == [8, 12, 16, 12]
    assert controller.streams == 12 and seen[-1] == 12 and controller.settled


def test_a_fall_in_the_aggregate_while_holding_adds_streams_again():
    """Streams fresh from slow start fill the link until they meet loss; then each gets a quarter of
    what it got and the aggregate falls: holding at 12, the controller adds streams again (to the cap)."""
    controller = StreamController(8, 16, TIMING)
    sent, now, per_stream = 0.0, 0.0, 1e6
    while now < 120:
        k = controller.sample(now, int(sent))
        if now > 20:
            per_stream = 0.25e6  # loss met: each stream is held to a quarter
        sent += min(k * per_stream, 10e6) * 0.25
        now += 0.25
    ks = [k for k, _ in controller.history]
    assert ks[:4] == [8, 12, 16, 12]  # 12 fill the link: 16 add nothing, back to 12
    assert ks[-1] == 16 and controller.streams == 16 and controller.settled  # after the fall: 16 pay


def test_rtts_from_tcp_info_and_the_queue_signal():
    """(smoothed, smallest) RTT from ``TCP_INFO`` where the kernel gives both; the median connection's
    ratio above 1 + QUEUE_GROWTH is a standing queue, at or below it none; no samples, no queue."""
    assert rtts_from_tcp_info(tcp_info(150_000, 100_000)) == (0.15, 0.1)
    assert rtts_from_tcp_info(tcp_info(150_000, None)) is None and rtts_from_tcp_info(tcp_info(0, 100_000)) is None
    at = 0.1 * (1 + QUEUE_GROWTH)
    assert queueing([(0.19, 0.1), (0.18, 0.1), (0.1, 0.1)]) is True  # the median connection queues
    assert queueing([(0.19, 0.1), (0.1, 0.1), (0.101, 0.1)]) is False  # one slow connection is not a queue
    assert queueing([(at, 0.1)]) is False and queueing([(at * 1.01, 0.1)]) is True
    assert queueing([]) is False


@given(st.integers(1, 15), st.floats(1e3, 1e10))
def test_a_standing_queue_stops_the_probing(start, per_stream):
    """A full link shows a queue in the RTTs: the controller keeps the K it measured and adds none, even
    where each added stream would seem to pay (fresh streams in slow start), nor when the aggregate falls."""
    controller = StreamController(start, 16, TIMING)
    sent, now, fell = 0.0, 0.0, False
    while now < 60:
        k = controller.sample(now, int(sent), full=True)
        fell = fell or now > 30
        sent += k * per_stream * (0.5 if fell else 1.0) * 0.25
        now += 0.25
    assert controller.streams == start and controller.settled
    assert {k for k, _ in controller.history} == {start}


def test_no_more_work_ends_the_probing():
    """Once no range is left to hand out, the controller keeps the last K that paid off."""
    controller = StreamController(2, 16, TIMING)
    controller.sample(0.0, 0)
    controller.sample(1.0, 0)
    assert controller.sample(3.0, 100) == 3
    assert controller.sample(10.0, 200, more_work=False) == 2 and controller.settled
    assert controller.sample(20.0, 200) == 2  # and stays so


@given(st.integers(1, 2**40), st.integers(0, 2**40), st.integers(0, 2**40))
def test_split_point_leaves_both_halves_valid_ranges(size, a, b):
    """The rest of a range ``[start, end)`` is split only on the grid, past the sender's margin and a
    block before the end, so ``[start, point)`` and ``[point, end)`` are both valid PUTR ranges."""
    start = (min(a, b) % size) // A * A
    end = min(size, -(-max(a, b, start + 1) // A) * A)  # a range ends on the grid or at the file end
    pos = start + (a % (end - start)) if end > start else start
    point = split_point(pos, end)
    if point is None:
        assert end - pos < 2 * SPLIT_LEAST + 2 * A + STEAL_MARGIN  # no room for two halves on the grid
        return
    assert point % A == 0 and pos + STEAL_MARGIN < point and point + A <= end
    assert point - pos >= SPLIT_LEAST and end - point >= SPLIT_LEAST
    assert range_error(size, start, point) is None and range_error(size, point, end) is None


def test_split_point_examples():
    assert split_point(0, 32 * A) == 16 * A
    assert split_point(24 * A, 32 * A) == 28 * A and split_point(25 * A, 32 * A) is None  # halves of 16 MiB at least
    assert split_point(30 * A, 32 * A, least=A) == 31 * A and split_point(31 * A, 32 * A, least=A) is None
    assert split_point(28 * A + 1, 34 * A + 5, least=A) == 32 * A and split_point(33 * A, 34 * A + 5, least=A) is None


def test_best_split_takes_the_range_with_the_most_left():
    """An idle stream takes the half of the range that leaves it the most; nothing when none can split."""
    assert best_split([(0, 8 * A), (20 * A, 40 * A), (41 * A, 42 * A)]) == (1, 30 * A)
    assert best_split([(3 * A, 4 * A), (8 * A, 9 * A + 7), (10 * A, 17 * A)]) is None
    assert best_split([]) is None


class Schedule(RangeSchedule):
    """A driver's side of ``RangeSchedule`` with no connections: TCP_INFO given per connection name."""

    def __init__(self, plan, infos=None):
        self.queue, self.controller, self.ranges, self.running, self.stored = RangeQueue(plan), None, [], 0, []
        self.infos = infos or {}

    def tcp_info_of(self, conn):
        return self.infos.get(conn)


def test_a_range_on_a_kept_connection_counts_its_bytes_from_where_the_connection_was():
    """The kernel counts a connection's acknowledged bytes since its connect: a second range on a kept
    connection counts only what was acknowledged after it began, and its answer makes all of it acked."""
    sched = Schedule([(0, 4 * A), (4 * A, 8 * A)])
    first, second = sched._next_range(), sched._next_range()
    sched._assign(first, "c")
    sched.infos["c"] = tcp_info(1000, 900, acked=3 * A)
    assert sched._acked()[0] == 3 * A
    sched._answered(first, object(), 4 * A)
    assert (first["reply"], first["acked"]) == ("durable", 4 * A) and sched.stored == []
    sched._assign(first, None)
    sched._assign(second, "c", tcp_info(1000, 900, acked=4 * A + 100))  # it carried the first range (and a request)
    sched.infos["c"] = tcp_info(1000, 900, acked=4 * A + 100 + A)
    assert sched._acked()[0] == 4 * A + A
    stored = Stored(8 * A, 0, "0" * 64)
    sched._answered(second, stored, 4 * A)
    assert (second["reply"], second["acked"], sched.stored) == ("stored", 4 * A, [stored])


def test_what_a_failed_range_exchange_means():
    """Complete on the server: the range is done. Our own split's takeover, or a kept connection closed
    before its request was answered: again at once. Anything else, and any failure of a new connection
    or of an answered request: for the retry budget."""
    sched = Schedule([(0, 4 * A)])
    r = sched._next_range()
    done = RefusedByServer(ErrorCode.ALREADY_COMPLETE, "complete")
    assert sched._failed(r, done, reused=False, answered=True) == "complete"
    assert (r["reply"], r["pos"]) == ("complete", r["end"])
    taken = RefusedByServer(ErrorCode.TAKEN_OVER, "taken over")
    r = {**r, "reply": None, "split": True}
    assert sched._failed(r, taken, reused=False, answered=True) == "again"
    assert "split" not in r and sched._failed(r, taken, reused=False, answered=True) is None  # once only
    closed = TransportFailure("the connection closed")
    idle = RefusedByServer(ErrorCode.IDLE_TIMEOUT, "idle")
    for exc in (closed, idle):
        assert sched._failed(r, exc, reused=True, answered=False) == "again"
        assert sched._failed(r, exc, reused=True, answered=True) is None
        assert sched._failed(r, exc, reused=False, answered=False) is None
    refused = RefusedByServer(ErrorCode.UNKNOWN_SESSION, "no such session")
    assert sched._failed(r, refused, reused=True, answered=False) is None
    assert sched._failed(r, FiledockError(ErrorCode.INTERNAL_ERROR, "x"), reused=False, answered=True) is None
