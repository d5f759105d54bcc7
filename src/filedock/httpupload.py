"""The HTTP upload protocols, sans-IO: tus 1.0.0 and the IETF draft "Resumable Uploads for HTTP".

Like ``wire.py`` this module has no I/O and no Twisted. ``parse_request`` takes a
request's method, path and headers and returns one request event (``Options``,
``Create``, ``Probe``, ``Append``, ``Terminate``) or raises ``HttpUploadError``
carrying the status, the stable filedock error code and the headers the protocol
wants; the ``*_response`` functions say what a success looks like. The Twisted
front end (``server/http_upload``) decides what the bytes mean for the file and
asks this module how to say it.

The protocols are told apart by their headers, as tusd does: ``Tus-Resumable``
means tus 1.0.0; ``Upload-Draft-Interop-Version`` (6 or 8) means the IETF draft.
Interop version 6 is drafts -04/-05 (``Upload-Complete``; ``Upload-Incomplete``
belonged to interop versions 3 and 4 and is not accepted).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import enum
import hashlib
import re
import zlib
from dataclasses import dataclass, field
from typing import Mapping

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = ("creation", "creation-with-upload", "creation-defer-length", "termination", "expiration",
                  "checksum", "concatenation")
MAX_PARTS = 1000
"""Most parts one final upload may be made of (``Upload-Concat: final;...``)."""
CHECKSUM_ALGORITHMS = ("sha1", "sha256", "md5", "crc32")
DRAFT_VERSIONS = (6, 8)
TUS_CONTENT_TYPE = "application/offset+octet-stream"
DRAFT_CONTENT_TYPE = "application/partial-upload"
PATH_PREFIX = "/files/"
MAX_METADATA = 4096
"""Longest ``Upload-Metadata`` header accepted, in characters."""

DIGEST_HEADER = "Filedock-Digest"
"""Response header with the file's ``blake3-4m`` digest once it is complete."""
STATE_HEADER = "Filedock-Upload-State"
"""Response header of HEAD: ``partial``, ``finishing`` or ``complete``."""
ERROR_HEADER = "Filedock-Error"
"""Response header of every refusal: the stable filedock error code."""

REQUEST_HEADERS = (
    "Authorization", "Content-Type", "Content-Digest", "Repr-Digest", "Tus-Resumable", "Upload-Checksum",
    "Upload-Complete", "Upload-Concat", "Upload-Defer-Length", "Upload-Draft-Interop-Version", "Upload-Length",
    "Upload-Metadata", "Upload-Offset", "X-HTTP-Method-Override", "X-Requested-With",
)
"""Headers a browser may send (CORS ``Access-Control-Allow-Headers``)."""

EXPOSED_HEADERS = (
    "Location", "Upload-Offset", "Upload-Length", "Upload-Complete", "Upload-Limit", "Upload-Expires",
    "Upload-Metadata", "Upload-Draft-Interop-Version", "Tus-Resumable", "Tus-Version", "Tus-Extension",
    "Tus-Max-Size", "Tus-Checksum-Algorithm", "Upload-Concat", "Upload-Defer-Length", "Repr-Digest", DIGEST_HEADER, STATE_HEADER, ERROR_HEADER,
)
"""Response headers a browser page may read (CORS ``Access-Control-Expose-Headers``)."""

ALLOWED_METHODS = ("POST", "HEAD", "PATCH", "DELETE", "OPTIONS")


class Dialect(enum.Enum):
    """Which protocol a request speaks."""

    TUS = "tus"
    DRAFT = "draft"


class HttpUploadError(Exception):
    """A refusal: the HTTP ``status``, filedock's error ``code``, a message and extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


def _bad(message: str, code: str = "bad-request") -> HttpUploadError:
    return HttpUploadError(400, code, message)


# ------------------------------------------------------------ request events


@dataclass(frozen=True)
class Speaker:
    """Who speaks: the dialect and, for the draft, its interop version."""

    dialect: Dialect
    version: int = 0


@dataclass(frozen=True)
class Checksum:
    """A digest the client sent for the bytes of one request (``Upload-Checksum`` / ``Content-Digest``)."""

    algorithm: str  # one of CHECKSUM_ALGORITHMS
    digest: bytes

    def hasher(self) -> "ChunkHasher":
        """A fresh hasher for this algorithm."""
        return ChunkHasher(self.algorithm)


@dataclass(frozen=True)
class Options:
    """OPTIONS: what the server supports."""

    speaker: Speaker


@dataclass(frozen=True)
class Create:
    """POST (or a draft PUT): create an upload, maybe with its first bytes in the body."""

    speaker: Speaker
    length: int | None  # None: deferred (tus) or not known yet (draft)
    metadata: dict[str, str | None] = field(default_factory=dict)
    has_body: bool = False
    complete: bool | None = None  # the draft's Upload-Complete
    checksum: Checksum | None = None
    repr_digest: Checksum | None = None
    partial: bool = False  # tus concatenation: Upload-Concat: partial (a hidden part)
    final: tuple[str, ...] | None = None  # tus concatenation: the keys of the parts, in order
    deferred: bool = False  # tus creation-defer-length: the length comes with a later PATCH


@dataclass(frozen=True)
class Probe:
    """HEAD: how far is the upload?"""

    speaker: Speaker
    key: str


@dataclass(frozen=True)
class Append:
    """PATCH: bytes from ``offset``."""

    speaker: Speaker
    key: str
    offset: int
    complete: bool | None = None  # the draft's Upload-Complete
    length: int | None = None  # Upload-Length sent with the append
    checksum: Checksum | None = None
    repr_digest: Checksum | None = None


@dataclass(frozen=True)
class Terminate:
    """DELETE: the client gives the upload up."""

    speaker: Speaker
    key: str


# ------------------------------------------------------------ parsing


def is_upload_path(path: str) -> bool:
    """True for ``/files/`` and the paths below it."""
    return path == PATH_PREFIX[:-1] or path.startswith(PATH_PREFIX)


def _key_of(path: str) -> str:
    key = path[len(PATH_PREFIX):] if path.startswith(PATH_PREFIX) else ""
    if not key or "/" in key or len(key) > 64 or not re.fullmatch(r"[0-9A-Za-z-]+", key):
        raise HttpUploadError(404, "not-found", "no such upload")
    return key.lower()


def speaker_of(headers: Mapping[str, str]) -> Speaker | None:
    """The dialect the headers speak, or None if they name none; raises 412 for a version not served."""
    draft = headers.get("upload-draft-interop-version")
    if draft is not None:
        try:
            version = int(draft.strip())
        except ValueError:
            version = -1
        if version not in DRAFT_VERSIONS:
            raise HttpUploadError(412, "unsupported-version",
                                  f"Upload-Draft-Interop-Version {draft.strip()[:20]!r} is not served; "
                                  f"this server speaks {', '.join(map(str, DRAFT_VERSIONS))}",
                                  {"Tus-Version": TUS_VERSION})
        return Speaker(Dialect.DRAFT, version)
    tus = headers.get("tus-resumable")
    if tus is not None:
        if tus.strip() != TUS_VERSION:
            raise HttpUploadError(412, "unsupported-version", f"Tus-Resumable {tus.strip()[:20]!r} is not served",
                                  {"Tus-Version": TUS_VERSION})
        return Speaker(Dialect.TUS)
    if "upload-complete" in headers:  # a draft client that sent no version: the latest
        return Speaker(Dialect.DRAFT, DRAFT_VERSIONS[-1])
    return None


def parse_int(value: str | None, name: str) -> int | None:
    """A non-negative decimal header value (at most 19 digits), or None if absent."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or not value.isascii() or len(value) > 19:
        raise _bad(f"{name} must be a non-negative integer")
    return int(value)


def parse_boolean(value: str | None, name: str) -> bool | None:
    """A structured-field boolean (``?0``/``?1``), or None if absent."""
    if value is None:
        return None
    value = value.strip()
    if value not in ("?0", "?1"):
        raise _bad(f"{name} must be ?0 or ?1")
    return value == "?1"


def parse_metadata(value: str | None) -> dict[str, str | None]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value may be absent).

    Values are UTF-8 text; a key twice, a key with spaces or bad base64 is a 400.
    """
    if value is None or not value.strip():
        return {}
    if len(value) > MAX_METADATA:
        raise _bad(f"Upload-Metadata may be at most {MAX_METADATA} characters")
    pairs: dict[str, str | None] = {}
    for item in value.split(","):
        key, sep, encoded = item.lstrip().partition(" ")
        encoded = encoded.strip()
        if not key or not re.fullmatch(r"[!-~]+", key) or " " in encoded:
            raise _bad("Upload-Metadata is 'key base64value' pairs separated by commas")
        if key in pairs:
            raise _bad(f"Upload-Metadata names {key[:40]!r} twice")
        if not sep:  # a key alone: present, without a value ("key " is an empty value)
            pairs[key] = None
            continue
        try:
            pairs[key] = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise _bad(f"Upload-Metadata: the value of {key[:40]!r} is not base64 of UTF-8 text") from None
    return pairs


def format_metadata(pairs: Mapping[str, str | None]) -> str:
    """The inverse of ``parse_metadata``."""
    return ",".join(k if v is None else f"{k} {base64.b64encode(v.encode('utf-8')).decode('ascii')}"
                    for k, v in pairs.items())


def parse_checksum(value: str | None) -> Checksum | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``; an unknown algorithm or a malformed digest is a 400."""
    if value is None:
        return None
    parts = value.strip().split(" ")
    if len(parts) != 2:
        raise _bad("Upload-Checksum is '<algorithm> <base64 digest>'")
    algorithm = parts[0].lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise _bad(f"checksum algorithm {parts[0][:20]!r} is not supported; use one of "
                   f"{', '.join(CHECKSUM_ALGORITHMS)}", "unsupported-checksum")
    return Checksum(algorithm, _digest_bytes(parts[1], algorithm, "Upload-Checksum"))


_DIGEST_NAMES = {"sha-256": "sha256", "sha": "sha1", "md5": "md5", "crc32": "crc32"}
_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "md5": 16, "crc32": 4}


def _digest_bytes(text: str, algorithm: str, header: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{header}: the digest is not base64") from None
    if len(raw) != _DIGEST_SIZES[algorithm]:
        raise _bad(f"{header}: a {algorithm} digest is {_DIGEST_SIZES[algorithm]} bytes, not {len(raw)}")
    return raw


def parse_digest_field(value: str | None, header: str) -> Checksum | None:
    """RFC 9530 ``Content-Digest``/``Repr-Digest`` (``sha-256=:<base64>:``, a dictionary): the strongest
    algorithm served (sha-256 first), or None if the header is absent or names none served."""
    if value is None:
        return None
    found: dict[str, bytes] = {}
    for member in value.split(","):
        name, sep, rest = member.strip().partition("=")
        name = name.strip().lower()
        rest = rest.strip().split(";", 1)[0]
        if not sep or len(rest) < 2 or rest[0] != ":" or rest[-1] != ":":
            raise _bad(f"{header} is a dictionary of byte sequences, e.g. sha-256=:<base64>:")
        algorithm = _DIGEST_NAMES.get(name)
        if algorithm is not None:
            found[algorithm] = _digest_bytes(rest[1:-1], algorithm, header)
    for algorithm in ("sha256", "sha1", "md5", "crc32"):
        if algorithm in found:
            return Checksum(algorithm, found[algorithm])
    return None


def parse_concat(value: str | None) -> tuple[bool, tuple[str, ...] | None]:
    """tus ``Upload-Concat``: ``partial`` -> (True, None); ``final;<url> <url> ...`` -> (False, the parts'
    keys in order); absent -> (False, None). Each URL is an upload's (absolute or a path under ``/files/``)."""
    if value is None:
        return False, None
    value = value.strip()
    if value == "partial":
        return True, None
    kind, sep, urls = value.partition(";")
    if kind.strip() != "final" or not sep:
        raise _bad("Upload-Concat is 'partial' or 'final;<url> <url> ...'")
    keys = []
    for url in urls.split():
        path = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*", "", url).split("?", 1)[0]
        try:
            keys.append(_key_of(path))
        except HttpUploadError:
            raise _bad(f"Upload-Concat: {url[:80]!r} is not an upload's URL") from None
    if not keys:
        raise _bad("Upload-Concat: final names no parts")
    if len(keys) > MAX_PARTS:
        raise _bad(f"Upload-Concat: at most {MAX_PARTS} parts")
    if len(set(keys)) != len(keys):
        raise _bad("Upload-Concat: a part is named twice")
    return False, tuple(keys)


def _content_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _has_body(headers: Mapping[str, str]) -> bool:
    length = headers.get("content-length")
    if length is not None and length.strip() not in ("", "0"):
        return True
    return "chunked" in headers.get("transfer-encoding", "").lower()


def _check_body_type(speaker: Speaker, headers: Mapping[str, str], required: bool) -> None:
    """tus: a body is ``application/offset+octet-stream`` (415 otherwise); the draft's appends are
    ``application/partial-upload`` (415), its creation bodies are the representation (any type)."""
    if speaker.dialect is Dialect.TUS:
        if _content_type(headers) != TUS_CONTENT_TYPE:
            raise HttpUploadError(415, "unsupported-media-type", f"send the body as {TUS_CONTENT_TYPE}")
    elif required and _content_type(headers) != DRAFT_CONTENT_TYPE:
        raise HttpUploadError(415, "unsupported-media-type", f"send appends as {DRAFT_CONTENT_TYPE}")


def parse_request(method: str, path: str, headers: Mapping[str, str], max_size: int):
    """One request event from a request's method, path and (lower-case) headers.

    ``max_size`` is the largest upload served (``Tus-Max-Size``). Raises ``HttpUploadError``.
    """
    override = headers.get("x-http-method-override")
    if method == "POST" and override and override.strip().upper() in ("PATCH", "DELETE"):
        method = override.strip().upper()
    if not is_upload_path(path):
        raise HttpUploadError(404, "not-found", "no such upload")
    speaker = speaker_of(headers)
    if method == "OPTIONS":
        return Options(speaker or Speaker(Dialect.TUS))
    if speaker is None:
        raise HttpUploadError(412, "unsupported-version", "send Tus-Resumable: 1.0.0 (tus) or "
                              "Upload-Draft-Interop-Version (the IETF draft)", {"Tus-Version": TUS_VERSION})
    collection = path in (PATH_PREFIX, PATH_PREFIX[:-1])
    if method in ("POST", "PUT") and collection:
        return _parse_create(speaker, headers, max_size, method)
    if collection:
        raise HttpUploadError(405, "method-not-allowed", f"{method[:20]} is not allowed on {PATH_PREFIX}",
                              {"Allow": "POST, OPTIONS"})
    key = _key_of(path)
    if method == "HEAD":
        return Probe(speaker, key)
    if method == "DELETE":
        return Terminate(speaker, key)
    if method == "PATCH":
        return _parse_append(speaker, key, headers, max_size)
    raise HttpUploadError(405, "method-not-allowed", f"{method[:20]} is not allowed on an upload",
                          {"Allow": "HEAD, PATCH, DELETE, OPTIONS"})


def _parse_length(headers: Mapping[str, str], max_size: int) -> int | None:
    length = parse_int(headers.get("upload-length"), "Upload-Length")
    if length is not None and length > max_size:
        raise HttpUploadError(413, "too-large", f"uploads may be at most {max_size} bytes")
    return length


def _parse_create(speaker: Speaker, headers: Mapping[str, str], max_size: int, method: str) -> Create:
    length = _parse_length(headers, max_size)
    metadata = parse_metadata(headers.get("upload-metadata"))
    body = _has_body(headers)
    if speaker.dialect is Dialect.TUS:
        if method != "POST":
            raise HttpUploadError(405, "method-not-allowed", "tus creates uploads with POST", {"Allow": "POST"})
        partial, final = parse_concat(headers.get("upload-concat"))
        if final is not None:
            if body:
                raise _bad("a final upload (Upload-Concat: final) has no body: its bytes are its parts'")
            return Create(speaker, None, metadata, False, None, None, None, False, final)
        deferred = headers.get("upload-defer-length")
        if deferred is not None:
            if deferred.strip() != "1":
                raise _bad("Upload-Defer-Length must be 1")
            if length is not None:
                raise _bad("send Upload-Length or Upload-Defer-Length: 1, not both")
        elif length is None:
            raise _bad("send Upload-Length (or Upload-Defer-Length: 1)")
        if body:
            _check_body_type(speaker, headers, True)
        return Create(speaker, length, metadata, body, None, parse_checksum(headers.get("upload-checksum")),
                      None, partial, None, deferred is not None)
    complete = parse_boolean(headers.get("upload-complete"), "Upload-Complete")
    if complete is None:
        raise _bad("send Upload-Complete: ?0 or ?1")
    if complete and length is None:
        content_length = parse_int(headers.get("content-length"), "Content-Length")
        length = content_length  # the whole representation is in this request
        if length is not None and length > max_size:
            raise HttpUploadError(413, "too-large", f"uploads may be at most {max_size} bytes")
    if length is None:
        raise _bad("send Upload-Length (this server needs the length when the upload is created)")
    return Create(speaker, length, metadata, body, complete,
                  parse_digest_field(headers.get("content-digest"), "Content-Digest"),
                  parse_digest_field(headers.get("repr-digest"), "Repr-Digest"))


def _parse_append(speaker: Speaker, key: str, headers: Mapping[str, str], max_size: int) -> Append:
    offset = parse_int(headers.get("upload-offset"), "Upload-Offset")
    if offset is None:
        raise _bad("send Upload-Offset")
    length = _parse_length(headers, max_size)
    if speaker.dialect is Dialect.TUS:
        _check_body_type(speaker, headers, True)
        return Append(speaker, key, offset, None, length, parse_checksum(headers.get("upload-checksum")))
    complete = parse_boolean(headers.get("upload-complete"), "Upload-Complete")
    if complete is None:
        raise _bad("send Upload-Complete: ?0 or ?1")
    _check_body_type(speaker, headers, True)
    return Append(speaker, key, offset, complete, length,
                  parse_digest_field(headers.get("content-digest"), "Content-Digest"),
                  parse_digest_field(headers.get("repr-digest"), "Repr-Digest"))


# ------------------------------------------------------------ checksums


class ChunkHasher:
    """Incremental hash of one request's bytes in one of ``CHECKSUM_ALGORITHMS``."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._crc = 0
        self._hash = None if algorithm == "crc32" else hashlib.new(algorithm)

    def update(self, data: bytes | memoryview) -> None:
        """Add bytes."""
        if self._hash is None:
            self._crc = zlib.crc32(data, self._crc)
        else:
            self._hash.update(data)

    def digest(self) -> bytes:
        """The digest of everything added (CRC-32: 4 bytes, big-endian)."""
        if self._hash is None:
            return self._crc.to_bytes(4, "big")
        return self._hash.digest()


def checksum_matches(checksum: Checksum, hasher: ChunkHasher) -> bool:
    """True when the bytes hashed are the ones the client's checksum names."""
    return hasher.digest() == checksum.digest


def checksum_failed(speaker: Speaker) -> HttpUploadError:
    """A chunk whose checksum did not match: tus 460, the draft 400; the chunk is discarded."""
    status = 460 if speaker.dialect is Dialect.TUS else 400
    return HttpUploadError(status, "checksum-mismatch", "the bytes do not match the checksum sent; "
                                                        "the chunk was discarded, send it again")


# ------------------------------------------------------------ responses


def http_date(timestamp: float) -> str:
    """An RFC 9110 IMF-fixdate."""
    return email.utils.formatdate(timestamp, usegmt=True)


def base_headers(speaker: Speaker) -> dict[str, str]:
    """Headers every response in ``speaker``'s dialect carries."""
    if speaker.dialect is Dialect.TUS:
        return {"Tus-Resumable": TUS_VERSION}
    return {"Upload-Draft-Interop-Version": str(speaker.version)}


def upload_limit(max_size: int, max_age: int | None) -> str:
    """The draft's ``Upload-Limit`` (a structured dictionary)."""
    return f"max-size={max_size}" + (f", max-age={max_age}" if max_age is not None else "")


def options_response(max_size: int) -> tuple[int, dict[str, str]]:
    """OPTIONS (tus discovery): 200, so a CORS preflight passes too."""
    return 200, {"Tus-Resumable": TUS_VERSION, "Tus-Version": TUS_VERSION, "Tus-Extension": ",".join(TUS_EXTENSIONS),
                 "Tus-Max-Size": str(max_size), "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
                 "Upload-Limit": upload_limit(max_size, None)}


@dataclass(frozen=True)
class UploadState:
    """What the server holds of one upload, to report it."""

    offset: int  # durable bytes
    length: int | None  # None: deferred (tus creation-defer-length), not known yet
    expires: float | None = None  # when an unfinished upload is swept (None: complete, never)
    digest: str | None = None  # blake3-4m, once complete
    finishing: bool = False
    max_size: int = 0
    max_age: int | None = None
    concat: str | None = None  # tus Upload-Concat to report: "partial" or "final;<url> ..."

    @property
    def complete(self) -> bool:
        """All bytes are here, durable and recorded."""
        return self.digest is not None


def state_headers(speaker: Speaker, state: UploadState) -> dict[str, str]:
    """``Upload-Offset``, ``Upload-Length``, ``Upload-Expires``/``Upload-Complete``, digest: for HEAD and PATCH."""
    headers = base_headers(speaker)
    headers["Upload-Offset"] = str(state.offset)
    if state.length is not None:
        headers["Upload-Length"] = str(state.length)
    elif speaker.dialect is Dialect.TUS:
        headers["Upload-Defer-Length"] = "1"
    if state.concat is not None and speaker.dialect is Dialect.TUS:
        headers["Upload-Concat"] = state.concat
    if state.expires is not None and not state.complete:
        headers["Upload-Expires"] = http_date(state.expires)
    if speaker.dialect is Dialect.DRAFT:
        headers["Upload-Complete"] = "?1" if state.complete else "?0"
        headers["Upload-Limit"] = upload_limit(state.max_size or state.length or 0, state.max_age)
    if state.digest is not None:
        headers[DIGEST_HEADER] = state.digest
    return headers


def probe_response(speaker: Speaker, state: UploadState) -> tuple[int, dict[str, str]]:
    """HEAD: the durable offset (tus 200, the draft 204), never cached."""
    headers = state_headers(speaker, state)
    headers["Cache-Control"] = "no-store"
    headers[STATE_HEADER] = "complete" if state.complete else "finishing" if state.finishing else "partial"
    if state.finishing:
        headers["Retry-After"] = "1"
    return (200 if speaker.dialect is Dialect.TUS else 204), headers


def append_response(speaker: Speaker, state: UploadState) -> tuple[int, dict[str, str]]:
    """PATCH that was accepted: 204 with the new (durable) offset; the draft's completing append: 200."""
    status = 200 if speaker.dialect is Dialect.DRAFT and state.complete else 204
    return status, state_headers(speaker, state)


def create_response(speaker: Speaker, location: str, state: UploadState) -> tuple[int, dict[str, str]]:
    """Creation: 201 with ``Location`` (tus, and a draft upload not yet complete); a draft upload complete
    in its creation request: 200."""
    headers = state_headers(speaker, state)
    headers["Location"] = location
    if speaker.dialect is Dialect.DRAFT and state.complete:
        return 200, headers
    return 201, headers


def offset_mismatch(speaker: Speaker, state: UploadState, sent: int) -> HttpUploadError:
    """409 with the offset the server holds (the draft's ``mismatching-upload-offset``)."""
    headers = state_headers(speaker, state)
    return HttpUploadError(409, "bad-offset", f"the upload holds {state.offset} bytes, not {sent}: "
                                              f"resume from Upload-Offset", headers)


def error_response(speaker: Speaker | None, err: HttpUploadError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and a JSON body for a refusal (the code also in ``Filedock-Error``)."""
    import json

    headers = base_headers(speaker) if speaker is not None else {"Tus-Resumable": TUS_VERSION}
    headers.update(err.headers)
    headers[ERROR_HEADER] = err.code
    body = {"error": {"code": err.code, "message": err.message}}
    if speaker is not None and speaker.dialect is Dialect.DRAFT and err.status == 409:
        body["type"] = "https://iana.org/assignments/http-problem-types#mismatching-upload-offset"
        headers["Content-Type"] = "application/problem+json"
    else:
        headers["Content-Type"] = "application/json"
    return err.status, headers, json.dumps(body).encode("utf-8")


def informational_104(speaker: Speaker, location: str, limit: str) -> bytes:
    """The draft's 104 (Upload Resumption Supported) interim response, as bytes for HTTP/1.1."""
    lines = [b"HTTP/1.1 104 Upload Resumption Supported",
             b"Upload-Draft-Interop-Version: %d" % speaker.version,
             b"Location: " + location.encode("latin-1"),
             b"Upload-Limit: " + limit.encode("latin-1")]
    return b"\r\n".join(lines) + b"\r\n\r\n"
