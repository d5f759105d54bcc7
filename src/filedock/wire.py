"""The data-port protocol, sans-IO: bytes in, events out, bytes to send returned.

Nothing here touches a socket, a file or a reactor. ``ServerConnection`` is one
connection seen from the server, ``ClientConnection`` the same seen from a client.
Feed received bytes with ``receive_data(data)`` (``b""`` means the peer closed) and
pull events with ``next_event()`` until it returns ``NEED_DATA`` (or ``PAUSED`` while
the server is deciding on a request). ``send(event)`` returns the bytes for what the
local side says (the same event classes the peer receives); the caller decides when
to write them. Each role's states and transitions are one table
(``SERVER_TRANSITIONS``, ``CLIENT_TRANSITIONS``); callers ask predicates such as
``awaiting_request`` or ``closed`` rather than reading ``state``.

Two dialects share one event vocabulary (see docs/protocol.md):

* the 2007 dialect: ``<session-uuid> <file-uuid> <size>\\r\\n`` then ``size`` raw bytes,
  then the client closes; no reply, ever;
* the versioned dialect: ``FILEDOCK/1 PUT|GET|ABORT ...`` request lines with one-line
  replies (``OFFSET``, ``STORED``, ``DATA``, ``ABORTED`` or ``ERR <code> <message>``).
"""

from __future__ import annotations

import enum
import re
from collections import deque

from filedock.digest import format_crc  # also imported from here by clients
from filedock.errors import ErrorCode, FiledockError
from filedock.record import record

MAX_LINE = 4096
"""Longest header or reply line, newline included."""

MAX_SIZE = 2**63 - 1
"""Largest size or offset the protocol can carry."""

VERSION = "FILEDOCK/1"

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_NUM = r"(?:0|[1-9][0-9]{0,18})"
_HEX = r"[0-9a-f]"


# Patterns, compiled on first use by ``re``'s own cache (``re.fullmatch(pattern, text)``): a client
# parses a handful of reply kinds and a server a handful of requests, and compiling all seventeen at
# import cost ~4 ms of every ``filedock`` command's start-up (a third of this module's import).
_LEGACY_RE = rf"({_UUID}) ({_UUID}) ({_NUM})"
_PUT_RE = rf"PUT ({_UUID}) ({_UUID}) ({_NUM})"
_PUTR_RE = rf"PUTR ({_UUID}) ({_UUID}) ({_NUM}) ({_NUM}) ({_NUM})"
_GET_RE = rf"GET ({_UUID}) ({_UUID}) ({_NUM})"
_ABORT_RE = rf"ABORT ({_UUID}) ({_UUID})"
_BATCH_RE = rf"BATCH ({_UUID}) ({_NUM})"
_ITEM_RE = rf"({_UUID}) ({_NUM}) ({_HEX}{{64}})"
_ITEM_STORED_RE = rf"STORED ({_UUID}) ({_NUM}) ({_HEX}{{8}}) ({_HEX}{{64}})"
_ITEM_FAILED_RE = rf"FAILED ({_UUID}) ([a-z][a-z0-9-]{{0,63}})(?: (.*))?"
_END_RE = rf"END ({_NUM})"
_DONE_RE = rf"DONE(?: ({_HEX}{{64}}))?"
_OFFSET_RE = rf"OFFSET ({_NUM})"
_STORED_RE = rf"STORED ({_NUM}) ({_HEX}{{8}}) ({_HEX}{{64}})"
_RANGES_RE = rf"RANGES ({_NUM}) (-|{_NUM}-{_NUM}(?:,{_NUM}-{_NUM})*)"
_DURABLE_RE = rf"DURABLE ({_NUM}) ({_NUM})"
_DATA_RE = rf"DATA ({_NUM}) ({_NUM}) ({_HEX}{{8}}) ({_HEX}{{64}})"
_ERR_RE = r"ERR ([a-z][a-z0-9-]{0,63})(?: (.*))?"


class Sentinel(enum.Enum):
    """Answers from ``next_event`` that are not events."""

    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


# ---------------------------------------------------------------- events


@record
class UploadRequest:
    """A client asks to upload ``size`` bytes of file ``file_key`` under ``session_key``.

    ``legacy`` is true for the 2007 dialect, which always sends from byte 0 and
    expects no reply.
    """

    session_key: str
    file_key: str
    size: int
    legacy: bool = False


RANGE_ALIGN = 4 * 1024 * 1024
"""Ranges of a ranged upload start on, and end on (but for the file's end), multiples of this: the
``blake3-4m`` block size, so each range hashes whole blocks and the block tree stays end to end."""


def range_error(size: int, start: int, end: int) -> str | None:
    """Why ``[start, end)`` is not a valid range of a ``size``-byte file, or None if it is."""
    if size == 0:
        return "an empty file has no ranges; send it with PUT"
    if not start < end <= size:
        return f"range {start}-{end} is not inside the file of {size} bytes (start < end <= size)"
    if start % RANGE_ALIGN or (end % RANGE_ALIGN and end != size):
        return f"range {start}-{end} is not aligned to {RANGE_ALIGN} bytes (or ends at the file's end)"
    return None


def format_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    """Durable ranges as on the wire: ``a-b,c-d`` (half-open, ascending, disjoint), or ``-`` for none."""
    return ",".join(f"{a}-{b}" for a, b in ranges) or "-"


def parse_ranges(text: str) -> tuple[tuple[int, int], ...] | None:
    """The ranges ``format_ranges`` wrote; None unless ascending, disjoint, non-empty and in range."""
    if text == "-":
        return ()
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        start, end = int(a), int(b)
        if not start < end <= MAX_SIZE or (out and start <= out[-1][1]):
            return None
        out.append((start, end))
    return tuple(out)


@record
class RangedUploadRequest:
    """A client sends bytes ``[start, end)`` of the ``size``-byte file ``file_key`` on this connection.

    Several connections may each carry a range of the same file into the same partial
    (``FILEDOCK/1 PUTR``); ranges are aligned (``range_error``).
    """

    session_key: str
    file_key: str
    size: int
    start: int
    end: int


@record
class DownloadRequest:
    """A client asks for a complete file from ``offset`` on."""

    session_key: str
    file_key: str
    offset: int


@record
class AbortRequest:
    """A client gives up an upload: the server deletes the partial."""

    session_key: str
    file_key: str


@record
class BatchRequest:
    """Many small whole files on one connection: ``count`` items follow, then ``DONE``."""

    session_key: str
    count: int


@record
class BatchItem:
    """One file of a batch: ``size`` body bytes follow; ``digest`` is the client's."""

    file_key: str
    size: int
    digest: str


@record
class ItemStored:
    """Batch reply: this file is durable (or was complete already, with these values)."""

    file_key: str
    size: int
    crc32: int
    digest: str


@record
class ItemFailed:
    """Batch reply: this file was not stored; the others are unaffected."""

    file_key: str
    code: str
    message: str


@record
class BatchEnd:
    """Batch reply: every item has its line; ``count`` of them."""

    count: int


@record
class BatchAccepted:
    """Server decision on a batch: the items may come. Nothing goes on the wire until the results."""


@record
class BatchResults:
    """Server reply to a batch's ``DONE``: one ``ItemStored``/``ItemFailed`` per item, then ``END``."""

    results: tuple[ItemStored | ItemFailed, ...]


@record
class Data:
    """Body bytes, in order. ``data`` may be a memoryview into the received chunk."""

    data: bytes | memoryview


@record
class BodyComplete:
    """Every announced body byte has arrived (upload: at the server; download: at the client)."""


@record
class Done:
    """Versioned upload trailer: the client has sent everything; ``digest`` is its own, if given."""

    digest: str | None


@record
class EndOfStream:
    """The peer closed its side. Whether that completes anything depends on the state."""


@record
class ProtocolError:
    """The peer broke the protocol. For a server: reply ``error_line`` and close."""

    code: ErrorCode
    message: str


@record
class Offset:
    """Server reply to PUT: it holds ``offset`` bytes durably; send the rest."""

    offset: int


@record
class RangeOffset:
    """Server reply to PUTR: it holds this range durably up to ``offset`` (send from there to the
    range's end); ``durable`` lists every range of the file it holds durably, ascending."""

    offset: int
    durable: tuple[tuple[int, int], ...] = ()


@record
class RangeStored:
    """Server reply to a ranged upload's DONE when the file is not complete yet: the range
    ``[start, end)`` is durable (fsync'd and recorded); other ranges are still missing."""

    start: int
    end: int


@record
class Stored:
    """Server reply to DONE: the file is durable (fsync'd, renamed, recorded)."""

    size: int
    crc32: int
    digest: str


@record
class DownloadStart:
    """Server reply to GET: ``size - offset`` bytes follow."""

    size: int
    offset: int
    crc32: int
    digest: str


@record
class Aborted:
    """Server reply to ABORT: the partial is gone."""


@record
class ServerError:
    """The server refused or failed; it closes the connection after this line."""

    code: str
    message: str

    def exception(self) -> FiledockError:
        """This error as an exception to raise or errback with."""
        return FiledockError(self.code, self.message)


ServerEvent = (
    UploadRequest | RangedUploadRequest | DownloadRequest | AbortRequest | BatchRequest | BatchItem | Data
    | BodyComplete | Done | EndOfStream | ProtocolError
)
ClientEvent = (
    Offset | RangeOffset | RangeStored | Stored | DownloadStart | Aborted | ItemStored | ItemFailed | BatchEnd
    | ServerError | Data
    | BodyComplete | EndOfStream
)


# ---------------------------------------------------------------- formatting


def format_error(code: ErrorCode | str, message: str) -> bytes:
    """One error line. The message is flattened to printable ASCII on one line."""
    code_s = code.value if isinstance(code, ErrorCode) else code
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in message)
    line = f"ERR {code_s} {clean}"[: MAX_LINE - 2]
    return line.encode("ascii") + b"\r\n"


def _line(text: str) -> bytes:
    return text.encode("ascii") + b"\r\n"


# ---------------------------------------------------------------- buffering


class _Input:
    """Received bytes not yet turned into events: whole lines, or body bytes without copying."""

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self._size = 0
        self.eof = False

    def feed(self, data: bytes) -> None:
        if self.eof:
            raise RuntimeError("data received after end of stream")
        if data:
            self._chunks.append(data)
            self._size += len(data)
        else:
            self.eof = True

    def __len__(self) -> int:
        return self._size

    def take_line(self, limit: int) -> bytes | None | ProtocolError:
        """One line without its ``\\n`` (and ``\\r``), None if incomplete, or an error if too long."""
        scanned = 0
        for chunk in self._chunks:
            pos = bytes(chunk[: max(0, limit - scanned)]).find(b"\n")
            if pos >= 0:
                raw = self.take(scanned + pos + 1)
                return raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            scanned += len(chunk)
            if scanned >= limit:
                return ProtocolError(ErrorCode.HEADER_TOO_LONG, f"no newline in the first {limit} bytes")
        return None

    def take(self, n: int) -> bytes:
        """Exactly ``n`` buffered bytes, joined."""
        out = bytearray()
        while len(out) < n:
            out += self.take_some(n - len(out))
        return bytes(out)

    def take_some(self, n: int) -> bytes | memoryview:
        """Up to ``n`` bytes from the first chunk, without copying."""
        chunk = self._chunks.popleft()
        if len(chunk) > n:
            view = memoryview(chunk)
            self._chunks.appendleft(view[n:])
            chunk = view[:n]
        self._size -= len(chunk)
        return chunk


def _decode(line: bytes) -> str | None:
    try:
        return line.decode("ascii")
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------- states and transition tables
#
# Everything that changes a connection's state is in the tables below: the state an
# event leaves a connection in, for the events it receives (turned into events by
# ``next_event``) and the ones it sends (``send``). A pair missing from a table is a
# protocol error: from the peer it becomes ``ProtocolError``/``ServerError`` (the
# parsers only produce what the state expects), from the local side ``send`` raises
# ``LocalProtocolError``. ``Data`` and ``EndOfStream`` never change a state and are in
# no table, so the per-chunk body path looks nothing up.


class LocalProtocolError(RuntimeError):
    """The local side asked for something the protocol does not allow now (a caller bug):
    a reply with no request to answer, a second request on one connection, ``Done`` early."""


class ServerState(enum.Enum):
    """Where a server connection stands. Every transition is in ``SERVER_TRANSITIONS``."""

    REQUEST = "request"  # waiting for the header line
    DECIDING = "deciding"  # header parsed; the server must accept or refuse
    BODY = "body"  # receiving upload bytes
    TRAILER = "trailer"  # versioned: body complete, waiting for DONE
    LEGACY_END = "legacy-end"  # 2007: body complete, waiting for the client to close
    BATCH_ITEM = "batch-item"  # batch: waiting for an item line, or DONE after the last item
    BATCH_BODY = "batch-body"  # batch: receiving one item's bytes
    FINISHING = "finishing"  # versioned: DONE received; the server owes STORED or ERR
    SENDING = "sending"  # download: the server streams; the client says nothing
    CLOSED = "closed"  # a final reply was sent or an error raised; nothing more


class ClientState(enum.Enum):
    """Where a client connection stands. Every transition is in ``CLIENT_TRANSITIONS``."""

    IDLE = "idle"
    AWAIT_OFFSET = "await-offset"
    SENDING = "sending"
    AWAIT_STORED = "await-stored"
    AWAIT_DATA = "await-data"
    RECEIVING = "receiving"
    AWAIT_ABORTED = "await-aborted"
    BATCH_SENDING = "batch-sending"
    AWAIT_BATCH = "await-batch"
    CLOSED = "closed"


_S = ServerState
SERVER_TRANSITIONS: dict[tuple[ServerState, type], ServerState] = {
    # received from the client
    (_S.REQUEST, UploadRequest): _S.DECIDING,
    (_S.REQUEST, RangedUploadRequest): _S.DECIDING,
    (_S.REQUEST, DownloadRequest): _S.DECIDING,
    (_S.REQUEST, AbortRequest): _S.DECIDING,
    (_S.REQUEST, BatchRequest): _S.DECIDING,
    (_S.BODY, BodyComplete): _S.TRAILER,
    (_S.TRAILER, Done): _S.FINISHING,
    (_S.BATCH_ITEM, BatchItem): _S.BATCH_BODY,
    (_S.BATCH_BODY, BodyComplete): _S.BATCH_ITEM,
    (_S.BATCH_ITEM, Done): _S.FINISHING,
    # sent by the server: the decision on a request, then its final reply
    (_S.DECIDING, Offset): _S.BODY,
    (_S.DECIDING, RangeOffset): _S.BODY,
    (_S.DECIDING, BatchAccepted): _S.BATCH_ITEM,
    (_S.DECIDING, DownloadStart): _S.SENDING,
    (_S.DECIDING, Aborted): _S.CLOSED,
    (_S.FINISHING, Stored): _S.CLOSED,
    (_S.FINISHING, RangeStored): _S.REQUEST,  # a range is durable: the connection may carry another request
    (_S.FINISHING, BatchResults): _S.CLOSED,
    # the peer broke the protocol (only where something is parsed), or the server refuses (anywhere)
    **{(state, ProtocolError): _S.CLOSED
       for state in (_S.REQUEST, _S.TRAILER, _S.LEGACY_END, _S.BATCH_ITEM, _S.FINISHING)},
    **{(state, ServerError): _S.CLOSED for state in ServerState},
}
"""(server state, event received or sent) -> the next state, for the versioned dialect."""

LEGACY_SERVER_TRANSITIONS: dict[tuple[ServerState, type], ServerState] = {
    **SERVER_TRANSITIONS,
    (_S.BODY, BodyComplete): _S.LEGACY_END,  # no trailer: the client's close ends the upload
}
"""The 2007 dialect's table: the versioned one, except that a complete body waits for the close.
Chosen when a 2007 header is parsed."""

SERVER_REPLY_TO: dict[type, type] = {
    Offset: UploadRequest,
    RangeOffset: RangedUploadRequest,
    BatchAccepted: BatchRequest,
    DownloadStart: DownloadRequest,
    Aborted: AbortRequest,
    Stored: UploadRequest,
    RangeStored: RangedUploadRequest,
    BatchResults: BatchRequest,
}
"""The request each server reply answers: ``send`` refuses a reply to another kind of request."""

SERVER_REPLY_ALSO_TO: dict[type, type] = {
    Stored: RangedUploadRequest,  # the range whose DONE completes the file is answered STORED
}
"""A second request a reply may answer, beside ``SERVER_REPLY_TO``'s."""

_C = ClientState
CLIENT_TRANSITIONS: dict[tuple[ClientState, type], ClientState] = {
    # sent by the client: one request per connection, then what it owes after the request
    (_C.IDLE, UploadRequest): _C.AWAIT_OFFSET,
    (_C.IDLE, RangedUploadRequest): _C.AWAIT_OFFSET,
    (_C.IDLE, DownloadRequest): _C.AWAIT_DATA,
    (_C.IDLE, AbortRequest): _C.AWAIT_ABORTED,
    (_C.IDLE, BatchRequest): _C.BATCH_SENDING,
    (_C.SENDING, Done): _C.AWAIT_STORED,
    (_C.BATCH_SENDING, BatchItem): _C.BATCH_SENDING,
    (_C.BATCH_SENDING, Done): _C.AWAIT_BATCH,
    # received from the server
    (_C.AWAIT_OFFSET, Offset): _C.SENDING,
    (_C.AWAIT_OFFSET, RangeOffset): _C.SENDING,
    (_C.AWAIT_STORED, Stored): _C.CLOSED,
    (_C.AWAIT_STORED, RangeStored): _C.IDLE,  # the server reads the next request on this connection
    (_C.AWAIT_DATA, DownloadStart): _C.RECEIVING,
    (_C.RECEIVING, BodyComplete): _C.CLOSED,
    (_C.AWAIT_ABORTED, Aborted): _C.CLOSED,
    (_C.AWAIT_BATCH, ItemStored): _C.AWAIT_BATCH,
    (_C.AWAIT_BATCH, ItemFailed): _C.AWAIT_BATCH,
    (_C.AWAIT_BATCH, BatchEnd): _C.CLOSED,
    # an ERR line (or a reply that makes no sense) may come at any time and ends the connection
    **{(state, ServerError): _C.CLOSED for state in ClientState},
}
"""(client state, event sent or received) -> the next state."""

del _S, _C


def _next_state(table: dict, state: enum.Enum, kind: type) -> enum.Enum:
    """The state after ``kind`` in ``state``; a pair not in the table is the local side's mistake."""
    try:
        return table[(state, kind)]
    except KeyError:
        raise LocalProtocolError(f"{kind.__name__} is not allowed in state {state.value}") from None


# ---------------------------------------------------------------- server side


class ServerConnection:
    """One data-port connection, server side.

    After a request event the adapter sends its decision with ``send``: ``Offset``
    (accept an upload from there), ``BatchAccepted``, ``DownloadStart`` (then writes the
    bytes itself), ``Aborted``, or ``ServerError`` (refuse; allowed at any time). After
    ``Done`` it sends ``Stored`` or ``BatchResults``. Callers ask the predicates
    (``awaiting_request``, ``receiving_body``, ``closed`` ...) rather than ``state``.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.state = ServerState.REQUEST
        self.max_line = max_line
        self.request: UploadRequest | DownloadRequest | AbortRequest | BatchRequest | None = None
        self.body_expected = 0
        self.body_received = 0
        self.items_left = 0
        self.served = 0  # requests this connection finished and then kept the connection for another
        self._table = SERVER_TRANSITIONS
        self._input = _Input()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when it closed its side."""
        self._input.feed(data)

    # -- what callers may ask

    @property
    def peer_closed(self) -> bool:
        """True once ``receive_data(b"")`` was called."""
        return self._input.eof

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return len(self._input)

    @property
    def awaiting_request(self) -> bool:
        """No request line yet: the header timeout applies, and the client is not yet authenticated."""
        return self.state is ServerState.REQUEST

    @property
    def deciding(self) -> bool:
        """A request arrived and waits for the server's decision (``next_event`` says ``PAUSED``)."""
        return self.state is ServerState.DECIDING

    @property
    def awaiting_item(self) -> bool:
        """In a batch, between files: the next item line (or ``DONE``) is due."""
        return self.state is ServerState.BATCH_ITEM

    @property
    def receiving_body(self) -> bool:
        """Body bytes of an upload, or of a batch item, are due from the client."""
        return self.state is ServerState.BODY or self.state is ServerState.BATCH_BODY

    @property
    def awaiting_close(self) -> bool:
        """A 2007 body is complete: the client's close (``EndOfStream``) completes the upload."""
        return self.state is ServerState.LEGACY_END

    @property
    def sending_body(self) -> bool:
        """A download was accepted: the server streams file bytes, so an error line cannot be sent."""
        return self.state is ServerState.SENDING

    @property
    def closed(self) -> bool:
        """A final reply was sent, an error raised or a refusal sent: nothing more happens."""
        return self.state is ServerState.CLOSED

    # -- events in

    def next_event(self) -> ServerEvent | Sentinel:
        """The next event, ``NEED_DATA``, or ``PAUSED`` while the server decides."""
        state = self.state
        if state is ServerState.BODY or state is ServerState.BATCH_BODY:
            return self._body_event()
        if state is ServerState.REQUEST:
            return self._line_event(self._parse_request)
        if state is ServerState.BATCH_ITEM:
            return self._line_event(self._parse_item)
        if state is ServerState.TRAILER:
            return self._line_event(self._parse_trailer)
        if state is ServerState.DECIDING:
            return PAUSED
        if state is ServerState.LEGACY_END or state is ServerState.FINISHING:
            if len(self._input):
                if state is ServerState.FINISHING and isinstance(self.request, RangedUploadRequest):
                    return PAUSED  # the client's next request, sent ahead: read once this range is answered
                return self._fail(ErrorCode.EXCESS_DATA, "bytes after the announced size")
            return self._eof_or_need()
        if state is ServerState.SENDING:
            if len(self._input):  # a download client has nothing to say; drop it
                self._input.take(len(self._input))
            return self._eof_or_need()
        return NEED_DATA  # CLOSED

    # -- events out

    def send(self, event: Offset | BatchAccepted | DownloadStart | Aborted | Stored | BatchResults
             | ServerError) -> bytes:
        """The bytes for ``event`` (``b""`` where the dialect has no reply); the state moves on.

        Raises ``LocalProtocolError`` if the event is not allowed now (see
        ``SERVER_TRANSITIONS`` and ``SERVER_REPLY_TO``), ``ValueError`` for values the
        request rules out (an offset outside the file); the state is unchanged then.
        """
        kind = type(event)
        next_state = _next_state(self._table, self.state, kind)
        wanted = SERVER_REPLY_TO.get(kind)
        if wanted is not None and not isinstance(self.request, (wanted, SERVER_REPLY_ALSO_TO.get(kind, wanted))):
            raise LocalProtocolError(f"{kind.__name__} answers no pending {wanted.__name__}"
                                     f" (state {self.state.value})")
        data = self._WRITERS[kind](self, event)
        self.state = next_state
        if next_state is ServerState.REQUEST:  # the next request on this connection starts afresh
            self.request, self.body_expected, self.body_received, self.items_left = None, 0, 0, 0
            self.served += 1
        return data

    def _write_offset(self, event: Offset) -> bytes:
        req = self.request
        if req.legacy and event.offset != 0:
            raise ValueError("a 2007-dialect upload always starts at 0")
        if not 0 <= event.offset <= req.size:
            raise ValueError("offset outside the file")
        self.body_expected = req.size - event.offset
        return b"" if req.legacy else _line(f"OFFSET {event.offset}")

    def _write_range_offset(self, event: RangeOffset) -> bytes:
        req = self.request
        if not req.start <= event.offset <= req.end:
            raise ValueError("offset outside the range")
        if parse_ranges(format_ranges(event.durable)) != tuple(event.durable):
            raise ValueError("durable ranges must be ascending, disjoint and non-empty")
        self.body_expected = req.end - event.offset
        return _line(f"RANGES {event.offset} {format_ranges(event.durable)}")

    def _write_range_stored(self, event: RangeStored) -> bytes:
        if (event.start, event.end) != (self.request.start, self.request.end):
            raise ValueError("a ranged upload reports its own range durable")
        return _line(f"DURABLE {event.start} {event.end}")

    def _write_batch_accepted(self, event: BatchAccepted) -> bytes:
        self.items_left = self.request.count
        return b""

    def _write_download_start(self, event: DownloadStart) -> bytes:
        if event.offset != self.request.offset:
            raise ValueError(f"the client asked from {self.request.offset}, not {event.offset}")
        return _line(f"DATA {event.size} {event.offset} {format_crc(event.crc32)} {event.digest}")

    def _write_aborted(self, event: Aborted) -> bytes:
        return _line("ABORTED")

    def _write_stored(self, event: Stored) -> bytes:
        return _line(f"STORED {event.size} {format_crc(event.crc32)} {event.digest}")

    def _write_batch_results(self, event: BatchResults) -> bytes:
        out = [_line(f"STORED {r.file_key} {r.size} {format_crc(r.crc32)} {r.digest}")
               if isinstance(r, ItemStored) else format_error(r.code, r.message).replace(
                   b"ERR ", f"FAILED {r.file_key} ".encode(), 1) for r in event.results]
        return b"".join(out) + _line(f"END {len(event.results)}")

    def _write_error(self, event: ServerError) -> bytes:
        if isinstance(self.request, UploadRequest) and self.request.legacy:
            return b""  # a 2007 client reads nothing, ever
        return format_error(event.code, event.message)

    _WRITERS = {
        Offset: _write_offset,
        RangeOffset: _write_range_offset,
        RangeStored: _write_range_stored,
        BatchAccepted: _write_batch_accepted,
        DownloadStart: _write_download_start,
        Aborted: _write_aborted,
        Stored: _write_stored,
        BatchResults: _write_batch_results,
        ServerError: _write_error,
    }

    # -- internals

    def _advance(self, event: ServerEvent) -> ServerEvent:
        self.state = self._table[(self.state, type(event))]
        return event

    def _fail(self, code: ErrorCode, message: str) -> ProtocolError:
        return self._advance(ProtocolError(code, message))

    def _eof_or_need(self) -> EndOfStream | Sentinel:
        if self._input.eof:
            return EndOfStream()
        return NEED_DATA

    def _line_event(self, parse) -> ServerEvent | Sentinel:
        line = self._input.take_line(self.max_line)
        if isinstance(line, ProtocolError):
            return self._advance(line)
        if line is None:
            return self._eof_or_need()
        return parse(line)

    def _parse_request(self, line: bytes) -> ServerEvent:
        text = _decode(line)
        if text is None:
            return self._fail(ErrorCode.MALFORMED_HEADER, "header is not ASCII")
        if text.startswith("FILEDOCK/"):
            version, _, rest = text.partition(" ")
            if version != VERSION:
                return self._fail(ErrorCode.MALFORMED_HEADER, f"unsupported protocol version {version[:20]}")
            event = self._parse_versioned(rest)
        else:
            m = re.fullmatch(_LEGACY_RE, text)
            if m and self.served:
                return self._fail(ErrorCode.MALFORMED_HEADER, "a 2007 header only opens a connection")
            event = m and UploadRequest(m[1].lower(), m[2].lower(), int(m[3]), legacy=True)
        if event is None:
            return self._fail(ErrorCode.MALFORMED_HEADER, "expected '<session-uuid> <file-uuid> <size>'"
                              " or 'FILEDOCK/1 PUT|GET|ABORT ...'")
        if getattr(event, "size", 0) > MAX_SIZE or getattr(event, "offset", 0) > MAX_SIZE:
            return self._fail(ErrorCode.MALFORMED_HEADER, "size out of range")
        if isinstance(event, RangedUploadRequest) and (why := range_error(event.size, event.start, event.end)):
            return self._fail(ErrorCode.BAD_RANGE, why)
        self.request = event
        if getattr(event, "legacy", False):
            self._table = LEGACY_SERVER_TRANSITIONS
        return self._advance(event)

    @staticmethod
    def _parse_versioned(rest: str) -> ServerEvent | None:
        if m := re.fullmatch(_PUT_RE, rest):
            return UploadRequest(m[1].lower(), m[2].lower(), int(m[3]))
        if m := re.fullmatch(_PUTR_RE, rest):
            return RangedUploadRequest(m[1].lower(), m[2].lower(), int(m[3]), int(m[4]), int(m[5]))
        if m := re.fullmatch(_GET_RE, rest):
            return DownloadRequest(m[1].lower(), m[2].lower(), int(m[3]))
        if m := re.fullmatch(_ABORT_RE, rest):
            return AbortRequest(m[1].lower(), m[2].lower())
        if m := re.fullmatch(_BATCH_RE, rest):
            return BatchRequest(m[1].lower(), int(m[2]))
        return None

    def _parse_item(self, line: bytes) -> ServerEvent:
        text = _decode(line)
        if self.items_left == 0:
            if text == "DONE":
                return self._advance(Done(None))
            return self._fail(ErrorCode.MALFORMED_HEADER, "expected 'DONE' after the last item of the batch")
        m = re.fullmatch(_ITEM_RE, text) if text is not None else None
        if m is None or int(m[2]) > MAX_SIZE:
            return self._fail(ErrorCode.MALFORMED_HEADER, "expected '<file-key> <size> <digest>' for a batch item")
        self.items_left -= 1
        self.body_expected, self.body_received = int(m[2]), 0
        return self._advance(BatchItem(m[1].lower(), int(m[2]), m[3]))

    def _body_event(self) -> ServerEvent | Sentinel:
        remaining = self.body_expected - self.body_received
        if remaining == 0:
            return self._advance(BodyComplete())
        if len(self._input) == 0:
            return self._eof_or_need()
        data = self._input.take_some(remaining)
        self.body_received += len(data)
        return Data(data)

    def _parse_trailer(self, line: bytes) -> ServerEvent:
        text = _decode(line)
        m = re.fullmatch(_DONE_RE, text) if text is not None else None
        if m is None:
            return self._fail(ErrorCode.MALFORMED_HEADER, "expected 'DONE [<digest>]' after the body")
        return self._advance(Done(m[1]))


# ---------------------------------------------------------------- client side


class ClientConnection:
    """One data-port connection in the versioned dialect, client side.

    ``send`` a request (``UploadRequest``, ``DownloadRequest``, ``AbortRequest`` or
    ``BatchRequest``), then what the request owes: after ``Offset`` the body bytes and
    ``Done``; in a batch a ``BatchItem`` and its bytes per file, then ``Done``.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.state = ClientState.IDLE
        self.max_line = max_line
        self.size = 0
        self.offset = 0
        self.range: tuple[int, int] | None = None  # a ranged upload's [start, end)
        self.pipelined: RangedUploadRequest | None = None  # sent after DONE, before the reply (see send)
        self.body_expected = 0
        self.body_received = 0
        self.items_left = 0
        self._input = _Input()

    # -- what callers may ask

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return len(self._input)

    @property
    def sending_body(self) -> bool:
        """The server took the request: the client is sending body bytes (or batch items)."""
        return self.state is ClientState.SENDING or self.state is ClientState.BATCH_SENDING

    @property
    def receiving_body(self) -> bool:
        """A download's bytes are coming."""
        return self.state is ClientState.RECEIVING

    @property
    def awaiting_reply(self) -> bool:
        """Everything is sent; the server's answer (``OFFSET``, ``STORED``, ``DATA`` ...) is due."""
        return self.state in _AWAITING

    @property
    def closed(self) -> bool:
        """A final reply or an error arrived: nothing more happens on this connection."""
        return self.state is ClientState.CLOSED

    # -- events out

    def send(self, event: UploadRequest | DownloadRequest | AbortRequest | BatchRequest | BatchItem | Done) -> bytes:
        """The bytes for ``event``; the state moves on. Raises ``LocalProtocolError`` if it is not
        allowed now (see ``CLIENT_TRANSITIONS``): a second request, ``Done`` early, an item too many.

        One exception to "a request once the last is answered": after a ranged upload's ``Done``, the
        next ranged upload may be sent ahead (``pipelined``); if the reply is ``DURABLE`` the
        connection then awaits its ``RANGES``, and if it is ``STORED`` or an error the server never
        read it (``pipelined`` says which request that was)."""
        kind = type(event)
        if kind is RangedUploadRequest and self.state is ClientState.AWAIT_STORED and self.range is not None \
                and self.pipelined is None:
            why = range_error(event.size, event.start, event.end)
            if why:
                raise ValueError(why)
            self.pipelined = event
            return _line(f"{VERSION} PUTR {event.session_key} {event.file_key} {event.size} {event.start} "
                         f"{event.end}")
        next_state = _next_state(CLIENT_TRANSITIONS, self.state, kind)
        data = self._WRITERS[kind](self, event)
        self.state = next_state
        return data

    def _write_upload(self, event: UploadRequest) -> bytes:
        if event.legacy:
            raise ValueError("the client core speaks the versioned dialect; see legacy_header()")
        self.size, self.range = event.size, None
        return _line(f"{VERSION} PUT {event.session_key} {event.file_key} {event.size}")

    def _write_ranged_upload(self, event: RangedUploadRequest) -> bytes:
        why = range_error(event.size, event.start, event.end)
        if why:
            raise ValueError(why)
        self.size, self.range = event.size, (event.start, event.end)
        return _line(f"{VERSION} PUTR {event.session_key} {event.file_key} {event.size} {event.start} {event.end}")

    def _write_download(self, event: DownloadRequest) -> bytes:
        self.offset = event.offset
        return _line(f"{VERSION} GET {event.session_key} {event.file_key} {event.offset}")

    def _write_abort(self, event: AbortRequest) -> bytes:
        return _line(f"{VERSION} ABORT {event.session_key} {event.file_key}")

    def _write_batch(self, event: BatchRequest) -> bytes:
        self.items_left = event.count
        return _line(f"{VERSION} BATCH {event.session_key} {event.count}")

    def _write_item(self, event: BatchItem) -> bytes:
        if not self.items_left:
            raise LocalProtocolError("a batch item past the batch's count")
        self.items_left -= 1
        return _line(f"{event.file_key} {event.size} {event.digest}")

    def _write_done(self, event: Done) -> bytes:
        if self.state is ClientState.BATCH_SENDING:
            if self.items_left:
                raise LocalProtocolError(f"DONE with {self.items_left} batch items not sent")
            return _line("DONE")
        return _line("DONE" if event.digest is None else f"DONE {event.digest}")

    _WRITERS = {
        UploadRequest: _write_upload,
        RangedUploadRequest: _write_ranged_upload,
        DownloadRequest: _write_download,
        AbortRequest: _write_abort,
        BatchRequest: _write_batch,
        BatchItem: _write_item,
        Done: _write_done,
    }

    # -- events in

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` when it closed."""
        self._input.feed(data)

    def next_event(self) -> ClientEvent | Sentinel:
        """The next reply or body event, or ``NEED_DATA``."""
        if self.state is ClientState.RECEIVING:
            return self._body_event()
        if self.state in _NOT_WAITING:
            if self._input.eof and not len(self._input):
                return EndOfStream()
            if len(self._input) and self.state is not ClientState.CLOSED:
                return self._line_event()  # an early ERR while we send
            return NEED_DATA
        return self._line_event()

    def _advance(self, event: ClientEvent) -> ClientEvent:
        self.state = CLIENT_TRANSITIONS[(self.state, type(event))]
        return event

    def _line_event(self) -> ClientEvent | Sentinel:
        line = self._input.take_line(self.max_line)
        if isinstance(line, ProtocolError):
            return self._advance(ServerError(ErrorCode.MALFORMED_HEADER.value, "server reply line too long"))
        if line is None:
            return EndOfStream() if self._input.eof else NEED_DATA
        text = _decode(line) or ""
        if m := re.fullmatch(_ERR_RE, text):
            return self._advance(ServerError(m[1], m[2] or ""))
        event = self._parse_reply(text)
        if event is None or (self.state, type(event)) not in CLIENT_TRANSITIONS:
            return self._advance(ServerError(ErrorCode.MALFORMED_HEADER.value, f"unexpected reply {text[:80]!r}"))
        if type(event) is RangeStored and self.pipelined is not None:  # the request sent ahead is read now
            nxt, self.pipelined = self.pipelined, None
            self.size, self.range, self.state = nxt.size, (nxt.start, nxt.end), ClientState.AWAIT_OFFSET
            return event
        if type(event) is Offset or type(event) is RangeOffset:
            self.offset = event.offset
        elif type(event) is DownloadStart:
            self.size = event.size
            self.body_expected = event.size - event.offset
        return self._advance(event)

    def _parse_reply(self, text: str) -> ClientEvent | None:
        """The reply ``text`` says, if it is well formed and fits the request; None otherwise."""
        if m := re.fullmatch(_OFFSET_RE, text):
            offset = int(m[1])
            return Offset(offset) if offset <= self.size and self.range is None else None
        if m := re.fullmatch(_RANGES_RE, text):
            offset, durable = int(m[1]), parse_ranges(m[2])
            if self.range is None or durable is None or not self.range[0] <= offset <= self.range[1] \
                    or (durable and durable[-1][1] > self.size):
                return None
            return RangeOffset(offset, durable)
        if m := re.fullmatch(_DURABLE_RE, text):
            return RangeStored(int(m[1]), int(m[2])) if self.range == (int(m[1]), int(m[2])) else None
        if m := re.fullmatch(_STORED_RE, text):
            return Stored(int(m[1]), int(m[2], 16), m[3])
        if m := re.fullmatch(_DATA_RE, text):
            size, offset = int(m[1]), int(m[2])
            if offset != self.offset or offset > size:
                return None
            return DownloadStart(size, offset, int(m[3], 16), m[4])
        if m := re.fullmatch(_ITEM_STORED_RE, text):
            return ItemStored(m[1], int(m[2]), int(m[3], 16), m[4])
        if m := re.fullmatch(_ITEM_FAILED_RE, text):
            return ItemFailed(m[1], m[2], m[3] or "")
        if m := re.fullmatch(_END_RE, text):
            return BatchEnd(int(m[1]))
        if text == "ABORTED":
            return Aborted()
        return None

    def _body_event(self) -> ClientEvent | Sentinel:
        remaining = self.body_expected - self.body_received
        if remaining == 0:
            return self._advance(BodyComplete())
        if len(self._input) == 0:
            return EndOfStream() if self._input.eof else NEED_DATA
        data = self._input.take_some(remaining)
        self.body_received += len(data)
        return Data(data)


_NOT_WAITING = frozenset({ClientState.IDLE, ClientState.SENDING, ClientState.BATCH_SENDING, ClientState.CLOSED})
_AWAITING = frozenset({ClientState.AWAIT_OFFSET, ClientState.AWAIT_STORED, ClientState.AWAIT_DATA,
                       ClientState.AWAIT_ABORTED, ClientState.AWAIT_BATCH})


def legacy_header(session_key: str, file_key: str, size: int) -> bytes:
    """The 2007 dialect's only line."""
    return _line(f"{session_key} {file_key} {size}")
