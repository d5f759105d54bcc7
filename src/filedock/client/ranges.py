"""Planning a ranged upload: which byte ranges go over which of K connections.

Pure functions (no sockets): ``plan_ranges`` cuts a file into at most K aligned
ranges; ``missing`` subtracts what the server said is durable; ``auto_streams``
is the K ``--streams auto`` starts from, given the path's measured round-trip time
(``client/streams_policy.py`` then adapts it to the measured goodput). ``RangedUpload``
in ``client/blocking.py`` and ``client/twisted/ranged.py`` do the I/O.
"""

from __future__ import annotations

from filedock.wire import RANGE_ALIGN

MIN_RANGED_SIZE = 2 * RANGE_ALIGN
"""Smaller files always go over one plain PUT: there is nothing to split."""

MAX_STREAMS = 16
"""At most this many connections per file (the server's default ``max_connections_per_session``)."""

LAN_RTT = 0.002
"""Below this round-trip time (seconds) one stream already fills the path: ``auto`` keeps one."""

RTT_PER_STREAM = 0.0125
"""``auto`` adds one stream per this much round-trip time (8 streams at 100 ms), see ``auto_streams``."""


def plan_ranges(size: int, streams: int, align: int = RANGE_ALIGN) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``size`` bytes, at most ``streams`` of them, each starting on a
    multiple of ``align`` and ending on one (the last ends at ``size``), as equal as blocks allow."""
    if size <= 0:
        return []
    if streams < 1:
        raise ValueError("at least one stream")
    blocks = -(-size // align)
    k = min(streams, blocks)
    out, first = [], 0
    for i in range(k):
        last = blocks * (i + 1) // k
        out.append((first * align, min(size, last * align)))
        first = last
    return out


def missing(ranges: list[tuple[int, int]], durable: tuple[tuple[int, int], ...] | list[tuple[int, int]],
            ) -> list[tuple[int, int]]:
    """The parts of ``ranges`` not covered by ``durable`` (both ascending, half-open)."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        pos = start
        for a, b in durable:
            if b <= pos or a >= end:
                continue
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < end:
            out.append((pos, end))
    return out


def auto_streams(rtt: float, size: int, limit: int = MAX_STREAMS) -> int:
    """The K ``--streams auto`` starts with, from the round-trip time ``rtt`` (seconds) of the first connection.

    One stream on a short path (below ``LAN_RTT``: loopback and LANs, where one stream fills the
    link and more only add per-connection costs, so ``auto`` is never slower than one stream);
    on a long one, a stream per ``RTT_PER_STREAM`` of RTT: each stream's window is limited by its
    socket buffer and, under loss, by its congestion control (throughput ~ 1/(RTT sqrt(p))), so the
    aggregate grows about linearly with streams until the link is full. Never more streams than
    blocks, nor than ``limit``.
    """
    if rtt < LAN_RTT:
        return 1
    k = max(2, round(rtt / RTT_PER_STREAM))
    return max(1, min(k, limit, len(plan_ranges(size, k))))
