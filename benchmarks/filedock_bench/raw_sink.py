"""(b) The raw limit: a plain Python server that does nothing but receive and write.

One connection at a time: ``recv_into`` a 1 MiB buffer, ``os.write`` it, and at EOF
one fsync, then a reply line ``STORED <bytes> <name>`` so the client can time
"durable". No hashing, no protocol, no metadata. Run as a script::

    python raw_sink.py --dir DIR --ready READY.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

BUFFER = 1 << 20


def receive(conn: socket.socket, fd: int, view: memoryview) -> int:
    total = 0
    while n := conn.recv_into(view):
        written = 0
        while written < n:
            written += os.write(fd, view[written:n])
        total += n
    return total


def serve(directory: Path, ready: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": server.getsockname()[1], "pid": os.getpid()}))
    os.replace(tmp, ready)
    view = memoryview(bytearray(BUFFER))
    count = 0
    while True:
        conn, _ = server.accept()
        count += 1
        name = f"recv-{count}"
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with conn:
            total = receive(conn, fd, view)
            os.fsync(fd)
            os.close(fd)
            conn.sendall(f"STORED {total} {name}\n".encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--ready", required=True, type=Path)
    args = parser.parse_args()
    serve(args.dir, args.ready)


if __name__ == "__main__":
    main()
