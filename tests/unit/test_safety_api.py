"""Issue 10, item 13 (API parts): numbers JSON cannot carry, two Authorization headers, keys
in upper case in the access log, and fsck's message for a CRC-only mismatch."""

from __future__ import annotations

import json
from http.client import HTTPConnection

import pytest

from filedock.fsck import Fsck
from filedock.server.api import hide_keys
from filedock.store.blobs import BlobStore
from filedock.store.sqlite import SQLiteStore
from tests.unit.test_api import Server, make_server  # noqa: F401  (a fixture)


@pytest.mark.parametrize("raw", [b'{"name": "j", "metadata": {"x": 1e999}}',
                                 b'{"name": "j", "metadata": {"x": -1e999}}',
                                 b'{"name": "j", "metadata": {"x": NaN}}',
                                 b'{"name": "j", "metadata": {"x": 1E400}}'])
def test_numbers_json_cannot_carry_are_refused(make_server, raw):
    """``1e999`` would be stored as infinity and sent back as the non-JSON word ``Infinity``:
    it is refused with bad-request, and no job is made."""
    server: Server = make_server()
    r = server.call("POST", "/v1/jobs", raw=raw)
    assert (r.status, r.code) == (400, "bad-request")
    assert server.jobs() == []


def test_metadata_update_with_infinity_is_refused_and_listing_stays_json(make_server):
    """PATCH with 1e999 is refused; what the API sends back is always strict JSON."""
    server: Server = make_server()
    server.create_job("j", metadata={"x": 1.5e300})
    r = server.call("PATCH", "/v1/jobs/j", raw=b'{"metadata": {"x": 1e999}}')
    assert (r.status, r.code) == (400, "bad-request")
    conn = HTTPConnection("127.0.0.1", server.port.getHost().port, timeout=10)
    conn.request("GET", "/v1/jobs/j", headers={"Authorization": f"Bearer {server.token}"})
    payload = conn.getresponse().read()
    conn.close()
    json.loads(payload, parse_constant=lambda name: pytest.fail(f"{name} in a reply"))
    assert json.loads(payload)["metadata"] == {"x": 1.5e300}


def test_two_authorization_headers_are_refused(make_server):
    """Two Authorization headers (even two valid ones) get 400: which one counts is not left to chance."""
    server: Server = make_server()
    port = server.port.getHost().port
    for second in (server.token, "wrong"):
        conn = HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("Authorization", f"Bearer {server.token}")
        conn.putheader("Authorization", f"Bearer {second}")
        body = b'{"name": "two-headers"}'
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        conn.close()
        assert resp.status == 400 and payload["error"]["code"] == "bad-request"
    assert server.jobs() == []


def test_keys_in_upper_case_are_hidden_from_the_log():
    """A key the client wrote in upper case is cut short like a lower-case one."""
    key = "183DC062-B210-4BC1-B559-AE5744CB0CE0"
    assert hide_keys(f"/v1/files/{key}", "...") == "/v1/files/183DC062..."
    assert hide_keys(f"/v1/sessions/{key.lower()}") == "/v1/sessions/183dc062…"


def test_fsck_names_the_crcs_when_only_the_crc_differs(tmp_path):
    """A complete file whose digest matches but whose recorded CRC-32 does not: the finding shows
    both CRCs, not the same digest twice."""
    from filedock.digest import hash_file

    store = SQLiteStore(tmp_path / "filedock.sqlite3")
    blobs = BlobStore(tmp_path)
    job = store.create_job("j", {})
    record = store.add_file(job.id, "a", 5)
    path = blobs.final_path(job.id, getattr(record, "id", None) or record.key)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"hello")
    h = hash_file(path)
    store.record_complete(record.key, h.crc32 ^ 1, h.hexdigest())
    (finding,) = Fsck(store, blobs).run()
    assert finding.kind == "digest-mismatch"
    assert f"{h.crc32 ^ 1:08x}" in finding.detail and f"{h.crc32:08x}" in finding.detail
    assert h.hexdigest() not in finding.detail
    store.close()


class SlowTokenStore:
    """A store whose token check waits until the test opens the gate."""

    def __init__(self, inner: SQLiteStore) -> None:
        import threading

        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def check_token(self, token: str):
        self.entered.set()
        self.gate.wait(10)
        return self.inner.check_token(token)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.mark.parametrize("token", ["valid", "wrong"])
@pytest.mark.parametrize("how", ["closes", "is-dropped-for-a-newer-one"])
def test_client_gone_while_its_token_is_checked(make_server, token, how):
    """The hardened site checks a token before reading the body; a client that leaves meanwhile (or
    whose connection is dropped to make room for a new one) leaves no error behind, and the server
    answers the next request."""
    from filedock import record
    import socket
    import time

    from twisted.logger import globalLogPublisher

    from tests.unit.test_api import LIMITS, failures

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        gated: list[SlowTokenStore] = []
        limits = record.replace(LIMITS, max_api_connections=1 if how != "closes" else 1024)
        server: Server = make_server(hardened=True, limits=limits,
                                     wrap=lambda inner: gated.append(SlowTokenStore(inner)) or gated[0])
        port = server.port.getHost().port
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sent = server.token if token == "valid" else "fdk_wrong"
        sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {sent}\r\n"
                     f"Content-Length: 20\r\n\r\n".encode())
        assert gated[0].entered.wait(10)
        newer = socket.create_connection(("127.0.0.1", port), timeout=10)  # drops the first if the site is full
        if how == "closes":
            sock.close()
        time.sleep(0.3)
        gated[0].gate.set()
        time.sleep(0.3)
        newer.close()
        sock.close()
        time.sleep(0.2)
        assert server.call("GET", "/v1/info").status == 200
        assert failures(events) == []
    finally:
        globalLogPublisher.removeObserver(events.append)
