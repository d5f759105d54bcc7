"""The sender's TCP congestion control for a path, chosen from what the path measured.

Loss-based congestion control (CUBIC, Reno: most machines' default) reads every lost packet
as congestion and halves its window, so on a long path with a little random loss a stream is
held to about MSS/RTT x 1.22/sqrt(p): at 100 ms and 0.1 % loss about 1 MB/s a stream, and
eight streams a few percent of a 1 Gbit/s link (docs/wan.md). BBR paces at the bottleneck's
measured rate and does not read random loss as congestion; on the emulated 100 ms, 0.1 % link
eight BBR streams carry more than ten times what eight CUBIC streams do. Linux lets a sender
choose per socket (``TCP_CONGESTION``), so a ranged upload on a long path asks for BBR where
the kernel offers it, unless the user chose one.
"""

from __future__ import annotations

import socket
from typing import Callable

LONG_PATH_RTT = 0.002
"""From this round-trip time (seconds) on, a path is long enough for the choice to matter (the
same line ``auto_streams`` draws: below it one stream fills the link and loss recovers at once)."""

PREFERRED = "bbr"
"""The congestion control asked for on long paths."""


def choose_congestion_control(rtt: float | None, requested: str | None, system_default: str | None,
                              settable: Callable[[str], bool]) -> tuple[str | None, str]:
    """(the name to set on the data connections, or None to leave the system's default; why).

    ``rtt``: the measured round-trip time in seconds (None: not measured); ``requested``: the user's
    ``--congestion-control``; ``system_default``: what a new socket gets here; ``settable(name)``:
    whether this process may set ``name`` per socket. The user's choice always wins; short or
    unmeasured paths keep the default; a long path gets ``PREFERRED`` where it can be set.
    """
    if requested:
        return requested, "asked for"
    if rtt is None:
        return None, "system default (path not measured)"
    if rtt < LONG_PATH_RTT:
        return None, f"system default (short path, rtt {rtt * 1000:.2f} ms)"
    if system_default == PREFERRED:
        return None, f"system default {PREFERRED} (long path, rtt {rtt * 1000:.0f} ms)"
    if not settable(PREFERRED):
        return None, f"system default ({PREFERRED} not offered here; long path, rtt {rtt * 1000:.0f} ms)"
    return PREFERRED, f"{PREFERRED} chosen for a long path (rtt {rtt * 1000:.0f} ms; system default {system_default})"


def can_set(name: str) -> bool:
    """Whether this process may give a socket congestion control ``name`` (the kernel has it and
    allows it to this user)."""
    if not hasattr(socket, "TCP_CONGESTION"):
        return False
    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError:
            return False
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode() == name
