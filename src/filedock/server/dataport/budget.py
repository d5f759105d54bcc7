"""Connections that have not sent a request yet: a budget of their own, shared fairly between peers."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.logger import Logger

from filedock.config import Limits
from filedock.server.dataport.stats import DataPortStats

log = Logger(namespace="filedock.dataport")


def peer_group(addr: Any) -> str:
    """Who a connection counts against for the per-address share: its IP address (an IPv6
    address by its /64, which one host usually holds whole); one group for non-IP transports."""
    host = getattr(addr, "host", None)
    if not host:
        return "-"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class UnauthenticatedBudget:
    """Counts connections without a whole request line, per peer (oldest first).

    Each counted connection has a ``peer`` and a ``crowded_out()`` method, which the
    budget calls to end it when a newcomer from a lighter peer needs its slot.
    """

    def __init__(self, limits: Limits, stats: DataPortStats) -> None:
        self.limits, self.stats = limits, stats
        self.by_peer: dict[str, dict[Any, None]] = {}
        self.count = 0

    def admit(self, conn: Any) -> str | None:
        """Count a new connection as unauthenticated; or say why it is refused.

        One peer holds at most ``max_unauthenticated_per_address`` such connections. When
        all connections, or all unauthenticated ones, are in use, the newcomer takes the
        slot of the oldest unauthenticated connection of the peer holding the most, if
        that peer holds more than the newcomer's would: a flood from a few addresses
        cannot lock the others out, and uploads under way are never the ones ended.
        """
        limits = self.limits
        mine = self.by_peer.get(conn.peer, {})
        if len(mine) >= limits.max_unauthenticated_per_address:
            return "too many connections from your address have not sent a request"
        if self.stats.active > limits.max_connections or self.count >= limits.max_unauthenticated:
            heaviest = max(self.by_peer.values(), key=len, default={})
            if len(heaviest) <= len(mine) + 1:
                return "the server holds too many connections"
            victim = next(iter(heaviest))
            self.stats.refused += 1
            log.info("connection from {peer} ended for a newcomer from {other}: no request yet",
                     peer=victim.peer, other=conn.peer)
            self.leave(victim)
            victim.crowded_out()
        self.by_peer.setdefault(conn.peer, {})[conn] = None
        self.count += 1
        return None

    def leave(self, conn: Any) -> None:
        """``conn`` sent a whole request line (or is gone): it no longer counts."""
        mine = self.by_peer.get(conn.peer)
        if mine is not None and conn in mine:
            del mine[conn]
            self.count -= 1
            if not mine:
                del self.by_peer[conn.peer]
