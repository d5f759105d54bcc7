"""The wire core's transition tables, ``send(event)`` for both roles, and the predicates callers ask."""

from __future__ import annotations

import hashlib
import random
import uuid
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filedock import wire
from filedock.wire import (
    CLIENT_TRANSITIONS, LEGACY_SERVER_TRANSITIONS, NEED_DATA, PAUSED, SERVER_REPLY_TO, SERVER_TRANSITIONS,
    AbortRequest, Aborted, BatchAccepted, BatchEnd, BatchItem, BatchRequest, BatchResults, BodyComplete,
    ClientConnection, ClientState, Data, Done, DownloadRequest, DownloadStart, EndOfStream, ItemFailed,
    ItemStored, LocalProtocolError, Offset, ServerConnection, ServerError, ServerState, Stored, UploadRequest,
)

SESSION = "0b7d3c1e-5f2a-4c8b-9d6e-1a2b3c4d5e6f"
FILE = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
FILE2 = "9c1f0e6a-2b3d-4e5f-8a9b-0c1d2e3f4a5b"
DIGEST = hashlib.sha256(b"filedock").hexdigest()

SERVER_SENDS = (Offset(0), BatchAccepted(), DownloadStart(10, 0, 1, DIGEST), Aborted(), Stored(10, 1, DIGEST),
                BatchResults(()), ServerError("no-space", "full"))
CLIENT_SENDS = (UploadRequest(SESSION, FILE, 10), DownloadRequest(SESSION, FILE, 0), AbortRequest(SESSION, FILE),
                BatchRequest(SESSION, 1), BatchItem(FILE, 3, DIGEST), Done(None))


# ---------------------------------------------------------------- the tables


@pytest.mark.parametrize("table,states", [(SERVER_TRANSITIONS, ServerState), (LEGACY_SERVER_TRANSITIONS, ServerState),
                                          (CLIENT_TRANSITIONS, ClientState)])
def test_every_state_has_a_row_and_every_row_leads_to_a_state(table, states):
    """No state is missing from its table, and every row names a state of the same role."""
    assert {state for state, _ in table} == set(states)
    assert all(isinstance(state, states) and isinstance(after, states) for (state, _), after in table.items())


def test_every_state_is_reachable_and_only_closed_is_final():
    """From the first state every state can be reached (LEGACY_END in the 2007 dialect), and every
    state but CLOSED leads on."""
    server_edges = [*SERVER_TRANSITIONS.items(), *LEGACY_SERVER_TRANSITIONS.items()]
    for edges, first, states in ((server_edges, ServerState.REQUEST, ServerState),
                                 (list(CLIENT_TRANSITIONS.items()), ClientState.IDLE, ClientState)):
        seen, todo = {first}, [first]
        while todo:
            state = todo.pop()
            for (src, _), dst in edges:
                if src is state and dst not in seen:
                    seen.add(dst)
                    todo.append(dst)
        assert seen == set(states)
        leads_on = {src for (src, _), dst in edges if dst is not src}
        assert set(states) - leads_on == {states.CLOSED}


def test_the_2007_table_differs_only_where_the_body_ends():
    differ = {k for k in SERVER_TRANSITIONS if SERVER_TRANSITIONS[k] != LEGACY_SERVER_TRANSITIONS[k]}
    assert differ == {(ServerState.BODY, BodyComplete)}
    assert LEGACY_SERVER_TRANSITIONS[(ServerState.BODY, BodyComplete)] is ServerState.LEGACY_END


def test_data_and_end_of_stream_never_change_a_state():
    """The per-chunk path has nothing to look up: neither event is in any table."""
    for table in (SERVER_TRANSITIONS, CLIENT_TRANSITIONS):
        assert not {kind for _, kind in table} & {Data, EndOfStream}


def _server_in(state: ServerState, request=None) -> ServerConnection:
    conn = ServerConnection()
    conn.state, conn.request = state, request
    return conn


@pytest.mark.parametrize("state", list(ServerState))
@pytest.mark.parametrize("event", SERVER_SENDS, ids=lambda e: type(e).__name__)
def test_server_send_outside_the_table_is_a_local_protocol_error(state, event):
    """Every (state, reply) pair not in the table raises LocalProtocolError and leaves the state alone."""
    request = SERVER_REPLY_TO.get(type(event))
    request = {UploadRequest: UploadRequest(SESSION, FILE, 10), BatchRequest: BatchRequest(SESSION, 0),
               DownloadRequest: DownloadRequest(SESSION, FILE, 0), AbortRequest: AbortRequest(SESSION, FILE),
               None: None}[request]
    conn = _server_in(state, request)
    if (state, type(event)) in SERVER_TRANSITIONS:
        conn.send(event)
        assert conn.state is SERVER_TRANSITIONS[(state, type(event))]
    else:
        with pytest.raises(LocalProtocolError):
            conn.send(event)
        assert conn.state is state


@pytest.mark.parametrize("state", list(ClientState))
@pytest.mark.parametrize("event", CLIENT_SENDS, ids=lambda e: type(e).__name__)
def test_client_send_outside_the_table_is_a_local_protocol_error(state, event):
    conn = ClientConnection()
    conn.state, conn.items_left = state, 1
    if (state, type(event)) in CLIENT_TRANSITIONS:
        if not (type(event) is Done and state is ClientState.BATCH_SENDING):  # an item is still owed
            conn.send(event)
            assert conn.state is CLIENT_TRANSITIONS[(state, type(event))]
    else:
        with pytest.raises(LocalProtocolError):
            conn.send(event)
        assert conn.state is state


def test_a_reply_must_answer_the_pending_request():
    """In DECIDING, a reply for another kind of request is refused: the table alone would allow it."""
    conn = _server_in(ServerState.DECIDING, DownloadRequest(SESSION, FILE, 0))
    for event in (Offset(0), BatchAccepted(), Aborted()):
        with pytest.raises(LocalProtocolError, match="answers no pending"):
            conn.send(event)
    assert conn.state is ServerState.DECIDING
    conn = _server_in(ServerState.FINISHING, BatchRequest(SESSION, 0))
    with pytest.raises(LocalProtocolError):
        conn.send(Stored(1, 2, DIGEST))


def test_local_protocol_error_is_a_runtime_error():
    """Code that caught RuntimeError from the old methods still catches it."""
    assert issubclass(LocalProtocolError, RuntimeError)


# ---------------------------------------------------------------- send(): server


def _deciding(line: bytes) -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(line)
    assert not isinstance(conn.next_event(), type(NEED_DATA))
    assert conn.next_event() is PAUSED
    return conn


def _put(size=10, legacy=False) -> ServerConnection:
    if legacy:
        return _deciding(wire.legacy_header(SESSION, FILE, size))
    return _deciding(f"FILEDOCK/1 PUT {SESSION} {FILE} {size}\r\n".encode())


def test_server_send_offset():
    conn = _put()
    assert conn.send(Offset(4)) == b"OFFSET 4\r\n"
    assert (conn.state, conn.body_expected) == (ServerState.BODY, 6)
    assert conn.receiving_body


def test_server_send_offset_to_a_2007_client_is_silent_and_from_zero():
    conn = _put(legacy=True)
    with pytest.raises(ValueError):
        conn.send(Offset(1))
    assert conn.state is ServerState.DECIDING
    assert conn.send(Offset(0)) == b""
    conn.receive_data(b"0123456789")
    assert conn.next_event() == Data(b"0123456789")
    assert conn.next_event() == BodyComplete()
    assert conn.awaiting_close and conn.state is ServerState.LEGACY_END


@pytest.mark.parametrize("offset", [-1, 11])
def test_server_send_offset_outside_the_file_is_a_value_error(offset):
    conn = _put()
    with pytest.raises(ValueError):
        conn.send(Offset(offset))
    assert conn.deciding


def test_server_send_stored_after_done():
    conn = _put(3)
    conn.send(Offset(0))
    conn.receive_data(b"abcDONE\r\n")
    assert [conn.next_event() for _ in range(3)] == [Data(b"abc"), BodyComplete(), Done(None)]
    assert conn.send(Stored(3, 0xABC, DIGEST)) == f"STORED 3 00000abc {DIGEST}\r\n".encode()
    assert conn.closed


def test_server_send_download_start():
    conn = _deciding(f"FILEDOCK/1 GET {SESSION} {FILE} 2\r\n".encode())
    with pytest.raises(ValueError):
        conn.send(DownloadStart(10, 0, 1, DIGEST))  # not where the client asked to start
    assert conn.send(DownloadStart(10, 2, 1, DIGEST)) == f"DATA 10 2 00000001 {DIGEST}\r\n".encode()
    assert conn.sending_body and conn.state is ServerState.SENDING


def test_server_send_aborted():
    conn = _deciding(f"FILEDOCK/1 ABORT {SESSION} {FILE}\r\n".encode())
    assert conn.send(Aborted()) == b"ABORTED\r\n"
    assert conn.closed


def test_server_send_batch_accepted_then_results():
    conn = _deciding(f"FILEDOCK/1 BATCH {SESSION} 2\r\n".encode())
    assert conn.send(BatchAccepted()) == b""
    assert conn.awaiting_item and conn.items_left == 2
    conn.receive_data(f"{FILE} 1 {DIGEST}\r\nx{FILE2} 0 {DIGEST}\r\nDONE\r\n".encode())
    events = [conn.next_event() for _ in range(6)]
    assert events[-1] == Done(None) and conn.state is ServerState.FINISHING
    results = (ItemStored(FILE, 1, 0xFF, DIGEST), ItemFailed(FILE2, "digest-mismatch", "bad\r\nline"))
    assert conn.send(BatchResults(results)) == (f"STORED {FILE} 1 000000ff {DIGEST}\r\n"
                                                f"FAILED {FILE2} digest-mismatch bad??line\r\nEND 2\r\n").encode()
    assert conn.closed


@pytest.mark.parametrize("state", list(ServerState))
def test_server_send_error_is_allowed_in_every_state(state):
    conn = _server_in(state, UploadRequest(SESSION, FILE, 10))
    assert conn.send(ServerError("no-space", "disk full")) == b"ERR no-space disk full\r\n"
    assert conn.closed


def test_server_send_error_to_a_2007_client_is_silent():
    conn = _put(legacy=True)
    assert conn.send(ServerError("unknown-session", "no")) == b""
    assert conn.closed


# ---------------------------------------------------------------- send(): client


def test_client_send_each_request():
    cases = [
        (UploadRequest(SESSION, FILE, 9), f"FILEDOCK/1 PUT {SESSION} {FILE} 9\r\n", ClientState.AWAIT_OFFSET),
        (DownloadRequest(SESSION, FILE, 4), f"FILEDOCK/1 GET {SESSION} {FILE} 4\r\n", ClientState.AWAIT_DATA),
        (AbortRequest(SESSION, FILE), f"FILEDOCK/1 ABORT {SESSION} {FILE}\r\n", ClientState.AWAIT_ABORTED),
        (BatchRequest(SESSION, 2), f"FILEDOCK/1 BATCH {SESSION} 2\r\n", ClientState.BATCH_SENDING),
    ]
    for event, line, state in cases:
        conn = ClientConnection()
        assert conn.send(event) == line.encode()
        assert conn.state is state
        assert conn.awaiting_reply is (state is not ClientState.BATCH_SENDING)
        with pytest.raises(LocalProtocolError):
            conn.send(event)  # one request per connection


def test_client_send_legacy_upload_is_refused():
    with pytest.raises(ValueError):
        ClientConnection().send(UploadRequest(SESSION, FILE, 9, legacy=True))


def test_client_send_done_after_offset():
    conn = ClientConnection()
    conn.send(UploadRequest(SESSION, FILE, 9))
    with pytest.raises(LocalProtocolError):
        conn.send(Done(None))
    conn.receive_data(b"OFFSET 9\r\n")
    assert conn.next_event() == Offset(9)
    assert conn.sending_body and not conn.awaiting_reply
    assert conn.send(Done(DIGEST)) == f"DONE {DIGEST}\r\n".encode()
    assert conn.state is ClientState.AWAIT_STORED and conn.awaiting_reply


def test_client_send_batch_items_then_done():
    conn = ClientConnection()
    conn.send(BatchRequest(SESSION, 1))
    assert conn.sending_body
    with pytest.raises(LocalProtocolError):
        conn.send(Done(None))
    assert conn.send(BatchItem(FILE, 3, DIGEST)) == f"{FILE} 3 {DIGEST}\r\n".encode()
    with pytest.raises(LocalProtocolError):
        conn.send(BatchItem(FILE2, 3, DIGEST))
    assert conn.send(Done(None)) == b"DONE\r\n"
    assert conn.state is ClientState.AWAIT_BATCH


# ---------------------------------------------------------------- predicates


SERVER_PREDICATES = {
    "awaiting_request": {ServerState.REQUEST},
    "deciding": {ServerState.DECIDING},
    "awaiting_item": {ServerState.BATCH_ITEM},
    "receiving_body": {ServerState.BODY, ServerState.BATCH_BODY},
    "awaiting_close": {ServerState.LEGACY_END},
    "sending_body": {ServerState.SENDING},
    "closed": {ServerState.CLOSED},
}
CLIENT_PREDICATES = {
    "sending_body": {ClientState.SENDING, ClientState.BATCH_SENDING},
    "receiving_body": {ClientState.RECEIVING},
    "awaiting_reply": {ClientState.AWAIT_OFFSET, ClientState.AWAIT_STORED, ClientState.AWAIT_DATA,
                       ClientState.AWAIT_ABORTED, ClientState.AWAIT_BATCH},
    "closed": {ClientState.CLOSED},
}


@pytest.mark.parametrize("state", list(ServerState))
def test_server_predicates(state):
    conn = _server_in(state)
    assert {name for name in SERVER_PREDICATES if getattr(conn, name)} == \
        {name for name, states in SERVER_PREDICATES.items() if state in states}


@pytest.mark.parametrize("state", list(ClientState))
def test_client_predicates(state):
    conn = ClientConnection()
    conn.state = state
    assert {name for name in CLIENT_PREDICATES if getattr(conn, name)} == \
        {name for name, states in CLIENT_PREDICATES.items() if state in states}


def test_buffered_counts_bytes_not_yet_turned_into_events():
    """Both roles: ``buffered`` is what arrived and is not yet an event (the stall watch's measure)."""
    server = ServerConnection()
    header = f"FILEDOCK/1 PUT {SESSION} {FILE} 10\r\n".encode()
    server.receive_data(header + b"abc")
    assert server.buffered == len(header) + 3
    server.next_event()
    assert server.buffered == 3
    client = ClientConnection()
    client.send(DownloadRequest(SESSION, FILE, 0))
    client.receive_data(f"DATA 5 0 00000000 {DIGEST}\r\nab".encode())
    client.next_event()
    assert client.buffered == 2 and client.receiving_body
    assert client.next_event() == Data(b"ab") and client.buffered == 0


def test_wire_imports_nothing_above_it():
    """The protocol core depends on no storage, server or client module (and storage not on it)."""
    import ast
    import inspect

    from filedock.store import model

    for module, banned in ((wire, ("filedock.store", "filedock.server", "filedock.client")),
                           (model, ("filedock.wire", "filedock.server", "filedock.client"))):
        tree = ast.parse(inspect.getsource(module))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
            {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not [m for m in imported if m and m.startswith(banned)], module.__name__


# ---------------------------------------------------------------- send() and the old methods, back to back


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])] if data else []


class Pair:
    """A server and a client back to back; every byte crosses cut at random points (from ``rng``)."""

    def __init__(self, rng) -> None:
        self.server, self.client, self.rng = ServerConnection(), ClientConnection(), rng

    def _cross(self, conn, data: bytes, eof: bool = False) -> list:
        events = []
        cuts = [self.rng.randrange(0, len(data) + 1) for _ in range(self.rng.randrange(0, 8))]
        for chunk in _chunks(data, cuts) + ([b""] if eof else []):
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not NEED_DATA and ev is not PAUSED:
                if isinstance(ev, Data) and events and isinstance(events[-1], Data):
                    events[-1] = Data(events[-1].data + bytes(ev.data))
                else:
                    events.append(Data(bytes(ev.data)) if isinstance(ev, Data) else ev)
                if isinstance(ev, EndOfStream):
                    break
        return events

    def to_server(self, data: bytes) -> list:
        return self._cross(self.server, data)

    def to_client(self, data: bytes) -> list:
        return self._cross(self.client, data)

    def close(self) -> list:
        """Both sides close: the server's events, then the client's."""
        return self._cross(self.server, b"", eof=True) + self._cross(self.client, b"", eof=True)


def _run(kind: str, body: bytes, offset: int, items: list[bytes], refuse_at: int, seed: int,
         session: str, file_key: str) -> tuple:
    """One exchange of ``kind``, every message sent with ``send`` and checked against its line as
    docs/protocol.md writes it; returns (every event each side saw, every byte each side sent, the states)."""
    pair = Pair(random.Random(seed))
    c, s = pair.client, pair.server
    seen, sent = [], []

    def client_says(event, line: str):
        data = c.send(event)
        assert data == line.encode("ascii"), (event, data)
        sent.append(data)
        seen.append(("server", pair.to_server(data)))

    def server_says(event, line: str):
        data = s.send(event)
        assert data == line.encode("ascii"), (event, data)
        sent.append(data)
        seen.append(("client", pair.to_client(data)))

    crc, digest = zlib.crc32(body), hashlib.sha256(body).hexdigest()
    if kind == "upload":
        client_says(UploadRequest(session, file_key, len(body)), f"FILEDOCK/1 PUT {session} {file_key} {len(body)}\r\n")
        if refuse_at == 0:
            server_says(ServerError("unknown-session", "no such session"), "ERR unknown-session no such session\r\n")
            return seen, sent, s.state, c.state
        server_says(Offset(offset), f"OFFSET {offset}\r\n")
        seen.append(("server", pair.to_server(body[offset:])))
        if refuse_at == 1:
            server_says(ServerError("no-space", "disk full"), "ERR no-space disk full\r\n")
            return seen, sent, s.state, c.state
        client_says(Done(digest), f"DONE {digest}\r\n")
        server_says(Stored(len(body), crc, digest), f"STORED {len(body)} {crc:08x} {digest}\r\n")
    elif kind == "download":
        client_says(DownloadRequest(session, file_key, offset), f"FILEDOCK/1 GET {session} {file_key} {offset}\r\n")
        server_says(DownloadStart(len(body), offset, crc, digest), f"DATA {len(body)} {offset} {crc:08x} {digest}\r\n")
        seen.append(("client", pair.to_client(body[offset:])))
    elif kind == "abort":
        client_says(AbortRequest(session, file_key), f"FILEDOCK/1 ABORT {session} {file_key}\r\n")
        server_says(Aborted(), "ABORTED\r\n")
    else:
        keys = [str(uuid.UUID(int=(uuid.UUID(file_key).int + i) % 2**128, version=4)) for i in range(len(items))]
        client_says(BatchRequest(session, len(items)), f"FILEDOCK/1 BATCH {session} {len(items)}\r\n")
        server_says(BatchAccepted(), "")  # the server answers nothing until DONE
        for key, data in zip(keys, items):
            client_says(BatchItem(key, len(data), digest), f"{key} {len(data)} {digest}\r\n")
            seen.append(("server", pair.to_server(data)))
        client_says(Done(None), "DONE\r\n")
        results = tuple(ItemStored(k, len(d), zlib.crc32(d), digest) if i % 2 == 0
                        else ItemFailed(k, "digest-mismatch", "the bytes differ")
                        for i, (k, d) in enumerate(zip(keys, items)))
        lines = "".join(f"STORED {r.file_key} {r.size} {r.crc32:08x} {r.digest}\r\n" if isinstance(r, ItemStored)
                        else f"FAILED {r.file_key} digest-mismatch the bytes differ\r\n" for r in results)
        server_says(BatchResults(results), f"{lines}END {len(items)}\r\n")
    seen.append(("close", pair.close()))
    return seen, sent, s.state, c.state


@given(kind=st.sampled_from(["upload", "download", "abort", "batch"]), body=st.binary(max_size=600),
       items=st.lists(st.binary(max_size=200), max_size=5), refuse_at=st.integers(0, 2),
       session=st.uuids(version=4).map(str), file_key=st.uuids(version=4).map(str), data=st.data())
@settings(max_examples=300, deadline=None)
def test_send_gives_the_documented_lines_and_the_exchange_completes(kind, body, items, refuse_at, session,
                                                                    file_key, data):
    """Driving a server and a client back to back with ``send``, each message's bytes are the line
    docs/protocol.md gives for its field values, and under any chunking the events both sides see are
    the exchange's (requests, replies, body, completion), ending in the right states."""
    offset = data.draw(st.integers(0, len(body)), label="offset")
    seed = data.draw(st.integers(0, 2**32), label="chunking seed")
    seen, _, server_state, client_state = _run(kind, body, offset, items, refuse_at, seed, session, file_key)
    events = [ev for _, evs in seen for ev in evs]
    if kind == "upload" and refuse_at == 0:
        assert events[-1] == ServerError("unknown-session", "no such session")
    elif kind == "upload" and refuse_at == 1:
        assert ServerError("no-space", "disk full") in events
        assert body_of(events) == body[offset:]
    elif kind == "upload":
        digest = hashlib.sha256(body).hexdigest()
        assert Done(digest) in events and Stored(len(body), zlib.crc32(body), digest) in events
        assert body_of(events) == body[offset:]
    elif kind == "download":
        assert isinstance(events[1], DownloadStart) and BodyComplete() in events
        assert body_of(events) == body[offset:]
    elif kind == "abort":
        assert Aborted() in events
    else:
        assert events.count(BodyComplete()) == len(items)
        assert [e for e in events if isinstance(e, BatchEnd)] == [BatchEnd(len(items))]
        assert body_of(events) == b"".join(items)
    # a download's server streams until the connection goes; every other exchange ends CLOSED
    assert server_state is (ServerState.SENDING if kind == "download" else ServerState.CLOSED)
    assert client_state is ClientState.CLOSED


def body_of(events: list) -> bytes:
    return b"".join(bytes(ev.data) for ev in events if isinstance(ev, Data))
