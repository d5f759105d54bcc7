"""InProcessUploadRegistry: claims, asking a holder to let go, per-session slots, promised bytes.

Every answer is a Deferred (a registry shared by several servers will answer later);
the in-process one answers at once, which these tests read with ``successResultOf``-style
helpers.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from filedock.errors import ErrorCode, FiledockError
from filedock.server.registry import InProcessUploadRegistry, IUploadClaim, IUploadRegistry

FILE, OTHER, SESSION = "f" * 32, "e" * 32, "s" * 32


def result_of(d: defer.Deferred):
    """The result a Deferred already has (the in-process registry answers at once)."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    assert not isinstance(out[0], Failure), out[0]
    return out[0]


def failure_of(d: defer.Deferred) -> Exception:
    """The exception a Deferred already failed with."""
    out = []
    d.addErrback(lambda f: out.append(f.value))
    assert out, "the Deferred did not fail"
    return out[0]


@pytest.fixture
def registry():
    return InProcessUploadRegistry()


def test_the_in_process_registry_provides_the_interface(registry):
    """Front ends depend on IUploadRegistry only; the default implementation provides all of it."""
    assert verifyObject(IUploadRegistry, registry)
    claim = result_of(registry.acquire(FILE, SESSION, 4, lambda: None))
    assert verifyObject(IUploadClaim, claim)


def test_acquire_a_free_file_grants_it_at_once_without_asking_anyone(registry):
    """A file nobody holds is granted at once; it is held until released, then free again."""
    asked = []
    claim = result_of(registry.acquire(FILE, SESSION, 4, lambda: asked.append("first")))
    assert claim.file_key == FILE and claim.took_over is False
    assert result_of(registry.is_held(FILE)) is True
    assert result_of(registry.is_held(OTHER)) is False
    registry.release(claim)
    assert result_of(registry.is_held(FILE)) is False
    assert asked == []


def test_a_second_acquire_asks_the_holder_to_let_go_and_waits_for_its_release(registry):
    """tusd's requestUnlock: the newer holder's Deferred fires only once the older one released."""
    asked = []
    first = result_of(registry.acquire(FILE, SESSION, 4, lambda: asked.append("first")))
    waiting = registry.acquire(FILE, SESSION, 4, lambda: asked.append("second"))
    assert asked == ["first"]
    assert not waiting.called
    registry.release(first)
    second = result_of(waiting)
    assert second.took_over is True
    assert result_of(registry.is_held(FILE)) is True  # the newer holder has it now
    registry.release(second)
    assert result_of(registry.is_held(FILE)) is False


def test_releasing_an_older_claim_leaves_the_newer_holder_in_place(registry):
    """The older claim's release (after the newer one took the file) never frees the newer claim."""
    first = result_of(registry.acquire(FILE, SESSION, 4, lambda: None))
    waiting = registry.acquire(FILE, SESSION, 4, lambda: None)
    registry.release(first)
    registry.release(first)  # twice is harmless
    assert result_of(waiting).took_over
    assert result_of(registry.is_held(FILE)) is True


def test_each_session_has_a_limited_share_of_upload_slots(registry):
    """A session holds at most ``limit`` claims; a further one fails with too-many-connections, and a
    released slot is free again. Another session's share is its own."""
    claims = [result_of(registry.acquire(f"{i:032x}", SESSION, 2, lambda: None)) for i in range(2)]
    assert registry.session_slots(SESSION) == 2
    err = failure_of(registry.acquire(OTHER, SESSION, 2, lambda: None))
    assert isinstance(err, FiledockError) and err.code is ErrorCode.TOO_MANY_CONNECTIONS
    assert result_of(registry.acquire(OTHER, "t" * 32, 2, lambda: None)).file_key == OTHER
    registry.release(claims[0])
    assert registry.session_slots(SESSION) == 1
    assert result_of(registry.acquire("d" * 32, SESSION, 2, lambda: None)).took_over is False


def test_taking_over_a_file_of_the_same_session_counts_the_slot_it_frees(registry):
    """A retry of a file whose older connection (same session) still holds a slot is not refused for
    the slot that older connection is about to give back."""
    result_of(registry.acquire(FILE, SESSION, 1, lambda: None))
    waiting = registry.acquire(FILE, SESSION, 1, lambda: None)
    assert not waiting.called  # waits for the older holder rather than failing
    assert registry.session_slots(SESSION) == 2  # for as long as both hold on


def test_wait_for_slot_fires_when_a_slot_of_the_session_is_released(registry):
    """2007 uploads wait for a slot instead of being refused; a release wakes the longest waiter; a waiter
    that gave up passes the slot on to the next."""
    held = result_of(registry.acquire(FILE, SESSION, 1, lambda: None))
    assert registry.wait_for_slot(SESSION, FILE, 1).called  # the same file: its slot frees on takeover
    first = registry.wait_for_slot(SESSION, OTHER, 1)
    second = registry.wait_for_slot(SESSION, "d" * 32, 1)
    assert not first.called and not second.called
    registry.release(held)
    assert first.called and not second.called
    registry.pass_slot_on(SESSION)  # the first waiter no longer wants it
    assert second.called


def test_try_acquire_never_takes_over(registry):
    """A batch's claim on a file: granted only if nobody holds it, and never asks a holder to let go."""
    asked = []
    result_of(registry.acquire(FILE, SESSION, 4, lambda: asked.append("put")))
    assert result_of(registry.try_acquire(FILE)) is None
    assert asked == []
    claim = result_of(registry.try_acquire(OTHER))
    assert claim.file_key == OTHER and claim.session_key is None
    assert result_of(registry.try_acquire(OTHER)) is None
    registry.release(claim)
    assert result_of(registry.try_acquire(OTHER)) is not None


def test_batches_have_a_share_of_their_own(registry):
    """Batch slots are counted apart from upload slots: full batch slots never stop an upload."""
    result_of(registry.join_batch_share(SESSION, 1))
    err = failure_of(registry.join_batch_share(SESSION, 1))
    assert err.code is ErrorCode.TOO_MANY_CONNECTIONS
    assert result_of(registry.acquire(FILE, SESSION, 1, lambda: None)).file_key == FILE
    registry.leave_batch_share(SESSION)
    assert result_of(registry.join_batch_share(SESSION, 1)) is None


def test_promised_bytes_sum_what_each_owner_has_still_to_write(registry):
    """Each owner's bytes to come are asked when the total is asked (so they are current); an owner can
    be left out (an upload judging its own room) and withdraws when done."""
    to_come = {"a": 100}
    registry.promise("a", lambda: to_come["a"])
    registry.promise("b", lambda: 50)
    assert result_of(registry.bytes_promised()) == 150
    to_come["a"] = 30
    assert result_of(registry.bytes_promised()) == 80
    assert result_of(registry.bytes_promised(exclude="b")) == 30
    registry.withdraw("a")
    registry.withdraw("a")
    assert result_of(registry.bytes_promised()) == 50
