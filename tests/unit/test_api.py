"""The control API, served on a real loopback port by the reactor thread, driven over HTTP.

Each test gets its own SQLite store and data dir in ``tmp_path``; requests are made
with ``http.client`` from the test thread while the reactor runs in its own thread
(the ``reactor_thread`` fixture in tests/conftest.py).
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import types
import uuid
from contextlib import closing
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from twisted.internet import threads
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.server import Site

import filedock
from filedock import record
from filedock.config import Limits
from filedock.server.api import BoundedBody, ControlAPI, access_log_line, hide_keys
from filedock.store.blobs import BlobStore
from filedock.store.metadata import DeferredStore
from filedock.store.sqlite import SQLiteStore

LIMITS = Limits(max_api_body=4096, max_file_size=1_000_000, job_quota=1_500_000,
                session_ttl=3600.0, max_session_ttl=7200.0)
DATA_PORT = {"data_port": {"host": "127.0.0.1", "port": 7481, "tls": False}}


@dataclass
class Response:
    """What came back: status, headers and the decoded JSON body."""

    status: int
    headers: HTTPMessage
    body: Any

    @property
    def code(self) -> str:
        """The error code of a refusal."""
        return self.body["error"]["code"]


class Server:
    """The control API on a loopback port with its own store, blobs and token."""

    def __init__(self, reactor: Any, tmp_path: Path, limits: Limits = LIMITS, dataport: Any = None,
                 wrap: Any = None, hardened: bool = False) -> None:
        self.reactor = reactor
        tmp_path.mkdir()
        self.sqlite = SQLiteStore(tmp_path / "meta.db")
        self.token = self.sqlite.create_token("test")
        self.blobs = BlobStore(tmp_path / "data")
        inner = wrap(self.sqlite) if wrap else self.sqlite
        self.api, self.port = threads.blockingCallFromThread(reactor, self._listen, inner, limits, dataport,
                                                             hardened)

    def _listen(self, inner: Any, limits: Limits, dataport: Any, hardened: bool):
        api = ControlAPI(DeferredStore(inner, self.reactor), self.blobs, limits, dataport, lambda: DATA_PORT)
        site = api.site() if hardened else Site(api.resource())
        return api, self.reactor.listenTCP(0, site, interface="127.0.0.1")

    def stop(self) -> None:
        """Stop listening and close the store."""
        threads.blockingCallFromThread(self.reactor, self.port.stopListening)
        self.sqlite.close()

    def call(self, method: str, path: str, body: Any = None, *, token: str | None = "default",
             raw: Any = None, headers: dict[str, str] | None = None) -> Response:
        """One request on a fresh connection; every reply must be JSON."""
        token = self.token if token == "default" else token
        sent = {"Authorization": f"Bearer {token}"} if token else {}
        sent.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn = HTTPConnection("127.0.0.1", self.port.getHost().port, timeout=10)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        assert resp.getheader("Content-Type") == "application/json"
        assert resp.getheader("Content-Length") == str(len(payload))
        return Response(resp.status, resp.headers, json.loads(payload))

    def create_job(self, name: str = "job-1", **extra: Any) -> dict[str, Any]:
        """POST /v1/jobs, asserting it worked."""
        r = self.call("POST", "/v1/jobs", {"name": name, **extra})
        assert r.status == 201, r.body
        return r.body

    def add_file(self, job: str, name: str, size: int) -> dict[str, Any]:
        """POST /v1/jobs/<job>/files with one file, asserting it worked."""
        r = self.call("POST", f"/v1/jobs/{quote(job, safe='')}/files", {"name": name, "size": size})
        assert r.status == 201, r.body
        return r.body

    def jobs(self) -> list[dict[str, Any]]:
        """GET /v1/jobs."""
        r = self.call("GET", "/v1/jobs")
        assert r.status == 200
        return r.body["jobs"]

    def everything(self) -> list[dict[str, Any]]:
        """Every job with its files: what a refused request must leave alone."""
        return [self.call("GET", f"/v1/jobs/{job['id']}").body for job in self.jobs()]


@pytest.fixture
def make_server(reactor_thread, tmp_path):
    """Build servers (with options); all are stopped after the test."""
    made: list[Server] = []

    def make(**options: Any) -> Server:
        server = Server(reactor_thread, tmp_path / f"s{len(made)}", **options)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def server(make_server) -> Server:
    """A control API with default test limits and no data port."""
    return make_server()


@pytest.fixture
def logged():
    """Every log event emitted during the test."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failures(events: list[dict]) -> list[dict]:
    """Logged failures and errors."""
    return [e for e in events if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical)]


# ------------------------------------------------------------ success paths


def test_info_merges_the_service_facts(server):
    """GET /v1/info: version, digest scheme, every limit and what info() adds."""
    r = server.call("GET", "/v1/info")
    assert r.status == 200
    assert r.body == {"version": filedock.__version__, "digest": "blake3-4m", "limits": record.asdict(LIMITS),
                      "data_port": {"host": "127.0.0.1", "port": 7481, "tls": False}}
    assert r.headers["Cache-Control"] == "no-store"


def test_create_job_returns_the_job(server):
    """POST /v1/jobs: 201 with the stored job, metadata of every allowed type kept."""
    metadata = {"owner": "ada", "priority": 3, "ratio": 0.5, "urgent": True, "note": None}
    before = time.time()
    r = server.call("POST", "/v1/jobs", {"name": "scan 2024/05", "metadata": metadata})
    assert r.status == 201
    job = r.body
    assert set(job) == {"id", "name", "metadata", "created", "updated", "state"}
    assert uuid.UUID(job["id"]).version == 4
    assert (job["name"], job["metadata"], job["state"]) == ("scan 2024/05", metadata, "open")
    assert before <= job["created"] == job["updated"] <= time.time()
    assert server.sqlite.find_job(job["id"]).metadata == metadata


def test_create_job_exist_ok_finds_or_creates(server):
    """POST /v1/jobs with exist_ok: 201 with a new job; 200 with an existing one as GET shows it (files
    included, its metadata unchanged); a job of another name or without exist_ok is not affected."""
    r = server.call("POST", "/v1/jobs", {"name": "found", "metadata": {"a": 1}, "exist_ok": True})
    assert r.status == 201 and set(r.body) == {"id", "name", "metadata", "created", "updated", "state"}
    made = r.body
    f = server.add_file("found", "a.bin", 10)
    before = server.everything()
    r = server.call("POST", "/v1/jobs", {"name": "found", "metadata": {"b": 2}, "exist_ok": True})
    assert r.status == 200
    assert r.body == server.call("GET", "/v1/jobs/found").body
    assert r.body["id"] == made["id"] and r.body["metadata"] == {"a": 1}
    assert [x["key"] for x in r.body["files"]] == [f["key"]]
    assert server.everything() == before
    r = server.call("POST", "/v1/jobs", {"name": "found", "exist_ok": False})
    assert (r.status, r.code) == (409, "conflict")
    for bad in ("yes", 1, None):
        r = server.call("POST", "/v1/jobs", {"name": "other", "exist_ok": bad})
        assert (r.status, r.code) == (400, "bad-request") and "exist_ok" in r.body["error"]["message"]
    assert [j["name"] for j in server.jobs()] == ["found"]


def test_create_job_without_metadata(server):
    """Metadata is optional and defaults to an empty object."""
    assert server.create_job("plain")["metadata"] == {}


def test_list_jobs_counts_files(server):
    """GET /v1/jobs: every job in creation order, with declared and complete file counts."""
    first = server.create_job("first")
    second = server.create_job("second")
    a = server.add_file("first", "a.bin", 10)
    server.add_file("first", "b.bin", 20)
    server.sqlite.record_complete(a["key"], 0x1234, "ab" * 32)
    jobs = server.jobs()
    assert [j["id"] for j in jobs] == [first["id"], second["id"]]
    assert (jobs[0]["files_total"], jobs[0]["files_complete"]) == (2, 1)
    assert (jobs[1]["files_total"], jobs[1]["files_complete"]) == (0, 0)
    assert jobs[1]["name"] == "second" and jobs[1]["state"] == "open"


def test_list_jobs_when_there_are_none(server):
    """An empty store lists no jobs."""
    assert server.call("GET", "/v1/jobs").body == {"jobs": []}


def test_get_job_by_id_and_by_name(server):
    """GET /v1/jobs/<id-or-name>: the job and its files; names are percent-encoded in the path."""
    job = server.create_job("scan 2024/05", metadata={"k": "v"})
    f = server.add_file(job["id"], "dir/x.bin", 7)
    by_id = server.call("GET", f"/v1/jobs/{job['id']}")
    by_name = server.call("GET", "/v1/jobs/" + quote("scan 2024/05", safe=""))
    assert by_id.status == by_name.status == 200
    assert by_id.body == by_name.body
    assert by_id.body["name"] == "scan 2024/05" and by_id.body["metadata"] == {"k": "v"}
    assert by_id.body["files"] == [f]
    assert f["name"] == "dir/x.bin" and f["size"] == 7 and f["job"] == job["id"]


def test_patch_job_renames_and_replaces_metadata(server):
    """PATCH /v1/jobs/<job>: new name and metadata, visible afterwards under the new name."""
    job = server.create_job("old", metadata={"a": 1})
    r = server.call("PATCH", "/v1/jobs/old", {"name": "new", "metadata": {"b": "2"}})
    assert r.status == 200
    assert (r.body["id"], r.body["name"], r.body["metadata"]) == (job["id"], "new", {"b": "2"})
    assert r.body["updated"] >= job["updated"]
    assert server.call("GET", "/v1/jobs/new").body["id"] == job["id"]
    assert server.call("GET", "/v1/jobs/old").status == 404


def test_patch_job_metadata_only(server):
    """PATCH with only metadata keeps the name."""
    job = server.create_job("keep")
    r = server.call("PATCH", f"/v1/jobs/{job['id']}", {"metadata": {"x": None}})
    assert (r.status, r.body["name"], r.body["metadata"]) == (200, "keep", {"x": None})


def test_patch_job_with_nothing_changes_nothing(server):
    """An empty PATCH returns the job as it is."""
    job = server.create_job("same")
    r = server.call("PATCH", "/v1/jobs/same", {})
    assert (r.status, r.body) == (200, job)


def test_delete_job_deletes_records_and_blobs(server):
    """DELETE /v1/jobs/<job>: 200 with the id; its files, sessions and blob directory are gone."""
    job = server.create_job("doomed")
    f = server.add_file("doomed", "a.bin", 3)
    session = server.call("POST", "/v1/jobs/doomed/sessions", {}).body
    job_dir = server.blobs.job_dir(job["id"])
    job_dir.mkdir(parents=True)
    (job_dir / f["key"]).write_bytes(b"abc")
    r = server.call("DELETE", "/v1/jobs/doomed")
    assert (r.status, r.body) == (200, {"deleted": job["id"]})
    assert not job_dir.exists()
    assert server.jobs() == []
    assert server.call("GET", f"/v1/files/{f['key']}").status == 404
    assert server.sqlite.get_session(session["key"]) is None


def test_add_one_file(server):
    """POST /v1/jobs/<job>/files with one file: 201 with its record, key included."""
    job = server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/files", {"name": "data/part 1.bin", "size": 123})
    assert r.status == 201
    assert r.body == {"key": r.body["key"], "job": job["id"], "name": "data/part 1.bin", "size": 123,
                      "received": 0, "state": "pending", "crc32": None, "digest": None, "uploaded_at": None}
    assert uuid.UUID(r.body["key"]).version == 4


def test_add_an_empty_file(server):
    """Size 0 is a file too."""
    server.create_job()
    assert server.add_file("job-1", "empty", 0)["size"] == 0


def test_add_files_in_a_batch(server):
    """{"files": [...]} declares several files at once: 201 {"files": [...]} in order."""
    job = server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/files",
                    {"files": [{"name": "b", "size": 1}, {"name": "a", "size": 2}]})
    assert r.status == 201
    assert [(f["name"], f["size"], f["job"]) for f in r.body["files"]] == [("b", 1, job["id"]), ("a", 2, job["id"])]
    assert len({f["key"] for f in r.body["files"]}) == 2
    assert server.jobs()[0]["files_total"] == 2


def test_get_file(server):
    """GET /v1/files/<key>: the record, with CRC and digest once complete."""
    server.create_job()
    f = server.add_file("job-1", "a.bin", 10)
    assert server.call("GET", f"/v1/files/{f['key']}").body == f
    server.sqlite.record_complete(f["key"], 0xCAFE, "cd" * 32)
    r = server.call("GET", f"/v1/files/{f['key']}")
    assert r.status == 200
    assert (r.body["state"], r.body["received"], r.body["crc32"], r.body["digest"]) == \
        ("complete", 10, "0000cafe", "cd" * 32)
    assert r.body["uploaded_at"] is not None


def test_open_session_with_default_ttl(server):
    """POST /v1/jobs/<job>/sessions: 201; expires ``session_ttl`` after created."""
    job = server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/sessions")
    assert r.status == 201
    assert set(r.body) == {"key", "job", "created", "expires", "closed", "scope"}
    assert (r.body["job"], r.body["closed"]) == (job["id"], None)
    assert r.body["expires"] - r.body["created"] == pytest.approx(LIMITS.session_ttl)
    assert server.sqlite.get_session(r.body["key"]).job_id == job["id"]


def test_open_session_with_ttl(server):
    """A ttl up to ``max_session_ttl`` is honoured, fractions included."""
    server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/sessions", {"ttl": 90.5})
    assert r.status == 201
    assert r.body["expires"] - r.body["created"] == pytest.approx(90.5)
    top = server.call("POST", "/v1/jobs/job-1/sessions", {"ttl": LIMITS.max_session_ttl})
    assert top.status == 201


def test_close_session(server):
    """DELETE /v1/sessions/<key>: the session with ``closed`` set; closing again keeps the time."""
    server.create_job()
    opened = server.call("POST", "/v1/jobs/job-1/sessions").body
    r = server.call("DELETE", f"/v1/sessions/{opened['key']}")
    assert r.status == 200
    assert r.body["key"] == opened["key"] and r.body["closed"] >= opened["created"]
    assert server.sqlite.get_session(opened["key"]).closed == r.body["closed"]
    again = server.call("DELETE", f"/v1/sessions/{opened['key']}")
    assert (again.status, again.body) == (200, r.body)


def test_uploads_without_a_data_port(server):
    """GET /v1/uploads with no data port: an empty list."""
    assert server.call("GET", "/v1/uploads").body == {"uploads": []}


def test_uploads_from_the_data_port(make_server):
    """GET /v1/uploads: what the data port reports."""
    active = [{"job": "j", "name": "a.bin", "key": "12345678…", "size": 10, "received": 4,
               "resumed_from": 0, "seconds": 1.5}]
    server = make_server(dataport=types.SimpleNamespace(active_uploads=lambda: active))
    r = server.call("GET", "/v1/uploads")
    # each upload also names its job (None: this one's job is not in the store)
    assert (r.status, r.body) == (200, {"uploads": [u | {"job_name": None} for u in active]})


def test_query_strings_are_ignored(server):
    """A query string does not change the route."""
    assert server.call("GET", "/v1/jobs?limit=5").status == 200


# ------------------------------------------------------------ authentication

ENDPOINTS = [
    ("GET", "/v1/info"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
    ("PATCH", "/v1/jobs/x"), ("DELETE", "/v1/jobs/x"), ("POST", "/v1/jobs/x/files"),
    ("GET", "/v1/files/x"), ("POST", "/v1/jobs/x/sessions"), ("DELETE", "/v1/sessions/x"),
    ("GET", "/v1/uploads"), ("GET", "/nowhere"),
]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_no_token_is_401(server, method, path):
    """Every path, known or not, needs a token: 401 with WWW-Authenticate: Bearer."""
    r = server.call(method, path, {"name": "sneaky"}, token=None)
    assert (r.status, r.code) == (401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert server.jobs() == []


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_wrong_token_is_401(server, method, path):
    """A token the store does not know: 401, error="invalid_token"."""
    r = server.call(method, path, {"name": "sneaky"}, token="fdk_not-a-real-token")
    assert (r.status, r.code) == (401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="filedock", error="invalid_token"'
    assert server.jobs() == []


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token abc", "bearer"])
def test_malformed_authorization_is_401(server, header):
    """Only ``Bearer <token>`` is accepted."""
    r = server.call("GET", "/v1/info", token=None, headers={"Authorization": header})
    assert (r.status, r.code) == (401, "unauthorized")


def test_bearer_scheme_is_case_insensitive(server):
    """RFC 7235: the scheme name is case-insensitive."""
    r = server.call("GET", "/v1/info", token=None, headers={"Authorization": f"bearer {server.token}"})
    assert r.status == 200


def test_a_deleted_token_stops_working(server):
    """Tokens are checked on every request, not cached."""
    assert server.call("GET", "/v1/info").status == 200
    server.sqlite.delete_tokens("test")
    assert server.call("GET", "/v1/info").status == 401


# ------------------------------------------------------------ malformed requests


@pytest.mark.parametrize("raw", [b"{", b"{'name': 'x'}", b"[1, 2]", b'"job"', b"\xff\xfe{}",
                                 b'{"name": NaN}', b'{"name": "x"} trailing', b"[" * 2000 + b"]" * 2000])
def test_malformed_json_is_400(server, raw):
    """Bodies that are not one JSON object (or use NaN) are refused and change nothing."""
    server.create_job("existing")
    before = server.everything()
    r = server.call("POST", "/v1/jobs", raw=raw)
    assert (r.status, r.code) == (400, "bad-request")
    assert r.body["error"]["message"]
    assert server.everything() == before


@pytest.mark.parametrize("body", [
    {"name": 5}, {"name": None}, {"name": ["x"]}, {"name": "x", "metadata": ["a"]},
    {"name": "x", "metadata": "a=b"}, {"name": "x", "metadata": {"nested": {"a": 1}}},
    {"name": "x", "metadata": {"list": [1]}}, {},
])
def test_create_job_wrong_types_are_400(server, body):
    """Wrong or missing fields: 400 bad-request, no job created."""
    r = server.call("POST", "/v1/jobs", body)
    assert (r.status, r.code) == (400, "bad-request")
    assert server.jobs() == []


@pytest.mark.parametrize("name", ["", "x" * 201, "tab\there", "new\nline", "nul\x00", "bell\x07",
                                  "\u2028", str(uuid.uuid4())])
def test_bad_job_names_are_400(server, name):
    """Job names: 1..200 printable characters, not shaped like a job id."""
    r = server.call("POST", "/v1/jobs", {"name": name})
    assert (r.status, r.code) == (400, "bad-request")
    assert server.jobs() == []


def test_longest_job_name_is_accepted(server):
    """200 printable characters, spaces and non-ASCII included, make a good name."""
    name = ("ñ " * 100)[:200]
    assert server.create_job(name)["name"] == name


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/jobs", {"name": "x", "owner": "me"}),
    ("PATCH", "/v1/jobs/job-1", {"state": "complete"}),
    ("POST", "/v1/jobs/job-1/files", {"name": "a", "size": 1, "mode": 0o644}),
    ("POST", "/v1/jobs/job-1/files", {"files": [{"name": "a", "size": 1}], "name": "b"}),
    ("POST", "/v1/jobs/job-1/files", {"files": [{"name": "a", "size": 1, "sha": "x"}]}),
    ("POST", "/v1/jobs/job-1/sessions", {"ttl": 60, "mode": "rw"}),
])
def test_unknown_fields_are_400(server, method, path, body):
    """A field an endpoint does not know is refused (a typo must not pass silently)."""
    server.create_job()
    before = server.everything()
    r = server.call(method, path, body)
    assert (r.status, r.code) == (400, "bad-request")
    assert "unknown field" in r.body["error"]["message"]
    assert server.everything() == before


@pytest.mark.parametrize("body", [
    {"name": "a", "size": "10"}, {"name": "a", "size": 1.5}, {"name": "a", "size": True},
    {"name": "a", "size": -1}, {"name": "a"}, {"size": 1}, {"name": 3, "size": 1},
    {"files": []}, {"files": {"name": "a", "size": 1}}, {"files": ["a"]},
    {"files": [{"name": "a", "size": 1}, {"name": "a", "size": 2}]},
    {"files": [{"name": "a", "size": 1}, {"name": "b", "size": "2"}]},
])
def test_add_files_wrong_values_are_400(server, body):
    """File declarations with wrong types or values: 400, nothing added (batches included)."""
    server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/files", body)
    assert (r.status, r.code) == (400, "bad-request")
    assert server.jobs()[0]["files_total"] == 0


def test_patch_wrong_types_are_400(server):
    """PATCH checks types and names as creation does."""
    job = server.create_job()
    for body in ({"name": 1}, {"name": ""}, {"metadata": [1]}, {"metadata": {"a": {"b": 1}}}, {"name": None}):
        r = server.call("PATCH", "/v1/jobs/job-1", body)
        assert (r.status, r.code) == (400, "bad-request"), body
    assert server.call("GET", "/v1/jobs/job-1").body["metadata"] == job["metadata"]


@pytest.mark.parametrize("body", [{"ttl": "60"}, {"ttl": True}, {"ttl": 0}, {"ttl": -5},
                                  {"ttl": LIMITS.max_session_ttl + 1}, {"ttl": None}])
def test_bad_session_ttl_is_400(server, body):
    """ttl is a number of seconds, more than 0 and at most max_session_ttl."""
    job = server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/sessions", body)
    assert (r.status, r.code) == (400, "bad-request")
    with closing(sqlite3.connect(server.sqlite.path)) as db:
        assert db.execute("SELECT COUNT(*) FROM sessions WHERE job_id = ?", (job["id"],)).fetchone() == (0,)


# ------------------------------------------------------------ names that try to be paths


@pytest.mark.parametrize("name", [
    "/etc/passwd", "\\windows\\system32", "..", "../x", "a/../b", "a/..", "a\\..\\b", "..\\x",
    "a\x00b", "line\nbreak", "esc\x1b[31m", "del\x7f", "", "x" * 1025,
])
def test_path_tricks_in_file_names_are_400(server, name):
    """Absolute names, '..' components and control characters are refused clearly."""
    server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/files", {"name": name, "size": 1})
    assert (r.status, r.code) == (400, "bad-request")
    assert server.jobs()[0]["files_total"] == 0


@pytest.mark.parametrize("name", ["a..b", "..hidden", "dir/sub/file.txt", "dir\\file", "résumé 2024.pdf",
                                  "x" * 1024, "./a", "a/"])
def test_names_that_only_look_odd_are_accepted(server, name):
    """Dots inside a component, subdirectories and non-ASCII are fine."""
    server.create_job()
    assert server.add_file("job-1", name, 1)["name"] == name


def test_a_path_trick_in_a_batch_adds_nothing(server):
    """One bad name refuses the whole batch, and the message says which entry."""
    server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/files",
                    {"files": [{"name": "ok", "size": 1}, {"name": "../../etc/passwd", "size": 1}]})
    assert (r.status, r.code) == (400, "bad-request")
    assert r.body["error"]["message"].startswith("files[1]:")
    assert server.jobs()[0]["files_total"] == 0


# ------------------------------------------------------------ sizes, quotas, bodies


def test_file_larger_than_max_file_size_is_413(server):
    """size > max_file_size: 413 too-large."""
    server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/files", {"name": "big", "size": LIMITS.max_file_size + 1})
    assert (r.status, r.code) == (413, "too-large")
    assert server.add_file("job-1", "max", LIMITS.max_file_size)["size"] == LIMITS.max_file_size


def test_job_quota_is_409(server):
    """Declaring past the job quota: 409 quota-exceeded, the earlier files kept."""
    server.create_job()
    server.add_file("job-1", "a", 1_000_000)
    r = server.call("POST", "/v1/jobs/job-1/files", {"name": "b", "size": 600_000})
    assert (r.status, r.code) == (409, "quota-exceeded")
    assert server.jobs()[0]["files_total"] == 1
    assert server.add_file("job-1", "c", 500_000)["size"] == 500_000


def test_job_quota_counts_the_whole_batch(server):
    """A batch past the quota adds none of its files."""
    server.create_job()
    r = server.call("POST", "/v1/jobs/job-1/files",
                    {"files": [{"name": "a", "size": 900_000}, {"name": "b", "size": 900_000}]})
    assert (r.status, r.code) == (409, "quota-exceeded")
    assert server.jobs()[0]["files_total"] == 0


def test_body_larger_than_the_limit_is_413(server):
    """A Content-Length past max_api_body: 413 body-too-large, nothing created."""
    body = json.dumps({"name": "x", "metadata": {"pad": "p" * LIMITS.max_api_body}}).encode()
    r = server.call("POST", "/v1/jobs", raw=body)
    assert (r.status, r.code) == (413, "body-too-large")
    assert server.jobs() == []


def test_chunked_body_larger_than_the_limit_is_413(server):
    """No Content-Length (chunked): the bytes actually read are counted."""
    chunks = [b'{"name": "x", "metadata": {"pad": "'] + [b"p" * 1000] * 10 + [b'"}}']
    r = server.call("POST", "/v1/jobs", raw=iter(chunks))  # an iterator without a length goes chunked
    assert (r.status, r.code) == (413, "body-too-large")
    assert server.jobs() == []


def test_body_at_the_limit_is_accepted(server):
    """Exactly max_api_body bytes is still fine."""
    head, tail = b'{"name": "x", "metadata": {"pad": "', b'"}}'
    body = head + b"p" * (LIMITS.max_api_body - len(head) - len(tail)) + tail
    assert len(body) == LIMITS.max_api_body
    assert server.call("POST", "/v1/jobs", raw=body).status == 201


def test_hardened_site_bounds_the_body_in_memory(make_server):
    """ControlAPI.site(): a huge chunked body is refused and only limit + 1 bytes are kept."""
    server = make_server(hardened=True)
    chunks = [b"{"] + [b" " * 65536] * 32
    r = server.call("POST", "/v1/jobs", raw=iter(chunks))  # an iterator without a length goes chunked
    assert (r.status, r.code) == (413, "body-too-large")
    assert server.create_job("fine")["name"] == "fine"


def test_bounded_body_keeps_one_byte_past_the_limit():
    """BoundedBody drops (and counts) what is past limit + 1."""
    body = BoundedBody(4)
    assert body.write(b"abc") == 3 and body.write(b"defgh") == 5
    body.seek(0)
    assert (body.read(), body.dropped) == (b"abcde", 3)


# ------------------------------------------------------------ methods, paths, conflicts


@pytest.mark.parametrize("method,path,allow", [
    ("PUT", "/v1/jobs", "GET, POST"), ("DELETE", "/v1/info", "GET"), ("POST", "/v1/info", "GET"),
    ("PUT", "/v1/jobs/job-1", "GET, PATCH, DELETE"), ("GET", "/v1/jobs/job-1/files", "POST"),
    ("GET", "/v1/sessions/abc", "DELETE"), ("HEAD", "/v1/uploads", "GET"), ("OPTIONS", "/v1/jobs", "GET, POST"),
])
def test_wrong_method_is_405_with_allow(server, method, path, allow):
    """A known path with the wrong method: 405 method-not-allowed and an Allow header."""
    server.create_job()
    before = server.everything()
    conn = HTTPConnection("127.0.0.1", server.port.getHost().port, timeout=10)
    conn.request(method, path, body=b"{}", headers={"Authorization": f"Bearer {server.token}"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    assert resp.status == 405
    assert resp.getheader("Allow") == allow
    assert resp.getheader("Content-Type") == "application/json"
    if method != "HEAD":
        assert json.loads(payload)["error"]["code"] == "method-not-allowed"
    assert server.everything() == before


@pytest.mark.parametrize("path", ["/index.html", "/v1", "/v1/", "/v1/jobs/", "/v2/jobs", "/v1/jobs/a/b/c",
                                  "/v1/files", "/v1/sessions", "/v1/info/x"])
def test_unknown_path_is_404(server, path):
    """Paths the API does not have: 404 not-found."""
    r = server.call("GET", path)
    assert (r.status, r.code) == (404, "not-found")


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/jobs/nope", None), ("PATCH", "/v1/jobs/nope", {"name": "x"}),
    ("DELETE", "/v1/jobs/nope", None), ("POST", "/v1/jobs/nope/files", {"name": "a", "size": 1}),
    ("POST", "/v1/jobs/nope/files", {"files": [{"name": "a", "size": 1}]}),
    ("POST", "/v1/jobs/nope/sessions", {}), ("GET", f"/v1/jobs/{uuid.uuid4()}", None),
    ("GET", f"/v1/files/{uuid.uuid4()}", None), ("GET", "/v1/files/not-a-key", None),
    ("DELETE", f"/v1/sessions/{uuid.uuid4()}", None),
])
def test_unknown_job_file_or_session_is_404(server, method, path, body):
    """Unknown jobs, files and sessions: 404 not-found, nothing changed."""
    server.create_job()
    before = server.everything()
    r = server.call(method, path, body)
    assert (r.status, r.code) == (404, "not-found")
    assert server.everything() == before


def test_duplicate_job_name_is_409(server):
    """A second job with a taken name: 409 conflict; the first job is untouched."""
    job = server.create_job("twin", metadata={"n": 1})
    r = server.call("POST", "/v1/jobs", {"name": "twin", "metadata": {"n": 2}})
    assert (r.status, r.code) == (409, "conflict")
    assert [(j["id"], j["metadata"]) for j in server.jobs()] == [(job["id"], {"n": 1})]


def test_rename_to_a_taken_name_is_409(server):
    """PATCH to another job's name: 409 conflict, both names unchanged."""
    server.create_job("one")
    server.create_job("two")
    r = server.call("PATCH", "/v1/jobs/two", {"name": "one"})
    assert (r.status, r.code) == (409, "conflict")
    assert [j["name"] for j in server.jobs()] == ["one", "two"]


def test_duplicate_file_name_is_409(server):
    """A file name taken in the job: 409 conflict, alone or in a batch (which adds nothing)."""
    server.create_job()
    server.add_file("job-1", "a", 1)
    r = server.call("POST", "/v1/jobs/job-1/files", {"name": "a", "size": 2})
    assert (r.status, r.code) == (409, "conflict")
    r = server.call("POST", "/v1/jobs/job-1/files", {"files": [{"name": "b", "size": 1}, {"name": "a", "size": 1}]})
    assert (r.status, r.code) == (409, "conflict")
    assert [f["name"] for f in server.call("GET", "/v1/jobs/job-1").body["files"]] == ["a"]


def test_non_utf8_path_is_400(server):
    """Percent-encoded bytes that are not UTF-8 are refused."""
    r = server.call("GET", "/v1/jobs/%ff%fe")
    assert (r.status, r.code) == (400, "bad-request")


# ------------------------------------------------------------ failures inside the server


class FailingStore:
    """A store whose list_jobs fails with an unexpected error."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner

    def list_jobs(self):
        raise RuntimeError("secret-detail-1234 /srv/private/path")

    def job_summaries(self, *args: Any):  # what GET /v1/jobs asks of the store
        raise RuntimeError("secret-detail-1234 /srv/private/path")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_unexpected_error_is_500_without_details(make_server, logged):
    """An unexpected exception: 500 internal-error, no traceback in the body, logged instead."""
    server = make_server(wrap=FailingStore)
    r = server.call("GET", "/v1/jobs")
    assert (r.status, r.code) == (500, "internal-error")
    text = json.dumps(r.body)
    assert "secret-detail" not in text and "Traceback" not in text and "RuntimeError" not in text
    logged_failures = failures(logged)
    assert any(e["log_failure"].check(RuntimeError) for e in logged_failures if "log_failure" in e)
    assert server.call("GET", "/v1/info").status == 200


class GatedStore:
    """A store whose list_jobs waits until the test opens the gate."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def list_jobs(self):
        self.entered.set()
        self.gate.wait(10)
        return self.inner.list_jobs()

    def job_summaries(self, *args: Any):  # what GET /v1/jobs asks of the store
        self.entered.set()
        self.gate.wait(10)
        return self.inner.job_summaries(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_client_gone_during_a_pending_request(make_server, logged):
    """A client that disconnects while the store works: no error, the server carries on."""
    gated: list[GatedStore] = []
    server = make_server(wrap=lambda inner: gated.append(GatedStore(inner)) or gated[0])
    sock = socket.create_connection(("127.0.0.1", server.port.getHost().port), timeout=10)
    sock.sendall(f"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n\r\n".encode())
    assert gated[0].entered.wait(10)
    sock.close()
    time.sleep(0.2)  # let the reactor see the connection go
    gated[0].gate.set()
    # the store runs calls in order on one thread: this reply comes after the gone one was handled
    assert server.call("GET", "/v1/info").status == 200
    assert failures(logged) == []


def test_logs_never_hold_tokens_or_keys_in_full(make_server, logged):
    """Tokens and keys are cut short in every log line, the hardened site's access log included."""
    server = make_server(hardened=True)
    job = server.create_job()
    f = server.add_file("job-1", "a", 1)
    session = server.call("POST", "/v1/jobs/job-1/sessions").body
    server.call("GET", f"/v1/files/{f['key']}")
    server.call("DELETE", f"/v1/sessions/{session['key']}")
    server.call("GET", "/v1/info", token="fdk_wrong-token-value")
    server.call("DELETE", "/v1/jobs/job-1")
    text = "\n".join(formatEvent(e) or "" for e in logged)
    assert f"/v1/files/{f['key'][:8]}..." in text  # the access log is there, with the key cut
    for secret in (server.token, "fdk_wrong-token-value", job["id"], f["key"], session["key"]):
        assert secret not in text


def test_hide_keys_and_access_log_line():
    """hide_keys cuts every key; the access log line uses it."""
    key = str(uuid.uuid4())
    assert hide_keys(f"/v1/files/{key}?x={key}") == f"/v1/files/{key[:8]}…?x={key[:8]}…"
    request = types.SimpleNamespace(
        uri=f"/v1/sessions/{key}".encode(), method=b"DELETE", clientproto=b"HTTP/1.1", code=200,
        sentLength=10, getClientAddress=lambda: None, getHeader=lambda name: None)
    line = access_log_line("[ts]", request)
    assert key not in line and f"/v1/sessions/{key[:8]}..." in line


def test_dashboard_page_is_served_without_data(server):
    """GET / serves the dashboard page (HTML, strict CSP) without a token; it embeds no job data."""
    conn = HTTPConnection("127.0.0.1", server.port.getHost().port, timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    body = resp.read().decode()
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/html")
    assert "default-src 'none'" in resp.getheader("Content-Security-Policy")
    assert "<title>filedock</title>" in body and 'fetch(path, { headers: { "Authorization"' in body
