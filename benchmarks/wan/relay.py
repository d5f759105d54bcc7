"""The packet relay between the two TUN devices of a ``Link``: one process, both directions.

The reference for the model and the fallback: ``Link`` runs the C relay (relay.c, the same model,
command line and protocol; about six times this one's ceiling at MTU 1500, by
letting the stacks hand over TSO batches) wherever a compiler builds it.

Run by ``wan.link.Link``, never by hand::

    python relay.py --sender-ns NS --receiver-ns NS --tun NAME --delay-ms D --loss P
                    --rate-mbit R --queue-bytes Q --seed S [--cpu N]

It opens one TUN device in each namespace (the device is created in the namespace
the process is in when it opens ``/dev/net/tun``, so it ``setns``-es into each in turn
and the host's namespace never sees them), prints ``{"ready": ...}`` on stdout, then
moves IP packets both ways until its stdin closes, and prints its counters as one
JSON line. Each direction is its own link model, applied to every packet read:

1. loss: dropped with probability ``--loss`` (a seeded ``random.Random``);
2. rate: a FIFO serialised at ``--rate-mbit`` (IP bytes): a packet leaves the queue
   when the link has finished the ones before it; a packet that would make the
   backlog exceed ``--queue-bytes`` is dropped (drop-tail);
3. delay: written to the other TUN ``--delay-ms`` after it left the queue.

Departure times only grow, so each direction is one deque in due order and the next
wake-up is the earliest head. The process dies with its parent (PR_SET_PDEATHSIG) and
when its stdin closes, so a crashed test leaves no relay behind; the devices vanish
with it.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import random
import resource
import select
import signal
import struct
import sys
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
BATCH = 256
"""Packets read from one TUN before the relay looks at due deliveries again (bounds the burst it adds)."""

_libc = ctypes.CDLL(None, use_errno=True)


def enter_namespace(name: str) -> None:
    """Move this (single-threaded) process into network namespace ``name`` (``ip netns`` path)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tun(name: str) -> int:
    """A non-persistent TUN device ``name`` (layer 3, no packet-info header) in the current namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Direction:
    """One direction of the link: loss, a rate-limited drop-tail queue, then a fixed delay."""

    def __init__(self, name: str, fd_in: int, fd_out: int, delay: float, loss: float, rate_bytes: float,
                 queue_bytes: int, seed: int) -> None:
        self.name, self.fd_in, self.fd_out = name, fd_in, fd_out
        self.delay, self.loss = delay, loss
        self.rate = rate_bytes  # bytes per second; 0 means unlimited
        self.queue_bytes = queue_bytes
        self.random = random.Random(seed).random
        self.line: deque[tuple[float, bytes]] = deque()
        self.free_at = 0.0  # when the link finishes serialising what is queued
        self.counts = {"packets": 0, "bytes": 0, "lost": 0, "queue_drops": 0, "delivered": 0, "write_errors": 0}

    def ingest(self, now: float) -> None:
        """Read what the kernel queued on the input TUN (up to a batch) and schedule each packet."""
        read, fd, line, rate, loss, rnd = os.read, self.fd_in, self.line, self.rate, self.loss, self.random
        delay, free_at, limit = self.delay, self.free_at, self.queue_bytes
        packets = nbytes = lost = dropped = 0
        for _ in range(BATCH):
            try:
                packet = read(fd, 65536)
            except BlockingIOError:
                break
            size = len(packet)
            packets += 1
            nbytes += size
            if loss and rnd() < loss:
                lost += 1
                continue
            if rate:
                start = free_at if free_at > now else now
                if (start - now) * rate + size > limit:
                    dropped += 1
                    continue
                free_at = start + size / rate
                line.append((free_at + delay, packet))
            else:
                line.append((now + delay, packet))
        self.free_at = free_at
        c = self.counts
        c["packets"] += packets
        c["bytes"] += nbytes
        c["lost"] += lost
        c["queue_drops"] += dropped

    def deliver(self, now: float) -> float | None:
        """Write every packet that is due; return when the next one is due (None if none waits)."""
        line, write, fd = self.line, os.write, self.fd_out
        done = 0
        while line and line[0][0] <= now:
            try:
                write(fd, line.popleft()[1])
                done += 1
            except OSError:
                self.counts["write_errors"] += 1
        self.counts["delivered"] += done
        return line[0][0] if line else None


def relay(forward: Direction, backward: Direction) -> None:
    """Move packets until stdin closes."""
    poller = select.epoll()
    by_fd = {forward.fd_in: forward, backward.fd_in: backward}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    poller.register(sys.stdin.fileno(), select.EPOLLIN)
    stdin = sys.stdin.fileno()
    clock = time.monotonic
    while True:
        now = clock()
        due = [d for d in (forward.deliver(now), backward.deliver(now)) if d is not None]
        timeout = max(0.0, min(due) - clock()) if due else -1
        for fd, _ in poller.poll(timeout):
            if fd == stdin:
                return
            by_fd[fd].ingest(clock())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sender-ns", required=True)
    p.add_argument("--receiver-ns", required=True)
    p.add_argument("--tun", default="wan0")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    p.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped, each direction")
    p.add_argument("--rate-mbit", type=float, default=0.0, help="link rate in Mbit/s of IP bytes (0: unlimited)")
    p.add_argument("--queue-bytes", type=int, default=0, help="drop-tail queue limit per direction")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpu", type=int, default=None, help="pin the relay to this CPU")
    args = p.parse_args(argv)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the line above took effect
        return 1
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    enter_namespace(args.sender_ns)
    fd_sender = open_tun(args.tun)
    enter_namespace(args.receiver_ns)
    fd_receiver = open_tun(args.tun)
    _libc.setns(home, CLONE_NEWNET)
    os.close(home)
    rate = args.rate_mbit * 1e6 / 8
    delay = args.delay_ms / 1000
    forward = Direction("sender->receiver", fd_sender, fd_receiver, delay, args.loss, rate, args.queue_bytes,
                        args.seed)
    backward = Direction("receiver->sender", fd_receiver, fd_sender, delay, args.loss, rate, args.queue_bytes,
                         args.seed + 1)
    print(json.dumps({"ready": True, "pid": os.getpid(), "relay": "python"}), flush=True)
    try:
        relay(forward, backward)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent cleans up
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({forward.name: forward.counts, backward.name: backward.counts,
                      "cpu_seconds": {"user": usage.ru_utime, "system": usage.ru_stime}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
