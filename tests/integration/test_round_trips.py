"""Round trips before the first byte: what the uploader asks beside what, against a real server.

Across a long path every answer the uploader waits for costs a round trip (100 ms across a
continent). A relay between the client and the server holds each answer of the server for
``DELAY`` seconds and records when each connection opens, each request arrives and each answer
is delivered. The assertions are on the order of those events, which the delay makes certain,
not on durations: ``GET /v1/info`` is asked beside the job lookup, the session is opened beside
the declaration of the files, and the data connection is open before the session's answer comes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from filedock.client.blocking import DataPortClient
from filedock.client.http import ApiClient
from filedock.client.uploader import JobUploader
from filedock.errors import ErrorCode, FiledockError
from tests.integration.harness import ServerProcess

DELAY = 0.5
"""Seconds the relay holds each answer: far more than the client needs between two steps, and more
than the server's own time for a request (its fsyncs)."""


class Relay:
    """A TCP relay to ``target`` that delivers the server's bytes ``DELAY`` s late and logs what passes.

    ``events`` gets ``(time, kind, what)``: ``open`` (a connection, ``what`` is the relay's name),
    ``request`` (the first line of an HTTP request or a data-port header), ``answer`` (the request an
    API answer was for, as it is handed to the client); ``bodies`` maps each request line to its
    answer's bytes.
    """

    def __init__(self, name: str, target: tuple[str, int], events: list, bodies: dict) -> None:
        self.name, self.target, self.events, self.bodies = name, target, events, bodies
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _log(self, kind: str, what: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), kind, what))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._log("open", self.name)
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            asked: list[str] = []  # this connection's requests not answered yet, in order
            last: list[str] = []  # the request whose answer is coming
            threading.Thread(target=self._pump, args=(client, upstream, partial(self._asked, asked=asked)),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, partial(self._answer, asked=asked, last=last)),
                             daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, seen: Any) -> None:
        """Bytes from ``src`` to ``dst``, each piece shown to ``seen`` first, until either end closes."""
        try:
            while data := src.recv(1 << 16):
                seen(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _asked(self, data: bytes, asked: list[str]) -> None:
        first = data.split(b"\r\n", 1)[0].decode("latin-1")
        if first.split(" ", 1)[0] in ("GET", "POST", "DELETE", "PATCH", "PUT", "FILEDOCK/1"):
            line = " ".join(first.split()[:2])
            with self.lock:
                asked.append(line)
            self._log("request", line)

    def _answer(self, data: bytes, asked: list[str], last: list[str]) -> None:
        time.sleep(DELAY)
        with self.lock:
            line = asked.pop(0) if asked and self.name == "api" and data.startswith(b"HTTP/") else None
            if line is not None:
                self.bodies[line] = data
                last[:] = [line]
            elif last:  # the rest of the answer, in a later piece
                self.bodies[last[0]] += data
        if line is not None:  # logged before the client can act on it
            self._log("answer", line)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def relayed(tmp_path):
    """(server, api client through the relay, data client through the relay, events, answer bodies)."""
    with ServerProcess(tmp_path / "data", limits=["job_quota=1M"]) as server:
        events: list = []
        bodies: dict = {}
        api_relay = Relay("api", ("127.0.0.1", int(server.url.rstrip("/").rsplit(":", 1)[1])), events, bodies)
        data_relay = Relay("data", server.data_addr, events, bodies)
        api = ApiClient(f"http://127.0.0.1:{api_relay.port}/", server.token)
        try:
            yield server, api, DataPortClient("127.0.0.1", data_relay.port), events, bodies
        finally:
            api.close()
            api_relay.close()
            data_relay.close()


def when(events: list, kind: str, prefix: str) -> float:
    """When the first event of ``kind`` whose subject starts with ``prefix`` happened."""
    found = [t for t, k, what in events if k == kind and what.startswith(prefix)]
    assert found, f"no {kind} {prefix!r} in {[(k, w) for _, k, w in events]}"
    return found[0]


def test_the_uploader_asks_beside_what_it_waits_for(relayed, tmp_path):
    server, api, data, events, bodies = relayed
    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 1000)
    uploader = JobUploader(api, make_data_client=lambda: data)
    started = time.monotonic()
    results = uploader.upload("round-trips", [source], create=True)
    seconds = time.monotonic() - started
    assert [r.state for r in results] == ["complete"]

    job_id = json.loads(bodies["POST /v1/jobs"].split(b"\r\n\r\n", 1)[1])["id"]
    files, sessions = f"POST /v1/jobs/{job_id}/files", f"POST /v1/jobs/{job_id}/sessions"
    # the job is found or made in one request, and GET /v1/info went out before it was answered
    assert not [what for _, k, what in events if k == "request" and what.startswith("GET /v1/jobs/")]
    assert when(events, "request", "GET /v1/info") < when(events, "answer", "POST /v1/jobs")
    # the session was asked for before the files' declaration was answered
    assert when(events, "request", sessions) < when(events, "answer", files)
    # the data connection was open before the session's answer came, and used right after it
    assert when(events, "open", "data") < when(events, "answer", sessions)
    assert when(events, "request", "FILEDOCK/1 PUT") > when(events, "answer", sessions)
    assert when(events, "request", "DELETE /v1/sessions/") > when(events, "request", "FILEDOCK/1 PUT")
    # the answers waited for one after another: the job, files and session together, the data port's
    # OFFSET and STORED, the session's close: five (eight with the steps one at a time). The rest of
    # the time is the server's own (its fsyncs) and the client's
    waited = round(seconds / DELAY, 1)
    print(json.dumps({"seconds": round(seconds, 3), "answers_waited_in_a_row": waited}))
    assert waited < 6.5, f"{seconds:.2f} s: {waited} answers of {DELAY} s in a row"
    # one data connection, one session: nothing opened ahead was left over
    assert sum(1 for _, k, what in events if k == "open" and what == "data") == 1
    assert sum(1 for _, k, what in events if k == "request" and what.startswith(sessions)) == 1


def test_the_twisted_uploader_asks_beside_what_it_waits_for(relayed, reactor_thread, tmp_path):
    """``upload_job`` (Twisted) asks in the same order: the job in one request, ``GET /v1/info`` beside it,
    the session beside the declaration (its data connection goes to the address ``GET /v1/info`` gives)."""
    from twisted.internet import defer

    from filedock.client.txclient import TxApiClient, upload_job
    from tests.integration.test_client_twisted import in_reactor

    server, api, data, events, bodies = relayed
    source = tmp_path / "t.bin"
    source.write_bytes(b"t" * 2000)
    tx_api = TxApiClient(reactor_thread, api.url, server.token)
    results = in_reactor(reactor_thread, lambda: defer.ensureDeferred(upload_job(tx_api, "tx-trips", [source],
                                                                                  create=True)))
    assert [r.state for r in results] == ["complete"]
    job_id = json.loads(bodies["POST /v1/jobs"].split(b"\r\n\r\n", 1)[1])["id"]
    assert not [what for _, k, what in events if k == "request" and what.startswith("GET /v1/jobs/")]
    assert when(events, "request", "GET /v1/info") < when(events, "answer", "POST /v1/jobs")
    assert when(events, "request", f"POST /v1/jobs/{job_id}/sessions") < \
        when(events, "answer", f"POST /v1/jobs/{job_id}/files")
    assert when(events, "request", "DELETE /v1/sessions/") > when(events, "answer", f"POST /v1/jobs/{job_id}/files")


def test_create_finds_an_existing_job_and_resumes_it_in_one_request(relayed, tmp_path):
    """``--create`` on a job that exists: the one ``POST /v1/jobs`` (``exist_ok``) answers with its files, so
    a second run declares nothing again and sends nothing already there."""
    server, api, data, events, bodies = relayed
    source = tmp_path / "a.bin"
    source.write_bytes(b"r" * 5000)
    job = server.api.create_job("again")
    [record] = server.api.add_files(job["id"], [("a.bin", 5000)])
    results = JobUploader(api, make_data_client=lambda: data).upload("again", [source], create=True)
    assert [(r.state, r.key) for r in results] == [("complete", record["key"])]
    asked = [what for _, k, what in events if k == "request" and what.startswith(("GET /v1/jobs", "POST /v1/jobs"))]
    assert asked == ["POST /v1/jobs", f"POST /v1/jobs/{job['id']}/sessions"]  # no lookup, no declaration
    assert [j["name"] for j in server.api.get("/v1/jobs")["jobs"]] == ["again"]


def test_create_with_a_token_that_may_not_create_jobs_finds_the_job(tmp_path):
    """An upload-scoped token may not ``POST /v1/jobs``: ``--create`` then looks the job up as before."""
    with ServerProcess(tmp_path / "data") as server:
        job = server.api.create_job("scoped")
        token = server.api.post("/v1/tokens", {"label": "uploader", "scope": "upload", "job": job["id"]})["token"]
        source = tmp_path / "a.bin"
        source.write_bytes(b"s" * 3000)
        api = ApiClient(server.url, token)
        results = JobUploader(api).upload("scoped", [source], create=True)
        assert [r.state for r in results] == ["complete"]
        with pytest.raises(FiledockError) as caught:
            JobUploader(api).upload("not-there", [source], create=True)
        assert caught.value.code is ErrorCode.FORBIDDEN


def test_a_session_opened_ahead_is_closed_when_the_files_are_refused(relayed, tmp_path):
    server, api, data, events, bodies = relayed
    source = tmp_path / "big.bin"
    with open(source, "wb") as f:
        f.truncate(2 << 20)  # more than the job quota of 1 MiB: the declaration is refused
    uploader = JobUploader(api, make_data_client=lambda: data)
    with pytest.raises(FiledockError) as caught:
        uploader.upload("over-quota", [source], create=True)
    assert caught.value.code is ErrorCode.QUOTA_EXCEEDED
    job_id = json.loads(bodies["POST /v1/jobs"].split(b"\r\n\r\n", 1)[1])["id"]
    opened = json.loads(bodies[f"POST /v1/jobs/{job_id}/sessions"].split(b"\r\n\r\n", 1)[1])
    assert when(events, "request", f"DELETE /v1/sessions/{opened['key']}")
    # the server holds it closed: closing it again returns it as it is, closed already
    again = server.api.request("DELETE", f"/v1/sessions/{opened['key']}")
    assert again["closed"] is not None and again["closed"] <= time.time()


def test_a_preconnected_connection_the_server_closed_is_not_used(tmp_path):
    """The server drops a connection that sends no request within its header time-out: the transfer must
    open a new one, not fail on the stale one and spend an attempt of its retry budget."""
    with ServerProcess(tmp_path / "data", limits=["header_timeout=0.5"]) as server:
        api = server.api
        job = api.create_job("stale")
        [record] = api.add_files(job["id"], [("a.bin", 4096)])
        session = api.open_session(job["id"])
        source = tmp_path / "a.bin"
        source.write_bytes(b"y" * 4096)
        client = DataPortClient(*server.data_addr, attempts=1)  # one failed connection would end it
        client.preconnect()
        time.sleep(1.5)  # the server has timed the idle connection out
        result = client.upload_file(session["key"], record["key"], source)
        assert result.state == "complete" and result.sent == 4096
        client.preconnect()
        client.close_warm()  # not taken: closed, and the next transfer connects itself
        result = client.upload_file(session["key"], record["key"], source)
        assert result.state == "complete"


def test_a_preconnect_that_fails_reports_as_the_transfers_own_connect(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    client = DataPortClient("127.0.0.1", port, attempts=1)
    client.preconnect()
    source = Path(tmp_path / "a.bin")
    source.write_bytes(b"z")
    with pytest.raises(FiledockError) as caught:
        client.upload_file("0" * 32, "1" * 32, source)
    assert caught.value.code is ErrorCode.UNREACHABLE
    assert f"127.0.0.1:{port}" in caught.value.message


def test_twisted_a_session_opened_ahead_is_closed_when_the_files_are_refused(relayed, reactor_thread, tmp_path):
    from twisted.internet import defer

    from filedock.client.txclient import TxApiClient, upload_job
    from tests.integration.test_client_twisted import in_reactor

    server, api, data, events, bodies = relayed
    source = tmp_path / "big.bin"
    with open(source, "wb") as f:
        f.truncate(2 << 20)  # more than the job quota of 1 MiB
    tx_api = TxApiClient(reactor_thread, api.url, server.token)
    with pytest.raises(FiledockError) as caught:
        in_reactor(reactor_thread, lambda: defer.ensureDeferred(upload_job(tx_api, "tx-over", [source], create=True)))
    assert caught.value.code is ErrorCode.QUOTA_EXCEEDED
    job_id = json.loads(bodies["POST /v1/jobs"].split(b"\r\n\r\n", 1)[1])["id"]
    opened = json.loads(bodies[f"POST /v1/jobs/{job_id}/sessions"].split(b"\r\n\r\n", 1)[1])
    # closed before the upload's failure was reported
    assert [1 for _, k, what in events if k == "answer" and what == f"DELETE /v1/sessions/{opened['key']}"]
    assert server.api.request("DELETE", f"/v1/sessions/{opened['key']}")["closed"] is not None
