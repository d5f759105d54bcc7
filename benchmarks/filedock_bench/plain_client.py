"""A plain data-port client: the protocol by hand, body by ``socket.sendfile``, no hashing.

It is what measures the filedock server alone: the client does as little as a
client can, so the time is the server's (and the kernel's).
"""

from __future__ import annotations

import socket
from typing import BinaryIO

REPLY_TIMEOUT = 600.0


class LineReader:
    """Reply lines from a socket, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"server closed before a full reply line (got {self.buf[:200]!r})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("ascii", "replace")


def _expect(line: str, word: str) -> list[str]:
    parts = line.split()
    if not parts or parts[0] != word:
        raise RuntimeError(f"expected {word}, server said {line[:300]!r}")
    return parts


def open_put(addr: tuple[str, int], session: str, key: str, size: int) -> tuple[socket.socket, LineReader, int]:
    """Connect, ``FILEDOCK/1 PUT``; returns the socket, its reader and the server's durable offset."""
    sock = socket.create_connection(addr, timeout=REPLY_TIMEOUT)
    reader = LineReader(sock)
    sock.sendall(f"FILEDOCK/1 PUT {session} {key} {size}\r\n".encode())
    offset = int(_expect(reader.line(), "OFFSET")[1])
    return sock, reader, offset


def send_range(sock: socket.socket, f: BinaryIO, start: int, count: int) -> None:
    """``count`` bytes of ``f`` from ``start``, by sendfile (blocking: no per-chunk polling)."""
    sock.settimeout(None)
    if count:
        sent = sock.sendfile(f, start, count)
        if sent != count:
            raise RuntimeError(f"sendfile sent {sent} of {count} bytes")
    sock.settimeout(REPLY_TIMEOUT)


def put(addr: tuple[str, int], session: str, key: str, f: BinaryIO, base: int, size: int) -> int:
    """Upload declared file ``key`` (``size`` bytes) from ``f[base:base+size]``, resuming where the
    server is; returns once ``STORED`` arrived. Returns the offset the server resumed from."""
    sock, reader, offset = open_put(addr, session, key, size)
    with sock:
        send_range(sock, f, base + offset, size - offset)
        sock.sendall(b"DONE\r\n")
        _expect(reader.line(), "STORED")
    return offset


def put_partial(addr: tuple[str, int], session: str, key: str, f: BinaryIO, size: int, count: int) -> None:
    """Send the first ``count`` of ``size`` bytes, then close without ``DONE`` (an interrupted upload)."""
    sock, _reader, offset = open_put(addr, session, key, size)
    with sock:
        send_range(sock, f, offset, count - offset)


def send_2007(addr: tuple[str, int], session: str, key: str, f: BinaryIO, size: int) -> None:
    """The 2007 dialect: header, raw bytes, close. The server never answers."""
    with socket.create_connection(addr, timeout=REPLY_TIMEOUT) as sock:
        sock.sendall(f"{session} {key} {size}\r\n".encode())
        send_range(sock, f, 0, size)
