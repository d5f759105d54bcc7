"""Hostile input against a live server process: the data port and the control API.

The data-port barrage is reproducible (a fixed random seed) and built so that only
invalid requests, or requests for one sacrificial file, are ever sent: the
protected files (a complete one, a partial one, a pending one) must come out of it
byte for byte and record for record as they went in. Every connection must end
with one ``ERR <code> <message>`` line or a plain close, never anything else,
except the deliberate requests for the sacrificial file, which may be answered
``OFFSET``/``ABORTED`` as the protocol says.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import re
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from filedock import wire
from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, put, recv_line, wait_closed, wait_for
from tests.integration.test_reliability import (
    ERR_LINE, KEY_SHAPE, MiB, final_path, print_figures, raw_http, run_fsck, stored_line, upload_whole,
)

SEED = 20071124

# ---------------------------------------------------------------- snapshots


def snapshot_data_dir(data_dir: Path, skip: set[str]) -> dict[str, tuple[int, str]]:
    """Every file under the data dir: relative path -> (size, sha256).

    The SQLite files are left out (their pages change with every read transaction's
    bookkeeping; the records are compared through the API instead), and so is any
    path whose name starts with a key in ``skip`` (the sacrificial file).
    """
    out = {}
    for path in sorted(data_dir.rglob("*")):
        if path.name.startswith("filedock.sqlite3") or any(path.name.startswith(k) for k in skip):
            continue
        rel = str(path.relative_to(data_dir))
        if path.is_dir():
            out[rel] = (-1, "dir")
        else:
            out[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def snapshot_records(server: ServerProcess, job_ids: list[str]) -> dict:
    """The protected jobs with all their file records, exactly as the API shows them."""
    return {job_id: server.api.job(job_id) for job_id in job_ids}


# ---------------------------------------------------------------- the barrage


@dataclass
class Attempt:
    """One connection: bytes to send, how to end it, and which replies are acceptable."""

    kind: str
    payload: bytes
    ending: str = "shutdown"  # "shutdown" (half-close, read to the end), "wait", "close", "reset"
    sacrificial: bool = False  # a deliberate request for the sacrificial file: OFFSET/ABORTED allowed
    body: tuple[bool, int] | None = None  # after OFFSET: (whole rest?, else up to byte ``cut``) of its data
    then: bytes = b""  # sent after the body bytes


class Target:
    """What the barrage knows: the sacrificial session and file, and keys it must not hurt."""

    def __init__(self, session: str, sac_key: str, sac_data: bytes, protected: dict[str, int],
                 dead_sessions: list[str]) -> None:
        self.session, self.sac_key, self.sac_data = session, sac_key, sac_data
        self.protected = protected  # file key -> declared size
        self.dead_sessions = dead_sessions


def is_sacrificial_request(payload: bytes, target: Target) -> bool:
    """Would the server take ``payload``'s first line as a valid request on the sacrificial file?

    Only used to keep accidental valid requests out of the "must be refused" class;
    the server's answer is still checked on its own.
    """
    conn = wire.ServerConnection()
    conn.receive_data(payload)
    event = conn.next_event()
    if isinstance(event, (wire.UploadRequest, wire.DownloadRequest, wire.AbortRequest)):
        return event.session_key == target.session and event.file_key == target.sac_key
    return False


def random_key(rng: random.Random) -> str:
    """A well-formed UUID4 no server made (reproducible from the seed)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def templates(target: Target, rng: random.Random) -> list[bytes]:
    """Header lines that must all be refused: right shape, wrong session, file, job or size."""
    s, sac, n = target.session, target.sac_key, len(target.sac_data)
    lines = []
    for key, size in target.protected.items():
        for sess in (s, *target.dead_sessions, random_key(rng)):
            lines += [f"FILEDOCK/1 PUT {sess} {key} {size}", f"FILEDOCK/1 GET {sess} {key} 0",
                      f"FILEDOCK/1 ABORT {sess} {key}", f"{sess} {key} {size}"]
    lines += [f"FILEDOCK/1 PUT {s} {sac} {n + 1}", f"FILEDOCK/1 PUT {s} {sac} {n - 1}",
              f"FILEDOCK/1 GET {s} {sac} 0", f"FILEDOCK/1 PUT {s} {random_key(rng)} {n}",
              f"FILEDOCK/1 PUT {random_key(rng)} {sac} {n}", f"{random_key(rng)} {sac} {n}"]
    return [line.encode() for line in lines]


BAD_NUMBERS = ["-1", "-0", "+5", "0x10", "1e3", "1.0", "01", "00", " 5", "5 ", "\t5", "9223372036854775808",
               "18446744073709551616", "99999999999999999999999999999999", "-9223372036854775809", "",
               "\u0661\u0662", "５", "NaN", "inf", "1_000"]
BAD_KEYS = ["abc", "", "00000000000000000000000000000000", "{%s}", "urn:uuid:%s", "%s0", "<short>",
            "../../etc/passwd", "..%2f..%2fetc", "/etc/passwd", "g" * 8 + "-0000-0000-0000-000000000000",
            "%s\x00", "\x00" * 36, "%s/..", "％s", "<nodash>", "<spaced>"]
"""Keys that are not keys; ``%s`` and ``<...>`` are filled from a well-formed random UUID."""


def bad_key(shape: str, real: str) -> str:
    special = {"<short>": real[:-1], "<nodash>": real.replace("-", ""), "<spaced>": real.replace("-", " ")}
    return special.get(shape, shape % real if "%s" in shape else shape)


def structured(target: Target, rng: random.Random) -> Iterator[Attempt]:
    """The deliberate cases: numbers, keys, long lines, every stage of closing, extra bytes."""
    s, sac, data = target.session, target.sac_key, target.sac_data
    n = len(data)
    prot_key, prot_size = next(iter(target.protected.items()))
    real = random_key(rng)
    for number in BAD_NUMBERS:
        for line in (f"FILEDOCK/1 PUT {s} {sac} {number}", f"FILEDOCK/1 PUT {s} {prot_key} {number}",
                     f"FILEDOCK/1 GET {s} {sac} {number}", f"{s} {sac} {number}"):
            yield Attempt("bad-number", line.encode("utf-8") + b"\r\n", "wait")
    for shape in BAD_KEYS:
        key = bad_key(shape, real)
        for line in (f"FILEDOCK/1 PUT {s} {key} {n}", f"FILEDOCK/1 PUT {key} {sac} {n}",
                     f"FILEDOCK/1 ABORT {key} {prot_key}", f"{key} {prot_key} {prot_size}"):
            yield Attempt("bad-key", line.encode("utf-8") + b"\r\n", "wait")
    for length in (4095, 4096, 4097, 5000, 16384, 65536, 1 << 20):
        yield Attempt("long-line", b"A" * length, "wait" if length >= 4096 else "shutdown")
        yield Attempt("long-line", f"FILEDOCK/1 PUT {s} {sac} {n}".encode() + b" " * length + b"\r\n", "wait")
    yield Attempt("long-line", b"\n" * 0 + b"x" * 4200 + b"\n", "wait")
    for version in (b"FILEDOCK/0", b"FILEDOCK/2", b"FILEDOCK/1.1", b"filedock/1", b"FILEDOCK/", b"FILEDOCK/1\t"):
        yield Attempt("bad-version", version + f" PUT {s} {sac} {n}\r\n".encode(), "wait")
    for verb in (b"put", b"POST", b"DELETE", b"PUTT", b"", b"PUT PUT", b"DONE", b"OFFSET", b"STORED"):
        yield Attempt("bad-verb", b"FILEDOCK/1 " + verb + f" {s} {sac} {n}\r\n".encode(), "wait")
    tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\n"
    for junk in (b"\r\n", b"\n", b"\r\r\n", b" \r\n", b"\x00\r\n", b"DONE\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                 tls_hello, b"\xef\xbb\xbfFILEDOCK/1 PUT\r\n"):
        yield Attempt("junk-line", junk, "wait")

    # connections closed at every stage of a valid header (for the sacrificial file only)
    for header in (f"FILEDOCK/1 PUT {s} {sac} {n}\r\n".encode(), f"{s} {sac} {n}\r\n".encode(),
                   f"FILEDOCK/1 ABORT {s} {sac}\r\n".encode()):
        for cut in range(len(header)):
            ending = ("shutdown", "close", "reset")[cut % 3]
            yield Attempt("header-prefix", header[:cut], ending)
    # mid-body and before DONE: valid headers, body bytes that are always the sacrificial data
    for cut in (0, 1, 1000, 65536, 300_000, n - 1, n):
        for ending in ("shutdown", "close", "reset"):
            yield Attempt("mid-body", f"FILEDOCK/1 PUT {s} {sac} {n}\r\n".encode(), ending, sacrificial=True,
                          body=(False, cut))
    yield Attempt("partial-done", f"FILEDOCK/1 PUT {s} {sac} {n}\r\n".encode(), "shutdown", sacrificial=True,
                  body=(True, n), then=b"DON")
    yield Attempt("partial-done", f"FILEDOCK/1 PUT {s} {sac} {n}\r\n".encode(), "reset", sacrificial=True,
                  body=(True, n), then=b"DONE 00")
    for cut in (10, 500_000):  # 2007 dialect: short, then closed (a partial from 0, never complete)
        yield Attempt("legacy-short", f"{s} {sac} {n}\r\n".encode() + data[:cut], "close", sacrificial=True)
    # extra bytes after the declared size: 2007 (discarded, nothing said) and versioned (trailer is junk)
    for extra in (b"!", b"more bytes than announced", bytes(70_000)):
        yield Attempt("legacy-excess", f"{s} {sac} {n}\r\n".encode() + data + extra, "wait", sacrificial=True)
        yield Attempt("versioned-excess", f"FILEDOCK/1 PUT {s} {sac} {n}\r\n".encode(), "wait", sacrificial=True,
                      body=(True, n), then=extra + b"\r\nDONE\r\n")
    yield Attempt("abort", f"FILEDOCK/1 ABORT {s} {sac}\r\n".encode(), "wait", sacrificial=True)
    yield Attempt("get-incomplete", f"FILEDOCK/1 GET {s} {sac} 0\r\n".encode(), "wait", sacrificial=True)


def mutate(line: bytes, rng: random.Random) -> bytes:
    """1-4 random edits: flip, insert, delete, duplicate, swap a field, cut the newline."""
    out = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[pos:pos] = bytes([rng.randrange(256)])
        elif op == 2 and out:
            del out[min(pos, len(out) - 1)]
        elif op == 3:
            out[pos:pos] = out[pos:pos + rng.randint(1, 40)]
        elif op == 4:
            fields = bytes(out).split(b" ")
            rng.shuffle(fields)
            out = bytearray(b" ".join(fields))
        elif op == 5:
            out[pos:pos] = rng.choice([b" ", b"  ", b"\t", b"\r", b"-", b"0", b"\xff", b"\x00"])
        else:
            out = out[:pos]
    return bytes(out)


def randomized(target: Target, rng: random.Random, count: int) -> Iterator[Attempt]:
    """``count`` random attempts: garbage, random text lines and mutations of the refusable templates."""
    lines = templates(target, rng)
    alphabet = b"FILEDOCK/1 PUTGEABR0123456789abcdef-\r\n "
    for i in range(count):
        choice = rng.random()
        ending = rng.choice(("shutdown", "shutdown", "wait", "close", "reset"))
        if choice < 0.2:
            payload = rng.randbytes(rng.randint(1, 9000))
            kind = "binary-garbage"
        elif choice < 0.35:
            payload = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
            kind = "random-text"
        elif choice < 0.5:
            payload = rng.choice(lines) + b"\r\n"
            kind = "refusable-request"
            ending = rng.choice(("wait", "shutdown"))
        else:
            payload = mutate(rng.choice(lines) + b"\r\n", rng)
            kind = "mutated-request"
        if ending == "wait" and not payload.endswith(b"\n"):
            ending = "shutdown"  # an unfinished line would wait for the header timeout
        yield Attempt(kind, payload, ending)


class Barrage:
    """Sends attempts one connection each and checks every reply; counts what it tried."""

    def __init__(self, server: ServerProcess, target: Target) -> None:
        self.server, self.target = server, target
        self.tried = 0
        self.by_kind: dict[str, int] = {}
        self.codes: dict[str, int] = {}
        self.skipped_valid = 0
        self.bad: list[tuple[str, bytes, bytes]] = []

    def run(self, attempts: Iterator[Attempt]) -> None:
        for attempt in attempts:
            if not attempt.sacrificial and is_sacrificial_request(attempt.payload, self.target):
                self.skipped_valid += 1  # a mutation that happens to be valid is not hostile input
                continue
            reply = self.send(attempt)
            self.tried += 1
            self.by_kind[attempt.kind] = self.by_kind.get(attempt.kind, 0) + 1
            if reply is not None:
                self.check(attempt, reply)

    def send(self, attempt: Attempt) -> bytes | None:
        """One connection; returns everything the server sent (None if we could not read it)."""
        sock = socket.create_connection(self.server.data_addr, timeout=15)
        try:
            said = b""
            sock.sendall(attempt.payload)
            if attempt.body is not None:
                said = recv_line(sock) + b"\r\n"
                if said.startswith(b"OFFSET "):
                    offset = int(said.split()[1])
                    whole, cut = attempt.body
                    end = len(self.target.sac_data) if whole else max(offset, cut)
                    sock.sendall(self.target.sac_data[offset:end] + attempt.then)
                elif said == b"\r\n":
                    said = b""
            if attempt.ending == "close":
                return None
            if attempt.ending == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return None
            if attempt.ending == "shutdown":
                sock.shutdown(socket.SHUT_WR)
            return said + wait_closed(sock, 15)
        except (BrokenPipeError, ConnectionResetError):
            # the server closed on us while we were still sending: read what it said before that
            try:
                return said + wait_closed(sock, 5)
            except OSError:
                return None
        finally:
            sock.close()

    def check(self, attempt: Attempt, reply: bytes) -> None:
        rest = reply
        if attempt.sacrificial:
            for allowed in (b"OFFSET ", b"ABORTED\r\n"):
                if rest.startswith(allowed):
                    rest = rest[rest.index(b"\n") + 1:]
        match = ERR_LINE.fullmatch(rest) if rest else None
        if rest and not match:
            self.bad.append((attempt.kind, attempt.payload[:200], reply[:300]))
            return
        code = match[1].decode() if match else "(close)"
        self.codes[code] = self.codes.get(code, 0) + 1


def hostile_setup(server: ServerProcess) -> tuple[Target, dict, list[str], str, str]:
    """Protected job (complete, partial, pending files; closed and expired sessions) and a sacrificial job."""
    rng = random.Random(SEED)
    complete, partial = rng.randbytes(300_000), rng.randbytes(600_000)
    job, files, session = server.job_with_files("protected", {"complete.bin": len(complete),
                                                              "partial.bin": len(partial), "pending.bin": 100_000})
    assert upload_whole(server, session["key"], files["complete.bin"]["key"], complete) == stored_line(complete)
    sock, line = put(server, session["key"], files["partial.bin"]["key"], len(partial))
    sock.sendall(partial[:200_000])
    time.sleep(0.1)
    sock.close()
    wait_for(lambda: server.api.file(files["partial.bin"]["key"])["received"] == 200_000)
    expired = server.api.open_session(job["id"], 0.2)
    server.api.close_session(session["key"])
    sac_data = rng.randbytes(MiB)
    sjob, sfiles, ssession = server.job_with_files("sacrificial", {"sac": len(sac_data)})
    sac_key = sfiles["sac"]["key"]
    sock, _ = put(server, ssession["key"], sac_key, len(sac_data))  # the job dir exists before the snapshot
    sock.sendall(sac_data[:1000])
    sock.close()
    wait_for(lambda: not server.api.get("/v1/uploads")["uploads"])
    time.sleep(0.3)  # the expired session has expired
    target = Target(ssession["key"], sac_key, sac_data, {f["key"]: f["size"] for f in files.values()},
                    [session["key"], expired["key"]])
    return target, files, [job["id"]], sjob["id"], sac_key


def run_barrage(tmp_path: Path, count: int, name: str) -> dict:
    """The whole data-port barrage against one live server; asserts everything, returns the figures."""
    rng = random.Random(SEED)
    with ServerProcess(tmp_path / "data", limits=["header_timeout=5", "idle_timeout=5"]) as server:
        target, files, protected_jobs, sac_job, sac_key = hostile_setup(server)
        records_before = snapshot_records(server, protected_jobs)
        sac_blob = server.blob_path(sac_job, sac_key).name  # the sacrificial file's name on disk
        disk_before = snapshot_data_dir(server.data_dir, {sac_blob})
        started = time.monotonic()
        barrage = Barrage(server, target)
        barrage.run(structured(target, rng))
        barrage.run(randomized(target, rng, count))
        seconds = time.monotonic() - started
        wait_for(lambda: not server.api.get("/v1/uploads")["uploads"], timeout=30)

        assert server.proc.poll() is None, "the server died under the barrage"
        assert server.api.info()["digest"] == "blake3-4m"
        figures = {"inputs_tried": barrage.tried, "skipped_accidentally_valid": barrage.skipped_valid,
                   "by_kind": barrage.by_kind, "replies": barrage.codes, "seconds": round(seconds, 1),
                   "bad_replies": len(barrage.bad)}
        print(f"\n{name}: {barrage.tried} hostile inputs tried in {seconds:.1f}s", flush=True)
        print_figures(name, figures)
        assert not barrage.bad, f"{len(barrage.bad)} replies were neither an ERR line nor a close: {barrage.bad[:5]}"
        assert snapshot_records(server, protected_jobs) == records_before
        assert snapshot_data_dir(server.data_dir, {sac_blob}) == disk_before

        # the sacrificial file was only ever sent its own bytes: it still completes with the right digest
        sac = server.api.file(sac_key)
        assert sac["state"] in ("pending", "partial"), sac
        reply = upload_whole(server, target.session, sac_key, target.sac_data)
        assert reply == stored_line(target.sac_data), reply
    status, report = run_fsck(server.data_dir)
    assert report["findings"] == [], report
    return figures


def test_data_port_barrage_changes_nothing_and_kills_nothing(tmp_path):
    """~4500 hostile connections (fixed seed): each gets one ERR line or a close; the server lives,
    the protected files and records are unchanged, and the sacrificial file still completes."""
    figures = run_barrage(tmp_path, count=4000, name="hostile-data-port")
    assert figures["inputs_tried"] >= 4000


def test_bytes_after_done_are_refused_as_excess_data(tmp_path):
    """Bytes after the DONE line are excess-data (docs/protocol.md, and filedock.wire says so):
    the client must get ERR excess-data, not STORED, and the file must not be recorded complete."""
    data = random.Random(SEED + 1).randbytes(100_000)
    with ServerProcess(tmp_path / "data") as server:
        _, files, session = server.job_with_files("after-done", {"f": len(data)})
        key = files["f"]["key"]
        sock, line = put(server, session["key"], key, len(data))
        assert line == b"OFFSET 0"
        sock.sendall(data)
        sock.sendall(f"DONE {digest_of(data)}\r\n".encode() + b"EXTRA BYTES AFTER DONE")
        reply = wait_closed(sock)
        state = wait_for(lambda: not server.api.get("/v1/uploads")["uploads"]) and server.api.file(key)["state"]
        assert reply.startswith(b"ERR excess-data "), (reply, state)
        assert state != "complete"


# ---------------------------------------------------------------- the control API


def api_cases(job_id: str, file_key: str, session_key: str) -> list[tuple[str, str, bytes | None, int, str]]:
    """(method, path, body, expected status, expected error code) for hostile API requests."""
    jobs, files = "/v1/jobs", f"/v1/jobs/{job_id}/files"
    sessions, job = f"/v1/jobs/{job_id}/sessions", f"/v1/jobs/{job_id}"
    bad = []
    for body in (b"{", b"[]", b'"a string"', b"null", b"123", b"true", b'{"name": NaN}', b'{"name": Infinity}',
                 b'{"name": -Infinity}', b"\xff\xfe{}", b'{"name": "\xff"}', b"[" * 100_000, b"{" * 50_000,
                 b'{"name": "x"} trailing', b"{'name': 'x'}", b'{"name": "x",}', b"\x00", b'{"name": "a\\ud800"}'):
        bad.append(("POST", jobs, body, 400, "bad-request"))
    for body in ({"name": 5}, {"name": None}, {"name": ["x"]}, {"name": ""}, {"name": "x" * 201},
                 {"name": "a\nb"}, {"name": "tab\there"}, {"name": str(uuid.uuid4())}, {"name": "x", "metadata": []},
                 {"name": "x", "metadata": {"a": {"b": 1}}}, {"name": "x", "metadata": {"a": [1]}},
                 {"name": "x", "extra": 1}, {"nam": "x"}, {}, {"name": True}):
        bad.append(("POST", jobs, json.dumps(body).encode(), 400, "bad-request"))
    for name in ("../x", "/etc/passwd", "a\x00b", "a/../b", "..\\x", "a\\..\\b", "\\x", "..", "x/..", "",
                 "a\x1fb", "a\x7fb", "x" * 1025, "\\\\server\\share", "../../etc/passwd-ish", "ok/../../../../x"):
        bad.append(("POST", files, json.dumps({"name": name, "size": 1}).encode(), 400, "bad-request"))
    for body in ({"name": "f", "size": "10"}, {"name": "f", "size": 1.5}, {"name": "f", "size": True},
                 {"name": "f", "size": -1}, {"name": "f", "size": None}, {"name": "f"}, {"size": 1},
                 {"name": "f", "size": 1, "key": str(uuid.uuid4())}, {"files": []}, {"files": {}}, {"files": [1]},
                 {"files": [{"name": "a", "size": 1}, {"name": "a", "size": 1}]},
                 {"files": [{"name": f"n{i}", "size": 1} for i in range(1001)]},
                 {"files": [{"name": "ok", "size": 1}, {"name": "../bad", "size": 1}]},
                 {"files": [{"name": "ok", "size": 1}], "name": "x"}, {"name": "f", "size": 1e3}):
        bad.append(("POST", files, json.dumps(body).encode(), 400, "bad-request"))
    bad.append(("POST", files, b'{"name": "f", "size": 1e400}', 400, "bad-request"))
    bad.append(("POST", files, json.dumps({"name": "f", "size": 2 ** 70}).encode(), 413, "too-large"))
    for body in (b'{"ttl": "x"}', b'{"ttl": 0}', b'{"ttl": -1}', b'{"ttl": 1e12}', b'{"ttl": true}', b'{"ttl": NaN}',
                 b'{"ttl": null}', b'{"ttl": 10, "job": "x"}', b'{"ttl": 1e400}'):
        bad.append(("POST", sessions, body, 400, "bad-request"))
    for body in ({"name": 5}, {"metadata": "x"}, {"bogus": 1}, {"name": "../" * 100}, {"name": str(uuid.uuid4())}):
        expect = 400
        bad.append(("PATCH", job, json.dumps(body).encode(), expect, "bad-request"))
    for method, path in (("PUT", jobs), ("DELETE", "/v1/info"), ("POST", "/v1/info"), ("GET", files),
                         ("PATCH", f"/v1/files/{file_key}"), ("GET", f"/v1/sessions/{session_key}"),
                         ("TRACE", jobs), ("FOO", jobs), ("DELETE", jobs), ("PUT", f"/v1/files/{file_key}"),
                         ("POST", "/v1/uploads"), ("HEAD", "/v1/info")):
        bad.append((method, path, None, 405, "method-not-allowed"))
    for path in ("/v2/jobs", "/v1/jobs/x/y/z", "/v1//jobs", "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
                 "/v1/../../etc/passwd", "/v1/files/%00", f"/v1/files/{uuid.uuid4()}", "/v1/jobs/nope",
                 f"/v1/jobs/{job_id}/files/../../../etc", "/v1/files/" + "a" * 5000, "/%2e%2e/%2e%2e/etc/passwd",
                 "/v1/jobs/%2e%2e", "/v1/info/"):
        bad.append(("GET", path, None, 404, "not-found"))
    bad.append(("GET", "/v1/jobs/%ff%fe", None, 400, "bad-request"))
    bad.append(("DELETE", f"/v1/sessions/{uuid.uuid4()}", None, 404, "not-found"))
    bad.append(("DELETE", "/v1/jobs/%2e%2e", None, 404, "not-found"))
    return bad


TRACEBACK_SIGNS = (b"Traceback", b'File "', b'.py"', b".py, line", b"OperationalError", b"sqlite3.", b"twisted.")


def check_error_reply(status: int, headers: dict, body: bytes, want_status: int, want_code: str, what) -> None:
    """A refusal: the right status, a JSON error body with the right code, no traceback text."""
    assert status == want_status, (what, status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (what, headers)
    assert not any(sign in body for sign in TRACEBACK_SIGNS), (what, body[:500])
    payload = json.loads(body)
    assert payload["error"]["code"] == want_code, (what, payload)
    if want_status == 405:
        assert headers.get("allow"), (what, headers)


def test_api_refuses_hostile_requests_and_changes_nothing(tmp_path):
    """Malformed JSON, wrong types, unknown fields, path tricks, huge bodies, wrong methods and paths:
    each gets a JSON error with its proper HTTP status and no traceback; the job list is unchanged."""
    with ServerProcess(tmp_path / "data") as server:
        job, files, session = server.job_with_files("hostile-api", {"f": 10})
        jobs_before = server.api.get("/v1/jobs")
        job_before = server.api.job(job["id"])
        disk_before = snapshot_data_dir(server.data_dir, set())
        cases = api_cases(job["id"], files["f"]["key"], session["key"])
        for method, path, body, status, code in cases:
            got = raw_http(server, method, path, body)
            if method == "HEAD":  # no body by definition: status and headers only
                assert got[0] == status, (method, path, got)
                continue
            check_error_reply(*got, status, code, (method, path, (body or b"")[:80]))
        tried = len(cases)

        limit = server.api.info()["limits"]["max_api_body"]
        huge = b'{"name": "' + b"x" * (limit + 10) + b'"}'
        for path in ("/v1/jobs", f"/v1/jobs/{job['id']}/files", f"/v1/jobs/{job['id']}/sessions"):
            check_error_reply(*raw_http(server, "POST", path, huge), 413, "body-too-large", ("huge", path))
            chunked = raw_http_chunked(server, path, huge)
            check_error_reply(*chunked, 413, "body-too-large", ("huge chunked", path))
            tried += 2

        assert server.api.get("/v1/jobs") == jobs_before
        assert server.api.job(job["id"]) == job_before
        assert snapshot_data_dir(server.data_dir, set()) == disk_before
        assert server.proc.poll() is None
        log = server.log_path.read_text(errors="replace")
    print_figures("hostile-api", {"requests": tried, "internal_errors_logged": log.count("critical")})


def raw_http_chunked(server: ServerProcess, path: str, body: bytes) -> tuple[int, dict, bytes]:
    """A POST with a chunked body (no Content-Length): the server must bound what it reads."""
    conn = http.client.HTTPConnection(server.api.host, server.api.port, timeout=30)
    try:
        conn.request("POST", path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                     headers={"Authorization": f"Bearer {server.token}"}, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


ACCEPTED_TRICKY_NAMES = [
    "..../..../etc/passwd-ish", "etc/passwd-ish", "...\\...\\etc\\passwd-ish", "..%2f..%2fetc%2fpasswd-ish",
    "\u2025/\u2025/etc/passwd-ish", "\uff0e\uff0e/\uff0e\uff0e/etc/passwd-ish", "./etc/passwd-ish",
    "~/.ssh/authorized_keys-ish", "C:\\Windows\\System32\\evil-ish", "a..b/.../passwd-ish", "jobs/evil-ish",
    "filedock.sqlite3", "x/" * 300 + "deep-ish", "passwd-ish\u202e",
]


STAGED_SHAPE = re.compile(r"[0-9a-f]{12}-[0-9]+")


def allowed_data_dir_entry(rel: Path) -> bool:
    """Names the server itself makes in its data dir: jobs/<id>/<file id>[.part|.blocks], the SQLite files,
    the file key secret, staging/<lane>/<tag>-<n> (batches in flight), admin-token (serve --issue-admin-token)."""
    parts = rel.parts
    if len(parts) == 1:
        return (parts[0] in ("jobs", "lost+found", "staging", "filedock.lock", "filedock.secret", "admin-token")
                or parts[0].startswith("filedock.sqlite3"))
    if parts[0] == "staging":
        return parts[1].isdigit() and (len(parts) == 2 or len(parts) == 3 and bool(STAGED_SHAPE.fullmatch(parts[2])))
    if parts[0] != "jobs" or not KEY_SHAPE.fullmatch(parts[1]):
        return False
    if len(parts) == 2:
        return True
    return len(parts) == 3 and bool(KEY_SHAPE.fullmatch(parts[2].removesuffix(".part").removesuffix(".blocks")))


def test_tricky_names_that_are_accepted_are_stored_as_data(tmp_path):
    """Names like '..../..../etc/passwd-ish' that the rules accept become records, never paths: after
    uploading to each, the data dir holds only server-made names and nothing appears outside it."""
    around_before = sorted(p.name for p in tmp_path.iterdir())
    with ServerProcess(tmp_path / "data") as server:
        job_names = ["../../etc/passwd-ish", "/etc/passwd-ish", "..\\..\\evil-ish"]
        created = [server.api.create_job(name) for name in job_names]
        for job, name in zip(created, job_names):
            assert server.api.job(name)["id"] == job["id"]  # found by its name, percent-encoded in the path
        job = created[0]
        contents = {name: f"bytes of {name}".encode() for name in ACCEPTED_TRICKY_NAMES}
        declared = {name: server.api.add_file(job["id"], name, len(data)) for name, data in contents.items()}
        session = server.api.open_session(job["id"])
        for name, data in contents.items():
            assert declared[name]["name"] == name
            assert upload_whole(server, session["key"], declared[name]["key"], data) == stored_line(data)
        strays = [p for p in server.data_dir.rglob("*") if not allowed_data_dir_entry(p.relative_to(server.data_dir))]
        assert not strays, strays
        for name, data in contents.items():
            assert final_path(server, job["id"], declared[name]["key"]).read_bytes() == data
            sock = server.connect()
            sock.sendall(f"FILEDOCK/1 GET {session['key']} {declared[name]['key']} 0\r\n".encode())
            assert recv_line(sock).startswith(f"DATA {len(data)} 0 ".encode())
            assert wait_closed(sock) == data
        listed = {f["name"] for f in server.api.job(job["id"])["files"]}
        assert listed == set(contents)
    around_after = sorted(p.name for p in tmp_path.iterdir())
    assert set(around_after) - set(around_before) <= {"data", "data-server.log", "data-ready.json"}, around_after
    for outside in ("/etc/passwd-ish", "/evil-ish", str(tmp_path.parent / "etc")):
        assert not Path(outside).exists(), outside
    print_figures("tricky-names", {"file_names": len(contents), "job_names": len(job_names)})
