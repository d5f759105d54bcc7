"""Issue 10, item 12: scoped tokens on the control API. Every endpoint against every kind of token.

A token is ``admin`` (everything), ``upload`` (declare, upload, resume and check files) or
``read`` (list, show, download), for every job or for one job only. Each case gets a fresh
server with two jobs (``mine``, which the job-bound tokens are for, and ``other``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http.client import HTTPConnection
from typing import Any
from urllib.parse import quote

import pytest

from tests.unit.test_api import Server, make_server  # noqa: F401  (a fixture)

GRANTS = {  # name: (scope, bound to job "mine")
    "admin": ("admin", False),
    "admin-mine": ("admin", True),
    "upload": ("upload", False),
    "upload-mine": ("upload", True),
    "read": ("read", False),
    "read-mine": ("read", True),
}


@dataclass(frozen=True)
class Endpoint:
    """One request; ``{job}``, ``{file}``, ``{session}``, ``{token_id}`` are filled in per case."""

    method: str
    path: str
    body: Any
    scopes: tuple[str, ...]
    per_job: bool  # True: it touches one job (the one in {job}, or the file's or session's job)


ENDPOINTS = [
    Endpoint("GET", "/v1/info", None, ("admin", "upload", "read"), False),
    Endpoint("GET", "/v1/jobs", None, ("admin", "read"), False),
    Endpoint("POST", "/v1/jobs", {"name": "made"}, ("admin",), False),
    Endpoint("GET", "/v1/jobs/{job}", None, ("admin", "upload", "read"), True),
    Endpoint("PATCH", "/v1/jobs/{job}", {"metadata": {"k": 1}}, ("admin",), True),
    Endpoint("DELETE", "/v1/jobs/{job}", None, ("admin",), True),
    Endpoint("POST", "/v1/jobs/{job}/files", {"name": "new.bin", "size": 3}, ("admin", "upload"), True),
    Endpoint("POST", "/v1/jobs/{job}/sessions", {}, ("admin", "upload", "read"), True),
    Endpoint("GET", "/v1/files/{file}", None, ("admin", "upload", "read"), True),
    Endpoint("DELETE", "/v1/sessions/{session}", None, ("admin", "upload", "read"), True),
    Endpoint("GET", "/v1/uploads", None, ("admin", "read"), False),
    Endpoint("GET", "/metrics", None, ("admin", "read"), False),
    Endpoint("GET", "/v1/stats", None, ("admin", "read"), False),
    Endpoint("POST", "/v1/tokens", {"scope": "read"}, ("admin",), False),
    Endpoint("GET", "/v1/tokens", None, ("admin",), False),
    Endpoint("DELETE", "/v1/tokens/{token_id}", None, ("admin",), False),
]

CASES = [(e, grant, target) for e in ENDPOINTS for grant in GRANTS
         for target in (("mine", "other") if e.per_job else ("mine",))]


def call(server: Server, method: str, path: str, body: Any, token: str) -> tuple[int, bytes]:
    conn = HTTPConnection("127.0.0.1", server.port.getHost().port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def world(server: Server) -> dict[str, Any]:
    """Two jobs with a file and an open session each, and a spare token to revoke."""
    out: dict[str, Any] = {}
    for name in ("mine", "other"):
        job = server.create_job(name)
        record = server.add_file(name, "a.bin", 3)
        session = server.call("POST", f"/v1/jobs/{name}/sessions", {}).body
        out[name] = {"job": job["id"], "file": record["key"], "session": session["key"]}
    spare = server.sqlite.create_token("spare", "read")
    out["token_id"] = server.sqlite.check_token(spare).id
    return out


def state(server: Server) -> Any:
    """What a refused request must leave as it was."""
    s = server.sqlite
    return ([(j.name, j.metadata) for j in s.list_jobs()],
            [(f.job_id, f.name) for f in s.all_files()],
            [(g.id, g.scope) for g in s.list_tokens()],
            s._read("SELECT closed FROM sessions ORDER BY created"))


@pytest.mark.parametrize("endpoint,grant,target", CASES,
                         ids=[f"{e.method}-{e.path}-{g}-{t}" for e, g, t in CASES])
def test_every_endpoint_against_every_scope(make_server, endpoint, grant, target):
    """A token's scope and job decide: allowed requests succeed; others get 403 forbidden and change
    nothing. A token bound to job "mine" cannot reach job "other", nor endpoints spanning all jobs."""
    server: Server = make_server(hardened=True)
    w = world(server)
    scope, bound = GRANTS[grant]
    token = server.sqlite.create_token(grant, scope, w["mine"]["job"] if bound else None)
    ids = w[target]
    path = endpoint.path.format(job=quote(target), file=ids["file"], session=ids["session"],
                                token_id=w["token_id"])
    allowed = scope in endpoint.scopes and (not bound or (endpoint.per_job and target == "mine")
                                            or endpoint.path == "/v1/info")
    before = state(server)
    status, payload = call(server, endpoint.method, path, endpoint.body, token)
    if allowed:
        assert 200 <= status < 300, (status, payload)
    else:
        assert status == 403, (status, payload)
        assert json.loads(payload)["error"]["code"] == "forbidden"
        assert state(server) == before


def test_a_job_bound_token_cannot_probe_other_job_names(make_server):
    """A job that does not exist and one that does (not its own) are refused alike."""
    server: Server = make_server(hardened=True)
    w = world(server)
    token = server.sqlite.create_token("t", "read", w["mine"]["job"])
    for ref in ("other", "no-such-job"):
        status, payload = call(server, "GET", f"/v1/jobs/{ref}", None, token)
        assert (status, json.loads(payload)["error"]["code"]) == (403, "forbidden")


def test_sessions_carry_their_tokens_scope(make_server):
    """A session opened with an upload (read) token says so; admin tokens open admin sessions."""
    server: Server = make_server(hardened=True)
    w = world(server)
    for scope in ("upload", "read", "admin"):
        token = server.sqlite.create_token(scope, scope, w["mine"]["job"])
        status, payload = call(server, "POST", "/v1/jobs/mine/sessions", {}, token)
        assert status == 201
        session = json.loads(payload)
        assert session["scope"] == scope
        assert server.sqlite.get_session(session["key"]).scope == scope


def test_tokens_endpoint_creates_lists_and_revokes(make_server):
    """POST /v1/tokens shows the token once; GET lists grants without secrets; DELETE revokes it."""
    server: Server = make_server(hardened=True)
    w = world(server)
    r = server.call("POST", "/v1/tokens", {"label": "ci", "scope": "upload", "job": "mine"})
    assert r.status == 201
    made = r.body
    assert made["scope"] == "upload" and made["job"] == w["mine"]["job"] and made["token"].startswith("fdk_")
    listing = server.call("GET", "/v1/tokens").body["tokens"]
    assert made["id"] in [t["id"] for t in listing]
    assert made["token"] not in json.dumps(listing)
    assert call(server, "GET", "/v1/jobs/mine", None, made["token"])[0] == 200
    assert server.call("DELETE", f"/v1/tokens/{made['id']}").status == 200
    assert call(server, "GET", "/v1/jobs/mine", None, made["token"])[0] == 401
    assert server.call("DELETE", f"/v1/tokens/{made['id']}").code == "not-found"


@pytest.mark.parametrize("body", [{"scope": "root"}, {"scope": 1}, {"job": "no-such-job"}, {"label": ""},
                                  {"extra": 1}])
def test_tokens_endpoint_refuses_bad_requests(make_server, body):
    """Unknown scopes, jobs and fields are refused; no token is made."""
    server: Server = make_server(hardened=True)
    before = server.sqlite.list_tokens()
    r = server.call("POST", "/v1/tokens", body)
    assert r.status in (400, 404)
    assert server.sqlite.list_tokens() == before


def test_a_deleted_job_takes_its_tokens_along(make_server):
    """Tokens bound to a job stop working when the job is deleted."""
    server: Server = make_server(hardened=True)
    w = world(server)
    token = server.sqlite.create_token("t", "upload", w["mine"]["job"])
    assert server.call("DELETE", "/v1/jobs/mine").status == 200
    assert call(server, "GET", "/v1/info", None, token)[0] == 401


@pytest.mark.parametrize("method,suffix", [("GET", "content"), ("POST", "link")])
def test_file_content_and_links_need_read_scope_on_the_files_job(make_server, method, suffix):
    """A file's bytes (and a signed link to them) are for read and admin tokens of its job only:
    an upload token, or a token of another job, is refused before the file's state is looked at."""
    server: Server = make_server(hardened=True)
    w = world(server)
    path = f"/v1/files/{w['mine']['file']}/{suffix}"
    for scope, job in (("upload", None), ("read", w["other"]["job"]), ("upload", w["mine"]["job"])):
        status, payload = call(server, method, path, {} if method == "POST" else None,
                               server.sqlite.create_token("t", scope, job))
        assert (status, json.loads(payload)["error"]["code"]) == (403, "forbidden")
    for scope, job in (("read", None), ("read", w["mine"]["job"]), ("admin", None)):
        status, payload = call(server, method, path, {} if method == "POST" else None,
                               server.sqlite.create_token("t", scope, job))
        # allowed through: the file is declared but not complete yet
        assert (status, json.loads(payload)["error"]["code"]) == (409, "not-complete")
