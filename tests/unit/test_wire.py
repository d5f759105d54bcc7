"""Tests for ``filedock.wire``: the sans-IO data-port protocol core (bytes in, events out)."""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from filedock.errors import ErrorCode, FiledockError
from filedock.wire import (
    MAX_LINE, MAX_SIZE, NEED_DATA, PAUSED, AbortRequest, Aborted, BodyComplete, ClientConnection,
    ClientState, Data, Done, DownloadRequest, DownloadStart, EndOfStream, Offset, ProtocolError,
    ServerConnection, ServerError, ServerState, Stored, UploadRequest, format_crc, format_error,
    legacy_header,
)

SESSION = "0b7d3c1e-5f2a-4c8b-9d6e-1a2b3c4d5e6f"
FILE = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
DIGEST = hashlib.sha256(b"filedock").hexdigest()

FAST = settings(max_examples=200, deadline=None)
FUZZ = settings(max_examples=400, deadline=None)

SERVER_EVENTS = (UploadRequest, DownloadRequest, AbortRequest, Data, BodyComplete, Done, EndOfStream,
                 ProtocolError)
CLIENT_EVENTS = (Offset, Stored, DownloadStart, Aborted, ServerError, Data, BodyComplete, EndOfStream)
ERROR_CODE_RE = re.compile(r"[a-z][a-z0-9-]{0,63}")


# ---------------------------------------------------------------- helpers


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions into non-empty chunks (b"" would mean EOF)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])] if data else []


def chunkings(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """Random splits of ``data`` into non-empty chunks, from one chunk to one byte each."""
    return st.one_of(
        st.lists(st.integers(0, len(data)), max_size=24).map(lambda cuts: split_at(data, cuts)),
        st.just([data[i:i + 1] for i in range(len(data))]),
    )


def merge_data(events: list) -> list:
    """Events with runs of ``Data`` joined into one ``Data`` holding bytes."""
    out: list = []
    for ev in events:
        if isinstance(ev, Data):
            if out and isinstance(out[-1], Data):
                out[-1] = Data(out[-1].data + bytes(ev.data))
            else:
                out.append(Data(bytes(ev.data)))
        else:
            out.append(ev)
    return out


def body_of(events: list) -> bytes:
    """The concatenated bytes of every ``Data`` event."""
    return b"".join(bytes(ev.data) for ev in events if isinstance(ev, Data))


def drain(conn: ServerConnection | ClientConnection, limit: int = 100_000) -> tuple[list, object]:
    """Events until ``NEED_DATA``/``PAUSED`` or an ``EndOfStream``; returns (events, what stopped it)."""
    events: list = []
    for _ in range(limit):
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return events, ev
        events.append(ev)
        if isinstance(ev, EndOfStream):
            return events, ev
    raise AssertionError("next_event made no progress")


def server_events(data: bytes, max_line: int = MAX_LINE) -> tuple[ServerConnection, list, object]:
    """A fresh server fed ``data`` in one chunk, and its events."""
    conn = ServerConnection(max_line=max_line)
    conn.receive_data(data)
    events, stop = drain(conn)
    return conn, events, stop


def versioned(line: str, eol: bytes = b"\r\n") -> bytes:
    """A versioned request line."""
    return f"FILEDOCK/1 {line}".encode("ascii") + eol


class ScriptedServer:
    """Drives a ``ServerConnection`` like a server adapter that accepts everything."""

    def __init__(self, offset: int = 0, size: int = 0, crc: int = 0, digest: str = DIGEST) -> None:
        self.conn = ServerConnection()
        self.offset, self.size, self.crc, self.digest = offset, size, crc, digest
        self.events: list = []
        self.replies = bytearray()

    def feed(self, chunks: list[bytes], eof: bool = True) -> None:
        """Feed every chunk (then EOF), reacting to each event as an adapter would."""
        for chunk in [*chunks, b""] if eof else chunks:
            self.conn.receive_data(chunk)
            self._pump()

    def _pump(self) -> None:
        while True:
            events, stop = drain(self.conn)
            self.events += events
            if stop is PAUSED:
                self.replies += self._decide(self.conn.request)
                continue
            if events and isinstance(events[-1], Done):
                self.replies += self.conn.send(Stored(self.size, self.crc, self.digest))
                continue
            return

    def _decide(self, request) -> bytes:
        if isinstance(request, UploadRequest):
            return self.conn.send(Offset(0 if request.legacy else self.offset))
        if isinstance(request, DownloadRequest):
            return self.conn.send(DownloadStart(self.size, request.offset, self.crc, self.digest))
        return self.conn.send(Aborted())


class ConnectionPair:
    """A server and a client connection wired back to back, no sockets (after h11's ConnectionPair).

    ``chunker`` decides how each batch of bytes is split on its way across.
    """

    def __init__(self, chunker: Callable[[bytes], list[bytes]]) -> None:
        self.server = ServerConnection()
        self.client = ClientConnection()
        self.chunker = chunker

    def _send(self, conn, data: bytes) -> list:
        events: list = []
        for chunk in self.chunker(data):
            conn.receive_data(chunk)
            more, _ = drain(conn)
            events += more
        more, _ = drain(conn)
        return merge_data(events + more)

    def to_server(self, data: bytes) -> list:
        """Bytes from the client, as the server sees them."""
        return self._send(self.server, data)

    def to_client(self, data: bytes) -> list:
        """Bytes from the server, as the client sees them."""
        return self._send(self.client, data)

    def close_client(self) -> list:
        """The client closes; the server's events."""
        self.server.receive_data(b"")
        return merge_data(drain(self.server)[0])

    def close_server(self) -> list:
        """The server closes; the client's events."""
        self.client.receive_data(b"")
        return merge_data(drain(self.client)[0])


uuids = st.uuids().map(str)
digests = st.binary(min_size=32, max_size=32).map(bytes.hex)
crcs = st.integers(0, 0xFFFFFFFF)
eols = st.sampled_from([b"\r\n", b"\n"])


# ---------------------------------------------------------------- 2007 header


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_legacy_header_parses_with_crlf_or_bare_lf(eol):
    """A 2007 header ``<uuid> <uuid> <size>`` ends with CRLF or a bare LF and becomes a legacy UploadRequest."""
    conn, events, stop = server_events(f"{SESSION} {FILE} 12345".encode() + eol)
    assert events == [UploadRequest(SESSION, FILE, 12345, legacy=True)]
    assert stop is PAUSED
    assert conn.state is ServerState.DECIDING
    assert conn.request == UploadRequest(SESSION, FILE, 12345, legacy=True)


def test_legacy_header_helper_formats_the_2007_line():
    """``legacy_header`` produces exactly the 2007 dialect's line."""
    assert legacy_header(SESSION, FILE, 7) == f"{SESSION} {FILE} 7\r\n".encode()


def test_uppercase_uuids_are_lowercased():
    """Keys in upper case are accepted and reported in lower case, in both dialects."""
    _, events, _ = server_events(f"{SESSION.upper()} {FILE.upper()} 1\r\n".encode())
    assert events == [UploadRequest(SESSION, FILE, 1, legacy=True)]
    _, events, _ = server_events(versioned(f"GET {SESSION.upper()} {FILE.upper()} 0"))
    assert events == [DownloadRequest(SESSION, FILE, 0)]


def test_paused_until_the_server_decides():
    """After a request the server connection answers PAUSED, whatever arrives, until a decision."""
    conn, _, _ = server_events(legacy_header(SESSION, FILE, 3) + b"abc")
    assert conn.next_event() is PAUSED
    conn.receive_data(b"more")
    assert conn.next_event() is PAUSED
    assert conn.body_received == 0


@pytest.mark.parametrize("size", [0, 1, MAX_SIZE])
def test_sizes_at_the_edges_are_accepted(size):
    """Sizes 0, 1 and 2**63-1 are valid in both dialects."""
    _, events, _ = server_events(legacy_header(SESSION, FILE, size))
    assert events == [UploadRequest(SESSION, FILE, size, legacy=True)]
    _, events, _ = server_events(versioned(f"PUT {SESSION} {FILE} {size}"))
    assert events == [UploadRequest(SESSION, FILE, size)]


MALFORMED_HEADERS = [
    pytest.param(f"{SESSION} {FILE} -1", id="negative-size"),
    pytest.param(f"{SESSION} {FILE} {MAX_SIZE + 1}", id="size-2**63"),
    pytest.param(f"{SESSION} {FILE} 9999999999999999999", id="size-19-digits-too-big"),
    pytest.param(f"{SESSION} {FILE} 10000000000000000000", id="size-20-digits"),
    pytest.param(f"{SESSION} {FILE} 007", id="leading-zeros"),
    pytest.param(f"{SESSION} {FILE} 00", id="double-zero"),
    pytest.param(f"{SESSION} {FILE} +5", id="plus-sign"),
    pytest.param(f"{SESSION} {FILE} 1e3", id="exponent"),
    pytest.param(f"{SESSION} {FILE} 0x10", id="hex-size"),
    pytest.param(f"{SESSION} {FILE}", id="missing-size"),
    pytest.param(f"{SESSION} {FILE} ", id="trailing-space-no-size"),
    pytest.param(f"{SESSION} {FILE} 5 ", id="trailing-space"),
    pytest.param(f" {SESSION} {FILE} 5", id="leading-space"),
    pytest.param(f"{SESSION}  {FILE} 5", id="double-space"),
    pytest.param(f"{SESSION}\t{FILE} 5", id="tab"),
    pytest.param(f"{SESSION[:-1]} {FILE} 5", id="short-uuid"),
    pytest.param(f"{SESSION}0 {FILE} 5", id="long-uuid"),
    pytest.param(f"{SESSION.replace('-', '')} {FILE} 5", id="uuid-without-dashes"),
    pytest.param(f"{'g' + SESSION[1:]} {FILE} 5", id="non-hex-uuid"),
    pytest.param(f"{{{SESSION}}} {FILE} 5", id="braced-uuid"),
    pytest.param(f"job-name {FILE} 5", id="name-not-key"),
    pytest.param(f"../../etc/passwd {FILE} 5", id="path-not-key"),
    pytest.param("", id="empty-line"),
    pytest.param("hello", id="words"),
    pytest.param(f"{SESSION} {FILE} 5\r", id="stray-cr"),
    pytest.param(f"{SESSION} {FILE} 5\x00", id="nul"),
    pytest.param(f"{SESSION} {FILE} \u0661", id="arabic-indic-digit"),
    pytest.param(f"{SESSION} {FILE} \uff15", id="fullwidth-digit"),
    pytest.param(f"{SESSION} {FILE} 5 \u00e9", id="latin-1-letter"),
    pytest.param(f"FILEDOCK/1 PUT {SESSION} {FILE} -1", id="versioned-negative"),
    pytest.param(f"FILEDOCK/1 PUT {SESSION} {FILE} 01", id="versioned-leading-zero"),
    pytest.param(f"FILEDOCK/1 PUT {SESSION} {FILE} {MAX_SIZE + 1}", id="versioned-too-big"),
    pytest.param(f"FILEDOCK/1 GET {SESSION} {FILE} {MAX_SIZE + 1}", id="versioned-offset-too-big"),
    pytest.param(f"FILEDOCK/1 GET {SESSION} {FILE}", id="get-without-offset"),
    pytest.param(f"FILEDOCK/1 ABORT {SESSION} {FILE} 0", id="abort-with-size"),
    pytest.param(f"FILEDOCK/1 put {SESSION} {FILE} 5", id="lowercase-verb"),
    pytest.param(f"FILEDOCK/1 POST {SESSION} {FILE} 5", id="unknown-verb"),
    pytest.param(f"FILEDOCK/1 PUT job {FILE} 5", id="versioned-non-uuid"),
    pytest.param("FILEDOCK/1", id="version-alone"),
    pytest.param("FILEDOCK/1 ", id="version-and-space"),
    pytest.param(f"FILEDOCK/1  PUT {SESSION} {FILE} 5", id="versioned-double-space"),
]


@pytest.mark.parametrize("line", MALFORMED_HEADERS)
def test_malformed_headers_are_protocol_errors(line):
    """Every malformed header yields one ProtocolError(malformed-header) and closes the connection."""
    conn, events, stop = server_events(line.encode("utf-8") + b"\r\n")
    assert events == [ProtocolError(ErrorCode.MALFORMED_HEADER, events[0].message)]
    assert conn.state is ServerState.CLOSED
    assert conn.request is None
    assert conn.next_event() is NEED_DATA


def test_non_ascii_bytes_are_malformed():
    """Bytes that are not ASCII (even invalid UTF-8) give malformed-header, not a decode error."""
    _, events, _ = server_events(b"\xff\xfe" + legacy_header(SESSION, FILE, 1))
    assert events == [ProtocolError(ErrorCode.MALFORMED_HEADER, "header is not ASCII")]


@pytest.mark.parametrize("version", ["FILEDOCK/2", "FILEDOCK/0", "FILEDOCK/10", "FILEDOCK/1.1", "FILEDOCK/"])
def test_unknown_versions_are_refused_by_name(version):
    """A ``FILEDOCK/<n>`` prefix other than FILEDOCK/1 is malformed and the message names the version."""
    _, events, _ = server_events(f"{version} PUT {SESSION} {FILE} 5\r\n".encode())
    assert len(events) == 1
    assert events[0].code is ErrorCode.MALFORMED_HEADER
    assert events[0].message == f"unsupported protocol version {version}"


def test_unknown_version_message_is_bounded():
    """An absurdly long version token is cut to 20 characters in the error message."""
    version = "FILEDOCK/" + "9" * 500
    _, events, _ = server_events(f"{version} PUT\r\n".encode())
    assert events[0].message == f"unsupported protocol version {version[:20]}"


# ---------------------------------------------------------------- versioned requests


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_versioned_put_get_abort_parse(eol):
    """PUT, GET and ABORT request lines become the matching request events."""
    _, ev, _ = server_events(versioned(f"PUT {SESSION} {FILE} 100", eol))
    assert ev == [UploadRequest(SESSION, FILE, 100, legacy=False)]
    _, ev, _ = server_events(versioned(f"GET {SESSION} {FILE} 42", eol))
    assert ev == [DownloadRequest(SESSION, FILE, 42)]
    _, ev, _ = server_events(versioned(f"ABORT {SESSION} {FILE}", eol))
    assert ev == [AbortRequest(SESSION, FILE)]


def test_accept_upload_replies_offset_and_streams_the_rest():
    """send(Offset(offset)) replies ``OFFSET n`` and expects exactly size - offset body bytes."""
    conn, _, _ = server_events(versioned(f"PUT {SESSION} {FILE} 10"))
    assert conn.send(Offset(4)) == b"OFFSET 4\r\n"
    assert conn.state is ServerState.BODY
    assert conn.body_expected == 6
    conn.receive_data(b"456789DONE\r\n")
    events, stop = drain(conn)
    assert merge_data(events) == [Data(b"456789"), BodyComplete(), Done(None)]
    assert stop is NEED_DATA
    assert conn.state is ServerState.FINISHING


def test_accept_upload_at_full_size_completes_the_body_at_once():
    """Accepting at offset == size means no body: BodyComplete comes before any byte arrives."""
    conn, _, _ = server_events(versioned(f"PUT {SESSION} {FILE} 10"))
    assert conn.send(Offset(10)) == b"OFFSET 10\r\n"
    assert conn.next_event() == BodyComplete()
    assert conn.state is ServerState.TRAILER


@pytest.mark.parametrize("offset", [-1, 11])
def test_accept_upload_rejects_offsets_outside_the_file(offset):
    """An offset below 0 or above the size is a caller bug: ValueError, state unchanged."""
    conn, _, _ = server_events(versioned(f"PUT {SESSION} {FILE} 10"))
    with pytest.raises(ValueError):
        conn.send(Offset(offset))
    assert conn.state is ServerState.DECIDING


def test_legacy_upload_must_start_at_zero():
    """A 2007 upload cannot be resumed: Offset(n) with n > 0 raises, at 0 it replies nothing."""
    conn, _, _ = server_events(legacy_header(SESSION, FILE, 10))
    with pytest.raises(ValueError):
        conn.send(Offset(3))
    assert conn.send(Offset(0)) == b""
    assert conn.body_expected == 10


def test_decisions_must_match_the_pending_request():
    """A decision (Offset, Aborted, DownloadStart) for the wrong kind of request, or with none pending,
    raises RuntimeError."""
    conn, _, _ = server_events(versioned(f"GET {SESSION} {FILE} 0"))
    with pytest.raises(RuntimeError):
        conn.send(Offset(0))
    with pytest.raises(RuntimeError):
        conn.send(Aborted())
    assert conn.send(DownloadStart(5, 0, 0xABC, DIGEST)) == f"DATA 5 0 00000abc {DIGEST}\r\n".encode()
    with pytest.raises(RuntimeError):
        conn.send(DownloadStart(5, 0, 0, DIGEST))
    with pytest.raises(RuntimeError):
        ServerConnection().send(Offset(0))


def test_accept_download_echoes_the_requested_offset():
    """The DATA reply carries the size, the client's offset, the CRC as 8 hex digits and the digest."""
    conn, _, _ = server_events(versioned(f"GET {SESSION} {FILE} 3"))
    assert conn.send(DownloadStart(10, 3, 0xFFFFFFFF, DIGEST)) == f"DATA 10 3 ffffffff {DIGEST}\r\n".encode()
    assert conn.state is ServerState.SENDING


def test_download_client_bytes_are_dropped_and_eof_reported():
    """While the server sends, anything the client says is discarded; its close is EndOfStream."""
    conn, _, _ = server_events(versioned(f"GET {SESSION} {FILE} 0"))
    conn.send(DownloadStart(10, 0, 0, DIGEST))
    conn.receive_data(b"chatter")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() == EndOfStream()


def test_accept_abort_replies_aborted_and_closes():
    """send(Aborted()) replies ``ABORTED`` and nothing more happens on the connection."""
    conn, _, _ = server_events(versioned(f"ABORT {SESSION} {FILE}"))
    assert conn.send(Aborted()) == b"ABORTED\r\n"
    assert conn.state is ServerState.CLOSED
    conn.receive_data(b"junk")
    assert conn.next_event() is NEED_DATA


# ---------------------------------------------------------------- DONE trailer


def _after_body(trailer: bytes) -> tuple[ServerConnection, list]:
    conn, _, _ = server_events(versioned(f"PUT {SESSION} {FILE} 3"))
    conn.send(Offset(0))
    conn.receive_data(b"abc" + trailer)
    return conn, merge_data(drain(conn)[0])


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_done_without_digest(eol):
    """``DONE`` alone is a Done event without a digest; the server then owes STORED or ERR."""
    conn, events = _after_body(b"DONE" + eol)
    assert events == [Data(b"abc"), BodyComplete(), Done(None)]
    assert conn.state is ServerState.FINISHING


def test_done_with_digest():
    """``DONE <64 hex>`` carries the client's digest."""
    conn, events = _after_body(f"DONE {DIGEST}\r\n".encode())
    assert events == [Data(b"abc"), BodyComplete(), Done(DIGEST)]
    assert conn.send(Stored(3, 0x1234, DIGEST)) == f"STORED 3 00001234 {DIGEST}\r\n".encode()
    assert conn.state is ServerState.CLOSED


@pytest.mark.parametrize("trailer", [
    pytest.param(b"DONE " + DIGEST[:-1].encode(), id="63-hex"),
    pytest.param(b"DONE " + DIGEST.encode() + b"0", id="65-hex"),
    pytest.param(b"DONE " + DIGEST.upper().encode(), id="uppercase-hex"),
    pytest.param(b"DONE ", id="trailing-space"),
    pytest.param(b"done", id="lowercase"),
    pytest.param(b"DONE\xff", id="non-ascii"),
    pytest.param(b"", id="empty-line"),
    pytest.param(b"XYZ", id="garbage"),
])
def test_malformed_trailers_are_protocol_errors(trailer):
    """Anything but ``DONE [<64 lowercase hex>]`` after the body is malformed-header."""
    conn, events = _after_body(trailer + b"\r\n")
    assert events[:2] == [Data(b"abc"), BodyComplete()]
    assert events[2:] == [ProtocolError(ErrorCode.MALFORMED_HEADER, "expected 'DONE [<digest>]' after the body")]
    assert conn.state is ServerState.CLOSED


def test_stored_outside_finishing_is_a_caller_bug():
    """send(Stored(...)) before Done raises RuntimeError."""
    conn, _, _ = server_events(versioned(f"PUT {SESSION} {FILE} 3"))
    conn.send(Offset(0))
    with pytest.raises(RuntimeError):
        conn.send(Stored(3, 0, DIGEST))


def test_bytes_after_done_are_excess_data():
    """Anything after the DONE line is excess-data."""
    conn, events = _after_body(b"DONE\r\nmore")
    assert events == [Data(b"abc"), BodyComplete(), Done(None),
                      ProtocolError(ErrorCode.EXCESS_DATA, "bytes after the announced size")]
    assert conn.state is ServerState.CLOSED


def test_eof_without_done_is_end_of_stream_in_trailer():
    """A versioned client that closes after the body without DONE gives EndOfStream in TRAILER."""
    conn, events = _after_body(b"")
    conn.receive_data(b"")
    assert conn.next_event() == EndOfStream()
    assert conn.state is ServerState.TRAILER


# ---------------------------------------------------------------- header limit


def test_header_too_long_without_any_newline():
    """4 KiB without a newline is header-too-long, even though no newline ever comes."""
    conn = ServerConnection()
    conn.receive_data(b"a" * (MAX_LINE - 1))
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"a")
    too_long = ProtocolError(ErrorCode.HEADER_TOO_LONG, f"no newline in the first {MAX_LINE} bytes")
    assert conn.next_event() == too_long
    assert conn.state is ServerState.CLOSED


def test_header_too_long_fed_byte_by_byte():
    """The limit holds when the header trickles in one byte at a time."""
    conn = ServerConnection()
    for i in range(MAX_LINE):
        assert conn.next_event() is NEED_DATA, i
        conn.receive_data(b"x")
    assert conn.next_event().code is ErrorCode.HEADER_TOO_LONG


def test_a_line_of_exactly_the_limit_is_read():
    """A line of MAX_LINE bytes, newline included, is parsed (here: malformed), not too long."""
    _, events, _ = server_events(b"a" * (MAX_LINE - 1) + b"\n")
    assert events[0].code is ErrorCode.MALFORMED_HEADER
    _, events, _ = server_events(b"a" * MAX_LINE + b"\n")
    assert events[0].code is ErrorCode.HEADER_TOO_LONG


@given(cuts=st.lists(st.integers(0, 80), max_size=8))
@FAST
def test_max_line_is_inclusive_of_the_newline(cuts):
    """A valid header of L bytes passes with max_line=L and is too long with max_line=L-1, however split."""
    header = legacy_header(SESSION, FILE, 5)
    for limit, ok in ((len(header), True), (len(header) - 1, False)):
        conn = ServerConnection(max_line=limit)
        events: list = []
        for chunk in split_at(header, cuts):
            conn.receive_data(chunk)
            events += drain(conn)[0]
        if ok:
            assert events == [UploadRequest(SESSION, FILE, 5, legacy=True)]
        else:
            assert [e.code for e in events] == [ErrorCode.HEADER_TOO_LONG]


def test_trailer_line_has_the_same_limit():
    """A DONE trailer that never ends is header-too-long too."""
    conn, events = _after_body(b"D" * MAX_LINE)
    assert events[-1] == ProtocolError(ErrorCode.HEADER_TOO_LONG, f"no newline in the first {MAX_LINE} bytes")


def test_eof_before_the_header_ends_is_end_of_stream():
    """A client that closes mid-header gives EndOfStream in REQUEST, not an error."""
    conn = ServerConnection()
    conn.receive_data(SESSION.encode())
    conn.receive_data(b"")
    assert conn.next_event() == EndOfStream()
    assert conn.state is ServerState.REQUEST


def test_data_after_eof_is_a_caller_bug():
    """receive_data after b"" raises RuntimeError."""
    conn = ServerConnection()
    conn.receive_data(b"")
    with pytest.raises(RuntimeError):
        conn.receive_data(b"x")


# ---------------------------------------------------------------- 2007 body and end


def test_legacy_upload_then_close():
    """A 2007 upload: header, body, close give request, data, BodyComplete, EndOfStream."""
    srv = ScriptedServer()
    srv.feed([legacy_header(SESSION, FILE, 5) + b"hello"])
    assert merge_data(srv.events) == [UploadRequest(SESSION, FILE, 5, legacy=True), Data(b"hello"),
                                      BodyComplete(), EndOfStream()]
    assert srv.conn.state is ServerState.LEGACY_END
    assert srv.replies == b""


@pytest.mark.parametrize("split", [True, False])
def test_legacy_excess_data_is_a_protocol_error(split):
    """Bytes past the announced size (same chunk or later) are ProtocolError(excess-data) at LEGACY_END."""
    srv = ScriptedServer()
    chunks = [legacy_header(SESSION, FILE, 5) + b"hello", b"!"] if split else \
        [legacy_header(SESSION, FILE, 5) + b"hello!"]
    srv.feed(chunks, eof=False)
    assert merge_data(srv.events) == [UploadRequest(SESSION, FILE, 5, legacy=True), Data(b"hello"),
                                      BodyComplete(),
                                      ProtocolError(ErrorCode.EXCESS_DATA, "bytes after the announced size")]
    assert srv.conn.state is ServerState.CLOSED
    assert srv.conn.body_received == 5


def test_short_body_then_eof_is_end_of_stream_in_body():
    """A client that closes before the announced size gives EndOfStream while still in BODY."""
    srv = ScriptedServer(offset=0)
    srv.feed([versioned(f"PUT {SESSION} {FILE} 10") + b"1234"])
    assert merge_data(srv.events) == [UploadRequest(SESSION, FILE, 10), Data(b"1234"), EndOfStream()]
    assert srv.conn.state is ServerState.BODY
    assert (srv.conn.body_received, srv.conn.body_expected) == (4, 10)
    assert srv.conn.next_event() == EndOfStream()  # stays put


def test_legacy_refuse_sends_nothing():
    """send(ServerError(...)) to a 2007 client returns b"": the 2007 dialect never reads a reply."""
    conn, _, _ = server_events(legacy_header(SESSION, FILE, 5))
    assert conn.send(ServerError(ErrorCode.UNKNOWN_SESSION, "no such session")) == b""
    assert conn.state is ServerState.CLOSED


def test_legacy_refuse_after_excess_data_sends_nothing():
    """Even after a protocol error, a 2007 client is sent no bytes."""
    srv = ScriptedServer()
    srv.feed([legacy_header(SESSION, FILE, 1) + b"ab"], eof=False)
    err = srv.events[-1]
    assert err.code is ErrorCode.EXCESS_DATA
    assert srv.conn.send(ServerError(err.code, err.message)) == b""


def test_versioned_refuse_sends_an_error_line():
    """send(ServerError(...)) to a versioned client returns one ``ERR <code> <message>`` line."""
    conn, _, _ = server_events(versioned(f"PUT {SESSION} {FILE} 5"))
    assert conn.send(ServerError(ErrorCode.SIZE_MISMATCH, "declared 6")) == b"ERR size-mismatch declared 6\r\n"


def test_refuse_before_any_request_sends_an_error_line():
    """With no request parsed yet (e.g. header-too-long) send(ServerError(...)) returns an ERR line."""
    conn = ServerConnection()
    assert conn.send(ServerError(ErrorCode.TOO_MANY_CONNECTIONS, "busy")) == b"ERR too-many-connections busy\r\n"


# ---------------------------------------------------------------- formatting


def test_format_error_flattens_and_bounds_the_message():
    """Error lines are printable ASCII on one line, at most MAX_LINE bytes with CRLF."""
    line = format_error(ErrorCode.INTERNAL_ERROR, "a\r\nb\x00c\u00e9" + "x" * 10_000)
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    assert len(line) == MAX_LINE
    assert line.startswith(b"ERR internal-error a??b?c?xxx")
    assert all(32 <= b < 127 for b in line[:-2])


def test_format_error_accepts_unknown_code_strings():
    """A code given as a string (a newer peer's) is written as is."""
    assert format_error("future-code", "m") == b"ERR future-code m\r\n"


@pytest.mark.parametrize("value,text", [(0, "00000000"), (0xABC, "00000abc"), (0xFFFFFFFF, "ffffffff"),
                                        (-1, "ffffffff")])
def test_format_crc(value, text):
    """CRCs are 8 lowercase hex digits."""
    assert format_crc(value) == text


# ---------------------------------------------------------------- client replies


def _client(state: ClientState) -> ClientConnection:
    """A client waiting in ``state`` (for a 10-byte file)."""
    c = ClientConnection()
    if state is ClientState.AWAIT_OFFSET:
        c.send(UploadRequest(SESSION, FILE, 10))
    elif state in (ClientState.SENDING, ClientState.AWAIT_STORED):
        c.send(UploadRequest(SESSION, FILE, 10))
        c.receive_data(b"OFFSET 0\r\n")
        assert c.next_event() == Offset(0)
        if state is ClientState.AWAIT_STORED:
            c.send(Done(None))
    elif state is ClientState.AWAIT_DATA:
        c.send(DownloadRequest(SESSION, FILE, 0))
    elif state is ClientState.AWAIT_ABORTED:
        c.send(AbortRequest(SESSION, FILE))
    assert c.state is state
    return c


def _reply(state: ClientState, data: bytes, eof: bool = False) -> tuple[ClientConnection, list]:
    c = _client(state)
    c.receive_data(data)
    if eof:
        c.receive_data(b"")
    return c, merge_data(drain(c)[0])


def test_client_request_lines():
    """The client writes the versioned PUT, GET, ABORT and DONE lines."""
    c = ClientConnection()
    assert c.send(UploadRequest(SESSION, FILE, 9)) == f"FILEDOCK/1 PUT {SESSION} {FILE} 9\r\n".encode()
    assert (ClientConnection().send(DownloadRequest(SESSION, FILE, 4))
            == f"FILEDOCK/1 GET {SESSION} {FILE} 4\r\n".encode())
    assert ClientConnection().send(AbortRequest(SESSION, FILE)) == f"FILEDOCK/1 ABORT {SESSION} {FILE}\r\n".encode()
    sending = _client(ClientState.SENDING)
    assert sending.send(Done(DIGEST)) == f"DONE {DIGEST}\r\n".encode()
    assert _client(ClientState.SENDING).send(Done(None)) == b"DONE\r\n"


def test_client_one_request_per_connection():
    """A second request on one client connection raises RuntimeError."""
    c = ClientConnection()
    c.send(UploadRequest(SESSION, FILE, 1))
    with pytest.raises(RuntimeError):
        c.send(DownloadRequest(SESSION, FILE, 0))


def test_client_done_only_while_sending():
    """done() before the OFFSET reply raises RuntimeError."""
    with pytest.raises(RuntimeError):
        _client(ClientState.AWAIT_OFFSET).send(Done(None))


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_client_parses_offset(eol):
    """``OFFSET n`` (n <= size) moves the client to SENDING with that offset."""
    c, events = _reply(ClientState.AWAIT_OFFSET, b"OFFSET 7" + eol)
    assert events == [Offset(7)]
    assert (c.state, c.offset) == (ClientState.SENDING, 7)


def test_client_rejects_offset_past_the_size():
    """An OFFSET larger than the announced size is a malformed reply."""
    c, events = _reply(ClientState.AWAIT_OFFSET, b"OFFSET 11\r\n")
    assert len(events) == 1 and events[0].code == "malformed-header"
    assert c.state is ClientState.CLOSED


def test_client_parses_stored():
    """``STORED size crc digest`` becomes Stored with the CRC as an int."""
    c, events = _reply(ClientState.AWAIT_STORED, f"STORED 10 deadbeef {DIGEST}\r\n".encode(), eof=True)
    assert events == [Stored(10, 0xDEADBEEF, DIGEST), EndOfStream()]
    assert c.state is ClientState.CLOSED


def test_client_parses_data_and_body():
    """``DATA size offset crc digest`` then the body: DownloadStart, Data, BodyComplete."""
    c = ClientConnection()
    c.send(DownloadRequest(SESSION, FILE, 2))
    c.receive_data(f"DATA 6 2 0000000a {DIGEST}\r\nwxyz".encode())
    c.receive_data(b"")
    events, _ = drain(c)
    assert merge_data(events) == [DownloadStart(6, 2, 10, DIGEST), Data(b"wxyz"), BodyComplete(), EndOfStream()]


@pytest.mark.parametrize("line", [f"DATA 6 3 0000000a {DIGEST}", f"DATA 1 2 0000000a {DIGEST}"])
def test_client_rejects_data_with_the_wrong_offset(line):
    """A DATA reply whose offset is not the one asked for, or past the size, is malformed."""
    c = ClientConnection()
    c.send(DownloadRequest(SESSION, FILE, 2))
    c.receive_data(line.encode() + b"\r\n")
    ev = c.next_event()
    assert isinstance(ev, ServerError) and ev.code == "malformed-header"


def test_client_short_download_is_end_of_stream():
    """A server that closes mid-body gives EndOfStream while RECEIVING."""
    c, events = _reply(ClientState.AWAIT_DATA, f"DATA 10 0 00000000 {DIGEST}\r\nabc".encode(), eof=True)
    assert events == [DownloadStart(10, 0, 0, DIGEST), Data(b"abc"), EndOfStream()]
    assert c.state is ClientState.RECEIVING


def test_client_parses_aborted():
    """``ABORTED`` confirms an abort."""
    c, events = _reply(ClientState.AWAIT_ABORTED, b"ABORTED\r\n")
    assert events == [Aborted()]
    assert c.state is ClientState.CLOSED


@pytest.mark.parametrize("state", [ClientState.AWAIT_OFFSET, ClientState.SENDING, ClientState.AWAIT_STORED,
                                   ClientState.AWAIT_DATA, ClientState.AWAIT_ABORTED])
def test_client_parses_err_in_every_waiting_state(state):
    """``ERR <code> <message>`` is a ServerError in any waiting state, including early while sending."""
    c, events = _reply(state, b"ERR unknown-session no such session\r\n")
    assert events == [ServerError("unknown-session", "no such session")]
    assert c.state is ClientState.CLOSED
    exc = events[0].exception()
    assert isinstance(exc, FiledockError) and exc.code is ErrorCode.UNKNOWN_SESSION
    assert exc.message == "no such session"


def test_client_err_without_message_and_unknown_code():
    """An ERR line without a message, or with a code this version does not know, still parses."""
    _, events = _reply(ClientState.AWAIT_OFFSET, b"ERR from-the-future\r\n")
    assert events == [ServerError("from-the-future", "")]
    assert events[0].exception().code == "from-the-future"


@pytest.mark.parametrize("state,line", [
    (ClientState.AWAIT_OFFSET, f"STORED 10 00000000 {DIGEST}"),
    (ClientState.AWAIT_STORED, "OFFSET 0"),
    (ClientState.AWAIT_DATA, "ABORTED"),
    (ClientState.AWAIT_ABORTED, "OFFSET 0"),
    (ClientState.SENDING, "OFFSET 0"),
    (ClientState.AWAIT_OFFSET, "OFFSET 01"),
    (ClientState.AWAIT_OFFSET, "offset 0"),
    (ClientState.AWAIT_STORED, f"STORED 10 0000000 {DIGEST}"),
    (ClientState.AWAIT_STORED, f"STORED 10 DEADBEEF {DIGEST}"),
    (ClientState.AWAIT_OFFSET, "ERR Bad-Code x"),
    (ClientState.AWAIT_OFFSET, "\xe9"),
])
def test_client_rejects_unexpected_replies(state, line):
    """A reply that does not fit the state is ServerError(malformed-header) and closes the client."""
    c, events = _reply(state, line.encode("latin-1") + b"\r\n")
    assert len(events) == 1
    assert isinstance(events[0], ServerError) and events[0].code == "malformed-header"
    assert events[0].message.startswith("unexpected reply")
    assert c.state is ClientState.CLOSED


def test_client_reply_too_long():
    """A reply line longer than MAX_LINE is a ServerError, not unbounded buffering."""
    c, events = _reply(ClientState.AWAIT_OFFSET, b"O" * MAX_LINE)
    assert events == [ServerError("malformed-header", "server reply line too long")]
    assert c.state is ClientState.CLOSED


def test_client_eof_without_reply():
    """A server that closes without replying gives EndOfStream."""
    c, events = _reply(ClientState.AWAIT_OFFSET, b"OFF", eof=True)
    assert events == [EndOfStream()]
    assert c.state is ClientState.AWAIT_OFFSET


def test_client_idle_with_nothing_is_need_data():
    """A client that sent nothing and received nothing needs data; at EOF it sees EndOfStream."""
    c = ClientConnection()
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    assert c.next_event() == EndOfStream()


# ---------------------------------------------------------------- property (a): chunking does not matter


@st.composite
def legacy_streams(draw):
    """(stream, expected server events) for a whole 2007 upload."""
    s, f = draw(uuids), draw(uuids)
    body = draw(st.binary(max_size=2000))
    eol = draw(eols)
    stream = f"{s} {f} {len(body)}".encode() + eol + body
    expected = [UploadRequest(s, f, len(body), legacy=True), *([Data(body)] if body else []),
                BodyComplete(), EndOfStream()]
    return stream, expected, 0, b""


@st.composite
def put_streams(draw):
    """(stream, expected server events, offset, expected replies) for a whole versioned upload."""
    s, f = draw(uuids), draw(uuids)
    tail = draw(st.binary(max_size=2000))
    offset = draw(st.integers(0, 5000))
    size = offset + len(tail)
    digest = draw(st.none() | digests)
    eol1, eol2 = draw(eols), draw(eols)
    trailer = (b"DONE" if digest is None else f"DONE {digest}".encode()) + eol2
    stream = f"FILEDOCK/1 PUT {s} {f} {size}".encode() + eol1 + tail + trailer
    # the server answers STORED after Done and closes: the client's later EOF is no event
    expected = [UploadRequest(s, f, size), *([Data(tail)] if tail else []), BodyComplete(), Done(digest)]
    replies = f"OFFSET {offset}\r\nSTORED {size} 00000000 {DIGEST}\r\n".encode()
    return stream, expected, offset, replies, size


@given(case=legacy_streams(), data=st.data())
@FAST
def test_legacy_stream_any_chunking_same_events(case, data):
    """However a 2007 upload is split, the server sees the same events and the body bytes are identical."""
    stream, expected, _, _ = case
    chunks = data.draw(chunkings(stream))
    srv = ScriptedServer()
    srv.feed(chunks)
    assert merge_data(srv.events) == expected
    assert srv.replies == b""


@given(case=put_streams(), data=st.data())
@FAST
def test_versioned_upload_any_chunking_same_events(case, data):
    """However a versioned upload (header, body, DONE) is split, the events and body bytes are identical."""
    stream, expected, offset, replies, size = case
    chunks = data.draw(chunkings(stream))
    srv = ScriptedServer(offset=offset, size=size)
    srv.feed(chunks)
    assert merge_data(srv.events) == expected
    assert srv.replies == replies
    assert srv.conn.state is ServerState.CLOSED


@given(s=uuids, f=uuids, offset=st.integers(0, MAX_SIZE), eol=eols, data=st.data())
@FAST
def test_get_and_abort_any_chunking(s, f, offset, eol, data):
    """GET and ABORT lines split anywhere give the same single request event."""
    get = f"FILEDOCK/1 GET {s} {f} {offset}".encode() + eol
    srv = ScriptedServer(size=offset)
    srv.feed(data.draw(chunkings(get)))
    assert srv.events == [DownloadRequest(s, f, offset), EndOfStream()]
    assert srv.replies == f"DATA {offset} {offset} 00000000 {DIGEST}\r\n".encode()
    abort = f"FILEDOCK/1 ABORT {s} {f}".encode() + eol
    srv = ScriptedServer()
    srv.feed(data.draw(chunkings(abort)))
    assert srv.events == [AbortRequest(s, f)]
    assert srv.replies == b"ABORTED\r\n"


@given(body=st.binary(max_size=2000), offset_cut=st.integers(0, 2000), crc=crcs, digest=digests,
       data=st.data())
@FAST
def test_client_download_any_chunking_same_events(body, offset_cut, crc, digest, data):
    """However the DATA reply and body are split, the client sees the same events and bytes."""
    offset = min(offset_cut, len(body))
    stream = f"DATA {len(body)} {offset} {crc:08x} {digest}\r\n".encode() + body[offset:]
    c = ClientConnection()
    c.send(DownloadRequest(SESSION, FILE, offset))
    events: list = []
    for chunk in [*data.draw(chunkings(stream)), b""]:
        c.receive_data(chunk)
        events += drain(c)[0]
    tail = body[offset:]
    assert merge_data(events) == [DownloadStart(len(body), offset, crc, digest), *([Data(tail)] if tail else []),
                                  BodyComplete(), EndOfStream()]


@given(size=st.integers(0, MAX_SIZE), data=st.data(), crc=crcs, digest=digests)
@FAST
def test_client_upload_replies_any_chunking(size, data, crc, digest):
    """OFFSET and STORED replies split anywhere give the same client events."""
    offset = data.draw(st.integers(0, size))
    c = ClientConnection()
    c.send(UploadRequest(SESSION, FILE, size))
    events: list = []
    for chunk in data.draw(chunkings(f"OFFSET {offset}\r\n".encode())):
        c.receive_data(chunk)
        events += drain(c)[0]
    assert events == [Offset(offset)]
    c.send(Done(digest))
    for chunk in [*data.draw(chunkings(f"STORED {size} {crc:08x} {digest}\r\n".encode())), b""]:
        c.receive_data(chunk)
        events += drain(c)[0]
    assert events == [Offset(offset), Stored(size, crc, digest), EndOfStream()]


# ---------------------------------------------------------------- property (b): arbitrary bytes never raise


def _valid_streams() -> list[bytes]:
    return [
        legacy_header(SESSION, FILE, 8) + b"01234567",
        versioned(f"PUT {SESSION} {FILE} 8") + b"01234567" + f"DONE {DIGEST}\r\n".encode(),
        versioned(f"PUT {SESSION} {FILE} 0") + b"DONE\n",
        versioned(f"GET {SESSION} {FILE} 3"),
        versioned(f"ABORT {SESSION} {FILE}"),
    ]


def _replies() -> list[bytes]:
    return [
        b"OFFSET 3\r\n", f"STORED 10 0000abcd {DIGEST}\r\n".encode(),
        f"DATA 10 0 0000abcd {DIGEST}\r\n".encode() + b"0123456789", b"ABORTED\r\n",
        b"ERR no-space full\r\n",
    ]


def _mutated(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A stream with a few bytes overwritten, deleted or inserted."""
    edits = st.lists(st.tuples(st.sampled_from("sdi"), st.integers(0, 300), st.integers(0, 255)), max_size=4)

    def apply(args):
        data, ops = bytearray(args[0]), args[1]
        for op, pos, byte in ops:
            pos = pos % (len(data) + 1)
            if op == "s" and pos < len(data):
                data[pos] = byte
            elif op == "d" and pos < len(data):
                del data[pos]
            elif op == "i":
                data.insert(pos, byte)
        return bytes(data)

    return st.tuples(base, edits).map(apply)


def fuzz_streams(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, valid streams with junk after them, and valid streams with small edits."""
    base = st.sampled_from(valid)
    return st.one_of(
        st.binary(max_size=300),
        st.tuples(base, st.binary(max_size=100)).map(lambda t: t[0] + t[1]),
        _mutated(base),
        st.lists(st.sampled_from([b"\r", b"\n", b" ", b"0", b"1", b"FILEDOCK/1 ", b"PUT ", b"DONE",
                                  SESSION.encode(), b"\xff", b"-"]), max_size=30).map(b"".join),
    )


@given(stream=fuzz_streams(_valid_streams()), data=st.data())
@FUZZ
def test_server_never_raises_on_arbitrary_input(stream, data):
    """Any bytes, split anywhere, give only server events, NEED_DATA or PAUSED; errors are ProtocolError."""
    conn = ServerConnection(max_line=data.draw(st.sampled_from([100, MAX_LINE])))
    chunks = data.draw(chunkings(stream))
    if data.draw(st.booleans()):
        chunks.append(b"")
    events: list = []
    ended = False
    for chunk in chunks:
        if ended:
            break
        conn.receive_data(chunk)
        for _ in range(10_000):
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if ev is PAUSED:
                assert conn.state is ServerState.DECIDING
                _fuzz_decide(conn, data)
                continue
            assert isinstance(ev, SERVER_EVENTS), ev
            event(f"{type(ev).__name__} {getattr(ev, 'code', '')}".strip())
            events.append(ev)
            if isinstance(ev, ProtocolError):
                assert isinstance(ev.code, ErrorCode)
                assert conn.state is ServerState.CLOSED
                line = conn.send(ServerError(ev.code, ev.message))
                assert line == b"" or re.fullmatch(rb"ERR [a-z-]+ [ -~]*\r\n", line)
                ended = True
                break
            if isinstance(ev, EndOfStream):
                assert conn.peer_closed
                ended = True
                break
            if isinstance(ev, Done):
                assert conn.state is ServerState.FINISHING
                assert ev.digest is None or re.fullmatch("[0-9a-f]{64}", ev.digest)
                if data.draw(st.booleans()):
                    assert conn.send(Stored(1, 2, DIGEST)).startswith(b"STORED ")
                else:
                    conn.send(ServerError(ErrorCode.DIGEST_MISMATCH, "no"))
        else:
            raise AssertionError("next_event made no progress")
    assert len(body_of(events)) == conn.body_received <= max(conn.body_expected, 0)
    assert sum(isinstance(e, (UploadRequest, DownloadRequest, AbortRequest)) for e in events) <= 1


def _fuzz_decide(conn: ServerConnection, data) -> None:
    """Accept or refuse the pending request at random, checking the reply's shape."""
    req = conn.request
    if data.draw(st.booleans(), label="refuse"):
        line = conn.send(ServerError(ErrorCode.UNKNOWN_SESSION, "no"))
        legacy = isinstance(req, UploadRequest) and req.legacy
        assert line == (b"" if legacy else b"ERR unknown-session no\r\n")
    elif isinstance(req, UploadRequest):
        offset = 0 if req.legacy else data.draw(st.integers(0, min(req.size, 50)), label="offset")
        line = conn.send(Offset(offset))
        assert line == (b"" if req.legacy else f"OFFSET {offset}\r\n".encode())
        assert conn.body_expected == req.size - offset
    elif isinstance(req, DownloadRequest):
        assert conn.send(DownloadStart(10, req.offset, 0, DIGEST)).startswith(b"DATA 10 ")
    else:
        assert conn.send(Aborted()) == b"ABORTED\r\n"
    assert conn.state is not ServerState.DECIDING


WAITING_STATES = [ClientState.IDLE, ClientState.AWAIT_OFFSET, ClientState.SENDING, ClientState.AWAIT_STORED,
                  ClientState.AWAIT_DATA, ClientState.AWAIT_ABORTED]


@given(state=st.sampled_from(WAITING_STATES), stream=fuzz_streams(_replies()), data=st.data())
@FUZZ
def test_client_never_raises_on_arbitrary_input(state, stream, data):
    """Any bytes, split anywhere, give a client in any waiting state only client events or NEED_DATA."""
    c = _client(state)
    chunks = data.draw(chunkings(stream))
    if data.draw(st.booleans()):
        chunks.append(b"")
    events: list = []
    for chunk in chunks:
        c.receive_data(chunk)
        for _ in range(10_000):
            ev = c.next_event()
            if ev is NEED_DATA:
                break
            assert isinstance(ev, CLIENT_EVENTS), ev
            event(f"{type(ev).__name__} {getattr(ev, 'code', '')}".strip())
            events.append(ev)
            if isinstance(ev, EndOfStream):
                break
            if isinstance(ev, ServerError):
                assert ERROR_CODE_RE.fullmatch(ev.code)
                assert isinstance(ev.exception(), FiledockError)
                assert c.state is ClientState.CLOSED
            if isinstance(ev, Offset):
                assert 0 <= ev.offset <= c.size
                c.send(Done(None))
        else:
            raise AssertionError("next_event made no progress")
    assert len(body_of(events)) == c.body_received <= c.body_expected
    assert sum(isinstance(e, (Offset, Stored, DownloadStart, Aborted, ServerError)) for e in events) <= 2


# ---------------------------------------------------------------- property (c): back to back


def _pair(data) -> ConnectionPair:
    return ConnectionPair(lambda b: data.draw(chunkings(b)))


@given(body=st.binary(max_size=3000), digest=st.none() | digests, data=st.data())
@FAST
def test_pair_upload_completes(body, digest, data):
    """A client and server back to back complete a (possibly resumed) upload, whatever the chunking."""
    pair = _pair(data)
    size = len(body)
    offset = data.draw(st.integers(0, size), label="offset")
    assert pair.to_server(pair.client.send(UploadRequest(SESSION, FILE, size))) == [UploadRequest(SESSION, FILE, size)]
    assert pair.server.next_event() is PAUSED
    assert pair.to_client(pair.server.send(Offset(offset))) == [Offset(offset)]
    assert pair.client.state is ClientState.SENDING
    events = pair.to_server(body[pair.client.offset:] + pair.client.send(Done(digest)))
    tail = body[offset:]
    assert events == [*([Data(tail)] if tail else []), BodyComplete(), Done(digest)]
    crc, final = zlib.crc32(body), hashlib.sha256(body).hexdigest()
    assert pair.to_client(pair.server.send(Stored(size, crc, final))) == [Stored(size, crc, final)]
    assert pair.close_server() == [EndOfStream()]
    assert pair.close_client() == []
    assert (pair.server.state, pair.client.state) == (ServerState.CLOSED, ClientState.CLOSED)


@given(body=st.binary(max_size=3000), data=st.data())
@FAST
def test_pair_download_completes(body, data):
    """A client and server back to back complete a download from any offset, whatever the chunking."""
    pair = _pair(data)
    offset = data.draw(st.integers(0, len(body)), label="offset")
    request = DownloadRequest(SESSION, FILE, offset)
    assert pair.to_server(pair.client.send(request)) == [request]
    crc, digest = zlib.crc32(body), hashlib.sha256(body).hexdigest()
    events = pair.to_client(pair.server.send(DownloadStart(len(body), offset, crc, digest)) + body[offset:])
    tail = body[offset:]
    assert events == [DownloadStart(len(body), offset, crc, digest), *([Data(tail)] if tail else []),
                      BodyComplete()]
    assert pair.close_server() == [EndOfStream()]
    assert pair.close_client() == [EndOfStream()]


@given(data=st.data())
@FAST
def test_pair_abort_completes(data):
    """ABORT across the pair: the server sees AbortRequest, the client Aborted."""
    pair = _pair(data)
    assert pair.to_server(pair.client.send(AbortRequest(SESSION, FILE))) == [AbortRequest(SESSION, FILE)]
    assert pair.to_client(pair.server.send(Aborted())) == [Aborted()]
    assert pair.client.state is ClientState.CLOSED


@given(body=st.binary(min_size=1, max_size=2000), data=st.data())
@FAST
def test_pair_server_error_mid_upload_reaches_the_client(body, data):
    """A server that refuses mid-body (disk full) reaches a client still sending as ServerError."""
    pair = _pair(data)
    pair.to_server(pair.client.send(UploadRequest(SESSION, FILE, len(body) + 1)))
    pair.to_client(pair.server.send(Offset(0)))
    events = pair.to_server(body)
    assert events == [Data(body)]
    line = pair.server.send(ServerError(ErrorCode.NO_SPACE, "disk full"))
    assert pair.to_client(line) == [ServerError("no-space", "disk full")]
    assert pair.client.state is ClientState.CLOSED


@given(body=st.binary(max_size=2000), data=st.data())
@FAST
def test_pair_legacy_upload_completes_silently(body, data):
    """A 2007 upload across the pair: the server sends no byte, ever; the client's close ends it."""
    pair = _pair(data)
    events = pair.to_server(legacy_header(SESSION, FILE, len(body)))
    assert events == [UploadRequest(SESSION, FILE, len(body), legacy=True)]
    assert pair.server.send(Offset(0)) == b""
    events = pair.to_server(body)
    assert events == [*([Data(body)] if body else []), BodyComplete()]
    assert pair.close_client() == [EndOfStream()]
    assert pair.server.state is ServerState.LEGACY_END
