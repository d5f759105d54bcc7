"""A closed connection is freed by reference counting alone, not left for the cycle collector.

A data-port connection holds its request, which holds the connection back as its channel (and the
writer's callbacks, the registry's claim, ...): unless something lets go when the connection closes,
every closed connection and its buffers wait for a full garbage collection. The same goes for an HTTP
upload's exchange (its ``Upload``'s channel, its web request's ``http_upload``), and for a failed step,
whose exception's traceback holds the frames (and so the request) that raised it. Each test disables
the collector, runs connections to their end (through StringTransport, or over real loopback sockets
on the reactor), and asserts weak references to them are dead.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import socket
import time
import uuid
import weakref
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from twisted.internet import threads

from filedock.config import Limits
from filedock.server.api import ControlAPI
from filedock.server.authority import StoreAuthority
from filedock.server.dataport import DataPortFactory
from filedock.server.http_upload import HttpUploads
from filedock.store.blobs import BlobStore
from filedock.store.metadata import DeferredStore
from filedock.store.sqlite import SQLiteStore
from tests.integration.test_dataport import recv_line
from tests.unit.test_dataport import Harness, digest_of

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def who_holds(obj: object) -> str:
    """The types of what still refers to ``obj`` (for the failure message)."""
    return ", ".join(sorted({type(r).__name__ for r in gc.get_referrers(obj)}))


def alive(ref: weakref.ref) -> str:
    obj = ref()
    return "" if obj is None else f"{type(obj).__name__} still alive, held by: {who_holds(obj)}"


def versioned_upload(h: Harness, name: str) -> tuple[weakref.ref, weakref.ref]:
    """PUT, body, DONE, STORED, close: weak references to the connection and its request."""
    data = os.urandom(70_000)
    key = h.app.expect_file(h.job, name, len(data))
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} {len(data)}\r\n".encode())
    proto.dataReceived(data + f"DONE {digest_of(data)}\r\n".encode())
    assert transport.value().endswith(f"{digest_of(data)}\r\n".encode())
    request = weakref.ref(proto.request)
    h.close(proto, transport)
    assert h.app.completed == [key]
    return weakref.ref(proto), request


def cut_upload(h: Harness, name: str) -> tuple[weakref.ref, weakref.ref]:
    """PUT, half the body, the client gone: the partial is kept; weak references as above."""
    key = h.app.expect_file(h.job, name, 100_000)
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 PUT {h.session} {key} 100000\r\n".encode())
    proto.dataReceived(os.urandom(50_000))
    request = weakref.ref(proto.request)
    h.close(proto, transport)
    return weakref.ref(proto), request


@pytest.mark.parametrize("run", [versioned_upload, cut_upload], ids=["stored", "cut"])
def test_a_closed_upload_connection_is_freed_without_the_cycle_collector(tmp_path, no_cycle_collector, run):
    h = Harness(tmp_path)
    proto, request = run(h, "f")
    assert not alive(proto), alive(proto)
    assert not alive(request), alive(request)


def test_a_closed_abort_connection_is_freed_without_the_cycle_collector(tmp_path, no_cycle_collector):
    """ABORT claims the file like an upload: once ABORTED and closed, the connection is gone too."""
    h = Harness(tmp_path)
    cut_upload(h, "f")
    key = next(iter(h.app.files))
    proto, transport = h.connect()
    proto.dataReceived(f"FILEDOCK/1 ABORT {h.session} {key}\r\n".encode())
    assert transport.value() == b"ABORTED\r\n"
    h.close(proto, transport)
    ref = weakref.ref(proto)
    del proto, transport
    assert not alive(ref), alive(ref)


# -- the same over real loopback connections, on the reactor: the data port and HTTP uploads (tus)


class LoopbackServer:
    """The data port and the control API (with ``/files/``) of one store, listening on loopback in this
    process; every data-port protocol and HTTP exchange built is remembered by a weak reference."""

    def __init__(self, reactor: Any, tmp_path: Path) -> None:
        self.reactor = reactor
        self.sqlite = SQLiteStore(tmp_path / "meta.db")
        self.token = self.sqlite.create_token("test")
        self.protocols: list[weakref.ref] = []
        self.exchanges: list[weakref.ref] = []
        self.blobs = BlobStore(tmp_path / "data")
        self.ports = threads.blockingCallFromThread(reactor, self._listen)

    def _listen(self) -> list[Any]:
        limits = Limits(disk_reserve=0)
        store = DeferredStore(self.sqlite, self.reactor)
        authority = StoreAuthority(store, limits, blobs=self.blobs)
        dataport = DataPortFactory(authority, self.blobs, limits, self.reactor)
        build = dataport.buildProtocol
        dataport.buildProtocol = lambda addr: self._remember(self.protocols, build(addr))
        data_port = self.reactor.listenTCP(0, dataport, interface="127.0.0.1")
        info = {"data_port": {"host": "127.0.0.1", "port": data_port.getHost().port, "tls": False}}
        api = ControlAPI(store, self.blobs, limits, dataport, lambda: info)
        api.http_uploads = uploads = HttpUploads(api, dataport, authority)
        exchange = uploads.exchange
        uploads.exchange = lambda request, length: self._remember(self.exchanges, exchange(request, length))
        return [data_port, self.reactor.listenTCP(0, api.site(), interface="127.0.0.1")]

    @staticmethod
    def _remember(refs: list[weakref.ref], obj: Any) -> Any:
        refs.append(weakref.ref(obj))
        return obj

    def stop(self) -> None:
        for port in self.ports:
            threads.blockingCallFromThread(self.reactor, port.stopListening)
        self.sqlite.close()

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = HTTPConnection("127.0.0.1", self.ports[1].getHost().port, timeout=30)
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {self.token}", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp, data

    def until_freed(self, refs: list[weakref.ref], what: str) -> None:
        """Wait (a few reactor turns) until every object in ``refs`` is gone; fail naming who holds one."""
        deadline = time.monotonic() + 10
        while True:
            # looked at on the reactor thread, between its callbacks: nothing of theirs is on a stack
            left = threads.blockingCallFromThread(self.reactor, lambda: [alive(r) for r in refs if r() is not None])
            if not left:
                return
            assert time.monotonic() < deadline, f"{what}: {left}"
            time.sleep(0.05)


@pytest.fixture
def loopback(reactor_thread, tmp_path, no_cycle_collector):
    server = LoopbackServer(reactor_thread, tmp_path)
    yield server
    server.stop()


def test_closed_loopback_data_port_connections_are_freed_without_the_cycle_collector(loopback):
    """Three uploads over real sockets (stored, cut mid-body, refused): once the server is done with
    them, no data-port protocol is left."""
    status, _, body = loopback.call("POST", "/v1/jobs", json.dumps({"name": "j"}).encode())
    assert status == 201, body
    job = json.loads(body)["id"]
    data = os.urandom(300_000)
    status, _, body = loopback.call("POST", f"/v1/jobs/{job}/files", json.dumps(
        {"files": [{"name": "a", "size": len(data)}, {"name": "b", "size": len(data)}]}).encode())
    assert status == 201, body
    keys = [f["key"] for f in json.loads(body)["files"]]
    status, _, body = loopback.call("POST", f"/v1/jobs/{job}/sessions", b"{}")
    assert status == 201, body
    session = json.loads(body)["key"]
    port = loopback.ports[0].getHost().port

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"FILEDOCK/1 PUT {session} {keys[0]} {len(data)}\r\n".encode())
        assert recv_line(sock) == b"OFFSET 0"
        sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
        assert recv_line(sock).startswith(b"STORED ")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"FILEDOCK/1 PUT {session} {keys[1]} {len(data)}\r\n".encode())
        assert recv_line(sock) == b"OFFSET 0"
        sock.sendall(data[:100_000])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"FILEDOCK/1 PUT {session} {uuid.uuid4()} 10\r\n".encode())
        assert recv_line(sock).startswith(b"ERR ")
    # the cut one is settled (its partial recorded) once its connection let go of the file
    assert len(loopback.protocols) == 3
    loopback.until_freed(loopback.protocols, "data-port connections still alive")


def test_finished_http_uploads_are_freed_without_the_cycle_collector(loopback):
    """tus: a creation, a PATCH that completes it and one cut short; afterwards no exchange is left."""
    status, _, body = loopback.call("POST", "/v1/jobs", json.dumps({"name": "j1"}).encode())
    assert status == 201, body
    data = os.urandom(200_000)
    paths = []
    for name in ("a", "b"):
        meta = f"job {base64.b64encode(b'j1').decode()},filename {base64.b64encode(name.encode()).decode()}"
        status, resp, body = loopback.call("POST", "/files/", None, {**TUS, "Upload-Length": str(len(data)),
                                                                   "Upload-Metadata": meta})
        assert status == 201, body
        paths.append(urlsplit(resp.getheader("Location")).path)
    status, _, body = loopback.call("PATCH", paths[0], data, {**TUS, **OCTETS, "Upload-Offset": "0"})
    assert status == 204, body
    # the second is cut: headers promise more than is sent, then the client goes
    with socket.create_connection(("127.0.0.1", loopback.ports[1].getHost().port), timeout=30) as sock:
        sock.sendall(f"PATCH {paths[1]} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {loopback.token}\r\n"
                     f"Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
                     f"Upload-Offset: 0\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data[:50_000])
        time.sleep(0.2)
    assert len(loopback.exchanges) >= 4
    loopback.until_freed(loopback.exchanges, "HTTP upload exchanges still alive")
