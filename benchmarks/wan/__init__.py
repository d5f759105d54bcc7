"""A WAN link emulator for filedock's tests and benchmarks: two network namespaces joined by a
user-space packet relay on TUN devices (delay, random loss, rate limit with a drop-tail queue).
See docs/wan.md."""

from .link import Link, LinkUnavailable, Namespace, namespaces, remove_stale, unavailable_reason

__all__ = ["Link", "LinkUnavailable", "Namespace", "namespaces", "remove_stale", "unavailable_reason"]
