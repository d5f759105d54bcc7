"""BATCH in the sans-IO core: many small files on one connection, one reply line each."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filedock import wire
from filedock.errors import ErrorCode

SESSION = str(uuid.uuid4())
DIGEST = "d" * 64


def server_events(stream: bytes, cuts: list[int]) -> list:
    """Feed ``stream`` cut at ``cuts`` to a server that accepts the batch; events with Data joined."""
    conn = wire.ServerConnection()
    events: list = []
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    for piece in (stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])):
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is wire.PAUSED:
                assert conn.send(wire.BatchAccepted()) == b""
                continue
            if event is wire.NEED_DATA:
                break
            if isinstance(event, wire.Data) and events and isinstance(events[-1], wire.Data):
                events[-1] = wire.Data(bytes(events[-1].data) + bytes(event.data))
            else:
                events.append(wire.Data(bytes(event.data)) if isinstance(event, wire.Data) else event)
    return events


@st.composite
def batches(draw):
    files = draw(st.lists(st.binary(max_size=300), min_size=0, max_size=6))
    keys = [str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)), version=4)) for _ in files]
    return list(zip(keys, files))


@given(batch=batches(), cuts=st.lists(st.integers(0, 3000), max_size=20))
@settings(max_examples=300, deadline=None)
def test_any_chunking_gives_the_same_batch_events(batch, cuts):
    """A whole batch stream, cut anywhere, gives BatchRequest, each item with its bytes, then Done."""
    client = wire.ClientConnection()
    stream = client.send(wire.BatchRequest(SESSION, len(batch)))
    for key, data in batch:
        stream += client.send(wire.BatchItem(key, len(data), DIGEST)) + data
    stream += client.send(wire.Done(None))
    expected: list = [wire.BatchRequest(SESSION, len(batch))]
    for key, data in batch:
        expected += [wire.BatchItem(key, len(data), DIGEST), *([wire.Data(data)] if data else []),
                     wire.BodyComplete()]
    expected.append(wire.Done(None))
    assert server_events(stream, cuts) == expected


def test_results_round_trip_to_the_client():
    """STORED and FAILED lines per item, then END, parse back into the same values."""
    k1, k2 = str(uuid.uuid4()), str(uuid.uuid4())
    server = wire.ServerConnection()
    server.receive_data(f"FILEDOCK/1 BATCH {SESSION} 0\r\nDONE\r\n".encode())
    assert server.next_event() == wire.BatchRequest(SESSION, 0)
    server.send(wire.BatchAccepted())
    assert server.next_event() == wire.Done(None)
    reply = server.send(wire.BatchResults((wire.ItemStored(k1, 5, 0xABCDEF01, DIGEST),
                                           wire.ItemFailed(k2, "size-mismatch", "declared with 4 bytes"))))
    assert server.state is wire.ServerState.CLOSED
    client = wire.ClientConnection()
    client.send(wire.BatchRequest(SESSION, 0))
    client.send(wire.Done(None))
    client.receive_data(reply)
    events = []
    while (event := client.next_event()) is not wire.NEED_DATA:
        events.append(event)
    assert events == [wire.ItemStored(k1, 5, 0xABCDEF01, DIGEST),
                      wire.ItemFailed(k2, "size-mismatch", "declared with 4 bytes"), wire.BatchEnd(2)]


@pytest.mark.parametrize("tail", [
    b"not-a-key 5 " + DIGEST.encode() + b"\r\n",  # bad key
    str(uuid.uuid4()).encode() + b" 5\r\n",  # no digest
    str(uuid.uuid4()).encode() + b" -5 " + DIGEST.encode() + b"\r\n",  # negative size
    b"DONE\r\n",  # DONE before the announced count
])
def test_malformed_item_lines_are_protocol_errors(tail):
    """A bad item line, or DONE before every item came, is malformed-header; nothing else follows."""
    events = server_events(f"FILEDOCK/1 BATCH {SESSION} 1\r\n".encode() + tail, [])
    assert isinstance(events[-1], wire.ProtocolError) and events[-1].code is ErrorCode.MALFORMED_HEADER


def test_bytes_after_done_are_excess_data():
    """Anything after the batch's DONE is excess-data."""
    conn = wire.ServerConnection()
    conn.receive_data(f"FILEDOCK/1 BATCH {SESSION} 0\r\nDONE\r\nmore".encode())
    assert isinstance(conn.next_event(), wire.BatchRequest)
    conn.send(wire.BatchAccepted())
    assert conn.next_event() == wire.Done(None)
    event = conn.next_event()
    assert isinstance(event, wire.ProtocolError) and event.code is ErrorCode.EXCESS_DATA


def test_client_refuses_items_past_the_count_and_early_done():
    """The client core will not announce more items than the batch said, nor finish early."""
    client = wire.ClientConnection()
    client.send(wire.BatchRequest(SESSION, 1))
    with pytest.raises(RuntimeError):
        client.send(wire.Done(None))
    client.send(wire.BatchItem(str(uuid.uuid4()), 0, DIGEST))
    with pytest.raises(RuntimeError):
        client.send(wire.BatchItem(str(uuid.uuid4()), 0, DIGEST))
    assert client.send(wire.Done(None)) == b"DONE\r\n"
