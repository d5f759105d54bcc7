"""The data-port protocol, sans-IO: bytes in, events out, bytes to send returned.

Nothing here touches a socket, a file or a reactor. ``ServerConnection`` is one
connection seen from the server, ``ClientConnection`` the same seen from a client.
Feed received bytes with ``receive_data(data)`` (``b""`` means the peer closed) and
pull events with ``next_event()`` until it returns ``NEED_DATA`` (or ``PAUSED`` while
the server is deciding on a request). Methods that answer return the bytes to send;
the caller decides when to write them.

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
from dataclasses import dataclass

from filedock.errors import ErrorCode, FiledockError

MAX_LINE = 4096
"""Longest header or reply line, newline included."""

MAX_SIZE = 2**63 - 1
"""Largest size or offset the protocol can carry."""

VERSION = "FILEDOCK/1"

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_NUM = r"(?:0|[1-9][0-9]{0,18})"
_HEX = r"[0-9a-f]"
_LEGACY_RE = re.compile(rf"({_UUID}) ({_UUID}) ({_NUM})")
_PUT_RE = re.compile(rf"PUT ({_UUID}) ({_UUID}) ({_NUM})")
_GET_RE = re.compile(rf"GET ({_UUID}) ({_UUID}) ({_NUM})")
_ABORT_RE = re.compile(rf"ABORT ({_UUID}) ({_UUID})")
_BATCH_RE = re.compile(rf"BATCH ({_UUID}) ({_NUM})")
_ITEM_RE = re.compile(rf"({_UUID}) ({_NUM}) ({_HEX}{{64}})")
_ITEM_STORED_RE = re.compile(rf"STORED ({_UUID}) ({_NUM}) ({_HEX}{{8}}) ({_HEX}{{64}})")
_ITEM_FAILED_RE = re.compile(rf"FAILED ({_UUID}) ([a-z][a-z0-9-]{{0,63}})(?: (.*))?")
_END_RE = re.compile(rf"END ({_NUM})")
_DONE_RE = re.compile(rf"DONE(?: ({_HEX}{{64}}))?")
_OFFSET_RE = re.compile(rf"OFFSET ({_NUM})")
_STORED_RE = re.compile(rf"STORED ({_NUM}) ({_HEX}{{8}}) ({_HEX}{{64}})")
_DATA_RE = re.compile(rf"DATA ({_NUM}) ({_NUM}) ({_HEX}{{8}}) ({_HEX}{{64}})")
_ERR_RE = re.compile(r"ERR ([a-z][a-z0-9-]{0,63})(?: (.*))?")


class Sentinel(enum.Enum):
    """Answers from ``next_event`` that are not events."""

    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class UploadRequest:
    """A client asks to upload ``size`` bytes of file ``file_key`` under ``session_key``.

    ``legacy`` is true for the 2007 dialect, which always sends from byte 0 and
    expects no reply.
    """

    session_key: str
    file_key: str
    size: int
    legacy: bool = False


@dataclass(frozen=True)
class DownloadRequest:
    """A client asks for a complete file from ``offset`` on."""

    session_key: str
    file_key: str
    offset: int


@dataclass(frozen=True)
class AbortRequest:
    """A client gives up an upload: the server deletes the partial."""

    session_key: str
    file_key: str


@dataclass(frozen=True)
class BatchRequest:
    """Many small whole files on one connection: ``count`` items follow, then ``DONE``."""

    session_key: str
    count: int


@dataclass(frozen=True)
class BatchItem:
    """One file of a batch: ``size`` body bytes follow; ``digest`` is the client's."""

    file_key: str
    size: int
    digest: str


@dataclass(frozen=True)
class ItemStored:
    """Batch reply: this file is durable (or was complete already, with these values)."""

    file_key: str
    size: int
    crc32: int
    digest: str


@dataclass(frozen=True)
class ItemFailed:
    """Batch reply: this file was not stored; the others are unaffected."""

    file_key: str
    code: str
    message: str


@dataclass(frozen=True)
class BatchEnd:
    """Batch reply: every item has its line; ``count`` of them."""

    count: int


@dataclass(frozen=True)
class Data:
    """Body bytes, in order. ``data`` may be a memoryview into the received chunk."""

    data: bytes | memoryview


@dataclass(frozen=True)
class BodyComplete:
    """Every announced body byte has arrived (upload: at the server; download: at the client)."""


@dataclass(frozen=True)
class Done:
    """Versioned upload trailer: the client has sent everything; ``digest`` is its own, if given."""

    digest: str | None


@dataclass(frozen=True)
class EndOfStream:
    """The peer closed its side. Whether that completes anything depends on the state."""


@dataclass(frozen=True)
class ProtocolError:
    """The peer broke the protocol. For a server: reply ``error_line`` and close."""

    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Offset:
    """Server reply to PUT: it holds ``offset`` bytes durably; send the rest."""

    offset: int


@dataclass(frozen=True)
class Stored:
    """Server reply to DONE: the file is durable (fsync'd, renamed, recorded)."""

    size: int
    crc32: int
    digest: str


@dataclass(frozen=True)
class DownloadStart:
    """Server reply to GET: ``size - offset`` bytes follow."""

    size: int
    offset: int
    crc32: int
    digest: str


@dataclass(frozen=True)
class Aborted:
    """Server reply to ABORT: the partial is gone."""


@dataclass(frozen=True)
class ServerError:
    """The server refused or failed; it closes the connection after this line."""

    code: str
    message: str

    def exception(self) -> FiledockError:
        """This error as an exception to raise or errback with."""
        return FiledockError(self.code, self.message)


ServerEvent = (
    UploadRequest | DownloadRequest | AbortRequest | BatchRequest | BatchItem | Data | BodyComplete | Done
    | EndOfStream | ProtocolError
)
ClientEvent = (
    Offset | Stored | DownloadStart | Aborted | ItemStored | ItemFailed | BatchEnd | ServerError | Data
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


def format_crc(crc32: int) -> str:
    """CRC-32 as it appears on the wire and in JSON: 8 lowercase hex digits."""
    return f"{crc32 & 0xFFFFFFFF:08x}"


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


# ---------------------------------------------------------------- server side


class ServerState(enum.Enum):
    """Where a server connection stands. Every transition is in ``ServerConnection``."""

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


class ServerConnection:
    """One data-port connection, server side.

    The adapter calls ``accept_upload``/``accept_download``/``accept_abort`` or
    ``refuse`` after a request event, and ``stored`` or ``refuse`` after ``Done``.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.state = ServerState.REQUEST
        self.max_line = max_line
        self.request: UploadRequest | DownloadRequest | AbortRequest | BatchRequest | None = None
        self.body_expected = 0
        self.body_received = 0
        self.items_left = 0
        self._input = _Input()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when it closed its side."""
        self._input.feed(data)

    @property
    def peer_closed(self) -> bool:
        """True once ``receive_data(b"")`` was called."""
        return self._input.eof

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
                return self._fail(ErrorCode.EXCESS_DATA, "bytes after the announced size")
            return self._eof_or_need()
        if state is ServerState.SENDING:
            if len(self._input):  # a download client has nothing to say; drop it
                self._input.take(len(self._input))
            return self._eof_or_need()
        return NEED_DATA  # CLOSED

    # -- decisions

    def accept_upload(self, offset: int) -> bytes:
        """Accept the pending upload from ``offset``; returns the reply (b"" for 2007)."""
        req = self._pending(UploadRequest)
        if req.legacy and offset != 0:
            raise ValueError("a 2007-dialect upload always starts at 0")
        if not 0 <= offset <= req.size:
            raise ValueError("offset outside the file")
        self.body_expected = req.size - offset
        self.state = ServerState.BODY
        return b"" if req.legacy else _line(f"OFFSET {offset}")

    def accept_batch(self) -> bytes:
        """Accept the pending batch; the items stream in with no reply until ``batch_results``."""
        req = self._pending(BatchRequest)
        self.items_left = req.count
        self.state = ServerState.BATCH_ITEM
        return b""

    def batch_results(self, lines: list[ItemStored | ItemFailed]) -> bytes:
        """The final reply of a batch: one line per item, then ``END <count>``."""
        if self.state is not ServerState.FINISHING or not isinstance(self.request, BatchRequest):
            raise RuntimeError(f"batch_results() in state {self.state.value}")
        self.state = ServerState.CLOSED
        out = [_line(f"STORED {r.file_key} {r.size} {format_crc(r.crc32)} {r.digest}")
               if isinstance(r, ItemStored) else format_error(r.code, r.message).replace(
                   b"ERR ", f"FAILED {r.file_key} ".encode(), 1) for r in lines]
        return b"".join(out) + _line(f"END {len(lines)}")

    def accept_download(self, size: int, crc32: int, digest: str) -> bytes:
        """Accept the pending download; the caller then writes ``size - offset`` bytes."""
        req = self._pending(DownloadRequest)
        self.state = ServerState.SENDING
        return _line(f"DATA {size} {req.offset} {format_crc(crc32)} {digest}")

    def accept_abort(self) -> bytes:
        """Confirm the pending abort."""
        self._pending(AbortRequest)
        self.state = ServerState.CLOSED
        return _line("ABORTED")

    def stored(self, size: int, crc32: int, digest: str) -> bytes:
        """The file is durable: the final reply of a versioned upload."""
        if self.state is not ServerState.FINISHING:
            raise RuntimeError(f"stored() in state {self.state.value}")
        self.state = ServerState.CLOSED
        return _line(f"STORED {size} {format_crc(crc32)} {digest}")

    def refuse(self, code: ErrorCode, message: str) -> bytes:
        """End the connection with an error; returns b"" for a 2007 client, which reads nothing."""
        self.state = ServerState.CLOSED
        if isinstance(self.request, UploadRequest) and self.request.legacy:
            return b""
        return format_error(code, message)

    # -- internals

    def _pending(self, kind: type) -> UploadRequest | DownloadRequest | AbortRequest | BatchRequest:
        if self.state is not ServerState.DECIDING or not isinstance(self.request, kind):
            raise RuntimeError(f"no pending {kind.__name__} (state {self.state.value})")
        return self.request

    def _fail(self, code: ErrorCode, message: str) -> ProtocolError:
        self.state = ServerState.CLOSED
        return ProtocolError(code, message)

    def _eof_or_need(self) -> EndOfStream | Sentinel:
        if self._input.eof:
            return EndOfStream()
        return NEED_DATA

    def _line_event(self, parse) -> ServerEvent | Sentinel:
        line = self._input.take_line(self.max_line)
        if isinstance(line, ProtocolError):
            self.state = ServerState.CLOSED
            return line
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
            m = _LEGACY_RE.fullmatch(text)
            event = m and UploadRequest(m[1].lower(), m[2].lower(), int(m[3]), legacy=True)
        if event is None:
            return self._fail(ErrorCode.MALFORMED_HEADER, "expected '<session-uuid> <file-uuid> <size>'"
                              " or 'FILEDOCK/1 PUT|GET|ABORT ...'")
        if getattr(event, "size", 0) > MAX_SIZE or getattr(event, "offset", 0) > MAX_SIZE:
            return self._fail(ErrorCode.MALFORMED_HEADER, "size out of range")
        self.request = event
        self.state = ServerState.DECIDING
        return event

    @staticmethod
    def _parse_versioned(rest: str) -> ServerEvent | None:
        if m := _PUT_RE.fullmatch(rest):
            return UploadRequest(m[1].lower(), m[2].lower(), int(m[3]))
        if m := _GET_RE.fullmatch(rest):
            return DownloadRequest(m[1].lower(), m[2].lower(), int(m[3]))
        if m := _ABORT_RE.fullmatch(rest):
            return AbortRequest(m[1].lower(), m[2].lower())
        if m := _BATCH_RE.fullmatch(rest):
            return BatchRequest(m[1].lower(), int(m[2]))
        return None

    def _parse_item(self, line: bytes) -> ServerEvent:
        text = _decode(line)
        if self.items_left == 0:
            if text == "DONE":
                self.state = ServerState.FINISHING
                return Done(None)
            return self._fail(ErrorCode.MALFORMED_HEADER, "expected 'DONE' after the last item of the batch")
        m = _ITEM_RE.fullmatch(text) if text is not None else None
        if m is None or int(m[2]) > MAX_SIZE:
            return self._fail(ErrorCode.MALFORMED_HEADER, "expected '<file-key> <size> <digest>' for a batch item")
        self.items_left -= 1
        self.body_expected, self.body_received = int(m[2]), 0
        self.state = ServerState.BATCH_BODY
        return BatchItem(m[1].lower(), int(m[2]), m[3])

    def _body_event(self) -> ServerEvent | Sentinel:
        remaining = self.body_expected - self.body_received
        if remaining == 0:
            legacy = isinstance(self.request, UploadRequest) and self.request.legacy
            if self.state is ServerState.BATCH_BODY:
                self.state = ServerState.BATCH_ITEM
            else:
                self.state = ServerState.LEGACY_END if legacy else ServerState.TRAILER
            return BodyComplete()
        if len(self._input) == 0:
            return self._eof_or_need()
        data = self._input.take_some(remaining)
        self.body_received += len(data)
        return Data(data)

    def _parse_trailer(self, line: bytes) -> ServerEvent:
        text = _decode(line)
        m = _DONE_RE.fullmatch(text) if text is not None else None
        if m is None:
            return self._fail(ErrorCode.MALFORMED_HEADER, "expected 'DONE [<digest>]' after the body")
        self.state = ServerState.FINISHING
        return Done(m[1])


# ---------------------------------------------------------------- client side


class ClientState(enum.Enum):
    """Where a client connection stands."""

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


class ClientConnection:
    """One data-port connection in the versioned dialect, client side."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.state = ClientState.IDLE
        self.max_line = max_line
        self.size = 0
        self.offset = 0
        self.body_expected = 0
        self.body_received = 0
        self.items_left = 0
        self._input = _Input()

    # -- requests

    def upload(self, session_key: str, file_key: str, size: int) -> bytes:
        """The PUT line. Then wait for ``Offset``."""
        self._start(ClientState.AWAIT_OFFSET)
        self.size = size
        return _line(f"{VERSION} PUT {session_key} {file_key} {size}")

    def done(self, digest: str | None = None) -> bytes:
        """The trailer after the body (or after a batch's last item): ask for durability."""
        if self.state is ClientState.BATCH_SENDING:
            if self.items_left:
                raise RuntimeError(f"done() with {self.items_left} batch items not sent")
            self.state = ClientState.AWAIT_BATCH
            return _line("DONE")
        if self.state is not ClientState.SENDING:
            raise RuntimeError(f"done() in state {self.state.value}")
        self.state = ClientState.AWAIT_STORED
        return _line("DONE" if digest is None else f"DONE {digest}")

    def batch(self, session_key: str, count: int) -> bytes:
        """The BATCH line; then ``batch_item`` and the bytes for each of ``count`` files, then ``done``."""
        self._start(ClientState.BATCH_SENDING)
        self.items_left = count
        return _line(f"{VERSION} BATCH {session_key} {count}")

    def batch_item(self, file_key: str, size: int, digest: str) -> bytes:
        """One batch item's line; exactly ``size`` bytes of the file must follow it."""
        if self.state is not ClientState.BATCH_SENDING or not self.items_left:
            raise RuntimeError("batch_item() outside a batch, or past its count")
        self.items_left -= 1
        return _line(f"{file_key} {size} {digest}")

    def download(self, session_key: str, file_key: str, offset: int = 0) -> bytes:
        """The GET line. Then wait for ``DownloadStart`` and ``Data``."""
        self._start(ClientState.AWAIT_DATA)
        self.offset = offset
        return _line(f"{VERSION} GET {session_key} {file_key} {offset}")

    def abort(self, session_key: str, file_key: str) -> bytes:
        """The ABORT line. Then wait for ``Aborted``."""
        self._start(ClientState.AWAIT_ABORTED)
        return _line(f"{VERSION} ABORT {session_key} {file_key}")

    def _start(self, state: ClientState) -> None:
        if self.state is not ClientState.IDLE:
            raise RuntimeError("one request per connection")
        self.state = state

    # -- replies

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` when it closed."""
        self._input.feed(data)

    def next_event(self) -> ClientEvent | Sentinel:
        """The next reply or body event, or ``NEED_DATA``."""
        if self.state is ClientState.RECEIVING:
            return self._body_event()
        if self.state in (ClientState.IDLE, ClientState.SENDING, ClientState.BATCH_SENDING, ClientState.CLOSED):
            if self._input.eof and not len(self._input):
                return EndOfStream()
            if len(self._input) and self.state is not ClientState.CLOSED:
                return self._line_event()  # an early ERR while we send
            return NEED_DATA
        return self._line_event()

    def _line_event(self) -> ClientEvent | Sentinel:
        line = self._input.take_line(self.max_line)
        if isinstance(line, ProtocolError):
            self.state = ClientState.CLOSED
            return ServerError(ErrorCode.MALFORMED_HEADER.value, "server reply line too long")
        if line is None:
            return EndOfStream() if self._input.eof else NEED_DATA
        text = _decode(line) or ""
        if m := _ERR_RE.fullmatch(text):
            self.state = ClientState.CLOSED
            return ServerError(m[1], m[2] or "")
        event = self._parse_reply(text)
        if event is None:
            self.state = ClientState.CLOSED
            return ServerError(ErrorCode.MALFORMED_HEADER.value, f"unexpected reply {text[:80]!r}")
        return event

    def _parse_reply(self, text: str) -> ClientEvent | None:
        state = self.state
        if state is ClientState.AWAIT_OFFSET and (m := _OFFSET_RE.fullmatch(text)):
            offset = int(m[1])
            if offset > self.size:
                return None
            self.offset = offset
            self.state = ClientState.SENDING
            return Offset(offset)
        if state is ClientState.AWAIT_STORED and (m := _STORED_RE.fullmatch(text)):
            self.state = ClientState.CLOSED
            return Stored(int(m[1]), int(m[2], 16), m[3])
        if state is ClientState.AWAIT_DATA and (m := _DATA_RE.fullmatch(text)):
            size, offset = int(m[1]), int(m[2])
            if offset != self.offset or offset > size:
                return None
            self.size = size
            self.body_expected = size - offset
            self.state = ClientState.RECEIVING
            return DownloadStart(size, offset, int(m[3], 16), m[4])
        if state is ClientState.AWAIT_BATCH:
            if m := _ITEM_STORED_RE.fullmatch(text):
                return ItemStored(m[1], int(m[2]), int(m[3], 16), m[4])
            if m := _ITEM_FAILED_RE.fullmatch(text):
                return ItemFailed(m[1], m[2], m[3] or "")
            if m := _END_RE.fullmatch(text):
                self.state = ClientState.CLOSED
                return BatchEnd(int(m[1]))
        if state is ClientState.AWAIT_ABORTED and text == "ABORTED":
            self.state = ClientState.CLOSED
            return Aborted()
        return None

    def _body_event(self) -> ClientEvent | Sentinel:
        remaining = self.body_expected - self.body_received
        if remaining == 0:
            self.state = ClientState.CLOSED
            return BodyComplete()
        if len(self._input) == 0:
            return EndOfStream() if self._input.eof else NEED_DATA
        data = self._input.take_some(remaining)
        self.body_received += len(data)
        return Data(data)


def legacy_header(session_key: str, file_key: str, size: int) -> bytes:
    """The 2007 dialect's only line."""
    return _line(f"{session_key} {file_key} {size}")
