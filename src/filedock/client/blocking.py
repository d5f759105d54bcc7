"""The blocking data-port client: one file up or down, resumable and verified.

For scripts and the CLI; no reactor. ``DataPortClient`` speaks the versioned
dialect through ``filedock.wire.ClientConnection`` and adds what a long transfer
needs: it learns the server's durable offset on every connection, reconnects with
jittered exponential backoff after a drop, a reset, a stall or a transient server
error, computes the local CRC-32 and content digest exactly once per call (in a
background thread, beside the sending), and reports success only when the
server's ``STORED`` values equal its own.

Memory is bounded on every path: the body goes out with sendfile(2) (plain TCP,
zero-copy) or through four 1 MiB buffers that the digest thread fills and hashes and the
sender encrypts (TLS: the file is read once; one reused buffer when resuming); replies and
downloads are read in 1 MiB pieces and handled before the next read.
"""

from __future__ import annotations

import copy
import errno
import functools
import logging
import os
import queue
import select
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from filedock import durability, record, wire
from filedock.client import http11
from filedock.client.model import (DURABLE, SENT, VERIFIED, Cancelled, DownloadResult, Outcome, ProgressCallback,
                                   RetryPolicy, SourceStamp, SourceWatch, UploadResult)
from filedock.client.pathtune import can_set, choose_congestion_control
from filedock.client.ranges import MAX_STREAMS, MIN_RANGED_SIZE, auto_streams, plan_ranges
from filedock.client.retry import REPLY_PATIENCE, RETRYABLE_REFUSALS, GiveUp, RetryBudget
from filedock.client.streams_policy import (UNSENT_LIMIT, ControllerTiming, RangeQueue, RangeSchedule,
                                            StreamController, chunk_plan, queueing,
                                            rtt_from_tcp_info)
from filedock.client.transfer import (AwaitDigest, BatchAttempt, Connect, DownloadAttempt, DropPartial, Fail, Finish,
                                      QueryStored, Restart, SendBody, Sleep, UploadAttempt, reply_error)
from filedock.digest import ContentHasher
from filedock.errors import ErrorCode, FiledockError, TransportFailure, short_key, ssl_errors

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("filedock.client")

CHUNK = 1 << 20
"""Bytes per read from a file or a socket, and the size of the TLS send buffer."""

POLL_SECONDS = 0.25
"""Longest a blocked socket call waits before cancellation and stalls are checked."""

HASH_WAIT = 30.0
"""How long a connection whose body is sent waits for the local digest before it
is closed (the server would time it out) and reopened once the digest is ready."""

RETRYABLE = frozenset(code.value for code in RETRYABLE_REFUSALS)
"""Server error codes a new connection may cure (``filedock.client.retry`` decides; kept for callers)."""

_MAX_PIECE = 64 * CHUNK


class _SourceChanged(Exception):
    """A batch file changed: close before DONE (nothing is stored) and send the batch again without it."""

    def __init__(self, key: str, change: str) -> None:
        super().__init__(change)
        self.key, self.change = key, change


class _Reconnect(Exception):
    """Start again on a new connection at once; not a failure (nothing went wrong)."""


REPORT_BYTES = CHUNK
"""Progress between two ``sent`` reports in the middle of a transfer that always earns a report."""

REPORT_SECONDS = 0.1
"""Longest quiet time between two ``sent`` reports while bytes flow (a bar stays smooth on a slow link)."""


class _Reports:
    """The caller's progress callback, with a ``sent`` report whenever bytes have moved for
    ``REPORT_SECONDS``, by 1% of the file, or by ``REPORT_BYTES``, whichever comes first.

    Forced reports (where a connection starts), the last ``sent`` (done == total) and
    the other stages always pass, so the stages still arrive in order.
    """

    def __init__(self, progress: ProgressCallback | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._progress = progress
        self._last = 0
        self._clock = clock
        self._last_at = clock()

    def __call__(self, stage: str, done: int, total: int, force: bool = False) -> None:
        if self._progress is None:
            return
        now = self._clock()
        if stage == SENT and done != total and not force:
            moved = abs(done - self._last)
            if moved < min(REPORT_BYTES, max(total // 100, 1)) and now - self._last_at < REPORT_SECONDS:
                return
        self._last, self._last_at = done, now
        self._progress(stage, done, total)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


_reply_error = reply_error


def _tune_socket(sock: socket.socket) -> None:
    """TCP keepalive notices a vanished peer (host down, network gone) within a minute or two.
    ``TCP_NODELAY``: every request line goes out in one ``send``, bodies in large ones; with Nagle's
    algorithm ``DONE`` waited behind the body's last, partly filled segment until the server
    acknowledged it: a delayed ACK (40 ms) on a LAN, a round trip on a long path, once per file
    or range."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def congestion_control(name: str | None = None) -> str | None:
    """The TCP congestion control a new socket gets here when it asks for ``name`` (None: the system's
    default), as the kernel names it; None where the platform cannot choose per socket. ``OSError`` if
    the kernel refuses ``name`` (not built, or not allowed for this user)."""
    if not hasattr(socket, "TCP_CONGESTION"):
        if name:
            raise OSError(errno.ENOPROTOOPT, "this platform cannot choose TCP congestion control per socket")
        return None
    with socket.socket() as sock:
        if name:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()


def _widen_send_buffer(sock: socket.socket) -> None:
    """Ask for the largest send buffer an explicit ``SO_SNDBUF`` may have, where that is more than the
    kernel's autotuning may reach (``net.core.wmem_max``, doubled by the kernel, above the third
    ``net.ipv4.tcp_wmem``): in flight is at most the send buffer, so at 100 ms RTT the common 4 MiB
    autotuning limit holds one stream to about 30 MB/s (docs/wan.md). Where ``wmem_max`` is lower (often
    208 KiB), an explicit size would shrink the buffer, so autotuning is left alone."""
    limits = _send_buffer_limits()
    if limits is not None and 2 * limits[0] > limits[1]:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits[0])


@functools.lru_cache(maxsize=1)
def _send_buffer_limits() -> tuple[int, int] | None:
    """(net.core.wmem_max, the largest autotuned send buffer), or None where /proc does not say."""
    try:
        with open("/proc/sys/net/core/wmem_max") as f:
            explicit = int(f.read())
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            autotuned = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return explicit, autotuned


class _Link:
    """One data-port connection: the socket, the sans-IO state, stall and cancel checks.

    Every blocking call waits at most ``POLL_SECONDS``, so a cancel is seen within a
    fraction of a second and "nothing moved for ``patience`` seconds" is a stall.
    """

    def __init__(self, sock: socket.socket, cancel: threading.Event | None, stall_timeout: float) -> None:
        self.sock = sock
        self.conn = wire.ClientConnection()
        self.cancel = cancel
        self.stall_timeout = stall_timeout
        self.patience = stall_timeout
        self.tls = _is_tls(sock)
        self.connect_seconds: float | None = None  # how long its connect and handshake took
        self._last = time.monotonic()
        sock.settimeout(POLL_SECONDS)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _moved(self) -> None:
        self._last = time.monotonic()

    def check(self) -> None:
        """Raise ``Cancelled`` if cancelled, ``TransportFailure`` if nothing moved for too long."""
        _check_cancel(self.cancel)
        if time.monotonic() - self._last > self.patience:
            raise TransportFailure(f"nothing moved for {self.patience:g} seconds")

    # -- sending

    def send_all(self, data: bytes | memoryview) -> None:
        """Send every byte. On TLS a timed-out write is retried with the same buffer, as OpenSSL requires."""
        view = memoryview(data)
        while len(view):
            self.check()
            try:
                n = self.sock.send(view)
            except TimeoutError:
                continue
            except OSError as exc:
                raise self._broken(exc) from None
            view = view[n:]
            self._moved()

    def send_body(self, f: BinaryIO, offset: int, count: int, on_sent: Callable[[int], None],
                  chunks: "_SharedChunks | None" = None) -> None:
        """Send ``count`` bytes of ``f`` from ``offset``, calling ``on_sent(n)`` as they go out.

        ``chunks`` (TLS only): the bytes as the local digest's thread read them, in order from ``offset``.
        """
        self.patience = self.stall_timeout
        if chunks is not None:
            self._send_body_shared(chunks, offset, count, on_sent)
        elif self.tls:
            self._send_body_buffered(f, offset, count, on_sent)
        else:
            self._send_body_sendfile(f, offset, count, on_sent)

    def _send_body_sendfile(self, f: BinaryIO, offset: int, count: int, on_sent: Callable[[int], None]) -> None:
        # Zero-copy sendfile(2), one non-blocking call at a time: each returns at once with what fits
        # in the socket buffer, so cancellation and stalls are checked every POLL_SECONDS at any speed.
        # (socket.sendfile loops inside until its whole count is out: minutes for a piece on a slow link.)
        sockfd, filefd = self.sock.fileno(), f.fileno()
        poller = select.poll()
        poller.register(sockfd, select.POLLOUT | select.POLLIN)
        pos, end = offset, offset + count
        while pos < end:
            self.check()
            events = poller.poll(POLL_SECONDS * 1000)
            if not events:
                continue
            mask = events[0][1]
            if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self.check_early_reply()
            if not mask & select.POLLOUT:
                continue
            try:
                n = os.sendfile(sockfd, filefd, pos, min(end - pos, _MAX_PIECE))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise self._broken(exc) from None
            if not n:
                raise _shrank(pos)
            pos += n
            self._moved()
            on_sent(n)

    def _send_body_buffered(self, f: BinaryIO, offset: int, count: int, on_sent: Callable[[int], None]) -> None:
        buf = memoryview(bytearray(CHUNK))
        fd = f.fileno()
        pos, end = offset, offset + count
        while pos < end:
            self.check_early_reply()
            n = os.preadv(fd, [buf[: min(CHUNK, end - pos)]], pos)
            if not n:
                raise _shrank(pos)
            self.send_all(buf[:n])
            pos += n
            on_sent(n)

    def _send_body_shared(self, chunks: "_SharedChunks", offset: int, count: int,
                          on_sent: Callable[[int], None]) -> None:
        # The digest thread reads and hashes each chunk, this thread encrypts and sends the same buffer:
        # the file is read once, not once per thread (TLS cannot use sendfile). A profile of a 1 GiB TLS
        # upload had the second read at a quarter of the client's CPU.
        pos, end = offset, offset + count
        while pos < end:
            self.check_early_reply()
            buf, n = chunks.take(self.check)
            try:
                if not n:
                    raise chunks.error or _shrank(pos)
                n = min(n, end - pos)
                self.send_all(memoryview(buf)[:n])
            finally:
                chunks.give_back(buf)
            pos += n
            on_sent(n)

    # -- receiving

    def check_early_reply(self) -> None:
        """An ERR sent while we are still sending (taken-over, no-space, idle-timeout) ends the body early."""
        if not (self.tls and self.sock.pending()):
            try:
                readable, _, _ = select.select([self.sock], [], [], 0)
            except (OSError, ValueError):
                return
            if not readable:
                return
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(CHUNK)
        except (BlockingIOError, *ssl_errors("SSLWantReadError", "SSLWantWriteError")):
            return  # e.g. a TLS 1.3 session ticket: no application data
        except OSError as exc:
            raise self._broken(exc) from None
        finally:
            self.sock.settimeout(POLL_SECONDS)
        self.conn.receive_data(data)
        event = self.conn.next_event()
        if event is not wire.NEED_DATA:
            raise _reply_error(event)

    def next_event(self) -> Any:
        """The next reply or body event, reading as needed."""
        while True:
            event = self.conn.next_event()
            if event is not wire.NEED_DATA:
                return event
            self.check()
            try:
                data = self.sock.recv(CHUNK)
            except TimeoutError:
                continue
            except OSError as exc:
                raise self._broken(exc) from None
            self._moved()
            self.conn.receive_data(data)

    def expect(self, kind: type, patience: float | None = None) -> Any:
        """The next event, which must be a ``kind``; anything else raises."""
        self.patience = max(self.stall_timeout, patience or 0.0)
        self._moved()
        event = self.next_event()
        if isinstance(event, kind):
            return event
        raise _reply_error(event)

    def _broken(self, exc: OSError) -> Exception:
        """The socket failed: an ERR line the server sent before closing explains it, if we can still read it."""
        if self.conn.sending_body:
            try:
                self.sock.setblocking(False)
                for _ in range(4):  # an ERR line is short; a few reads find it or nothing
                    data = self.sock.recv(CHUNK)
                    self.conn.receive_data(data)
                    if not data:
                        break
            except (OSError, ValueError, RuntimeError):
                pass
            event = self.conn.next_event()
            if isinstance(event, wire.ServerError):
                return _reply_error(event)
        return TransportFailure(f"connection lost: {exc.strerror or exc}")


def _shrank(pos: int) -> FiledockError:
    return FiledockError(ErrorCode.CHANGED_DURING_UPLOAD, f"the local file ended at byte {pos}: it shrank during "
                                                          "the upload; nothing was recorded complete")


class _SharedChunks:
    """Chunks of a file the digest thread read and hashed, handed in order to the TLS sender.

    ``DEPTH`` buffers of ``CHUNK`` bytes go round: the digest thread fills a free one, hashes
    it and queues it; the sender takes it, sends it and gives it back. A sender that stops
    early (a dropped connection) calls ``abandon``: the digest thread then reads the rest
    alone, as without a sender.
    """

    DEPTH = 4

    def __init__(self) -> None:
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(self.DEPTH):
            self._free.put(bytearray(CHUNK))
        self._ready: queue.SimpleQueue[tuple[bytearray, int]] = queue.SimpleQueue()
        self._abandoned = threading.Event()
        self.error: BaseException | None = None
        """Why the digest thread stopped feeding, once ``take`` has returned a 0-byte chunk."""

    def produce(self, fd: int, hasher: ContentHasher, size: int, stop: threading.Event) -> None:
        """On the digest thread: read, hash and queue chunks until ``size``, a stop or ``abandon``."""
        try:
            while hasher.offset < size and not stop.is_set() and not self._abandoned.is_set():
                try:
                    buf = self._free.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                view = memoryview(buf)
                n = os.preadv(fd, [view[: min(CHUNK, size - hasher.offset)]], hasher.offset)
                if not n:
                    raise _shrank(hasher.offset)
                hasher.update(view[:n])
                self._ready.put((buf, n))
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            if hasher.offset < size:
                self._ready.put((bytearray(), 0))  # a sender waiting for more hears that there is none

    def take(self, check: Callable[[], None]) -> tuple[bytearray, int]:
        """The next (buffer, byte count); a count of 0: no more (see ``error``). ``check`` runs while waiting."""
        while True:
            try:
                return self._ready.get(timeout=POLL_SECONDS)
            except queue.Empty:
                check()

    def give_back(self, buf: bytearray) -> None:
        """``buf`` is sent: the digest thread may fill it again."""
        if buf:
            self._free.put(buf)

    def abandon(self) -> None:
        """The sender takes no more: the digest thread goes on alone."""
        self._abandoned.set()


class _LocalDigest:
    """CRC-32 and content digest of a file's first ``size`` bytes, computed once in a thread.

    Reads sequentially with ``pread`` on the caller's descriptor (no file position
    shared with the sender), through one 1 MiB buffer.

    ``paired`` (a TLS upload): the thread waits for the sender's first ``share`` (or a
    ``release``); a sender starting at byte 0 then gets the chunks this thread reads, so each
    byte is read from the file once.
    """

    def __init__(self, f: BinaryIO, size: int, label: str, paired: bool = False, owned: bool = False) -> None:
        self._fd = f.fileno()
        self._owned = f if owned else None  # closed by ``stop``
        self._size = size
        self._stop = threading.Event()
        self._done = threading.Event()
        self._hasher: ContentHasher | None = None
        self._error: BaseException | None = None
        self._released = threading.Event()
        if not paired:
            self._released.set()
        self._chunks: _SharedChunks | None = None
        self._thread = threading.Thread(target=self._run, name=f"filedock-hash-{label}", daemon=True)
        self._thread.start()

    def share(self, offset: int) -> _SharedChunks | None:
        """For a sender about to send from ``offset``: the chunks this thread will read, if it has read
        nothing yet and ``offset`` is 0 (only the first sender of a paired digest); else None."""
        if self._released.is_set():
            return None
        if offset == 0:
            self._chunks = _SharedChunks()
        self._released.set()
        return self._chunks

    def release(self) -> None:
        """No sender will share: hash alone from now on."""
        self._released.set()

    def _run(self) -> None:
        try:
            hasher = ContentHasher()
            while not self._released.wait(POLL_SECONDS):
                if self._stop.is_set():
                    return
            if self._chunks is not None:
                self._chunks.produce(self._fd, hasher, self._size, self._stop)
            buf = memoryview(bytearray(CHUNK))
            while hasher.offset < self._size:
                if self._stop.is_set():
                    return
                n = os.preadv(self._fd, [buf[: min(CHUNK, self._size - hasher.offset)]], hasher.offset)
                if not n:
                    raise _shrank(hasher.offset)
                hasher.update(buf[:n])
            self._hasher = hasher
        except BaseException as exc:  # handed to the waiting caller
            self._error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float) -> ContentHasher | None:
        """The finished hasher, or None if it is still running after ``timeout`` seconds."""
        self.release()
        if not self._done.wait(timeout):
            return None
        if self._error is not None:
            raise self._error
        return self._hasher

    def wait_cancellable(self, cancel: threading.Event | None) -> ContentHasher:
        """The finished hasher, however long it takes, unless cancelled."""
        while True:
            _check_cancel(cancel)
            hasher = self.wait(POLL_SECONDS)
            if hasher is not None:
                return hasher

    def stop(self) -> None:
        """Stop reading (within one chunk) and wait for the thread."""
        self._stop.set()
        if self._chunks is not None:
            self._chunks.abandon()
        self._thread.join()
        if self._owned is not None:
            self._owned.close()


_AHEAD: dict[tuple[int, int, int, int], _LocalDigest] = {}
_AHEAD_LOCK = threading.Lock()


def hash_ahead(path: str | os.PathLike) -> bool:
    """Start computing ``path``'s CRC-32 and digest now, in a thread, for an upload of it later in this
    process (``DataPortClient.upload_file`` takes it over if the file is still the one opened here:
    same device, inode, size and modification time). False if ``path`` is not a regular file.

    What it is for: ``filedock upload`` spends its first 0.1-0.2 s importing and asking the API,
    with the CPU otherwise idle; hashing meanwhile leaves less of the digest to compete with the
    server for the CPU once the bytes flow (on loopback the client's hashing is what keeps
    ``filedock upload`` below the server alone).
    """
    try:
        f = open(path, "rb", buffering=0)
    except OSError:
        return False  # the upload itself reports it
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        f.close()
        return False
    digest = _LocalDigest(f, st.st_size, "ahead", owned=True)
    with _AHEAD_LOCK:
        old = _AHEAD.pop(_identity(st), None)
        _AHEAD[_identity(st)] = digest
    if old is not None:
        old.stop()
    return True


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def hashed_ahead(f: BinaryIO, size: int) -> _LocalDigest | None:
    """The ``hash_ahead`` digest of the file open as ``f`` (its first ``size`` bytes), if there is one."""
    if not _AHEAD:
        return None
    st = os.fstat(f.fileno())
    if st.st_size != size:
        return None
    with _AHEAD_LOCK:
        return _AHEAD.pop(_identity(st), None)


WARM_SECONDS = 10.0
"""How long a preconnected data connection may wait for its transfer: well inside the server's
header time-out (``limits.header_timeout``, 30 s by default), after which it closes the connection."""


class _WarmLink:
    """A data connection being opened on a thread (``DataPortClient.preconnect``), handed out once."""

    def __init__(self, open_link: Callable[[threading.Event | None], _Link]) -> None:
        self._open = open_link
        self._lock = threading.Lock()
        self._link: _Link | None = None
        self._opened = 0.0
        self._discarded = False
        self._error: FiledockError | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, name="filedock-preconnect", daemon=True).start()

    def _run(self) -> None:
        link = None
        try:
            link = self._open(None)
        except FiledockError as exc:  # the transfer's own connect failing: its retry policy decides
            self._error = exc
        except Exception as exc:  # noqa: BLE001 - anything else: the transfer connects itself
            log.debug("preconnect: %s", exc)
        with self._lock:
            if not self._discarded:
                self._link, self._opened, link = link, time.monotonic(), None
        if link is not None:  # discarded while it was being opened
            link.close()
        self._done.set()

    def take(self, cancel: threading.Event | None) -> _Link | None:
        """The connection once it is open, if it still is and is fresh; else None (and it is closed).
        Raises what opening it raised (unreachable, a TLS failure), as the transfer's own connect would."""
        while not self._done.wait(POLL_SECONDS):
            _check_cancel(cancel)
        if self._error is not None:
            raise self._error
        with self._lock:
            link, self._link = self._link, None
        if link is None:
            return None
        if time.monotonic() - self._opened > WARM_SECONDS or not _unused_and_open(link.sock):
            link.close()
            return None
        link.cancel = cancel
        link._moved()
        return link

    def discard(self) -> None:
        """Close the connection, now or as soon as it is open."""
        with self._lock:
            self._discarded = True
            link, self._link = self._link, None
        if link is not None:
            link.close()


def _is_tls(sock: Any) -> bool:
    """An ``ssl.SSLSocket`` or a ``tls.TLSSocket`` (which wraps a plain socket rather than being one)."""
    ssl = sys.modules.get("ssl")  # not loaded: no SSLSocket can exist
    return not isinstance(sock, socket.socket) or ssl is not None and isinstance(sock, ssl.SSLSocket)


def _unused_and_open(sock: socket.socket) -> bool:
    """True if nothing came on a connection that has sent nothing yet: a closed one reads its end, and
    one the server gave up on its ``ERR`` line. (TLS 1.3 session tickets are not application data.)"""
    try:
        sock.setblocking(False)
        try:
            sock.recv(1) if _is_tls(sock) else sock.recv(1, socket.MSG_PEEK)
        finally:
            sock.settimeout(POLL_SECONDS)
    except (BlockingIOError, *ssl_errors("SSLWantReadError", "SSLWantWriteError")):
        return True
    except OSError:
        return False
    return False  # its end, or a byte the server should not have sent before a request


class DataPortClient:
    """Blocking uploads and downloads of single files through a filedock data port.

    ``ssl_context`` switches to TLS (the server name checked is ``host``).
    ``attempts`` is how many connections in a row may fail without progress before
    a transfer gives up; progress (a server offset larger than ever before, or bytes
    downloaded) resets the count, so a long transfer survives any number of
    drops as long as each one leaves it further along.
    ``stall_timeout`` is how long a connection may move nothing while sending or
    receiving before it is abandoned for a new one. ``congestion_control`` names the
    TCP congestion control of its connections (``TCP_CONGESTION``, e.g. ``"bbr"``;
    None: the system's default). Instances hold no per-transfer
    state: one client may serve several threads.
    """

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                 stall_timeout: float = 60.0, attempts: int = 5, backoff: float = 0.5,
                 congestion_control: str | None = None, streams: int | str | None = None) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.stall_timeout = stall_timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.congestion_control = congestion_control
        self.streams = streams  # connections per large file: a number, "auto", or None (one plain PUT)
        self._warm: _WarmLink | None = None  # preconnect's connection, until a transfer takes it
        self._warm_lock = threading.Lock()
        self._fast_tls: Any = None  # the pyOpenSSL context for ssl_context, once one is needed (tls.py)
        self._fast_tls_lock = threading.Lock()

    @property
    def policy(self) -> RetryPolicy:
        """``attempts`` and ``backoff`` as the ``RetryPolicy`` every transfer of this client follows."""
        return RetryPolicy(self.attempts, self.backoff)

    def __repr__(self) -> str:
        return f"DataPortClient({self.host!r}, {self.port}, tls={self.ssl_context is not None})"

    # ------------------------------------------------------------ upload

    def upload_file(self, session_key: str, file_key: str, path: str | os.PathLike, *, name: str | None = None,
                    progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
                    expect: SourceStamp | None = None) -> UploadResult:
        """Upload ``path`` as declared file ``file_key``, from wherever the server's durable copy ends.

        Returns a result with ``state == "complete"`` only after ``STORED`` and only if
        the server's size, CRC-32 and digest equal the local ones. Raises
        ``FiledockError`` (the server's code, or ``digest-mismatch``) or ``Cancelled``;
        the server keeps the partial either way except after ``digest-mismatch``.
        A file complete on the server already is verified, not sent again.

        ``expect`` is the file's stamp when it was declared (default: when opened). A
        file whose size, modification time or inode is no longer that stamp before
        ``DONE`` is not committed: the partial is dropped (``ABORT``) and
        ``changed-during-upload`` raised. A change noticed after ``STORED`` raises it
        too (the server then holds the file as it was read).
        """
        name = name if name is not None else Path(path).name
        report = _Reports(progress)
        _check_cancel(cancel)
        try:
            with open(path, "rb", buffering=0) as f:
                source = SourceWatch(path, f.fileno(), name, expect)
                size = source.stamp.size
                ranged = self.streams is not None and size >= MIN_RANGED_SIZE
                local = hashed_ahead(f, size) or _LocalDigest(f, size, short_key(file_key),
                                                              paired=self.ssl_context is not None and not ranged)
                try:
                    if ranged:
                        ranged = RangedUpload(self, session_key, file_key, f, size, name, local, report, cancel,
                                              source)
                        try:
                            result = ranged.run()
                            if result is not None:
                                return result
                            # one stream: a plain PUT, on auto's measured connection if it opened one
                            plain = _spare_first(self, ranged) if ranged.spare is not None else self
                            result = plain._upload(session_key, file_key, f, size, name, local, report, cancel,
                                                   source)
                        finally:
                            ranged.close_spare()
                        return record.replace(result, streams=ranged.detail())
                    return self._upload(session_key, file_key, f, size, name, local, report, cancel, source)
                finally:
                    local.stop()
        except KeyboardInterrupt:
            raise Cancelled("interrupted") from None

    def _upload(self, session_key: str, file_key: str, f: BinaryIO, size: int, name: str,
                local: _LocalDigest, report: _Reports, cancel: threading.Event | None,
                source: SourceWatch) -> UploadResult:
        """Drive an ``UploadAttempt``: it decides, this does the I/O."""
        attempt = UploadAttempt(name, file_key, size, self.policy)
        action: Any = attempt.start()
        while True:
            if isinstance(action, Connect):
                action = self._upload_connection(attempt, session_key, file_key, f, local, report, source, cancel)
            elif isinstance(action, Sleep):
                log.info("%s: reconnecting in %.1fs (attempt %d of %d)", name, action.seconds,
                         attempt.budget.failures + 1, self.attempts)
                _sleep(action.seconds, cancel)
                action = attempt.start()
            elif isinstance(action, AwaitDigest):
                log.info("body of %s sent; waiting for the local digest before DONE", short_key(file_key))
                local.wait_cancellable(cancel)
                action = attempt.start()
            elif isinstance(action, QueryStored):
                # complete already (by us, with STORED lost in a drop, or by an earlier run): ask its values
                stored = self._retrying(cancel, lambda link: self._complete_values(
                    link, session_key, file_key, action.size))
                report(SENT, size, size)
                action = self._stored(attempt, stored, local, report, source, cancel)
            elif isinstance(action, DropPartial):
                self._discard(session_key, file_key, cancel)  # its bytes belong to no one version
                source.check()  # the stamp's own words, if the stamp shows it
                raise action.error
            elif isinstance(action, Fail):
                raise action.error
            elif isinstance(action, Finish):
                report(VERIFIED, size, size)
                return action.result
            else:
                raise AssertionError(f"unknown action {action!r}")

    @staticmethod
    def _stored(attempt: UploadAttempt, stored: wire.Stored, local: _LocalDigest, report: _Reports,
                source: SourceWatch, cancel: threading.Event | None) -> Any:
        """The server made the file complete: check the local file kept still, then the verdict."""
        source.check(stored=True)
        hasher = local.wait_cancellable(cancel)
        report(DURABLE, attempt.size, attempt.size)
        return attempt.stored(stored) or attempt.digest_ready(hasher.crc32, hasher.hexdigest())

    def _discard(self, session_key: str, file_key: str, cancel: threading.Event | None) -> None:
        """Drop a partial whose bytes may mix two versions of the local file (best effort)."""
        try:
            self.abort_file(session_key, file_key, cancel=cancel)
        except (FiledockError, Cancelled) as exc:
            log.info("could not drop the partial of %s: %s", short_key(file_key), exc)

    def _upload_connection(self, attempt: UploadAttempt, session_key: str, file_key: str, f: BinaryIO,
                           local: _LocalDigest, report: _Reports, source: SourceWatch,
                           cancel: threading.Event | None) -> Any:
        """One connection of an upload -> the attempt's next action."""
        link: _Link | None = None
        try:
            link = self._connect(cancel)
            size = attempt.size
            link.send_all(link.conn.send(wire.UploadRequest(session_key, file_key, size)))
            body: SendBody = attempt.offset(link.expect(wire.Offset, REPLY_PATIENCE).offset)
            report(SENT, body.offset, size, force=True)
            done = body.offset

            def sent(n: int) -> None:
                nonlocal done
                done += n
                attempt.body_sent(n)
                report(SENT, done, size)

            chunks = local.share(body.offset) if link.tls and body.count else None
            try:
                link.send_body(f, body.offset, body.count, sent, chunks)
            finally:
                if chunks is not None:
                    chunks.abandon()  # sent or failed: the digest thread reads whatever is left alone
            hasher = local.wait(min(HASH_WAIT, self.stall_timeout))
            if hasher is None:
                # the body is out but our digest is not ready (a resume after a long prefix): the server
                # would time the silent connection out; let it checkpoint everything, come back later
                return attempt.digest_late()
            send_done = attempt.digest_ready(hasher.crc32, hasher.hexdigest())
            source.check()  # DONE commits what was declared: never a file that changed meanwhile
            link.send_all(link.conn.send(wire.Done(send_done.digest)))
            stored = link.expect(wire.Stored, REPLY_PATIENCE)
        except FiledockError as exc:
            return attempt.failed(exc)
        finally:
            if link is not None:
                link.close()
        return self._stored(attempt, stored, local, report, source, cancel)

    def _complete_values(self, link: _Link, session_key: str, file_key: str, size: int) -> wire.Stored:
        """The size, CRC-32 and digest the server recorded for a complete file (a GET of zero bytes)."""
        link.send_all(link.conn.send(wire.DownloadRequest(session_key, file_key, size)))
        start = link.expect(wire.DownloadStart, REPLY_PATIENCE)
        return wire.Stored(start.size, start.crc32, start.digest)

    def upload_batch(self, session_key: str, files: list[tuple[str, str | os.PathLike, str]], *,
                     progress: Callable[[str, str, int, int], None] | None = None,
                     cancel: threading.Event | None = None,
                     stamps: dict[str, SourceStamp] | None = None) -> list[UploadResult]:
        """Upload many small whole files on one connection (``BATCH``): ``files`` is (key, path, name).

        Each file is read once (it must fit in ``batch_item_max``), hashed and sent; the
        server makes them all durable together and answers per file. Results come
        back in the order given, ``state == "complete"`` only where the server's size,
        CRC-32 and digest equal the local file's; refused files carry the server's code.
        A dropped connection sends the whole batch again (files already stored are
        answered from the record). ``progress(name, stage, done, total)`` per file.

        ``stamps`` (by file key) are the files' stamps when declared. A file that is not
        its stamp when read, or changes while read, is ``changed-during-upload``: the
        connection is closed before ``DONE`` (the server stores nothing of it) and the
        batch is sent again without that file. One that changes after the server stored
        it is reported the same way.
        """
        report = progress or (lambda name, stage, done, total: None)
        attempt = BatchAttempt(files, stamps, self.policy)

        def step(link: _Link) -> dict[str, Any]:
            remaining = attempt.remaining
            link.send_all(link.conn.send(wire.BatchRequest(session_key, len(remaining))))
            for key, path, name in remaining:
                data = self._read_whole(key, path, attempt.stamps)
                h = ContentHasher()
                h.update(data)
                attempt.item_read(key, len(data), h.crc32, h.hexdigest())
                link.send_all(link.conn.send(wire.BatchItem(key, len(data), h.hexdigest())) + data)
                report(name, SENT, len(data), len(data))
            link.send_all(link.conn.send(wire.Done(None)))
            answers: dict[str, Any] = {}
            while True:
                event = link.expect((wire.ItemStored, wire.ItemFailed, wire.BatchEnd), REPLY_PATIENCE)
                if isinstance(event, wire.BatchEnd):
                    return answers
                answers[event.file_key] = event

        try:
            action = attempt.start()
            while action is not None:
                try:
                    # a drop is retried inside with the attempt's budget; a changed file leaves the batch
                    attempt.answered(self._retrying(cancel, step, attempt.budget))
                    break
                except _SourceChanged as exc:  # closed before DONE: nothing of it was stored
                    action = attempt.source_changed(exc.key, exc.change)
        except KeyboardInterrupt:
            raise Cancelled("interrupted") from None
        return attempt.results({key: SourceStamp.read(path) for key, path in attempt.to_check()}, report)

    @staticmethod
    def _read_whole(key: str, path: str | os.PathLike, known: dict[str, SourceStamp]) -> bytes:
        """A batch file's bytes, read once; ``_SourceChanged`` if it is not the declared version."""
        with open(path, "rb") as f:
            before = SourceStamp.of(os.fstat(f.fileno()))
            stamp = known.setdefault(key, before)
            data = f.read()
            change = stamp.change(before) or stamp.change(SourceStamp.of(os.fstat(f.fileno()))) or \
                (f"shrank to {len(data)} bytes" if len(data) != stamp.size else None)
        if change:
            raise _SourceChanged(key, change)
        return data

    def abort_file(self, session_key: str, file_key: str, *, cancel: threading.Event | None = None) -> None:
        """Give up an upload: the server deletes the partial and the file starts again from 0."""
        def step(link: _Link) -> None:
            link.send_all(link.conn.send(wire.AbortRequest(session_key, file_key)))
            link.expect(wire.Aborted, REPLY_PATIENCE)

        try:
            self._retrying(cancel, step)
        except KeyboardInterrupt:
            raise Cancelled("interrupted") from None

    # ------------------------------------------------------------ download

    def download_file(self, session_key: str, file_key: str, dest: str | os.PathLike, *,
                      progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
                      part: str | os.PathLike | None = None) -> DownloadResult:
        """Download a complete file to ``dest``, resuming ``dest + ".part"`` if an earlier call left one.

        ``part`` names the partial file instead (on the same filesystem as ``dest``); a
        partial that is a symbolic link is refused (``OSError``), never followed.

        The bytes already in the ``.part`` are hashed once, the new ones as they
        arrive; ``dest`` appears (fsync'd, renamed) only if size, CRC-32 and digest
        equal the server's. On a mismatch the ``.part`` is deleted and
        ``FiledockError(digest-mismatch)`` raised. Progress reports ``sent`` for bytes
        received, then ``durable`` and ``verified``.
        """
        dest = Path(dest)
        part = Path(part) if part is not None else dest.with_name(dest.name + ".part")
        report = _Reports(progress)
        _check_cancel(cancel)
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with open(fd, "r+b", buffering=0) as f:
                result = self._download(session_key, file_key, f, dest.name, part, report, cancel)
                os.fsync(f.fileno())
            durability.publish(part, dest)
        except KeyboardInterrupt:
            raise Cancelled("interrupted") from None
        report(DURABLE, result.size, result.size)
        report(VERIFIED, result.size, result.size)
        return result

    def _download(self, session_key: str, file_key: str, f: BinaryIO, name: str, part: Path, report: _Reports,
                  cancel: threading.Event | None) -> DownloadResult:
        """Drive a ``DownloadAttempt`` over the open partial ``f``."""
        hasher = hash_stream_cancellable(f, cancel)
        attempt = DownloadAttempt(name, file_key, self.policy)
        action: Any = attempt.start(hasher.offset)
        while True:
            if isinstance(action, Connect):
                link: _Link | None = None
                try:
                    link = self._connect(cancel)
                    action = self._download_connection(link, session_key, file_key, f, hasher, attempt, report,
                                                       action.offset)
                except FiledockError as exc:
                    action = attempt.failed(exc)
                finally:
                    if link is not None:
                        link.close()
            elif isinstance(action, Restart):
                log.info("the partial download is not a prefix of the server's file; starting again from 0")
                f.truncate(0)
                f.seek(0)
                hasher = ContentHasher()
                action = attempt.restarted()
            elif isinstance(action, Sleep):
                log.info("%s: reconnecting in %.1fs (attempt %d of %d)", name, action.seconds,
                         attempt.budget.failures + 1, self.attempts)
                _sleep(action.seconds, cancel)
                action = attempt.connect()
            elif isinstance(action, Fail):
                if action.discard:
                    part.unlink(missing_ok=True)
                raise action.error
            elif isinstance(action, Finish):
                return action.result
            else:
                raise AssertionError(f"unknown action {action!r}")

    @staticmethod
    def _download_connection(link: _Link, session_key: str, file_key: str, f: BinaryIO, hasher: ContentHasher,
                             attempt: DownloadAttempt, report: _Reports, offset: int) -> Any:
        """One connection of a download -> the attempt's next action."""
        link.send_all(link.conn.send(wire.DownloadRequest(session_key, file_key, offset)))
        start = link.expect(wire.DownloadStart, REPLY_PATIENCE)
        restart = attempt.started(start)
        if restart is not None:
            return restart  # the server's file changed between connections
        link.patience = link.stall_timeout
        fd = f.fileno()
        report(SENT, hasher.offset, start.size, force=True)
        while True:
            event = link.next_event()
            if isinstance(event, wire.Data):
                view = memoryview(event.data)
                while len(view):
                    view = view[os.write(fd, view):]
                hasher.update(event.data)
                attempt.body_received(len(event.data))
                report(SENT, hasher.offset, start.size)
            elif isinstance(event, wire.BodyComplete):
                return attempt.complete(hasher.crc32, hasher.hexdigest())
            else:
                raise reply_error(event)

    # ------------------------------------------------------------ connections and retries

    def preconnect(self) -> None:
        """Open the next data connection now, on a thread, for whichever transfer connects next.

        The uploader calls this as soon as it knows the data port's address, before it opens the
        session: the TCP connect (and TLS handshake) then happens beside the session's request
        instead of after it, one round trip less before the first byte (100 ms on a long path).
        A connection not taken within ``WARM_SECONDS``, or closed by the server meanwhile, is
        never used; ``close_warm`` closes one nobody took. A failure here is forgotten: the
        transfer connects itself and reports it.
        """
        with self._warm_lock:
            if self._warm is None:
                self._warm = _WarmLink(self._open)

    def close_warm(self) -> None:
        """Close ``preconnect``'s connection if no transfer took it."""
        with self._warm_lock:
            warm, self._warm = self._warm, None
        if warm is not None:
            warm.discard()

    def _connect(self, cancel: threading.Event | None) -> _Link:
        """A new connection for a transfer: ``preconnect``'s while it is fresh, else one opened now."""
        with self._warm_lock:
            warm, self._warm = self._warm, None
        link = warm.take(cancel) if warm is not None else None
        return link if link is not None else self._open(cancel)

    def _open(self, cancel: threading.Event | None) -> _Link:
        started = time.monotonic()
        try:
            sock = socket.create_connection((http11.address(self.host), self.port),
                                            timeout=min(self.stall_timeout, 30.0))
        except OSError as exc:
            raise TransportFailure(data_port_unreachable(self.host, self.port, exc.strerror or str(exc)),
                                   ErrorCode.UNREACHABLE) from None
        try:
            _tune_socket(sock)
            _widen_send_buffer(sock)
            if self.congestion_control:  # the sender's choice decides how a long, lossy path is used
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.congestion_control.encode())
            if self.ssl_context is not None:
                sock = self._handshake(sock)
        except OSError as exc:
            sock.close()
            raise TransportFailure(f"TLS handshake with {self.host}:{self.port} failed: {exc}") from None
        link = _Link(sock, cancel, self.stall_timeout)
        link.connect_seconds = time.monotonic() - started
        return link

    def _handshake(self, sock: socket.socket) -> Any:
        """The TLS connection over ``sock``; a certificate refused is ``tls-failed`` with what to do (``sock``
        closed), another failure an ``OSError``."""
        import ssl

        from filedock.client.trust import CertificateRefused

        try:
            fast = self._fast_tls_context()
            if fast:
                from filedock.client.tls import TLSSocket

                return TLSSocket.connect(sock, fast, self.host, min(self.stall_timeout, 30.0))
            return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise FiledockError(ErrorCode.TLS_FAILED,
                                data_port_certificate_message(self.host, self.port, exc.verify_code,
                                                              exc.verify_message or str(exc))) from None
        except CertificateRefused as exc:  # the same, on pyOpenSSL (tls.py)
            sock.close()
            raise FiledockError(ErrorCode.TLS_FAILED,
                                data_port_certificate_message(self.host, self.port, exc.verify_code, exc.why)) from None

    def _fast_tls_context(self) -> Any:
        """pyOpenSSL's context with ``ssl_context``'s trust where it can be rebuilt (``tls.fast_context``;
        made once per client: loading the system's roots takes a while), else False."""
        with self._fast_tls_lock:
            if self._fast_tls is None:
                fast = None
                from filedock.client.trust import TrustedContext

                if type(self.ssl_context) is TrustedContext and os.environ.get("FILEDOCK_CLIENT_TLS") != "stdlib":
                    from filedock.client.tls import fast_context

                    fast = fast_context(self.ssl_context)
                self._fast_tls = fast or False
            return self._fast_tls

    def _retrying(self, cancel: threading.Event | None, step: Callable[[_Link], Any],
                  budget: RetryBudget | None = None) -> Any:
        """``step(link)`` on new connections until it returns; what ``RetryPolicy`` retries is, with backoff."""
        budget = budget if budget is not None else RetryBudget(self.policy)
        while True:
            _check_cancel(cancel)
            link: _Link | None = None
            try:
                link = self._connect(cancel)
                return step(link)
            except _Reconnect:
                continue
            except FiledockError as exc:
                decision = budget.failed(exc)
                if isinstance(decision, GiveUp):
                    raise decision.error from None
                log.info("%s; reconnecting in %.1fs (attempt %d of %d)", exc.message, decision.seconds,
                         budget.failures + 1, self.attempts)
            finally:
                if link is not None:
                    link.close()
            _sleep(decision.seconds, cancel)


def _default_congestion() -> str | None:
    try:
        return congestion_control()
    except OSError:
        return None


class RangedUpload(RangeSchedule):
    """One file over several connections at once (``PUTR``), each sending aligned byte ranges.

    ``--streams K``: K equal ranges, one per connection. ``--streams auto``: the data connection
    the upload needs anyway is opened first and its round-trip time read from the kernel
    (``TCP_INFO``; the connect's duration where there is none). On a short path (below
    ``LAN_RTT``) that connection carries one plain ``PUT``, exactly as one stream would: ``run``
    returns None and leaves it in ``spare``. On a long path the file is cut into many ranges
    (``chunk_plan``) that connections take one at a time from a ``RangeQueue``, and a
    ``StreamController`` adds connections while the aggregate goodput rises (docs/client.md).

    Each range resumes where the server's durable blocks of it end, and the first reply's list of
    durable ranges removes them from the queue (a resume sends only what is missing); the
    connection whose range completes the file gets ``STORED`` and the others ``DURABLE``. The
    end-to-end check is the plain upload's: the server's size, CRC-32 and ``blake3-4m`` digest must
    equal the local file's. ``run`` returns None when ranges cannot be used (one stream for this
    path, or the server keeps blobs in object storage): the caller sends the file with a plain
    ``PUT`` (on ``spare`` if it is set).
    """

    CONN = "link"  # a range's connection (RangeSchedule): its _Link

    def __init__(self, client: "DataPortClient", session_key: str, file_key: str, f: BinaryIO, size: int,
                 name: str, local: "_LocalDigest", report: "_Reports", cancel: threading.Event | None,
                 source: SourceWatch) -> None:
        self.client, self.session_key, self.file_key = client, session_key, file_key
        self.f, self.size, self.name, self.local, self.report, self.source = f, size, name, local, report, source
        self.cancel = cancel
        self.halt = threading.Event()  # set when the caller cancels or one range fails for good
        self.lock = threading.Lock()
        self.ranges: list[dict[str, Any]] = []
        self.stored: list[wire.Stored] = []
        self.errors: list[BaseException] = []
        self.congestion: str | None = None
        self.how, self.rtt = "fixed", None
        self.congestion_reason: str | None = None
        self.spare: _Link | None = None  # auto's first connection, until a range or the plain PUT takes it
        self.queue = RangeQueue([])
        self.controller: StreamController | None = None
        self.running = 0  # connections (threads) taking ranges now
        self.peak = 0

    def choose_streams(self) -> tuple[int, str, float | None]:
        """(K to start with, how it was chosen, the measured RTT in seconds or None). For ``auto``
        this opens the upload's first data connection (kept in ``spare``)."""
        wanted = self.client.streams
        if wanted != "auto":
            return max(1, int(wanted)), "fixed", None
        try:
            self.spare = self.client._connect(self.halt)
        except FiledockError as exc:  # the plain PUT's own connects retry as its RetryPolicy says
            log.info("%s: %s; one stream", self.name, exc.message)
            return 1, "auto", None
        rtt = _link_rtt(self.spare.sock)
        if rtt is None:  # no TCP_INFO here: the connect took one round trip (and a TLS handshake, at most more)
            rtt = self.spare.connect_seconds
        return auto_streams(rtt, self.size), "auto", rtt

    def detail(self, plan: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """What ``--json`` and the logs say about the streams: how many (at most at once), why, RTT,
        congestion control, ranges, and for ``auto`` the controller's measurements."""
        streams = self.peak if self.ranges else (len(plan) if plan else 1)
        out = {"streams": max(1, streams), "chosen": self.how,
               "rtt_ms": round(self.rtt * 1000, 3) if self.rtt is not None else None,
               "congestion_control": self.congestion or self.client.congestion_control or _default_congestion(),
               "congestion_control_reason": self.congestion_reason,
               "ranges": [{k: r[k] for k in ("start", "end", "from", "sent", "reply")} for r in self.ranges]}
        if self.controller is not None:  # what auto measured (K, aggregate goodput) and the K it kept
            out["measured"] = [{"streams": k, "bytes_per_s": round(rate)} for k, rate in self.controller.history]
            out["kept"] = self.controller.streams
        return out

    def close_spare(self) -> None:
        """Close auto's first connection if nothing took it."""
        if self.spare is not None:
            self.spare.close()
            self.spare = None

    def run(self) -> UploadResult | None:
        k, how, rtt = self.choose_streams()
        self.how, self.rtt = how, rtt
        chosen, self.congestion_reason = choose_congestion_control(rtt, self.client.congestion_control,
                                                                   _default_congestion(), can_set)
        self.client.congestion_control = chosen  # the measured path decides for this client's connections
        if chosen and self.spare is not None and hasattr(socket, "TCP_CONGESTION"):
            try:  # auto's first connection was opened before the path was measured: switch it too
                self.spare.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, chosen.encode())
            except OSError as exc:
                log.info("%s: congestion control %s not set on the first connection: %s", self.name, chosen, exc)
        if how == "auto":
            if k < 2 or rtt is None:
                log.info("%s: one stream (auto, rtt %s ms)", self.name, f"{rtt * 1000:.2f}" if rtt else "unknown")
                return None
            plan = chunk_plan(self.size, MAX_STREAMS)
            limit = min(MAX_STREAMS, len(plan))
            self.controller = StreamController(min(k, limit), limit, ControllerTiming.for_rtt(rtt))
            k = self.controller.streams
        else:
            plan = plan_ranges(self.size, k)
        if len(plan) < 2:
            log.info("%s: one stream (%s)", self.name, how)
            return None
        self.queue = RangeQueue(plan)
        self._drive(min(k, len(plan)))
        _check_cancel(self.cancel)
        unsupported = [e for e in self.errors if isinstance(e, FiledockError)
                       and e.code is ErrorCode.RANGES_UNSUPPORTED]
        if unsupported:
            log.info("%s: %s; sending it with one PUT", self.name, unsupported[0].message)
            return None
        if self.errors:
            raise self.errors[0]
        return self._verdict(plan)

    def _drive(self, k: int) -> None:
        """Run connections until every range is handed out and sent; add (auto) as the controller says."""
        threads: list[threading.Thread] = []

        def spawn(n: int) -> None:
            for _ in range(n):
                with self.lock:
                    if not self._more_work():
                        return
                    self.running += 1
                    self.peak = max(self.peak, self.running)
                t = threading.Thread(target=self._worker, name=f"filedock-range-{len(threads)}", daemon=True)
                threads.append(t)
                t.start()

        spawn(k)
        try:
            while alive := [t for t in threads if t.is_alive()]:
                alive[0].join(POLL_SECONDS)
                if self.cancel is not None and self.cancel.is_set():
                    self.halt.set()
                if self.controller is not None and not self.halt.is_set():
                    with self.lock:
                        (acked, rtts), more, running = self._acked(), self._more_work(), self.running
                    wanted = self.controller.sample(time.monotonic(), acked, more, queueing(rtts))
                    log.debug("%s: %d bytes acknowledged, %d streams running, %d wanted, %d ranges waiting",
                              self.name, acked, running, wanted, len(self.queue))
                    if wanted > running:
                        log.info("%s: %d streams (auto)", self.name, wanted)
                        spawn(wanted - running)
        except KeyboardInterrupt:
            self.halt.set()
            raise
        finally:
            self.close_spare()

    def _verdict(self, plan: list[tuple[int, int]]) -> UploadResult:
        if self.stored:
            stored = self.stored[0]
        else:  # every range durable, STORED lost in a drop or the file complete already: ask its values
            stored = self.client._retrying(self.cancel, lambda link: self.client._complete_values(
                link, self.session_key, self.file_key, self.size))
        self.source.check(stored=True)
        hasher = self.local.wait_cancellable(self.cancel)
        self.report(DURABLE, self.size, self.size)
        local = (self.size, hasher.crc32, hasher.hexdigest())
        if (stored.size, stored.crc32, stored.digest) != local:
            raise FiledockError(ErrorCode.DIGEST_MISMATCH,
                                f"{self.name}: the server stored {stored.size} bytes with CRC-32 "
                                f"{wire.format_crc(stored.crc32)} and digest {stored.digest}, but the local file has "
                                f"{self.size} bytes, CRC-32 {wire.format_crc(hasher.crc32)}, digest {local[2]}")
        sent = sum(r["sent"] for r in self.ranges)
        detail = self.detail(plan)
        log.info("%s: %d streams (%s), congestion control %s, %d bytes sent", self.name, detail["streams"],
                 self.how, self.congestion, sent)
        self.report(VERIFIED, self.size, self.size)
        return UploadResult(self.name, self.size, self.file_key, self.size - sent if sent <= self.size else 0, sent,
                            hasher.crc32, hasher.hexdigest(), Outcome.COMPLETE, streams=detail)

    def _progress(self) -> None:
        with self.lock:
            done = self.size - self.queue.pending_bytes - sum(max(0, r["end"] - r["pos"]) for r in self.ranges)
        self.report(SENT, done, self.size)

    def _worker(self) -> None:
        """Take ranges from the queue and send them, until none is left, the controller wants fewer
        connections (auto), or the upload halts."""
        kept: _Link | None = None  # the connection the last range ended on, while the server keeps it
        asked: dict[str, Any] | None = None  # the next range, its PUTR sent on ``kept`` ahead of the reply
        try:
            while not self.halt.is_set():
                r, asked = (asked, None) if asked is not None else (self._next_range(), None)
                if r is None:
                    return
                more, kept, asked = self._range(r, kept, asked=r.pop("asked", False))
                if not more:
                    return
        finally:
            if kept is not None:
                kept.close()
            with self.lock:
                self.running -= 1

    def _next_range(self, steal: bool = True) -> dict[str, Any] | None:
        with self.lock:
            return super()._next_range(steal)

    def _give_back(self, r: dict[str, Any]) -> None:
        with self.lock:
            super()._give_back(r)

    def tcp_info_of(self, conn: _Link) -> bytes | None:
        return tcp_info(conn.sock)

    def on_split(self, victim: dict[str, Any], point: int, end: int) -> None:
        log.info("%s: range %d-%d split at %d for an idle stream", self.name, victim["start"], end, point)

    def _first_link(self) -> _Link:
        """auto's measured connection for the first range, a new one for the others."""
        with self.lock:
            link, self.spare = self.spare, None
        return link if link is not None else self.client._connect(self.halt)

    def _range(self, r: dict[str, Any], kept: _Link | None,
               asked: bool = False) -> tuple[bool, _Link | None, dict[str, Any] | None]:
        """One range's connections until it is durable, the file complete, or the range gives up
        -> (whether the worker may take another range, the connection to send it on if the server
        keeps this one, the next range if its request was sent ahead on that connection). ``kept``
        is the connection the worker's last range ended on (``asked``: this range's ``PUTR`` is sent
        on it already): a new range on it starts with the congestion window the last one built,
        instead of a handshake and a slow start, which on a long path cost more than a short
        range's transfer. With ``auto`` the next range's ``PUTR`` follows ``DONE`` at once, so the
        connection waits one round trip between ranges, not two."""
        budget = RetryBudget(self.client.policy)
        best = -1
        ahead: dict[str, Any] | None = None
        while not self.halt.is_set():
            link: _Link | None = None
            keep: _Link | None = None
            reused, progressed, answered = kept is not None, False, False
            try:
                link, kept = (kept, None) if kept is not None else (self._first_link(), None)
                with self.lock:
                    self._assign(r, link, tcp_info(link.sock) if reused else None)
                if self.controller is not None and not reused:  # the end of the range stays in the file, for _steal
                    limit_unsent(link.sock)
                if self.congestion is None and hasattr(socket, "TCP_CONGESTION"):
                    try:
                        raw = link.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
                        self.congestion = raw.split(b"\0")[0].decode()
                    except OSError:
                        pass
                if not (asked and reused):
                    link.send_all(link.conn.send(wire.RangedUploadRequest(
                        self.session_key, self.file_key, self.size, r["start"], r["end"])))
                asked = False
                reply = link.expect(wire.RangeOffset, REPLY_PATIENCE)
                answered = True
                offset = reply.offset
                with self.lock:
                    self.queue.learn(reply.durable)  # never hand out what the server holds
                    r["pos"] = offset
                    if r["from"] is None:
                        r["from"] = offset
                progressed, best = offset > best, max(best, offset)
                self._progress()

                def sent(n: int) -> None:
                    with self.lock:
                        r["pos"] += n
                        r["sent"] += n
                    self._progress()

                link.send_body(self.f, offset, r["end"] - offset, sent)
                hasher = self.local.wait(0)  # the digest if ready; the verdict compares it after STORED anyway
                self.source.check()  # DONE may commit the file: never one that changed meanwhile
                done = link.conn.send(wire.Done(hasher.hexdigest() if hasher else None))
                if self.controller is not None and ahead is None and (ahead := self._next_range(steal=False)) is not None:
                    done += link.conn.send(wire.RangedUploadRequest(self.session_key, self.file_key, self.size,
                                                                    ahead["start"], ahead["end"]))
                link.send_all(done)
                reply = link.expect((wire.RangeStored, wire.Stored), REPLY_PATIENCE)
                with self.lock:
                    self._answered(r, reply, r["end"] - offset)
                state = link.conn.state
                if state is wire.ClientState.IDLE or (state is wire.ClientState.AWAIT_OFFSET and ahead is not None):
                    keep = link  # DURABLE: the server reads our next request (or reads the one sent ahead now)
                if ahead is not None:
                    if keep is None:  # STORED: the server closed without reading it; the file is complete
                        self._give_back(ahead)
                        ahead = None
                    else:
                        ahead["asked"] = True
                return True, keep, ahead
            except FiledockError as exc:
                if ahead is not None:  # its request may have been sent ahead: the server never read it
                    self._give_back(ahead)
                    ahead = None
                with self.lock:
                    meaning = self._failed(r, exc, reused, answered)
                if meaning == "complete":
                    return True, None, None
                if meaning == "again":
                    log.debug("%s range %d-%d: %s; again at once on a new connection", self.name,
                              r["start"], r["end"], exc.message)
                    continue
                decision = budget.failed(exc, progressed)
                if isinstance(decision, GiveUp) or self.halt.is_set():
                    if not self.halt.is_set() or not isinstance(exc, Cancelled):
                        with self.lock:
                            self.errors.append(decision.error if isinstance(decision, GiveUp) else exc)
                    self.halt.set()
                    return False, None, None
                log.info("%s range %d-%d: %s; reconnecting in %.1fs", self.name, r["start"], r["end"], exc.message,
                         decision.seconds)
            except Cancelled:
                return False, None, None
            except BaseException as exc:  # noqa: BLE001 - a thread must hand every failure to run()
                with self.lock:
                    self.errors.append(exc)
                self.halt.set()
                return False, None, None
            finally:
                if link is not None:
                    with self.lock:
                        r["link"] = None  # before the close: its descriptor may be another socket's next
                    if link is not keep:
                        link.close()
            if self.halt.wait(decision.seconds):
                return False, None, None
        return False, None, None


def tcp_info(sock: socket.socket) -> bytes | None:
    """The kernel's ``TCP_INFO`` of a connected TCP socket (Linux), or None."""
    if not hasattr(socket, "TCP_INFO"):
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None


def _link_rtt(sock: socket.socket) -> float | None:
    """The kernel's round-trip time of a connected TCP socket (``TCP_INFO``, Linux), or None."""
    info = tcp_info(sock)
    return rtt_from_tcp_info(info) if info else None


def limit_unsent(sock: socket.socket) -> None:
    """Keep at most about ``UNSENT_LIMIT`` unsent bytes in the kernel (``TCP_NOTSENT_LOWAT``, Linux and
    macOS); bytes in flight are not limited, so the congestion control sees no difference."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform.startswith("linux") else None)
    if option is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, UNSENT_LIMIT)
        except OSError:
            pass


def _spare_first(client: "DataPortClient", ranged: RangedUpload) -> "DataPortClient":
    """A copy of ``client`` whose next connection is one already open (auto's measured connection): the
    plain ``PUT`` on a short path goes exactly as with one stream, on the connection it needs anyway."""
    plain = copy.copy(client)
    real = client._connect

    def connect(cancel: threading.Event | None) -> _Link:
        link, ranged.spare = ranged.spare, None
        if link is None:
            return real(cancel)
        link.cancel = cancel
        return link

    plain._connect = connect  # type: ignore[method-assign]
    return plain


def data_port_unreachable(host: str, port: int, reason: str) -> str:
    """The message for a data port that does not accept connections, with what to check."""
    return (f"cannot connect to the data port at {host}:{port} (the address the server gives in "
            f"GET /v1/info): {reason}. Is the server running? If clients must reach it under another "
            "name or address, start it with --public-host NAME")


def data_port_certificate_message(host: str, port: int, verify_code: int, why: str) -> str:
    """A data-port certificate that fails verification, put as what to do about it."""
    if verify_code in (62, 64):  # hostname mismatch, IP address mismatch
        return (f"the data port's certificate is not issued for {host!r}, the address the server gives for "
                f"its data port ({host}:{port}; {why}): start the server with --public-host set to a name the "
                "certificate carries, or give it a certificate that names "
                f"{host}")
    return (f"the data port's certificate ({host}:{port}) is not trusted ({why}): pass the CA certificate "
            "that signed it with --cacert FILE (or FILEDOCK_CACERT)")


def _sleep(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled("cancelled")


def hash_stream_cancellable(f: BinaryIO, cancel: threading.Event | None) -> ContentHasher:
    """CRC-32 and digest of the rest of a binary file, read once in 1 MiB pieces; ``Cancelled`` if cancelled.

    The file's position is left at its end.
    """
    hasher = ContentHasher()
    buf = memoryview(bytearray(CHUNK))
    while True:
        _check_cancel(cancel)
        n = f.readinto(buf)
        if not n:
            return hasher
        hasher.update(buf[:n])
