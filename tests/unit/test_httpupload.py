"""The sans-IO core of the HTTP upload protocols (tus 1.0.0 and the IETF draft): parsing and responses."""

from __future__ import annotations

import base64
import hashlib
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filedock import httpupload as hu
from filedock.httpupload import Dialect, HttpUploadError

MAX = 1 << 40
KEY = "8df02433-b7eb-4b3d-aa73-ed6285794f8a"
TUS = {"tus-resumable": "1.0.0"}
DRAFT6 = {"upload-draft-interop-version": "6"}
DRAFT8 = {"upload-draft-interop-version": "8"}
OCTETS = {"content-type": hu.TUS_CONTENT_TYPE}
PARTIAL = {"content-type": hu.DRAFT_CONTENT_TYPE}


def refusal(method, path, headers) -> HttpUploadError:
    with pytest.raises(HttpUploadError) as info:
        hu.parse_request(method, path, headers, MAX)
    return info.value


# ------------------------------------------------------------ telling the protocols apart


def test_tus_resumable_means_tus_and_the_interop_version_means_the_draft():
    """The dialect comes from the headers, as tusd tells them apart."""
    assert hu.parse_request("HEAD", f"/files/{KEY}", TUS, MAX).speaker == hu.Speaker(Dialect.TUS)
    assert hu.parse_request("HEAD", f"/files/{KEY}", DRAFT6, MAX).speaker == hu.Speaker(Dialect.DRAFT, 6)
    assert hu.parse_request("HEAD", f"/files/{KEY}", DRAFT8, MAX).speaker == hu.Speaker(Dialect.DRAFT, 8)
    # Upload-Complete without a version: the latest draft
    assert hu.speaker_of({"upload-complete": "?1"}) == hu.Speaker(Dialect.DRAFT, 8)


@given(st.text(max_size=12).filter(lambda v: v.strip() != "1.0.0"))
def test_any_other_tus_version_is_412_with_tus_version(version):
    """A tus version not served: 412 with ``Tus-Version``."""
    err = refusal("HEAD", f"/files/{KEY}", {"tus-resumable": version})
    assert (err.status, err.code, err.headers["Tus-Version"]) == (412, "unsupported-version", "1.0.0")


@given(st.integers().filter(lambda v: v not in hu.DRAFT_VERSIONS).map(str) | st.text(max_size=5))
def test_any_other_interop_version_is_412(version):
    """Only interop versions 6 and 8 are served."""
    if version.strip() in ("6", "8"):
        return
    err = refusal("HEAD", f"/files/{KEY}", {"upload-draft-interop-version": version})
    assert err.status == 412


def test_no_protocol_header_is_412_but_options_needs_none():
    """Every request but OPTIONS names its protocol."""
    assert refusal("HEAD", f"/files/{KEY}", {}).status == 412
    assert isinstance(hu.parse_request("OPTIONS", "/files/", {}, MAX), hu.Options)


# ------------------------------------------------------------ creation


def test_tus_creation_reads_length_and_metadata():
    """POST with Upload-Length and Upload-Metadata (a value may be absent)."""
    meta = f"job {base64.b64encode(b'j1').decode()},filename {base64.b64encode('ä.bin'.encode()).decode()},flag"
    event = hu.parse_request("POST", "/files/", {**TUS, "upload-length": "42", "upload-metadata": meta}, MAX)
    assert event == hu.Create(hu.Speaker(Dialect.TUS), 42, {"job": "j1", "filename": "ä.bin", "flag": None})


def test_tus_creation_errors():
    """No length: 400; too large: 413; a body of the wrong type: 415; a deferred length other than 1: 400."""
    assert refusal("POST", "/files/", TUS).status == 400
    assert refusal("POST", "/files/", {**TUS, "upload-length": str(MAX + 1)}).status == 413
    body = {**TUS, "upload-length": "5", "content-length": "5", "content-type": "text/plain"}
    assert refusal("POST", "/files/", body).status == 415
    assert refusal("POST", "/files/", {**TUS, "upload-defer-length": "0"}).status == 400
    assert refusal("PATCH", "/files/", TUS).status == 405


def test_creation_with_upload_notes_the_body_and_its_checksum():
    """creation-with-upload: the body's type is checked and its checksum parsed."""
    digest = base64.b64encode(hashlib.sha1(b"abc").digest()).decode()
    event = hu.parse_request("POST", "/files/", {**TUS, **OCTETS, "upload-length": "3", "content-length": "3",
                                                 "upload-checksum": f"sha1 {digest}"}, MAX)
    assert event.has_body and event.checksum == hu.Checksum("sha1", hashlib.sha1(b"abc").digest())


def test_draft_creation_needs_upload_complete_and_takes_the_length_from_a_whole_body():
    """The draft: Upload-Complete is required; ``?1`` with a body of known length needs no Upload-Length."""
    assert refusal("POST", "/files/", DRAFT6).status == 400
    event = hu.parse_request("POST", "/files/", {**DRAFT6, "upload-complete": "?1", "content-length": "7"}, MAX)
    assert (event.length, event.complete, event.has_body) == (7, True, True)
    event = hu.parse_request("PUT", "/files/", {**DRAFT8, "upload-complete": "?0", "upload-length": "9"}, MAX)
    assert (event.length, event.complete, event.has_body) == (9, False, False)
    assert refusal("POST", "/files/", {**DRAFT8, "upload-complete": "?0"}).status == 400
    assert refusal("POST", "/files/", {**DRAFT8, "upload-complete": "yes"}).status == 400


# ------------------------------------------------------------ metadata


@given(st.dictionaries(st.from_regex(r"[a-zA-Z0-9_.-]{1,20}", fullmatch=True),
                       st.none() | st.text(max_size=40), max_size=8))
def test_metadata_round_trips(pairs):
    """Whatever ``format_metadata`` writes, ``parse_metadata`` reads back."""
    assert hu.parse_metadata(hu.format_metadata(pairs)) == pairs


@pytest.mark.parametrize("header", [
    "job !!notbase64", "job a b c", "job YQ==,job Yg==", " ,job YQ==", "job " + base64.b64encode(b"\xff").decode(),
    "k" * 5000,
])
def test_bad_metadata_is_400(header):
    """Bad base64, a key twice, an empty pair, text that is not UTF-8, a huge header: 400."""
    with pytest.raises(HttpUploadError) as info:
        hu.parse_metadata(header)
    assert info.value.status == 400


@given(st.text(max_size=200))
def test_metadata_parse_never_fails_otherwise(header):
    """Any header either parses or is a 400, never another exception."""
    try:
        hu.parse_metadata(header)
    except HttpUploadError as err:
        assert err.status == 400


# ------------------------------------------------------------ appends and offsets


@given(st.integers(min_value=0, max_value=10**18))
def test_tus_patch_reads_the_offset(offset):
    """PATCH: the offset is kept as sent; ``application/offset+octet-stream`` required."""
    event = hu.parse_request("PATCH", f"/files/{KEY}", {**TUS, **OCTETS, "upload-offset": str(offset)}, MAX)
    assert event == hu.Append(hu.Speaker(Dialect.TUS), KEY, offset)


@given(st.text(max_size=25).filter(lambda v: not (v.strip().isdigit() and v.strip().isascii()
                                                  and len(v.strip()) <= 19)))
def test_a_bad_offset_is_400(value):
    """Upload-Offset that is not a non-negative integer: 400."""
    err = refusal("PATCH", f"/files/{KEY}", {**TUS, **OCTETS, "upload-offset": value})
    assert err.status == 400


def test_patch_content_types():
    """tus wants offset+octet-stream, the draft partial-upload: 415 otherwise; no offset: 400."""
    assert refusal("PATCH", f"/files/{KEY}", {**TUS, "upload-offset": "0"}).status == 415
    assert refusal("PATCH", f"/files/{KEY}", {**TUS, **PARTIAL, "upload-offset": "0"}).status == 415
    assert refusal("PATCH", f"/files/{KEY}", {**DRAFT6, **OCTETS, "upload-offset": "0",
                                              "upload-complete": "?0"}).status == 415
    assert refusal("PATCH", f"/files/{KEY}", {**TUS, **OCTETS}).status == 400
    event = hu.parse_request("PATCH", f"/files/{KEY}", {**DRAFT8, **PARTIAL, "upload-offset": "5",
                                                        "upload-complete": "?1"}, MAX)
    assert (event.offset, event.complete) == (5, True)


def test_method_override_and_unknown_paths():
    """X-HTTP-Method-Override carries PATCH/DELETE through POST; a key with a slash or odd bytes is 404."""
    event = hu.parse_request("POST", f"/files/{KEY}", {**TUS, "x-http-method-override": "DELETE"}, MAX)
    assert event == hu.Terminate(hu.Speaker(Dialect.TUS), KEY)
    assert refusal("HEAD", f"/files/{KEY}/x", TUS).status == 404
    assert refusal("HEAD", "/files/..%2f", TUS).status == 404
    assert refusal("GET", f"/files/{KEY}", TUS).status == 405


# ------------------------------------------------------------ checksums and digests


ALGOS = {"sha1": lambda b: hashlib.sha1(b).digest(), "sha256": lambda b: hashlib.sha256(b).digest(),
         "md5": lambda b: hashlib.md5(b).digest(), "crc32": lambda b: zlib.crc32(b).to_bytes(4, "big")}


@given(st.sampled_from(sorted(ALGOS)), st.lists(st.binary(max_size=300), max_size=6))
def test_chunk_hashers_match_the_algorithm_over_any_split(algorithm, pieces):
    """``Upload-Checksum`` for every served algorithm, however the body is split."""
    data = b"".join(pieces)
    header = f"{algorithm} {base64.b64encode(ALGOS[algorithm](data)).decode()}"
    checksum = hu.parse_checksum(header)
    hasher = checksum.hasher()
    for piece in pieces:
        hasher.update(piece)
    assert hu.checksum_matches(checksum, hasher)
    hasher.update(b"!")
    assert not hu.checksum_matches(checksum, hasher)


def test_checksum_header_errors():
    """Unknown algorithm: 400 ``unsupported-checksum``; bad base64 or the wrong size: 400."""
    for header, code in [("sha512 AAAA", "unsupported-checksum"), ("sha1 !!!", "bad-request"),
                         ("sha1 AAAA", "bad-request"), ("sha1", "bad-request")]:
        with pytest.raises(HttpUploadError) as info:
            hu.parse_checksum(header)
        assert (info.value.status, info.value.code) == (400, code)
    assert hu.checksum_failed(hu.Speaker(Dialect.TUS)).status == 460
    assert hu.checksum_failed(hu.Speaker(Dialect.DRAFT, 8)).status == 400


def test_content_digest_picks_sha256():
    """RFC 9530 dictionaries: sha-256 preferred; unknown algorithms ignored; malformed: 400."""
    sha = base64.b64encode(hashlib.sha256(b"x").digest()).decode()
    md5 = base64.b64encode(hashlib.md5(b"x").digest()).decode()
    got = hu.parse_digest_field(f"md5=:{md5}:, sha-256=:{sha}:", "Content-Digest")
    assert got == hu.Checksum("sha256", hashlib.sha256(b"x").digest())
    assert hu.parse_digest_field("sha-512=:AAAA:", "Repr-Digest") is None
    with pytest.raises(HttpUploadError):
        hu.parse_digest_field("sha-256=notbytes", "Content-Digest")


# ------------------------------------------------------------ responses


@settings(max_examples=50)
@given(st.integers(0, 10**12), st.integers(0, 10**12), st.sampled_from([hu.Speaker(Dialect.TUS),
                                                                        hu.Speaker(Dialect.DRAFT, 6),
                                                                        hu.Speaker(Dialect.DRAFT, 8)]))
def test_offset_responses_carry_the_offset_and_the_dialects_headers(offset, length, speaker):
    """HEAD and PATCH responses: the offset, the length, no caching for HEAD, the dialect's headers."""
    state = hu.UploadState(offset, length, expires=1_800_000_000.0)
    status, headers = hu.probe_response(speaker, state)
    assert headers["Upload-Offset"] == str(offset) and headers["Cache-Control"] == "no-store"
    assert headers["Upload-Expires"] == "Fri, 15 Jan 2027 08:00:00 GMT"
    if speaker.dialect is Dialect.TUS:
        assert status == 200 and headers["Tus-Resumable"] == "1.0.0"
    else:
        assert status == 204 and headers["Upload-Complete"] == "?0"
        assert headers["Upload-Draft-Interop-Version"] == str(speaker.version)
    err = hu.offset_mismatch(speaker, state, offset + 1)
    assert err.status == 409 and err.headers["Upload-Offset"] == str(offset)


def test_finishing_and_complete_states():
    """HEAD during the finish says ``finishing`` with Retry-After; complete carries the digest."""
    speaker = hu.Speaker(Dialect.TUS)
    _, headers = hu.probe_response(speaker, hu.UploadState(5, 10, finishing=True))
    assert headers[hu.STATE_HEADER] == "finishing" and headers["Retry-After"] == "1"
    _, headers = hu.probe_response(speaker, hu.UploadState(10, 10, digest="blake3-4m=ab"))
    assert headers[hu.STATE_HEADER] == "complete" and headers[hu.DIGEST_HEADER] == "blake3-4m=ab"
    assert "Upload-Expires" not in headers
    status, headers = hu.append_response(hu.Speaker(Dialect.DRAFT, 8), hu.UploadState(10, 10, digest="x"))
    assert status == 200 and headers["Upload-Complete"] == "?1"


def test_errors_carry_the_code_and_the_draft_problem_type():
    """Every refusal has the filedock code in a header and a JSON body; the draft's 409 is a problem."""
    status, headers, body = hu.error_response(hu.Speaker(Dialect.DRAFT, 8),
                                              hu.offset_mismatch(hu.Speaker(Dialect.DRAFT, 8),
                                                                 hu.UploadState(3, 9), 4))
    assert status == 409 and headers[hu.ERROR_HEADER] == "bad-offset"
    assert b"mismatching-upload-offset" in body and headers["Content-Type"] == "application/problem+json"


def test_options_and_the_104():
    """OPTIONS lists version, extensions, size and checksums; the 104 names the upload and its limit."""
    status, headers = hu.options_response(1000)
    assert status == 200 and "checksum" in headers["Tus-Extension"] and headers["Tus-Max-Size"] == "1000"
    assert "sha1" in headers["Tus-Checksum-Algorithm"]
    raw = hu.informational_104(hu.Speaker(Dialect.DRAFT, 6), "http://h/files/k", "max-size=5")
    assert raw.startswith(b"HTTP/1.1 104 ") and raw.endswith(b"\r\n\r\n") and b"Location: http://h/files/k" in raw


@settings(max_examples=200)
@given(st.sampled_from(["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS", "PUT", "BREW"]),
       st.sampled_from(["/files/", "/files", f"/files/{KEY}", "/files/a/b", "/other"]),
       st.dictionaries(st.sampled_from(["tus-resumable", "upload-draft-interop-version", "upload-offset",
                                        "upload-length", "upload-metadata", "upload-checksum", "content-type",
                                        "upload-complete", "content-length", "upload-defer-length",
                                        "content-digest", "repr-digest", "x-http-method-override"]),
                       st.text(max_size=30)))
def test_any_request_is_an_event_or_a_clean_refusal(method, path, headers):
    """Exhaustively: whatever arrives is an event or an ``HttpUploadError`` with a 4xx status."""
    try:
        event = hu.parse_request(method, path, headers, MAX)
    except HttpUploadError as err:
        assert 400 <= err.status < 500 and err.code and err.message
    else:
        assert isinstance(event, (hu.Options, hu.Create, hu.Probe, hu.Append, hu.Terminate))


# ------------------------------------------------------------ the front end, in process


def test_head_during_the_finish_says_finishing_at_once_and_never_more_than_is_durable(reactor_thread, tmp_path,
                                                                                       monkeypatch):
    """While the last bytes are made durable, HEAD answers at once with ``finishing``, ``Retry-After`` and
    the last durable offset (not the length); once recorded, the PATCH gets its 204 and HEAD says complete."""
    import http.client
    import threading

    from twisted.internet import threads

    from filedock.config import Limits
    from filedock.server.api import ControlAPI
    from filedock.server.authority import StoreAuthority
    from filedock.server.dataport import DataPortFactory
    from filedock.server.http_upload import HttpUploads
    from filedock.store.blobs import BlobStore, PartialWriter
    from filedock.store.metadata import DeferredStore
    from filedock.store.sqlite import SQLiteStore

    reactor = reactor_thread
    sqlite = SQLiteStore(tmp_path / "meta.db")
    token = sqlite.create_token("test")
    sqlite.create_job("j1", {})
    blobs = BlobStore(tmp_path / "data")
    entered, gate = threading.Event(), threading.Event()
    real_finish = PartialWriter.finish

    def slow_finish(self, expected_digest=None):
        entered.set()
        gate.wait(20)
        return real_finish(self, expected_digest)

    monkeypatch.setattr(PartialWriter, "finish", slow_finish)

    def listen():
        store = DeferredStore(sqlite, reactor)
        authority = StoreAuthority(store, Limits(), blobs=blobs)
        dataport = DataPortFactory(authority, blobs, Limits(), reactor)
        api = ControlAPI(store, blobs, Limits(), dataport, lambda: {})
        api.http_uploads = HttpUploads(api, dataport, authority)
        return reactor.listenTCP(0, api.site(), interface="127.0.0.1")

    port = threads.blockingCallFromThread(reactor, listen)

    def call(method, path, headers, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", port.getHost().port, timeout=30)
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}", **TUS, **headers})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}

    try:
        status, headers = call("POST", "/files/", {"Upload-Length": "300000", "Upload-Metadata":
                                                   f"job {base64.b64encode(b'j1').decode()},name YQ=="})
        assert status == 201
        path = "/files/" + headers["location"].rsplit("/", 1)[1]
        answer = {}
        sender = threading.Thread(target=lambda: answer.update(result=call(
            "PATCH", path, {**OCTETS, "Upload-Offset": "0"}, bytes(300000))))
        sender.start()
        assert entered.wait(20)
        status, headers = call("HEAD", path, {})
        assert status == 200 and headers[hu.STATE_HEADER.lower()] == "finishing"
        assert headers["retry-after"] == "1" and int(headers["upload-offset"]) < 300000
        assert "result" not in answer  # the PATCH is still finishing
        gate.set()
        sender.join(20)
        status, headers = answer["result"]
        assert status == 204 and headers["upload-offset"] == "300000" and headers["filedock-digest"]
        status, headers = call("HEAD", path, {})
        assert headers[hu.STATE_HEADER.lower()] == "complete" and headers["upload-offset"] == "300000"
    finally:
        gate.set()
        threads.blockingCallFromThread(reactor, port.stopListening)
        sqlite.close()
