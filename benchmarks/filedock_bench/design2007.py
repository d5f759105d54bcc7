"""(c) The 2007 design on Python 3: a Twisted LineReceiver server and a FileSender client.

The server reads the header ``<session> <file> <size>``, switches to raw mode,
writes each chunk to the file and updates ``zlib.crc32``; when the client closes
it fsyncs (the 2007 server did not; we add it so every contender ends durable)
and prints one JSON line with ``time.monotonic()`` at that moment. The client
streams the file with ``twisted.protocols.basic.FileSender`` in 64 KiB chunks, as
the 2007 client did, and prints the monotonic time just before it connected.
CLOCK_MONOTONIC is system-wide on Linux, so the two times compare across processes.

    python design2007.py serve --dir DIR --ready READY.json
    python design2007.py send --port P --session S --file F SOURCE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

from twisted.internet import protocol, reactor
from twisted.protocols.basic import FileSender, LineReceiver

CHUNK = 64 * 1024


class UploadReceiver(LineReceiver):
    """One 2007 upload: header line, then raw bytes until the client closes."""

    directory: Path

    def connectionMade(self) -> None:
        self.f = None
        self.received = 0
        self.crc = 0

    def lineReceived(self, line: bytes) -> None:
        _session, key, size = line.decode("ascii").split()
        self.key, self.size = key, int(size)
        self.f = open(self.factory.directory / key, "wb")
        self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        self.f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.received += len(data)

    def connectionLost(self, reason=None) -> None:
        if self.f is None:
            return
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        print(json.dumps({"file": self.key, "bytes": self.received, "size": self.size,
                          "crc32": f"{self.crc:08x}", "t_durable": time.monotonic()}), flush=True)


def serve(directory: Path, ready: Path) -> None:
    factory = protocol.ServerFactory.forProtocol(UploadReceiver)
    factory.directory = directory
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port.getHost().port, "pid": os.getpid()}))
    os.replace(tmp, ready)
    reactor.run()


class UploadSender(protocol.Protocol):
    """Header, then the file through FileSender (64 KiB reads), then close."""

    def connectionMade(self) -> None:
        f = self.factory
        self.transport.write(f"{f.session} {f.key} {f.size}\r\n".encode())
        sender = FileSender()
        sender.CHUNK_SIZE = CHUNK
        d = sender.beginFileTransfer(f.source, self.transport)
        d.addCallback(lambda _: self.transport.loseConnection())

    def connectionLost(self, reason=None) -> None:
        self.factory.t_closed = time.monotonic()
        reactor.stop()


def send(port: int, session: str, key: str, source: Path) -> None:
    factory = protocol.ClientFactory.forProtocol(UploadSender)
    factory.session, factory.key = session, key
    factory.size = source.stat().st_size
    factory.source = open(source, "rb")
    factory.t_closed = None
    t0 = time.monotonic()
    reactor.connectTCP("127.0.0.1", port, factory)
    reactor.run()
    print(json.dumps({"t0": t0, "t_closed": factory.t_closed}), flush=True)
    sys.exit(0 if factory.t_closed else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--ready", required=True, type=Path)
    p = sub.add_parser("send")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--session", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("source", type=Path)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.dir, args.ready)
    else:
        send(args.port, args.session, args.file, args.source)


if __name__ == "__main__":
    main()
