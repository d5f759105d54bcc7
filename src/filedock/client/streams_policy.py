"""How many streams ``--streams auto`` runs, and which ranges they send: pure logic, no sockets.

* ``rtt_from_tcp_info`` reads the round-trip time the kernel measured on a connection that is
  open anyway (``TCP_INFO``), so choosing costs no extra connection.
* ``chunk_plan`` cuts a file into many ranges on the 4 MiB grid (more than streams), and
  ``RangeQueue`` hands them out, one at a time, to however many connections are open (work
  stealing): a stream added later, or one that finishes early, takes the next range.
* ``StreamController`` decides K from samples of the aggregate goodput: start from the
  RTT's estimate, add streams while each addition raises the aggregate by a meaningful
  fraction, and go back to the last K that paid off when one does not (the link is full or
  the CPU bound).

``RangedUpload`` (``client/blocking.py``) and the Twisted client (``client/twisted/ranged.py``)
do the I/O; see docs/protocol.md, "Ranged uploads", and docs/client.md.
"""

from __future__ import annotations

import struct
from collections import deque

from filedock.client.ranges import missing
from filedock.errors import ErrorCode, FiledockError, RefusedByServer
from filedock.record import record
from filedock.wire import RANGE_ALIGN, Stored

MiB = 1 << 20

MIN_CHUNK = 8 * MiB
"""Smallest range ``chunk_plan`` hands out (but a file's last). Each range costs its connection two
idle round trips (``DONE`` to ``DURABLE``, ``PUTR`` to ``RANGES``; the connection itself is kept from
range to range); a file large enough for that to matter (256 MiB and more at 16 streams) gets ranges
of size / 32, so this floor only shapes small files, which it still lets use every stream."""

MAX_CHUNK = 256 * MiB
"""Largest range ``chunk_plan`` hands out: the last ranges' unequal ends (a tail where fewer streams
run) stay short."""

CHUNKS_PER_STREAM = 2
"""``chunk_plan`` aims at this many ranges per stream at the cap, so streams can be added late (an
idle stream splits the range with the most left, so they still finish close together). More ranges
cost more idle round trips: at 100 ms and 8 streams on 1 Gbit/s, ranges of size / 64 of 1 GiB left
each stream idle 14 % of the time (goodput 108 MB/s, 0.87x the link, at 8 streams)."""

MIN_GAIN = 0.10
"""An added stream must raise the aggregate goodput by at least this fraction to be kept."""

GAIN_SHARE = 0.25
"""... and by at least this share of what it would add if every stream got as much as the others."""

DROP = 0.25
"""Holding at K, an aggregate this fraction below the best seen at K makes the controller add again."""

QUEUE_GROWTH = 0.25
"""A smoothed RTT this fraction above the path's smallest (median over the running connections) is a
standing queue at the bottleneck: the link is full, and more streams would only lengthen the queue
and, for loss-based senders, overflow it. The controller then adds none."""

# struct tcp_info (linux/tcp.h): tcpi_rtt and tcpi_min_rtt, in microseconds
_TCPI_RTT = struct.Struct("=I")
_TCPI_RTT_AT = 68
_TCPI_MIN_RTT_AT = 148
_TCPI_BYTES_ACKED = struct.Struct("=Q")
_TCPI_BYTES_ACKED_AT = 120


def rtt_from_tcp_info(raw: bytes) -> float | None:
    """The round-trip time (seconds) in a ``getsockopt(IPPROTO_TCP, TCP_INFO)`` reply: the smallest
    seen (``tcpi_min_rtt``, Linux 4.6+) where the kernel gives it, else the smoothed one (``tcpi_rtt``);
    None if the reply is too short or says nothing (no sample yet)."""
    for at in (_TCPI_MIN_RTT_AT, _TCPI_RTT_AT):
        if len(raw) >= at + 4:
            (usec,) = _TCPI_RTT.unpack_from(raw, at)
            if usec:
                return usec / 1e6
    return None


def rtts_from_tcp_info(raw: bytes) -> tuple[float, float] | None:
    """(smoothed RTT, smallest RTT seen), seconds, from a ``TCP_INFO`` reply; None where the kernel
    does not give both (before Linux 4.6) or has no sample yet."""
    if len(raw) < _TCPI_MIN_RTT_AT + 4:
        return None
    (srtt,) = _TCPI_RTT.unpack_from(raw, _TCPI_RTT_AT)
    (least,) = _TCPI_RTT.unpack_from(raw, _TCPI_MIN_RTT_AT)
    return (srtt / 1e6, least / 1e6) if srtt and least else None


def queueing(rtts: list[tuple[float, float]]) -> bool:
    """Whether the running connections' (smoothed, smallest) RTTs show a standing queue: their median
    ratio above ``1 + QUEUE_GROWTH``. False without samples."""
    if not rtts:
        return False
    ratios = sorted(srtt / least for srtt, least in rtts)
    return ratios[len(ratios) // 2] > 1 + QUEUE_GROWTH


def acked_from_tcp_info(raw: bytes) -> int | None:
    """The bytes the peer acknowledged on a connection (``tcpi_bytes_acked``, Linux 4.2+), or None.

    The controller measures goodput with this, not with the bytes handed to the kernel: a send
    buffer of many MiB (``SO_SNDBUF`` raised for long paths) takes a whole range at once."""
    if len(raw) < _TCPI_BYTES_ACKED_AT + 8:
        return None
    return _TCPI_BYTES_ACKED.unpack_from(raw, _TCPI_BYTES_ACKED_AT)[0]


def chunk_size(size: int, limit: int, align: int = RANGE_ALIGN) -> int:
    """Length of ``chunk_plan``'s ranges: about ``CHUNKS_PER_STREAM`` per stream at ``limit`` streams,
    within ``MIN_CHUNK``..``MAX_CHUNK``, a multiple of ``align``."""
    want = -(-size // max(1, limit * CHUNKS_PER_STREAM))
    want = min(max(want, MIN_CHUNK), MAX_CHUNK)
    return max(align, -(-want // align) * align)


def chunk_plan(size: int, limit: int, align: int = RANGE_ALIGN) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``chunk_size`` covering ``size`` bytes in order (the last one shorter),
    each a valid ``PUTR`` range. The same file and ``limit`` give the same plan, so a resume by a new
    process finds each range's durable part where it left it: a prefix."""
    step = chunk_size(size, limit, align)
    return [(start, min(size, start + step)) for start in range(0, size, step)]


class RangeQueue:
    """Ranges waiting to be sent, handed out in file order, each exactly once.

    ``learn(durable)`` drops what the server says it holds durably (from any ``RANGES`` reply)
    from the ranges not handed out yet: what is left of a range is a suffix of it, or pieces
    between durable runs, all on the grid (durable runs are whole blocks, but for the file's end).
    Ranges already handed out are their connection's business (its ``RANGES`` offset).
    """

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self._pending: deque[tuple[int, int]] = deque(ranges)
        self.handed_out: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the ranges not handed out yet."""
        return sum(end - start for start, end in self._pending)

    def learn(self, durable: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> None:
        """The server holds ``durable`` (ascending, half-open): none of it is handed out from now on."""
        if durable and self._pending:
            self._pending = deque(missing(list(self._pending), durable))

    def give_back(self, piece: tuple[int, int]) -> None:
        """``piece``, handed out by ``take``, was never sent: it is the next one handed out again."""
        self.handed_out.remove(piece)
        self._pending.appendleft(piece)

    def take(self) -> tuple[int, int] | None:
        """The next range to send, or None when every range was handed out."""
        if not self._pending:
            return None
        piece = self._pending.popleft()
        self.handed_out.append(piece)
        return piece


STEAL_MARGIN = 0
"""A range is split no closer than this past what its connection has handed to the kernel (and on
the grid): the bytes before the split point it still sends itself. Bytes it sends past the point
before the server stops it are not lost: whole blocks of them are recorded, and skipped."""

UNSENT_LIMIT = 1 * MiB
"""A ranged connection keeps at most about this much unsent in the kernel (``TCP_NOTSENT_LOWAT``), so
the end of its range stays in the file, where an idle connection may take it (``split_point``)."""


SPLIT_LEAST = 4 * RANGE_ALIGN
"""Neither half of a split is shorter than this (16 MiB). Both halves then start on a new connection
or request (the older one is told ``taken-over`` and resumes its first half on a new connection),
and on a long path that costs round trips and a slow start: a split of a few MiB costs more than it
saves. Measured on the 100 ms link: with 4 MiB halves the last 1.5 s of a 2 GiB upload went to
takeovers of 4-8 MiB pieces."""


def split_point(pos: int, end: int, align: int = RANGE_ALIGN, least: int = SPLIT_LEAST) -> int | None:
    """Where an idle connection may take over the rest of a range whose connection has handed bytes
    up to ``pos`` to the kernel and will send up to ``end``: a grid point more than ``STEAL_MARGIN``
    and at least ``least`` past ``pos`` and at least ``least`` (and a block) before ``end``, near the
    middle of what is left (both halves then finish about together); None if what is left is too
    short to split."""
    first = max((pos + STEAL_MARGIN) // align * align + align,  # strictly past pos: the first half is never empty
                -(-(pos + least) // align) * align)
    last = (end - max(align, least)) // align * align
    middle = -(-((pos + end) // 2) // align) * align
    point = max(first, min(middle, last))
    return point if point <= last else None


def best_split(sending: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Which of the ranges being sent, given as (handed to the kernel up to, end), an idle connection
    should split: (its index, the ``split_point``) of the one that leaves the most to take, or None."""
    best: tuple[int, int] | None = None
    for i, (pos, end) in enumerate(sending):
        point = split_point(pos, end)
        if point is not None and (best is None or end - point > sending[best[0]][1] - best[1]):
            best = (i, point)
    return best


@record
class ControllerTiming:
    """How long ``StreamController`` lets a change settle (new streams leave slow start) and how long
    it then measures, in seconds: each at least its floor, and a number of round trips."""

    settle: float
    measure: float

    @classmethod
    def for_rtt(cls, rtt: float) -> "ControllerTiming":
        """10 round trips to settle (new connections: handshake, request, slow start to a few MB in
        flight) and 20 to measure (at 100 ms, windows of 2 s vary by a few percent on a full link,
        below ``MIN_GAIN``), floors 0.5 s and 1 s, so a sample on a quick path is not all noise."""
        return cls(settle=max(0.5, 10 * rtt), measure=max(1.0, 20 * rtt))


class StreamController:
    """Decides how many streams to run from samples of the bytes acknowledged so far.

    Starts at ``start`` streams. After a change it lets the streams settle (``timing.settle``:
    new connections leave slow start), then measures the aggregate goodput over
    ``timing.measure`` seconds. After the first measurement it adds streams (half again as many,
    at least one, never above ``limit``); if the aggregate then rose by at least
    ``max(MIN_GAIN, GAIN_SHARE * added / before)`` of the rate kept so far, the new K is kept and
    it adds again; if not, it goes back to the K before and holds (``settled``).

    While holding it keeps measuring: if the aggregate falls below ``1 - DROP`` of the best seen
    at this K (streams fresh from slow start had not met loss yet, or other traffic came), it
    adds streams again the same way. It never adds at ``limit``, nor once ``sample`` says no work
    is left to spread, nor while ``sample`` says the path holds a standing queue (``full``: the
    link is full; see ``queueing``), which keeps the K it measured. ``history`` lists (K,
    measured bytes per second) for the logs and ``--json``.
    """

    def __init__(self, start: int, limit: int, timing: ControllerTiming) -> None:
        if limit < 1:
            raise ValueError("at least one stream")
        self.limit = limit
        self.streams = max(1, min(start, limit))
        self.timing = timing
        self.settled = False
        self.finished = False  # no more work: K stays as it is
        self.history: list[tuple[int, float]] = []
        self._kept_rate: float | None = None
        self._kept_streams = self.streams
        self._changed_at: float | None = None
        self._window: tuple[float, int] | None = None

    def sample(self, now: float, sent: int, more_work: bool = True, full: bool = False) -> int:
        """The number of streams to run, given the total bytes ``sent`` (acknowledged) at time ``now``
        (seconds, any monotonic origin); ``more_work`` False when no range is left to hand out (a
        measurement would only see streams finishing); ``full`` True while the RTTs show a standing
        queue (the link is full: no stream is added)."""
        if self.finished:
            return self.streams
        if not more_work:
            self.streams, self.settled, self.finished = self._kept_streams, True, True
            return self.streams
        if self._changed_at is None:
            self._changed_at = now
        if self._window is None:
            if now - self._changed_at >= self.timing.settle:
                self._window = (now, sent)
            return self.streams
        began, base = self._window
        if now - began < self.timing.measure:
            return self.streams
        rate = (sent - base) / (now - began)
        self.history.append((self.streams, rate))
        self._window = (now, sent)  # the next window follows at once, unless K changes
        if self.settled:
            self._hold(now, rate, full)
        elif self._kept_rate is None or rate >= self._kept_rate * (1 + self._needed_gain()):
            self._kept_rate, self._kept_streams = rate, self.streams
            if full:  # this K fills the link: keep it
                self.settled = True
            else:
                self._add(now)
        else:
            self._change(now, self._kept_streams)
            self.settled = True
        return self.streams

    def _hold(self, now: float, rate: float, full: bool = False) -> None:
        kept = self._kept_rate or 0.0
        if rate < kept * (1 - DROP) and self.streams < self.limit and not full:
            # measure this K once more from now (this window may straddle the fall), then add
            self._kept_rate, self.settled = None, False
        else:
            self._kept_rate = max(kept, rate)

    def _add(self, now: float) -> None:
        if self.streams >= self.limit:
            self.settled = True
        else:
            self._change(now, min(self.limit, self.streams + max(1, self.streams // 2)))

    def _needed_gain(self) -> float:
        added = self.streams - self._kept_streams
        return max(MIN_GAIN, GAIN_SHARE * added / self._kept_streams)

    def _change(self, now: float, streams: int) -> None:
        self.streams, self._changed_at, self._window = streams, now, None


class RangeSchedule:
    """What both clients' ranged uploads share: handing out ranges (from the queue, then, for
    ``auto``, the second half of the range with the most left), giving back a range whose request
    the server never read, whether another stream would find work, and the goodput and RTTs the
    controller sees. Sans-IO: a driver (``blocking.RangedUpload``, ``twisted.ranged.TxRangedUpload``)
    sets ``queue``, ``controller``, ``ranges`` and ``running``, names the key of a range's
    connection (``CONN``) and reads a connection's ``TCP_INFO`` (``tcp_info_of``); a driver with
    threads calls these under its lock.

    A range is a dict: ``start``, ``end``, ``from`` (where the server said it resumes), ``pos``
    (handed to the kernel up to), ``sent``, ``reply`` (None until answered), ``CONN`` (the
    connection carrying it, or None), ``acked`` (its bytes the peer acknowledged), ``before`` (the
    connection's acknowledged bytes when this range began on it: a kept connection's count goes on
    from its earlier ranges), ``base`` (``acked`` then, less ``before``: ``acked`` is ``base`` plus
    the connection's count), and ``split`` once an idle stream took its second half.
    """

    CONN = "conn"
    queue: RangeQueue
    controller: StreamController | None
    ranges: list[dict]
    running: int
    stored: list[Stored]

    def tcp_info_of(self, conn) -> bytes | None:
        """The kernel's ``TCP_INFO`` of a range's connection, or None."""
        raise NotImplementedError

    def on_split(self, victim: dict, point: int, end: int) -> None:
        """An idle stream takes ``[point, end)`` of ``victim`` (for the log)."""

    def _next_range(self, steal: bool = True) -> dict | None:
        """The next range for a connection, or None (all handed out and none to split, or auto wants
        fewer connections). ``steal`` False: from the queue only (a request sent ahead splits nothing:
        a split is chosen when a stream is idle)."""
        if self.controller is not None and self.running > self.controller.streams:
            return None
        piece = self.queue.take() or (self._steal() if steal else None)
        if piece is None:
            return None
        r = {"start": piece[0], "end": piece[1], "from": None, "pos": piece[0], "sent": 0, "reply": None,
             self.CONN: None, "acked": 0, "base": 0, "before": 0}
        self.ranges.append(r)
        return r

    def _give_back(self, r: dict) -> None:
        """A range asked for ahead whose request the server never read: back to the queue, unsent."""
        self.ranges.remove(r)
        self.queue.give_back((r["start"], r["end"]))

    def _assign(self, r: dict, conn, kept_info: bytes | None = None) -> None:
        """``r`` goes out on ``conn``. ``kept_info``: a kept connection's ``TCP_INFO`` as ``r`` begins on
        it (None: a new connection): the kernel counts acknowledged bytes since the connect, so
        ``_acked`` counts ``r``'s from there."""
        before = (acked_from_tcp_info(kept_info) or 0) if kept_info else 0
        r[self.CONN], r["base"], r["before"] = conn, r["acked"] - before, before

    def _answered(self, r: dict, reply, sent: int) -> None:
        """The server answered ``r`` (``DURABLE``, or ``STORED`` for the file) once ``sent`` bytes of it
        had gone out on its connection: every one of them is at the server."""
        r["reply"] = "stored" if isinstance(reply, Stored) else "durable"
        r["acked"] = max(r["acked"], r["base"] + r["before"] + sent)  # in the frame of r's own bytes
        if isinstance(reply, Stored):
            self.stored.append(reply)

    def _failed(self, r: dict, exc: FiledockError, reused: bool, answered: bool) -> str | None:
        """What a failed exchange of ``r`` means before any retry budget: ``"complete"`` (the server
        has the whole file; ``r`` is marked so), ``"again"`` (send it again at once on a new connection,
        no failure counted: our own split took the range over, or a kept connection was closed before
        its request was answered, as an HTTP client resends on a stale kept-alive connection), or None
        (a failure for the retry budget)."""
        if isinstance(exc, RefusedByServer) and exc.code is ErrorCode.ALREADY_COMPLETE:
            r["reply"], r["pos"] = "complete", r["end"]
            return "complete"
        if exc.code is ErrorCode.TAKEN_OVER and r.pop("split", False):
            return "again"
        if reused and not answered and (not isinstance(exc, RefusedByServer) or exc.code is ErrorCode.IDLE_TIMEOUT):
            return "again"
        return None

    def _sending(self) -> list[dict]:
        return [r for r in self.ranges if r["reply"] is None and r[self.CONN] is not None and r["from"] is not None]

    def _more_work(self) -> bool:
        """Whether another stream would find work: a range to hand out, or one to split."""
        return len(self.queue) > 0 or best_split([(r["pos"], r["end"]) for r in self._sending()]) is not None

    def _steal(self) -> tuple[int, int] | None:
        """auto, once no range is left to hand out: the second half of the range with the most left to
        send, which its connection gives up (the server's takeover of the overlap tells it; it then
        finishes the first half). Loss-limited streams do not speed up when others finish, so
        without this the last ranges would run alone at one stream's rate."""
        if self.controller is None:
            return None
        sending = self._sending()
        split = best_split([(r["pos"], r["end"]) for r in sending])
        if split is None:
            return None
        victim, point = sending[split[0]], split[1]
        piece = (point, victim["end"])
        self.on_split(victim, point, victim["end"])
        victim["end"], victim["split"] = point, True
        return piece

    def _acked(self) -> tuple[int, list[tuple[float, float]]]:
        """(bytes the server acknowledged on every range so far, the running connections' smoothed and
        smallest RTTs): the goodput the controller sees and whether the path queues. Where the kernel
        does not say (no ``TCP_INFO``), the bytes sent and no RTTs."""
        total, rtts = 0, []
        for r in self.ranges:
            conn = r[self.CONN]
            if conn is not None:
                info = self.tcp_info_of(conn)
                n = acked_from_tcp_info(info) if info else None
                r["acked"] = r["sent"] if n is None else max(r["acked"], r["base"] + n)
                if info and (pair := rtts_from_tcp_info(info)):
                    rtts.append(pair)
            total += r["acked"]
        return total, rtts
