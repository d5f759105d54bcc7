"""The ranged upload in the sans-IO core: ``PUTR``, ``RANGES``, ``DURABLE`` and their table rows."""

from __future__ import annotations

import uuid
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filedock import wire
from filedock.digest import crc32_combine
from filedock.errors import ErrorCode

A = RANGE = wire.RANGE_ALIGN
SESSION, FILE = str(uuid.uuid4()), str(uuid.uuid4())


def valid_range(draw) -> tuple[int, int, int]:
    blocks = draw(st.integers(1, 64))
    size = (blocks - 1) * A + draw(st.integers(1, A))
    first = draw(st.integers(0, blocks - 1))
    last = draw(st.integers(first + 1, blocks))
    return size, first * A, min(size, last * A)


ranges_st = st.composite(valid_range)()


def server_with(line: bytes) -> tuple[wire.ServerConnection, object]:
    conn = wire.ServerConnection()
    conn.receive_data(line)
    return conn, conn.next_event()


@given(ranges_st)
def test_putr_round_trips_through_both_cores(r):
    """What the client core writes, the server core parses back to the same request."""
    size, start, end = r
    client = wire.ClientConnection()
    line = client.send(wire.RangedUploadRequest(SESSION, FILE, size, start, end))
    server, event = server_with(line)
    assert event == wire.RangedUploadRequest(SESSION, FILE, size, start, end)
    assert server.deciding


@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**40))
def test_invalid_ranges_are_refused_with_bad_range(size, start, end):
    """Any range that is empty, outside the file or off the 4 MiB grid is ``bad-range``, never accepted."""
    line = f"FILEDOCK/1 PUTR {SESSION} {FILE} {size} {start} {end}\r\n".encode()
    server, event = server_with(line)
    why = wire.range_error(size, start, end)
    if why is None:
        assert isinstance(event, wire.RangedUploadRequest)
    else:
        assert isinstance(event, wire.ProtocolError) and event.code is ErrorCode.BAD_RANGE
        assert server.closed


@pytest.mark.parametrize("line", [
    b"FILEDOCK/1 PUTR %s %s 10 0\r\n", b"FILEDOCK/1 PUTR %s %s 10 0 10 5\r\n", b"FILEDOCK/1 PUTR %s %s -1 0 10\r\n",
    b"FILEDOCK/1 PUTR %s %s 010 0 10\r\n",
])
def test_malformed_putr_lines(line):
    _, event = server_with(line % (SESSION.encode(), FILE.encode()))
    assert isinstance(event, wire.ProtocolError) and event.code is ErrorCode.MALFORMED_HEADER


def durable_st(size: int):
    return st.lists(st.integers(0, max(0, (size - 1) // A)), unique=True).map(
        lambda blocks: _runs(sorted(blocks), size))


def _runs(blocks, size):
    out = []
    for i in blocks:
        a, b = i * A, min(size, (i + 1) * A)
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


@settings(deadline=None, max_examples=40)  # each example moves up to a few MiB of body
@given(ranges_st, st.data())
def test_ranges_reply_round_trips_and_body_is_the_rest_of_the_range(r, data):
    """``RANGES offset list`` written by the server is read back by the client; the body expected is
    ``end - offset``; then ``DONE``, and ``STORED`` closes both sides while ``DURABLE`` leaves both
    ready for the next request on the same connection."""
    size, start, end = r
    durable = data.draw(durable_st(size))
    offset = data.draw(st.integers(start, end))
    client = wire.ClientConnection()
    server, _ = server_with(client.send(wire.RangedUploadRequest(SESSION, FILE, size, start, end)))
    client.receive_data(server.send(wire.RangeOffset(offset, durable)))
    assert client.next_event() == wire.RangeOffset(offset, durable)
    assert server.body_expected == end - offset and client.sending_body
    body = bytes(min(end - offset, 1 << 20))
    fed = 0
    while fed < end - offset:
        n = min(len(body), end - offset - fed)
        server.receive_data(body[:n])
        fed += n
        while isinstance(server.next_event(), wire.Data):
            pass
    server.receive_data(client.send(wire.Done(None)))
    events = []
    while (event := server.next_event()) is not wire.NEED_DATA:
        events.append(type(event))
    assert events[-1] is wire.Done and server.body_received == end - offset
    last = data.draw(st.sampled_from([wire.RangeStored(start, end), wire.Stored(size, 0, "0" * 64)]))
    client.receive_data(server.send(last))
    assert client.next_event() == last
    if isinstance(last, wire.Stored):
        assert client.closed and server.closed
    else:
        assert client.state is wire.ClientState.IDLE and server.awaiting_request
        assert server.request is None and server.body_expected == server.body_received == 0


def test_replies_that_do_not_fit_the_request_are_bad_replies():
    """An ``OFFSET`` to a ranged request, ``RANGES`` outside the range or with overlapping ranges, or
    ``DURABLE`` for another range: the client core turns each into a ``malformed-header`` error."""
    for reply in (b"OFFSET 0\r\n", f"RANGES {3 * A} -\r\n".encode(), f"RANGES {A} 0-{A},{A // 2}-{2 * A}\r\n".encode()):
        client = wire.ClientConnection()
        client.send(wire.RangedUploadRequest(SESSION, FILE, 2 * A, A, 2 * A))
        client.receive_data(reply)
        event = client.next_event()
        assert isinstance(event, wire.ServerError) and event.code == "malformed-header", reply
    client = wire.ClientConnection()
    client.send(wire.RangedUploadRequest(SESSION, FILE, 2 * A, A, 2 * A))
    client.receive_data(f"RANGES {2 * A} 0-{2 * A}\r\nDURABLE 0 {A}\r\n".encode())
    assert isinstance(client.next_event(), wire.RangeOffset)
    client.send(wire.Done(None))
    assert isinstance(client.next_event(), wire.ServerError)


def test_table_rows_keep_dialects_apart():
    """A plain PUT cannot be answered with RANGES or DURABLE, a ranged one not with OFFSET; the 2007
    table still completes on close; STORED answers both kinds of upload."""
    server, _ = server_with(f"FILEDOCK/1 PUT {SESSION} {FILE} 10\r\n".encode())
    with pytest.raises(wire.LocalProtocolError):
        server.send(wire.RangeOffset(0, ()))
    server, _ = server_with(f"FILEDOCK/1 PUTR {SESSION} {FILE} 10 0 10\r\n".encode())
    with pytest.raises(wire.LocalProtocolError):
        server.send(wire.Offset(0))
    with pytest.raises(ValueError):
        server.send(wire.RangeOffset(11, ()))
    assert wire.SERVER_TRANSITIONS[(wire.ServerState.FINISHING, wire.RangeStored)] is wire.ServerState.REQUEST
    assert wire.SERVER_TRANSITIONS[(wire.ServerState.FINISHING, wire.Stored)] is wire.ServerState.CLOSED
    assert wire.LEGACY_SERVER_TRANSITIONS[(wire.ServerState.BODY, wire.BodyComplete)] is wire.ServerState.LEGACY_END
    assert wire.SERVER_REPLY_ALSO_TO[wire.Stored] is wire.RangedUploadRequest


@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 2**20)), max_size=8))
def test_format_and_parse_ranges(pairs):
    ranges, pos = [], 0
    for gap, length in pairs:
        ranges.append((pos + gap, pos + gap + length))
        pos = pos + gap + length + 1
    ranges = tuple(ranges)
    assert wire.parse_ranges(wire.format_ranges(ranges)) == ranges


@given(st.binary(max_size=20000), st.data())
def test_crc32_combine_equals_zlib_on_random_splits(data, draw):
    """Ranges' CRC-32s combined equal zlib's CRC-32 of the whole, for any split into pieces."""
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    crc = 0
    for piece in pieces:
        crc = crc32_combine(crc, zlib.crc32(piece), len(piece))
    assert crc == zlib.crc32(data)


def _durable_range(client, server, size, start, end):
    """One whole ranged request on a connection pair, from ``PUTR`` to ``DURABLE``."""
    server.receive_data(client.send(wire.RangedUploadRequest(SESSION, FILE, size, start, end)))
    assert server.next_event() == wire.RangedUploadRequest(SESSION, FILE, size, start, end)
    client.receive_data(server.send(wire.RangeOffset(start, ())))
    assert client.next_event() == wire.RangeOffset(start, ())
    server.receive_data(bytes(end - start) + client.send(wire.Done(None)))
    events = []
    while (event := server.next_event()) is not wire.NEED_DATA:
        events.append(type(event))
    assert events[-1] is wire.Done and server.body_received == end - start
    client.receive_data(server.send(wire.RangeStored(start, end)))
    assert client.next_event() == wire.RangeStored(start, end)


@settings(deadline=None, max_examples=25)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=4), st.sampled_from(["putr", "put", "get", "abort"]))
def test_a_connection_carries_ranges_one_after_another_then_any_request(blocks, last):
    """After ``DURABLE`` both sides wait for the next request on the same connection: a range of
    the same file (the client's next one), then any request; its replies are read against it
    (a ``DURABLE`` of the previous range is no reply to the next)."""
    size = 4 * A + 5
    client, server = wire.ClientConnection(), wire.ServerConnection()
    for i in blocks:
        _durable_range(client, server, size, i * A, (i + 1) * A)
    assert server.served == len(blocks)
    if last == "putr":
        server.receive_data(client.send(wire.RangedUploadRequest(SESSION, FILE, size, 4 * A, size)))
        assert isinstance(server.next_event(), wire.RangedUploadRequest)
        client.receive_data(f"DURABLE {blocks[-1] * A} {(blocks[-1] + 1) * A}\r\n".encode())
        event = client.next_event()
        assert isinstance(event, wire.ServerError) and event.code == "malformed-header"
    elif last == "put":
        server.receive_data(client.send(wire.UploadRequest(SESSION, FILE, size)))
        assert server.next_event() == wire.UploadRequest(SESSION, FILE, size)
        client.receive_data(server.send(wire.Offset(7)))
        assert client.next_event() == wire.Offset(7)
    elif last == "get":
        server.receive_data(client.send(wire.DownloadRequest(SESSION, FILE, 0)))
        assert server.next_event() == wire.DownloadRequest(SESSION, FILE, 0)
    else:
        server.receive_data(client.send(wire.AbortRequest(SESSION, FILE)))
        assert server.next_event() == wire.AbortRequest(SESSION, FILE)


def test_after_durable_a_2007_header_is_refused_and_a_close_is_a_clean_end():
    """A 2007 header only opens a connection; a client that closes after ``DURABLE`` ends it cleanly."""
    size = 2 * A
    client, server = wire.ClientConnection(), wire.ServerConnection()
    _durable_range(client, server, size, 0, A)
    server.receive_data(f"{SESSION} {FILE} 10\r\n".encode())
    event = server.next_event()
    assert isinstance(event, wire.ProtocolError) and event.code is ErrorCode.MALFORMED_HEADER
    assert server.closed
    client, server = wire.ClientConnection(), wire.ServerConnection()
    _durable_range(client, server, size, 0, A)
    server.receive_data(b"")
    assert isinstance(server.next_event(), wire.EndOfStream)


def test_the_next_range_may_be_sent_ahead_of_the_reply():
    """After a ranged ``DONE`` the client core sends the next ``PUTR`` at once (one only, and only a
    ranged one); ``DURABLE`` of the first then moves it to await the second's ``RANGES``, which it reads
    against the second range. The server core holds the bytes unread (no ``excess-data``) until it
    answered the first. ``STORED`` instead closes, the request sent ahead unread."""
    size = 3 * A
    client, server = wire.ClientConnection(), wire.ServerConnection()
    server.receive_data(client.send(wire.RangedUploadRequest(SESSION, FILE, size, 0, A)))
    assert isinstance(server.next_event(), wire.RangedUploadRequest)
    client.receive_data(server.send(wire.RangeOffset(0, ())))
    assert client.next_event() == wire.RangeOffset(0, ())
    server.receive_data(bytes(A) + client.send(wire.Done(None)))
    ahead = client.send(wire.RangedUploadRequest(SESSION, FILE, size, A, 2 * A))
    assert client.pipelined == wire.RangedUploadRequest(SESSION, FILE, size, A, 2 * A)
    with pytest.raises(wire.LocalProtocolError):  # one request ahead at most
        client.send(wire.RangedUploadRequest(SESSION, FILE, size, 2 * A, size))
    server.receive_data(ahead)
    while (event := server.next_event()) is not wire.PAUSED:
        assert event is not wire.NEED_DATA and not isinstance(event, wire.ProtocolError)
    assert server.buffered == len(ahead)
    client.receive_data(server.send(wire.RangeStored(0, A)))
    assert client.next_event() == wire.RangeStored(0, A)
    assert client.state is wire.ClientState.AWAIT_OFFSET and client.pipelined is None and client.range == (A, 2 * A)
    assert server.next_event() == wire.RangedUploadRequest(SESSION, FILE, size, A, 2 * A)
    client.receive_data(f"RANGES {A} 0-{A}\r\n".encode())
    assert client.next_event() == wire.RangeOffset(A, ((0, A),))

    client, server = wire.ClientConnection(), wire.ServerConnection()
    client.send(wire.RangedUploadRequest(SESSION, FILE, size, 0, A))
    client.receive_data(f"RANGES 0 {A}-{size}\r\n".encode())
    client.next_event()
    client.send(wire.Done(None))
    client.send(wire.RangedUploadRequest(SESSION, FILE, size, A, 2 * A))
    client.receive_data(f"STORED {size} 00000000 {'0' * 64}\r\n".encode())
    assert isinstance(client.next_event(), wire.Stored) and client.closed and client.pipelined is not None

    plain = wire.ClientConnection()  # a plain PUT's DONE: nothing may follow it
    plain.send(wire.UploadRequest(SESSION, FILE, 5))
    plain.receive_data(b"OFFSET 0\r\n")
    plain.next_event()
    plain.send(wire.Done(None))
    with pytest.raises(wire.LocalProtocolError):
        plain.send(wire.RangedUploadRequest(SESSION, FILE, size, 0, A))
