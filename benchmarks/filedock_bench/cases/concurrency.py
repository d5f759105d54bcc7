"""Case 3: aggregate throughput with 1, 4 and 16 concurrent uploads, and one upload
while 1000 idle connections (from five other loopback addresses) are held open.

Plain sendfile clients in threads (sendfile releases the GIL), versioned dialect,
one session; ``size`` bytes in total, split evenly, each upload a different slice
of one source file. Aggregate = total bytes / (first connect -> last ``STORED``).
"""

from __future__ import annotations

import resource
import socket
import subprocess
import threading
import time
import uuid

from filedock_bench import plain_client
from filedock_bench.measure import Figure, Sample, human_size, median, run_interleaved, say
from filedock_bench.workspace import (ServerProcess, Workspace, delete_job, filedock_server, nofile_limit, open_fds,
                                      random_file, wait_for)

LEVELS = (1, 4, 16)
IDLE = 1000


def _split(total: int, n: int) -> list[int]:
    base = total // n
    return [base + (1 if i < total % n else 0) for i in range(n)]


def upload_concurrently(server: ServerProcess, source, total: int, n: int, label: str) -> float:
    """Seconds from the start signal to the last ``STORED`` of ``n`` uploads of ``total`` bytes together."""
    sizes = _split(total, n)
    job, files, session = server.job_with_files(f"bench-{label}-{uuid.uuid4().hex[:8]}",
                                                {f"part-{i:02d}": s for i, s in enumerate(sizes)})
    bases = [sum(sizes[:i]) for i in range(n)]
    gate = threading.Barrier(n + 1)
    ends: list[float] = [0.0] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with open(source, "rb") as f:
                gate.wait()
                plain_client.put(server.data_addr, session["key"], files[f"part-{i:02d}"]["key"], f, bases[i],
                                 sizes[i])
            ends[i] = time.monotonic()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    delete_job(server, job["id"])
    return max(ends) - t0


class Concurrent:
    """``n`` uploads at once."""

    def __init__(self, server: ServerProcess, source, size: int, n: int) -> None:
        self.server, self.source, self.size, self.n = server, source, size, n
        self.figure = Figure(f"3-c{n}", f"{n} concurrent upload{'s' if n > 1 else ''} (aggregate)", nbytes=size)
        self.figure.notes.append(f"{n} x {human_size(size // n)}")

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        return Sample(upload_concurrently(self.server, self.source, self.size, self.n, f"c{self.n}"))

    def stop(self) -> None:
        pass


class IdleLoad:
    """One upload while ``IDLE`` connections that send nothing are held open."""

    def __init__(self, server: ServerProcess, source, size: int) -> None:
        self.server, self.source, self.size = server, source, size
        self.figure = Figure("3-idle", f"1 upload with {IDLE} idle connections open", nbytes=size)

    def start(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = IDLE + 256
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, 4096)), hard))

    def run_once(self, index: int) -> Sample:
        pid = self.server.proc.pid
        before = open_fds(pid)
        opened, overflows = time.monotonic(), listen_overflows()
        idle, stalls = _open_idle(self.server.data_addr)
        open_seconds, overflows = time.monotonic() - opened, listen_overflows() - overflows
        try:
            accepted = _settled(lambda: open_fds(pid) - before)
            seconds = upload_concurrently(self.server, self.source, self.size, 1, "idle")
            still = open_fds(pid) - before
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: open_fds(pid) <= before + 8, 30, 0.05, "idle connections closed on the server")
        return Sample(seconds, {"accepted": accepted, "still_open_after_upload": still,
                                "server_nofile": nofile_limit(pid), "open_seconds": open_seconds,
                                "connect_stalls": stalls, "listen_overflows": overflows})

    def stop(self) -> None:
        pass


IDLE_PER_PEER = 200
"""Idle connections per loopback address (127.0.0.2, .3, ...): the server gives one address at
most ``max_unauthenticated_per_address`` (256) silent connections, so the idle crowd comes from
several peers, as it would in life, and the measured upload from 127.0.0.1."""


def _open_idle(addr: tuple[str, int]) -> tuple[list[socket.socket], int]:
    """``IDLE`` connections opened back to back; also how many connects took over 0.5 s
    (a SYN dropped because the listen queue was full, retried by the kernel after 1 s)."""
    socks, stalls = [], 0
    for i in range(IDLE):
        t0 = time.monotonic()
        socks.append(socket.create_connection(addr, timeout=30,
                                              source_address=(f"127.0.0.{2 + i // IDLE_PER_PEER}", 0)))
        stalls += time.monotonic() - t0 > 0.5
    return socks, stalls


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full (TcpExt
    ListenOverflows: machine-wide, so other users' programs could add to it)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenOverflows", 0))
    return 0


def listen_backlog(port: int) -> str:
    """The accept-queue length a listening socket was given (``ss``'s Send-Q), or '?'."""
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        return out.split()[2]
    except (OSError, IndexError):
        return "?"


def _settled(count, quiet: float = 0.5, timeout: float = 20.0) -> int:
    """A count once it has stopped changing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def run(size: int, runs: int) -> list[Figure]:
    with Workspace("concurrency") as work:
        say(f"case 3: {human_size(size)} in 1, 4, 16 concurrent uploads and with {IDLE} idle connections; "
            "creating the source file")
        source = random_file(work / "source.bin", size)
        server = filedock_server(work / "filedock-data")
        try:
            variants = [Concurrent(server, source, size, n) for n in LEVELS] + [IdleLoad(server, source, size)]
            figures = run_interleaved(variants, runs)
            figures[-1].notes.append(f"server RLIMIT_NOFILE {nofile_limit(server.proc.pid)} (soft/hard), "
                                     f"data-port listen backlog {listen_backlog(server.data_addr[1])}")
        finally:
            server.stop()
    idle = figures[-1]
    if idle.samples:
        accepted = idle.extras("accepted")
        still = idle.extras("still_open_after_upload")
        idle.notes.append(f"server accepted {min(accepted)}-{max(accepted)} of {IDLE}; "
                          f"{min(still)} still open after the upload")
        idle.notes.append(f"opening them back to back took {median(idle.extras('open_seconds')):.1f} s (median), "
                          f"{max(idle.extras('connect_stalls'))} connects stalled > 0.5 s (SYN retried), "
                          f"{max(idle.extras('listen_overflows'))} accept-queue overflows (TcpExt ListenOverflows)")
        single = next((f for f in figures if f.key == "3-c1" and f.samples), None)
        if single:
            idle.notes.append(f"{idle.mbps / single.mbps:.2f}x the single-upload figure (3-c1) of this case")
    return figures
