"""Reliability on real processes and sockets: crashes, dead clients, a full disk, slow and
idle clients, authorization and limits.

Every test runs a real ``filedock serve`` process on loopback (``ServerProcess``) and
speaks the data-port protocol over raw sockets with its own resume loop, so a failure
here is the server's, not a client library's. The long variants live in
test_soak.py (``make soak``); docs/reliability.md has the figures of the last runs.

Tests print one ``FIGURES {...}`` line each with what they counted (run with ``-s``
to see them).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import random
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from filedock import digest
from filedock.errors import FiledockError
from filedock.wire import format_crc
from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, put, recv_line, wait_closed, wait_for

MiB = 1 << 20
KEY_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ERR_LINE = re.compile(rb"ERR ([a-z][a-z0-9-]*) [ -~]*\r\n")


# ---------------------------------------------------------------- sources and checks


@dataclass(frozen=True)
class Source:
    """A local file to upload, with the values the server must end up recording."""

    path: Path
    size: int
    crc32: str
    digest: str

    @classmethod
    def make(cls, path: Path, size: int, rng: random.Random) -> "Source":
        """Write ``size`` bytes from ``rng`` (reproducible per seed) and hash them with filedock's digest."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 4 * MiB)
                f.write(rng.randbytes(n))
                left -= n
        hasher = digest.hash_file(path)
        return cls(path, size, format_crc(hasher.crc32), hasher.hexdigest())

    def read(self) -> bytes:
        return self.path.read_bytes()

    def stored_line(self) -> bytes:
        """The one ``STORED`` reply that proves this file arrived intact."""
        return f"STORED {self.size} {self.crc32} {self.digest}".encode()

    def done_line(self) -> bytes:
        return f"DONE {self.digest}\r\n".encode()


def disk_values(path: Path) -> tuple[int, str, str]:
    """(size, crc32, digest) of a file on disk, hashed from its bytes."""
    hasher = digest.hash_file(path)
    return path.stat().st_size, format_crc(hasher.crc32), hasher.hexdigest()


def final_path(server: ServerProcess, job_id: str, key: str) -> Path:
    return server.blob_path(job_id, key)


def run_fsck(data_dir: Path) -> tuple[int, dict]:
    """``python -m filedock fsck --data-dir D --json``: (exit status, report)."""
    proc = subprocess.run([sys.executable, "-m", "filedock", "fsck", "--data-dir", str(data_dir), "--json"],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, json.loads(proc.stdout)


def print_figures(name: str, figures: dict[str, Any]) -> None:
    """One greppable line per test with what it counted (docs/reliability.md quotes them)."""
    print(f"\nFIGURES {name} {json.dumps(figures, sort_keys=True)}", flush=True)


def settled(server: ServerProcess, key: str, timeout: float = 15.0) -> dict:
    """``key``'s record once no data-port connection holds any upload (its last checkpoint is recorded)."""
    wait_for(lambda: not server.api.get("/v1/uploads")["uploads"], timeout=timeout)
    return server.api.file(key)


def raw_http(server: ServerProcess, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, token: str | None | bool = True) -> tuple[int, dict, bytes]:
    """One HTTP request with full control over the bytes: (status, headers lowercased, body).

    ``token=True`` sends the server's admin token, ``None``/``False`` sends no
    ``Authorization`` header, a string sends ``Bearer <string>``.
    """
    host, port = server.api.host, server.api.port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    hdrs = dict(headers or {})
    if token is True:
        hdrs.setdefault("Authorization", f"Bearer {server.token}")
    elif isinstance(token, str):
        hdrs.setdefault("Authorization", f"Bearer {token}")
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def readable_now(socks: list[socket.socket]) -> list[socket.socket]:
    """The sockets with something to read (data, EOF or an error) right now; poll() has no FD_SETSIZE cap."""
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        by_fd[sock.fileno()] = sock
    return [by_fd[fd] for fd, _ in poller.poll(0)]


# ---------------------------------------------------------------- a client with its own resume loop


class Generation:
    """Which server process is live: bumped right after each SIGKILL, before the restart."""

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


RETRY_CODES = {"taken-over", "internal-error", "idle-timeout", "too-many-connections"}


class ResumingUpload(threading.Thread):
    """One client uploading one file over raw sockets: PUT -> OFFSET -> rest -> DONE -> STORED.

    It survives server deaths on its own: any drop means a new connection (with
    backoff) to wherever the server listens now, and a new ``PUT`` that learns the
    durable offset. ``offsets`` records ``(generation at connect, offset)`` for every
    ``OFFSET`` received, so a test can tell whether a restarted server ever offered
    less than it had already recorded as durable. Sending is paced at ``rate``
    bytes/s so that faults land mid-stream.
    """

    CHUNK = 64 * 1024

    def __init__(self, server: ServerProcess, generation: Generation, session_key: str, file_key: str,
                 source: Source, rate: float, deadline: float) -> None:
        super().__init__(name=f"upload-{file_key[:8]}", daemon=True)
        self.server, self.generation = server, generation
        self.session_key, self.file_key, self.source = session_key, file_key, source
        self.rate, self.deadline = rate, deadline
        self.offsets: list[tuple[int, int]] = []
        self.errors_seen: list[bytes] = []
        self.sent = 0
        self.connections = 0
        self.outcome: str | None = None
        self.error: str | None = None
        self.finished_at: float | None = None
        self.awaiting_stored = False  # DONE is sent, STORED not yet read: the durability window

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported by the test, never swallowed
            self.error = f"{type(exc).__name__}: {exc}"
        self.finished_at = time.monotonic()

    def _loop(self) -> None:
        data = memoryview(self.source.read())
        backoff = 0.05
        while time.monotonic() < self.deadline:
            try:
                if self._attempt(data):
                    return
            except (OSError, FiledockError):
                pass  # the server died under us (or is restarting): connect again
            time.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 0.5)
        self.error = "gave up: deadline passed"

    def _attempt(self, data: memoryview) -> bool:
        """One connection; True when the upload is over (stored, or failed for good)."""
        gen = self.generation.value
        with socket.create_connection(self.server.data_addr, timeout=10) as sock:
            self.connections += 1
            sock.sendall(f"FILEDOCK/1 PUT {self.session_key} {self.file_key} {self.source.size}\r\n".encode())
            line = recv_line(sock)
            if line.startswith(b"OFFSET "):
                offset = int(line.split()[1])
                self.offsets.append((gen, offset))
                self._send_paced(sock, data[offset:])
                sock.sendall(self.source.done_line())
                self.awaiting_stored = True
                try:
                    line = recv_line(sock)
                finally:
                    self.awaiting_stored = False
                if line == self.source.stored_line():
                    self.outcome = "stored"
                    return True
            if line.startswith(b"ERR already-complete "):
                # STORED was lost with a dead server: the record must hold our values
                record = self.server.api.file(self.file_key)
                if (record["size"], record["crc32"], record["digest"]) != \
                        (self.source.size, self.source.crc32, self.source.digest):
                    self.error = f"complete with wrong values: {record}"
                else:
                    self.outcome = "already-complete"
                return True
            if not line:
                return False
            self.errors_seen.append(line)
            match = ERR_LINE.fullmatch(line + b"\r\n")
            if match and match[1].decode() in RETRY_CODES:
                return False
            self.error = f"unexpected reply {line[:200]!r}"
            return True

    def _send_paced(self, sock: socket.socket, view: memoryview) -> None:
        started, sent_here = time.monotonic(), 0
        while len(view):
            n = min(self.CHUNK, len(view))
            sock.sendall(view[:n])
            view = view[n:]
            sent_here += n
            self.sent += n
            ahead = sent_here / self.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


# ---------------------------------------------------------------- 1. crash safety


def check_complete_records(server: ServerProcess, job_id: str, files: dict[str, dict],
                           sources: dict[str, Source]) -> tuple[int, int]:
    """For every record that says complete: the bytes on disk are the source's. (checked, wrong)."""
    checked = wrong = 0
    for name, declared in files.items():
        record = server.api.file(declared["key"])
        if record["state"] != "complete":
            continue
        checked += 1
        src = sources[name]
        on_disk = disk_values(final_path(server, job_id, declared["key"]))
        if on_disk != (src.size, src.crc32, src.digest) or \
                (record["size"], record["crc32"], record["digest"]) != (src.size, src.crc32, src.digest):
            wrong += 1
    return checked, wrong


def crash_campaign(tmp_path: Path, *, sizes: list[int], kills: int, done_kills: int, rate: float, seed: int,
                   min_gap: float = 0.4, deadline: float = 240.0) -> dict[str, Any]:
    """Upload ``sizes`` concurrently while the server is SIGKILLed ``kills`` times; returns the figures.

    ``kills - done_kills`` kills fall at random points of the byte stream (uniform
    over 8..90 % of all bytes, plus a little jitter in time); ``done_kills`` fall in
    the durability window of some upload (its DONE sent, its STORED not yet read:
    fsync, rename, record). Every kill comes at least ``min_gap`` seconds after the
    last restart, so that the clients have reconnected. Asserts as it goes: after
    every restart each record that says complete has the source's bytes on disk; at
    the end every file is complete and verified, no durable byte was ever lost and
    fsck finds nothing.
    """
    rng = random.Random(seed)
    sources = {f"f{i:02d}.bin": Source.make(tmp_path / "src" / f"f{i:02d}.bin", size, rng)
               for i, size in enumerate(sizes)}
    # one session for all uploads, and all of them at once (the default allows 16 per session)
    server = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M", "max_connections_per_session=64"])
    server.start()
    figures: dict[str, Any] = {"uploads": len(sizes), "bytes_total": sum(sizes), "kills_planned": kills}
    try:
        job, files, session = server.job_with_files("crash", {n: s.size for n, s in sources.items()})
        generation = Generation()
        stop_at = time.monotonic() + deadline
        uploads = {name: ResumingUpload(server, generation, session["key"], files[name]["key"], src, rate, stop_at)
                   for name, src in sources.items()}
        for upload in uploads.values():
            upload.start()
        total = sum(sizes)
        plan: list[float | None] = [rng.uniform(0.08, 0.9) * total for _ in range(kills - done_kills)]
        plan.sort()
        for _ in range(done_kills):  # None: a kill in some upload's durability window, early enough
            plan.insert(rng.randrange(len(plan) // 2 + 1), None)  # that many uploads are still to finish
        snapshots: list[tuple[int, dict[str, dict]]] = []
        kills_done = checked = wrong = 0
        active_at_kill: list[int] = []
        in_window_at_kill: list[int] = []
        last_restart = time.monotonic()

        def moment(threshold: float | None) -> bool:
            if time.monotonic() - last_restart < min_gap:
                return False
            if threshold is None:
                return any(u.awaiting_stored for u in uploads.values())
            return sum(u.sent for u in uploads.values()) >= threshold

        for threshold in plan:
            while any(u.is_alive() for u in uploads.values()) and not moment(threshold):
                time.sleep(0.0005 if threshold is None else 0.005)
            if not any(u.is_alive() for u in uploads.values()):
                break
            if threshold is not None:
                time.sleep(rng.uniform(0.0, 0.05))
                before = {name: server.api.file(f["key"]) for name, f in files.items()}
            else:
                before = None  # no time to ask: the window is a few milliseconds
            in_window_at_kill.append(sum(u.awaiting_stored for u in uploads.values()))
            server.kill()
            generation.bump()
            kills_done += 1
            if before is not None:
                active_at_kill.append(sum(r["state"] != "complete" for r in before.values()))
                snapshots.append((generation.value, before))
            server.start()
            last_restart = time.monotonic()
            c, w = check_complete_records(server, job["id"], files, sources)
            checked, wrong = checked + c, wrong + w
            assert w == 0, f"after restart {kills_done}: a file recorded complete has wrong bytes on disk"
        for upload in uploads.values():
            upload.join(max(1.0, stop_at - time.monotonic()))
        errors = {n: u.error for n, u in uploads.items() if u.error or u.is_alive()}
        assert not errors, errors

        # durable offsets never go back: the first OFFSET after a kill is at least what was recorded before
        lost = 0
        for gen, before in snapshots:
            for name, record in before.items():
                if record["state"] == "complete":
                    continue
                later = [off for g, off in uploads[name].offsets if g >= gen]
                if later:
                    lost += max(0, record["received"] - later[0])
        final_wrong = 0
        for name, src in sources.items():
            record = server.api.file(files[name]["key"])
            assert record["state"] == "complete", record
            assert (record["size"], record["crc32"], record["digest"]) == (src.size, src.crc32, src.digest)
            if disk_values(final_path(server, job["id"], files[name]["key"])) != (src.size, src.crc32, src.digest):
                final_wrong += 1
        assert server.api.job(job["id"])["state"] == "complete"
        server.stop()
        status, report = run_fsck(server.data_dir)
        figures.update({
            "kills": kills_done,
            "kills_in_durability_window": sum(1 for n in in_window_at_kill if n),
            "uploads_in_flight_per_byte_kill": active_at_kill,
            "uploads_completed": sum(u.outcome is not None for u in uploads.values()),
            "stored_replies": sum(u.outcome == "stored" for u in uploads.values()),
            "already_complete_after_lost_stored": sum(u.outcome == "already-complete" for u in uploads.values()),
            "connections": sum(u.connections for u in uploads.values()),
            "resumes_from_nonzero_offset": sum(1 for u in uploads.values() for _, off in u.offsets if off),
            "bytes_sent_including_resends": sum(u.sent for u in uploads.values()),
            "durable_bytes_lost": lost,
            "complete_records_checked_after_restarts": checked,
            "complete_records_with_wrong_bytes": wrong + final_wrong,
            "server_errors_seen": sorted({e.decode(errors="replace")[:60] for u in uploads.values()
                                          for e in u.errors_seen}),
            "fsck_status": status, "fsck_findings": len(report["findings"]),
            "fsck_bytes_verified": report["bytes_verified"],
        })
        print_figures(f"crash-{len(sizes)}x{kills}", figures)
        assert lost == 0, f"{lost} bytes the server had recorded durable were offered again after a restart"
        assert final_wrong == 0
        assert report["findings"] == [] and status == 0, report
        assert kills_done == kills, f"only {kills_done} of {kills} kills landed while uploads were in flight"
        return figures
    finally:
        server.kill()


def test_sigkill_during_concurrent_uploads_loses_nothing(tmp_path):
    """5 concurrent uploads, 3 SIGKILLs (2 at random points of the byte stream, 1 between some DONE and
    its STORED): every file ends complete and verified.

    After each restart every record that says complete has the right bytes on disk;
    no client is ever offered less than the durable offset recorded before the kill;
    fsck finds nothing afterwards.
    """
    sizes = [3 * MiB + 123, 4 * MiB + 4567, 5 * MiB + 1, 6 * MiB - 7, MiB + 999]
    figures = crash_campaign(tmp_path, sizes=sizes, kills=3, done_kills=1, rate=2.5 * MiB, seed=1)
    assert figures["uploads_completed"] == 5


# ---------------------------------------------------------------- 2. client death

CLIENT_SCRIPT = r"""
import socket, sys, time
host, port, session, key, size, path = sys.argv[1:]
sock = socket.create_connection((host, int(port)))
sock.sendall(f"FILEDOCK/1 PUT {session} {key} {size}\r\n".encode())
line = b""
while not line.endswith(b"\n"):
    line += sock.recv(1)
print(line.decode().strip(), flush=True)
with open(path, "rb") as f:
    f.seek(int(line.split()[1]))
    while chunk := f.read(65536):
        sock.sendall(chunk)
        time.sleep(0.02)
time.sleep(3600)
"""


def test_killed_client_leaves_a_resumable_partial_that_the_sweeper_removes(tmp_path):
    """A client process SIGKILLed mid-upload leaves a partial (received > 0) that resumes at its offset;
    once untouched for partial_ttl the sweeper deletes it (pending, no .part)."""
    src = Source.make(tmp_path / "src.bin", 8 * MiB, random.Random(2))
    limits = ["checkpoint_bytes=1M", "partial_ttl=2", "sweep_interval=0.5"]
    with ServerProcess(tmp_path / "data", limits=limits) as server:
        job, files, session = server.job_with_files("dead-client", {"f": src.size})
        key = files["f"]["key"]
        host, port = server.data_addr
        client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, host, str(port), session["key"], key,
                                   str(src.size), str(src.path)], stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "OFFSET 0"
            wait_for(lambda: server.api.file(key)["received"] >= MiB, timeout=20)
            time.sleep(0.15)  # more bytes past the last checkpoint: the dying connection's own checkpoint
            client.send_signal(signal.SIGKILL)
            client.wait(10)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        record = settled(server, key)
        part = final_path(server, job["id"], key).with_suffix(".part")
        assert record["state"] == "partial" and record["received"] > 0, record
        assert part.exists() and part.stat().st_size >= record["received"]
        received = record["received"]

        sock, line = put(server, session["key"], key, src.size)
        assert line == f"OFFSET {received}".encode()  # resumable, from exactly there
        sock.close()

        swept = wait_for(lambda: (r := server.api.file(key))["state"] == "pending" and r, timeout=15)
        assert swept["received"] == 0
        assert not part.exists()
        assert not part.with_name(key + ".blocks").exists()
        assert server.proc.poll() is None
        print_figures("client-death", {"received_before_kill": received, "swept": True})


# ---------------------------------------------------------------- 3. disk full


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs mounted for this test (as root), unmounted afterwards; skipped if mounting fails."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount an 8 MiB tmpfs at {mount}: {(proc.stderr or proc.stdout).strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_disk(path: Path) -> int:
    """Write ``path`` until the filesystem says ENOSPC; returns the bytes written."""
    written = 0
    chunk = b"\xa5" * (64 * 1024)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n = f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
            written += n  # a short write is followed by ENOSPC on the next one


def send_until_reply(sock: socket.socket, data: bytes, chunk: int = 64 * 1024, timeout: float = 20.0) -> bytes:
    """Send ``data`` while watching for an early reply; returns what the server said until it closed."""
    view = memoryview(data)
    sock.settimeout(timeout)
    try:
        while len(view):
            if readable_now([sock]):
                break
            n = sock.send(view[:chunk])
            view = view[n:]
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        return wait_closed(sock, timeout)
    except OSError:
        return b""


def small_disk_server(mount: Path, tmp_path: Path) -> ServerProcess:
    """A server whose data dir is on the small disk (its log is not: a full disk must not silence it)."""
    return ServerProcess(mount / "data", limits=["disk_reserve=1M", "checkpoint_bytes=1M"],
                         log_path=tmp_path / "small-disk-server.log")


def upload_whole(server: ServerProcess, session_key: str, key: str, data: bytes) -> bytes:
    """A complete versioned upload in one go; returns the final reply line."""
    sock, line = put(server, session_key, key, len(data))
    assert line.startswith(b"OFFSET "), line
    offset = int(line.split()[1])
    sock.sendall(data[offset:] + f"DONE {digest_of(data)}\r\n".encode())
    reply = recv_line(sock)
    sock.close()
    return reply


def stored_line(data: bytes) -> bytes:
    hasher = digest.ContentHasher()
    hasher.update(data)
    return f"STORED {len(data)} {format_crc(hasher.crc32)} {hasher.hexdigest()}".encode()


def test_disk_full_up_front_and_mid_stream(small_disk, tmp_path):
    """On an 8 MiB disk with disk_reserve=1M: too big is refused up front with no-space; a disk that
    fills mid-stream gives that client ERR no-space and keeps its partial, which resumes (offset > 0)
    and completes once space is freed; the server serves other uploads afterwards."""
    rng = random.Random(3)
    data = rng.randbytes(4 * MiB)
    small = rng.randbytes(100_000)
    with small_disk_server(small_disk, tmp_path) as server:
        free = free_bytes(small_disk)
        job, files, session = server.job_with_files("full", {"a": len(data), "small": len(small),
                                                             "over-reserve": free, "huge": 20 * MiB})
        for name in ("over-reserve", "huge"):  # fits the disk but not with the reserve / does not fit at all
            sock, line = put(server, session["key"], files[name]["key"], files[name]["size"])
            assert line.startswith(b"ERR no-space "), (name, line)
            assert wait_closed(sock) == b""
            assert server.api.file(files[name]["key"])["state"] == "pending"
            assert not list((server.data_dir / "jobs").glob(f"*/{server.blob_path(job['id'], files[name]['key']).name}*"))

        key = files["a"]["key"]
        sock, line = put(server, session["key"], key, len(data))
        assert line == b"OFFSET 0"
        sock.sendall(data[:int(1.5 * MiB)])
        wait_for(lambda: server.api.file(key)["received"] >= MiB)
        side = small_disk / "side-file"
        filled = fill_disk(side)
        reply = send_until_reply(sock, data[int(1.5 * MiB):])
        sock.close()
        assert reply.startswith(b"ERR no-space "), reply
        assert reply.count(b"\n") == 1
        assert server.proc.poll() is None and server.api.info()["limits"]["disk_reserve"] == MiB
        record = settled(server, key)
        assert record["state"] == "partial" and record["received"] > 0, record

        side.unlink()
        sock, line = put(server, session["key"], key, len(data))
        assert line.startswith(b"OFFSET "), line
        offset = int(line.split()[1])
        assert offset > 0
        sock.sendall(data[offset:] + f"DONE {digest_of(data)}\r\n".encode())
        assert recv_line(sock) == stored_line(data)
        assert final_path(server, job["id"], key).read_bytes() == data

        assert upload_whole(server, session["key"], files["small"]["key"], small) == stored_line(small)
        assert server.proc.poll() is None
    status, report = run_fsck(small_disk / "data")
    print_figures("disk-full-side-file", {"free_at_start": free, "side_file_bytes": filled,
                                          "resumed_from": offset, "fsck_findings": len(report["findings"])})
    assert report["findings"] == [], report


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_disk_full_between_two_concurrent_uploads(small_disk, tmp_path):
    """Two uploads that each fit alone but not together: space promised to the first upload in progress
    is counted, so the second is refused up front with no-space (never a disk filled to 0 with the
    metadata store unable to commit); the first completes; deleting its job through the API frees the
    space and the second then completes; fsck finds nothing."""
    rng = random.Random(4)
    with small_disk_server(small_disk, tmp_path) as server:
        free = free_bytes(small_disk)
        size = free // 2 + MiB // 2  # fits with the 1 MiB reserve; two of them overflow the disk
        datas = {"p": rng.randbytes(size), "q": rng.randbytes(size)}
        jobs = {n: server.job_with_files(f"job-{n}", {n: len(d)}) for n, d in datas.items()}
        (job_p, files_p, session_p), (_, files_q, session_q) = jobs["p"], jobs["q"]
        sock_p, line = put(server, session_p["key"], files_p["p"]["key"], size)
        assert line == b"OFFSET 0", line
        sock_p.sendall(datas["p"][:MiB])  # p is under way
        sock_q, line = put(server, session_q["key"], files_q["q"]["key"], size)
        assert line.startswith(b"ERR no-space ") and b"promised" in line, line
        sock_q.close()
        reply = send_until_reply(sock_p, datas["p"][MiB:] + f"DONE {digest_of(datas['p'])}\r\n".encode())
        assert reply == stored_line(datas["p"]) + b"\r\n", reply
        assert server.api.file(files_q["q"]["key"])["state"] == "pending"
        free_after_p = free_bytes(small_disk)
        assert free_after_p >= MiB // 2  # the reserve held: room left for the metadata store

        status, _, body = raw_http(server, "DELETE", f"/v1/jobs/{job_p['id']}")
        assert status == 200, body
        sock, line = put(server, session_q["key"], files_q["q"]["key"], size)
        assert line == b"OFFSET 0", line
        sock.sendall(datas["q"] + f"DONE {digest_of(datas['q'])}\r\n".encode())
        assert recv_line(sock) == stored_line(datas["q"])
        print_figures("disk-full-concurrent", {"free_at_start": free, "each_file": size,
                                               "free_after_first": free_after_p})
        small = rng.randbytes(50_000)
        _, sfiles, ssession = server.job_with_files("after", {"s": len(small)})
        assert upload_whole(server, ssession["key"], sfiles["s"]["key"], small) == stored_line(small)
    status, report = run_fsck(small_disk / "data")
    assert report["findings"] == [], report


# ---------------------------------------------------------------- 6. slow and idle clients


def watch_until_closed(socks: dict[str, socket.socket], since: dict[str, float],
                       timeout: float) -> dict[str, tuple[float, bytes]]:
    """For each socket: (seconds from ``since`` until the server closed it, what it sent)."""
    out: dict[str, tuple[float, bytes]] = {}
    received = {name: b"" for name in socks}
    deadline = time.monotonic() + timeout
    open_ = dict(socks)
    while open_ and time.monotonic() < deadline:
        time.sleep(0.02)
        for sock in readable_now(list(open_.values())):
            name = next(n for n, s in open_.items() if s is sock)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                received[name] += chunk
            else:
                out[name] = (time.monotonic() - since[name], received[name])
                del open_[name]
    for name in open_:
        out[name] = (float("inf"), received[name])
    return out


def test_silent_and_stalled_connections_are_closed_with_idle_timeout(tmp_path):
    """header_timeout=1, idle_timeout=2: silent connections, half headers, stalls mid-body and before
    DONE all get ERR idle-timeout within a few seconds; a stalled upload keeps its partial."""
    limits = ["header_timeout=1", "idle_timeout=2"]
    payload = random.Random(6).randbytes(300_000)
    with ServerProcess(tmp_path / "data", limits=limits) as server:
        job, files, session = server.job_with_files("idle", {"mid": len(payload), "trailer": len(payload)})
        socks: dict[str, socket.socket] = {}
        since: dict[str, float] = {}
        for i in range(3):
            socks[f"silent-{i}"] = server.connect()
            since[f"silent-{i}"] = time.monotonic()
        for i, prefix in enumerate([b"FILEDOCK/1 PU", f"{session['key']} ".encode()]):
            socks[f"half-header-{i}"] = sock = server.connect()
            sock.sendall(prefix)
            since[f"half-header-{i}"] = time.monotonic()
        sock, line = put(server, session["key"], files["mid"]["key"], len(payload))
        assert line == b"OFFSET 0"
        sock.sendall(payload[:100_000])
        socks["mid-body"], since["mid-body"] = sock, time.monotonic()
        sock, line = put(server, session["key"], files["trailer"]["key"], len(payload))
        sock.sendall(payload)
        socks["before-done"], since["before-done"] = sock, time.monotonic()

        closed = watch_until_closed(socks, since, timeout=15)
        for name, (seconds, said) in closed.items():
            assert said.startswith(b"ERR idle-timeout ") and said.count(b"\n") == 1, (name, said)
            limit = 2.0 if name in ("mid-body", "before-done") else 1.0
            assert limit - 0.2 <= seconds <= limit + 3.0, (name, seconds)
        mid = settled(server, files["mid"]["key"])
        assert mid["state"] == "partial" and mid["received"] == 100_000, mid
        assert settled(server, files["trailer"]["key"])["received"] == len(payload)
        assert server.proc.poll() is None
        for sock in socks.values():
            sock.close()
    print_figures("idle-timeouts", {name: round(s, 2) for name, (s, _) in closed.items()})


def raise_nofile(wanted: int) -> None:
    """Raise RLIMIT_NOFILE so that this process and a server started after it can hold ``wanted`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            hard = wanted  # we run as root in CI; raising the hard limit needs CAP_SYS_RESOURCE
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def idle_connections_do_not_starve_uploads(tmp_path: Path, held: int, size: int) -> dict[str, Any]:
    """Hold ``held`` idle connections open while a real upload of ``size`` bytes runs; returns figures."""
    raise_nofile(held * 2 + 512)
    data = random.Random(7).randbytes(size)
    with ServerProcess(tmp_path / "data", limits=["header_timeout=120", "idle_timeout=120"]) as server:
        job, files, session = server.job_with_files("busy", {"f": size})
        idle: list[socket.socket] = []
        try:
            opened_at = time.monotonic()
            for i in range(held):
                # 200 per loopback address: under max_unauthenticated_per_address, as many peers would be
                source = (f"127.0.0.{1 + i // 200}", 0)
                sock = socket.create_connection(server.data_addr, timeout=30, source_address=source)
                if i % 3 == 1:
                    sock.sendall(b"FILEDOCK/1 PUT ")  # some hold half a header
                idle.append(sock)
            open_seconds = time.monotonic() - opened_at
            started = time.monotonic()
            reply = upload_whole(server, session["key"], files["f"]["key"], data)
            upload_seconds = time.monotonic() - started
            assert reply == stored_line(data)
            assert final_path(server, job["id"], files["f"]["key"]).read_bytes() == data
            closed = readable_now(idle)
            still_open = held - len(closed)
            assert not closed, f"the server closed {len(closed)} idle connections it should have held"
            status, _, body = raw_http(server, "GET", "/metrics")
            active = int(re.search(rb"filedock_active_connections (\d+)", body)[1])
            assert active >= held
            assert server.proc.poll() is None
        finally:
            for sock in idle:
                sock.close()
    return {"held": held, "still_open_after_upload": still_open, "server_active_connections": active,
            "upload_bytes": size, "upload_seconds": round(upload_seconds, 2),
            "seconds_to_open_all": round(open_seconds, 2)}


def test_200_idle_connections_do_not_stop_an_upload(tmp_path):
    """200 idle connections held open (some with half a header) while a 4 MiB upload finishes."""
    figures = idle_connections_do_not_starve_uploads(tmp_path, held=200, size=4 * MiB)
    print_figures("idle-200", figures)
    assert figures["upload_seconds"] < 30


# ---------------------------------------------------------------- 7. authorization


def is_uuid4(key: str) -> bool:
    """Canonical lowercase text of a version-4, RFC 4122-variant UUID."""
    try:
        value = uuid.UUID(key)
    except ValueError:
        return False
    return str(value) == key and value.version == 4 and value.variant == uuid.RFC_4122


def test_sessions_cannot_cross_jobs_and_dead_sessions_are_refused(tmp_path):
    """A session of job A can neither PUT nor GET job B's file (unknown-file); expired and closed
    sessions are refused; nothing of B changes."""
    data = random.Random(8).randbytes(200_000)
    with ServerProcess(tmp_path / "data") as server:
        job_a, files_a, session_a = server.job_with_files("A", {"a": 10})
        job_b, files_b, session_b = server.job_with_files("B", {"done": len(data), "open": len(data)})
        assert upload_whole(server, session_b["key"], files_b["done"]["key"], data) == stored_line(data)
        for key in (files_b["done"]["key"], files_b["open"]["key"]):
            for request in (f"FILEDOCK/1 PUT {session_a['key']} {key} {len(data)}\r\n",
                            f"FILEDOCK/1 GET {session_a['key']} {key} 0\r\n",
                            f"FILEDOCK/1 ABORT {session_a['key']} {key}\r\n",
                            f"{session_a['key']} {key} {len(data)}\r\n" + "x" * 10):
                sock = server.connect()
                sock.sendall(request.encode())
                reply = wait_closed(sock)
                if request[0] == "F":
                    assert reply.startswith(b"ERR unknown-file "), (request, reply)
                else:
                    assert reply == b""  # a 2007 client is told nothing, and nothing is written
        # the owner's session can read it (the refusal above was about the session, not the file)
        sock = server.connect()
        sock.sendall(f"FILEDOCK/1 GET {session_b['key']} {files_b['done']['key']} 0\r\n".encode())
        assert recv_line(sock).startswith(f"DATA {len(data)} 0 ".encode())
        assert wait_closed(sock) == data

        expired = server.api.open_session(job_b["id"], 0.3)
        closed = server.api.open_session(job_b["id"])
        server.api.close_session(closed["key"])
        time.sleep(0.5)
        for sess, code in ((expired["key"], "session-expired"), (closed["key"], "session-closed")):
            for request in (f"FILEDOCK/1 PUT {sess} {files_b['open']['key']} {len(data)}\r\n",
                            f"FILEDOCK/1 GET {sess} {files_b['done']['key']} 0\r\n"):
                sock = server.connect()
                sock.sendall(request.encode())
                assert wait_closed(sock).startswith(f"ERR {code} ".encode()), (code, request)
        assert server.api.file(files_b["open"]["key"])["state"] == "pending"
        assert not final_path(server, job_b["id"], files_b["open"]["key"]).with_suffix(".part").exists()
        assert final_path(server, job_b["id"], files_b["done"]["key"]).read_bytes() == data


def test_api_refuses_missing_and_wrong_tokens_everywhere(tmp_path):
    """No token, a malformed header or a wrong token: 401 with WWW-Authenticate on every path, before routing."""
    with ServerProcess(tmp_path / "data") as server:
        job, files, session = server.job_with_files("tok", {"f": 1})
        paths = [("GET", "/v1/info"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{job['id']}"),
                 ("DELETE", f"/v1/jobs/{job['id']}"), ("GET", f"/v1/files/{files['f']['key']}"),
                 ("POST", f"/v1/jobs/{job['id']}/sessions"), ("DELETE", f"/v1/sessions/{session['key']}"),
                 ("GET", "/v1/uploads"), ("GET", "/metrics"), ("GET", "/no/such/path"), ("PUT", "/v1/jobs")]
        variants = [({}, None, 'Bearer realm="filedock"'),
                    ({"Authorization": "Basic YWRtaW46YWRtaW4="}, None, 'Bearer realm="filedock"'),
                    ({"Authorization": "Bearer"}, None, 'Bearer realm="filedock"'),
                    ({}, "fdk_" + "A" * 43, 'error="invalid_token"'),
                    ({}, server.token[:-1], 'error="invalid_token"'),
                    ({}, server.token + "x", 'error="invalid_token"')]
        tried = 0
        for method, path in paths:
            for headers, token, challenge in variants:
                status, hdrs, body = raw_http(server, method, path, body=b"{}" if method == "POST" else None,
                                              headers=headers, token=token if token else False)
                tried += 1
                assert status == 401, (method, path, headers, status, body)
                assert json.loads(body)["error"]["code"] == "unauthorized"
                assert challenge in hdrs.get("www-authenticate", ""), hdrs
        assert server.api.job(job["id"])["files_total"] == 1  # the DELETEs changed nothing
        print_figures("api-401", {"requests": tried})


def test_keys_are_uuid4_and_never_logged_in_full_and_tokens_stored_hashed(tmp_path):
    """Keys from the API are canonical UUID4s with 122 random bits; after a busy run the server log
    holds no full key and no token; the SQLite files (WAL included) hold no token, only hashes."""
    import hashlib

    data = random.Random(9).randbytes(300_000)
    server = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=100k"])
    with server:
        job = server.api.create_job("keys")
        batch = server.api.post(f"/v1/jobs/{job['id']}/files",
                                {"files": [{"name": f"n{i}", "size": len(data)} for i in range(1000)]})["files"]
        sessions = [server.api.open_session(job["id"]) for _ in range(20)]
        file_keys = [f["key"] for f in batch]
        session_keys = [s["key"] for s in sessions]
        keys = [job["id"], *file_keys, *session_keys]
        assert all(is_uuid4(k) for k in keys), [k for k in keys if not is_uuid4(k)][:5]
        assert len(set(keys)) == len(keys)
        ints = [uuid.UUID(k).int for k in keys]
        fixed = {76, 77, 78, 79, 62, 63}  # version (4 bits) and variant (2 bits), counted from the right
        varying = {b for b in range(128) if b not in fixed and {(i >> b) & 1 for i in ints} == {0, 1}}
        assert len(varying) == 122, f"only {len(varying)} bits vary across {len(ints)} keys"

        # a busy run that gives the server every reason to log keys
        s1, s2 = session_keys[:2]
        f1, f2, f3, f4 = file_keys[:4]
        sock, line = put(server, s1, f1, len(data))
        sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
        assert recv_line(sock) == stored_line(data)
        old, _ = put(server, s1, f2, len(data))
        old.sendall(data[:150_000])
        time.sleep(0.2)
        new, line = put(server, s2, f2, len(data))  # takeover
        assert wait_closed(old).startswith(b"ERR taken-over ")
        new.sendall(data[int(line.split()[1]):] + b"DONE " + b"0" * 64 + b"\r\n")
        assert recv_line(new).startswith(b"ERR digest-mismatch ")
        for request in (f"FILEDOCK/1 PUT {s1} {f3} {len(data) + 1}\r\n", f"FILEDOCK/1 GET {s1} {f3} 0\r\n",
                        f"FILEDOCK/1 PUT {s1} {uuid.uuid4()} 5\r\n", f"FILEDOCK/1 PUT {uuid.uuid4()} {f3} 5\r\n",
                        f"FILEDOCK/1 PUT {s1} {f3} -1\r\n", f"FILEDOCK/1 ABORT {s1} {f4}\r\n",
                        f"{s1} {f4} {len(data)}\r\n" + "y" * 1000, f"FILEDOCK/1 GET {s1} {f1} 10\r\n",
                        f"FILEDOCK/1 PUT {s1} {f1} {len(data)}\r\n", f"FILEDOCK/2 PUT {s1} {f3} 1\r\n"):
            sock = server.connect()
            sock.sendall(request.encode())
            sock.shutdown(socket.SHUT_WR)
            wait_closed(sock)
        for path in (f"/v1/files/{f1}", f"/v1/files/{uuid.uuid4()}", f"/v1/jobs/{job['id']}",
                     f"/v1/sessions/{s1}?x={f2}", f"/v1/jobs/{job['id']}/nope/{f3}", "/v1/uploads"):
            raw_http(server, "GET", path)
            raw_http(server, "GET", path, token="wrong-" + s2)
        raw_http(server, "DELETE", f"/v1/sessions/{s2}")
        time.sleep(0.3)
        db_files = sorted(server.data_dir.glob("filedock.sqlite3*"))
        db_bytes_running = b"".join(p.read_bytes() for p in db_files)
    db_bytes = b"".join(p.read_bytes() for p in sorted(server.data_dir.glob("filedock.sqlite3*")))
    log = server.log_path.read_text(errors="replace")
    assert log.strip(), "the server wrote no log at all"
    leaked = [k for k in [*file_keys[:10], *session_keys, job["id"]] if k in log]
    assert not leaked, f"full keys in the server log: {leaked}"
    assert server.token not in log
    assert any(p.name.endswith("-wal") for p in db_files), db_files
    for blob in (db_bytes_running, db_bytes):
        assert server.token.encode() not in blob
        assert server.token.encode("utf-16-le") not in blob
    assert hashlib.sha256(server.token.encode()).hexdigest().encode() in db_bytes
    print_figures("keys", {"keys_checked": len(keys), "random_bits": len(varying),
                           "log_bytes_scanned": len(log), "db_files": [p.name for p in db_files]})


# ---------------------------------------------------------------- 8. limits


def test_file_size_and_job_quota_limits(tmp_path):
    """max_file_size: 413 too-large (also in a batch, which adds nothing); job_quota: 409 quota-exceeded;
    a file declared before max_file_size was lowered is refused at the data port with too-large."""
    with ServerProcess(tmp_path / "data", limits=["max_file_size=10M", "job_quota=20M"]) as server:
        job = server.api.create_job("limits")
        files_url = f"/v1/jobs/{job['id']}/files"
        cases = [({"name": "big", "size": 10 * MiB + 1}, 413, "too-large"),
                 ({"files": [{"name": "ok", "size": 1}, {"name": "big", "size": 10 * MiB + 1}]}, 413, "too-large"),
                 ({"name": "max", "size": 10 * MiB}, 201, None),
                 ({"name": "nine", "size": 9 * MiB}, 201, None),
                 ({"name": "over-quota", "size": MiB + 1}, 409, "quota-exceeded"),
                 ({"files": [{"name": "x", "size": MiB}, {"name": "y", "size": 1}]}, 409, "quota-exceeded"),
                 ({"name": "to-the-byte", "size": MiB}, 201, None),
                 ({"name": "empty", "size": 0}, 201, None),
                 ({"name": "one-more", "size": 1}, 409, "quota-exceeded")]
        for body, status, code in cases:
            got, _, raw = raw_http(server, "POST", files_url, json.dumps(body).encode())
            assert got == status, (body, got, raw)
            if code:
                assert json.loads(raw)["error"]["code"] == code
        names = sorted(f["name"] for f in server.api.job(job["id"])["files"])
        assert names == ["empty", "max", "nine", "to-the-byte"]
        session = server.api.open_session(job["id"])
        key = next(f["key"] for f in server.api.job(job["id"])["files"] if f["name"] == "max")
        server.stop()
        server.limits = ["max_file_size=5M"]
        server.start()
        sock, line = put(server, session["key"], key, 10 * MiB)
        assert line.startswith(b"ERR too-large "), line


def test_connection_limits_overall_and_per_session(tmp_path):
    """max_connections=20: the 21st connection gets ERR too-many-connections and a slot frees up when
    one closes; max_connections_per_session=2: a third concurrent upload in a session is refused."""
    limits = ["max_connections=20", "max_connections_per_session=2"]
    with ServerProcess(tmp_path / "data", limits=limits) as server:
        held = [server.connect() for _ in range(20)]
        time.sleep(0.3)
        extra = server.connect()
        reply = wait_closed(extra)
        assert reply.startswith(b"ERR too-many-connections "), reply
        assert not readable_now(held), "a connection under the limit was closed"
        held.pop().close()

        def admitted() -> bool:
            sock = server.connect()
            sock.settimeout(0.3)
            try:
                sock.recv(100)  # an ERR line or a close: refused
                return False
            except TimeoutError:
                return True  # a silent connection is held, not answered: admitted
            finally:
                sock.close()

        wait_for(admitted, timeout=10)
        for sock in held:
            sock.close()
        wait_for(lambda: b"filedock_active_connections 0" in raw_http(server, "GET", "/metrics")[2])

        job, files, session = server.job_with_files("per-session", {"a": 100, "b": 100, "c": 100})
        first, l1 = put(server, session["key"], files["a"]["key"], 100)
        second, l2 = put(server, session["key"], files["b"]["key"], 100)
        assert (l1, l2) == (b"OFFSET 0", b"OFFSET 0")
        third, l3 = put(server, session["key"], files["c"]["key"], 100)
        assert l3.startswith(b"ERR too-many-connections "), l3
        other = server.api.open_session(job["id"])  # the limit is per session, not per job
        sock, line = put(server, other["key"], files["c"]["key"], 100)
        assert line == b"OFFSET 0"
        sock.close()
        first.close()
        wait_for(lambda: put(server, session["key"], files["c"]["key"], 100)[1] == b"OFFSET 0")
        second.close()


def test_takeover_is_possible_at_the_per_session_limit(tmp_path):
    """A client whose upload connection went quiet reconnects to resume it: that takeover replaces one of
    the session's own connections, so it must be admitted even when the session is at
    max_connections_per_session (docs/protocol.md: "A dropped connection never leaves a lock behind")."""
    data = random.Random(10).randbytes(MiB)
    with ServerProcess(tmp_path / "data", limits=["max_connections_per_session=2"]) as server:
        _, files, session = server.job_with_files("takeover-at-limit", {"a": len(data), "b": len(data)})
        stalled, line = put(server, session["key"], files["a"]["key"], len(data))
        assert line == b"OFFSET 0"
        stalled.sendall(data[:300_000])
        busy, line = put(server, session["key"], files["b"]["key"], len(data))
        assert line == b"OFFSET 0"
        time.sleep(0.3)  # "a" now stalls with its connection still open, as a half-dead one would
        resumed, line = put(server, session["key"], files["a"]["key"], len(data))
        assert line == b"OFFSET 300000", (
            f"the takeover of a stalled upload was answered {line!r}: at the per-session limit the stalled "
            f"connection holds its slot until idle_timeout, so the client cannot resume")
        assert wait_closed(stalled).startswith(b"ERR taken-over ")
        resumed.sendall(data[300_000:] + f"DONE {digest_of(data)}\r\n".encode())
        assert recv_line(resumed) == stored_line(data)
        busy.close()


def test_header_length_limit(tmp_path):
    """max_header=256: a 300-byte line (with or without newline) gets header-too-long; a normal request works."""
    with ServerProcess(tmp_path / "data", limits=["max_header=256"]) as server:
        for raw in (b"A" * 299 + b"\n", b"A" * 300, b"FILEDOCK/1 PUT " + b"1" * 285 + b"\r\n"):
            sock = server.connect()
            sock.sendall(raw)
            reply = wait_closed(sock)
            assert reply.startswith(b"ERR header-too-long ") and reply.count(b"\n") == 1, reply
        data = b"fits" * 100
        _, files, session = server.job_with_files("short-headers", {"f": len(data)})
        assert upload_whole(server, session["key"], files["f"]["key"], data) == stored_line(data)
