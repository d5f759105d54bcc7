"""A closed connection is freed by reference counting alone, not left for the cycle collector.

A data-port connection holds its request, which holds the connection back as its channel (and the
writer's callbacks, the registry's claim, ...): unless something lets go when the connection closes,
every closed connection and its buffers wait for a full garbage collection. Each test disables the
collector, runs one connection to its end, and asserts a weak reference to it is dead.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator

import pytest

from tests.unit.test_dataport import Harness, digest_of


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
