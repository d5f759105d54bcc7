"""Measuring tools run inside a ``Link``'s namespaces (``python probe.py COMMAND ...``); each prints
one JSON line. Plain Python, so the tests need nothing beyond the emulator itself.

* ``ping --to ADDR``: ICMP echo over a raw socket (the receiving kernel answers), RTTs in ms.
* ``tcp-sink --port P``: accepts connections one after another, reads each to EOF, replies with a
  JSON line of what it received (bytes, seconds from the first byte, and the rate after ``--warmup``).
* ``tcp-source --to ADDR:P --cc NAME``: one TCP stream with its own congestion control
  (``TCP_CONGESTION``), for ``--seconds`` or ``--bytes``; prints the sink's reply and its own TCP_INFO.
* ``udp-sink`` / ``udp-source``: numbered datagrams one way, to count loss.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time

TCP_INFO_FIELDS = {"snd_mss": (16, "I"), "rtt_us": (68, "I"), "snd_cwnd": (80, "I"), "total_retrans": (100, "I"),
                   "data_segs_out": (156, "I"), "rwnd_limited_us": (176, "Q"), "sndbuf_limited_us": (184, "Q"),
                   "busy_us": (168, "Q")}
"""Offsets in Linux's ``struct tcp_info`` (stable ABI: fields are only ever appended)."""


def tcp_info(sock: socket.socket) -> dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return {name: struct.unpack_from(fmt, raw, off)[0] for name, (off, fmt) in TCP_INFO_FIELDS.items()
            if off + struct.calcsize(fmt) <= len(raw)}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    deadline = time.monotonic() + args.count * args.interval + args.wait
    next_send, seq = time.monotonic(), 0
    while time.monotonic() < deadline and len(rtts) < args.count:
        now = time.monotonic()
        if seq < args.count and now >= next_send:
            body = struct.pack("!HH", ident, seq) + b"filedock-wan".ljust(args.size, b".")
            header = struct.pack("!BBH", 8, 0, 0)
            packet = header[:2] + struct.pack("!H", _checksum(header + body)) + body
            sent_at[seq] = time.monotonic()
            sock.sendto(packet, (args.to, 0))
            seq += 1
            next_send += args.interval
        sock.settimeout(max(0.0005, min(next_send if seq < args.count else deadline, deadline) - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        ihl = (data[0] & 0x0F) * 4
        kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
        if kind == 0 and rid == ident and rseq in sent_at:
            rtts.append((time.monotonic() - sent_at.pop(rseq)) * 1000)
    return {"sent": seq, "received": len(rtts), "rtt_ms": rtts,
            "min_ms": min(rtts, default=None), "avg_ms": sum(rtts) / len(rtts) if rtts else None,
            "max_ms": max(rtts, default=None)}


def tcp_sink(args: argparse.Namespace) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen(8)
    print(json.dumps({"listening": args.port}), flush=True)
    buf = bytearray(1 << 20)
    while True:
        conn, _ = listener.accept()
        with conn:
            total, first, warm_bytes, warm_at = 0, None, 0, None
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                now = time.monotonic()
                if first is None:
                    first = now
                total += n
                if warm_at is None and now - first >= args.warmup:
                    warm_at, warm_bytes = now, total
            end = time.monotonic()
            reply = {"bytes": total, "seconds": end - first if first else 0.0}
            if warm_at is not None and end > warm_at:
                reply["steady_bytes_per_s"] = (total - warm_bytes) / (end - warm_at)
            conn.sendall(json.dumps(reply).encode() + b"\n")


def tcp_source(args: argparse.Namespace) -> dict:
    host, port = args.to.rsplit(":", 1)
    sock = socket.socket()
    if args.cc:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
    if args.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    sock.connect((host, int(port)))
    chunk = memoryview(bytes(64 << 10 if args.seconds else 1 << 20))  # small when timed: stop on time
    t0 = time.monotonic()
    sent = 0
    while True:
        if args.bytes and sent >= args.bytes:
            break
        if args.seconds and time.monotonic() - t0 >= args.seconds:
            break
        sent += sock.send(chunk[: min(len(chunk), args.bytes - sent) if args.bytes else len(chunk)])
    info = tcp_info(sock)
    sock.shutdown(socket.SHUT_WR)
    reply = json.loads(sock.makefile().readline())
    seconds = time.monotonic() - t0
    cc = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
    return {"cc": cc, "sent": sent, "seconds": seconds, "bytes_per_s": sent / seconds, "sink": reply,
            "tcp_info": info, "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)}


def udp_sink(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", args.port))
    print(json.dumps({"listening": args.port}), flush=True)
    seen: set[int] = set()
    sock.settimeout(args.timeout)
    try:
        while True:
            data = sock.recv(65536)
            seen.add(struct.unpack_from("!I", data)[0])
            sock.settimeout(args.idle)
    except socket.timeout:
        pass
    return {"received": len(seen)}


def udp_source(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = bytes(args.size - 4)
    start = time.monotonic()
    for seq in range(args.count):
        wait = start + seq / args.pps - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sock.sendto(struct.pack("!I", seq) + pad, (args.to, args.port))
    return {"sent": args.count}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("ping")
    c.add_argument("--to", required=True)
    c.add_argument("--count", type=int, default=10)
    c.add_argument("--interval", type=float, default=0.1)
    c.add_argument("--size", type=int, default=56)
    c.add_argument("--wait", type=float, default=2.0)
    c = sub.add_parser("tcp-sink")
    c.add_argument("--port", type=int, default=5201)
    c.add_argument("--warmup", type=float, default=0.0)
    c = sub.add_parser("tcp-source")
    c.add_argument("--to", required=True)
    c.add_argument("--cc", default="")
    c.add_argument("--seconds", type=float, default=0.0)
    c.add_argument("--bytes", type=int, default=0)
    c.add_argument("--sndbuf", type=int, default=0)
    c = sub.add_parser("udp-sink")
    c.add_argument("--port", type=int, default=5202)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--idle", type=float, default=1.0)
    c = sub.add_parser("udp-source")
    c.add_argument("--to", required=True)
    c.add_argument("--port", type=int, default=5202)
    c.add_argument("--count", type=int, default=1000)
    c.add_argument("--pps", type=float, default=1000.0)
    c.add_argument("--size", type=int, default=200)
    args = p.parse_args(argv)
    if args.command == "tcp-sink":
        tcp_sink(args)
        return 0
    run = {"ping": ping, "tcp-source": tcp_source, "udp-sink": udp_sink, "udp-source": udp_source}[args.command]
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
