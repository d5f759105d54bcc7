"""Who is uploading what: file claims, per-session connection shares and disk space promised.

Every front end (the data port today, HTTP uploads next) asks an ``IUploadRegistry``
before it writes a file, the way tusd's handlers ask their ``Locker``: acquire the
file (with a callback the registry calls to ask the current holder to let go),
release it when done. The interface is asynchronous so that a registry shared by
several servers (PostgreSQL leases and advisory locks, a dead server's claims
expiring) can replace ``InProcessUploadRegistry`` without touching the requests.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Callable

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from filedock.errors import ErrorCode, FiledockError, short_key


class IUploadClaim(Interface):
    """One holder's hold on one file, as ``IUploadRegistry.acquire`` granted it."""

    file_key = Attribute("the file held")
    session_key = Attribute("the session whose share the claim counts in, or None (a batch's file)")
    took_over = Attribute("True if an older holder was asked to let go and did before this claim was granted")


class IUploadRegistry(Interface):
    """Upload ownership, shared by every front end of one (or several) servers.

    Every method answers with a Deferred, even where the in-process registry
    knows at once; ``release``/``leave``/``withdraw`` are fire-and-forget.
    """

    def acquire(file_key: str, session_key: str, limit: int, request_release: Callable[[], None]) -> defer.Deferred:
        """Hold ``file_key`` and one of ``session_key``'s ``limit`` upload slots until ``release``.

        If another holder has the file, its ``request_release`` is called and the
        Deferred fires (with an ``IUploadClaim`` whose ``took_over`` is True) once it
        released. A slot the older holder of the same file in the same session frees
        counts as free. Fails with ``too-many-connections`` when the session's slots
        are taken.
        """

    def acquire_range(file_key: str, start: int, end: int, session_key: str, limit: int,
                      request_release: Callable[[], None]) -> defer.Deferred:
        """Hold bytes ``[start, end)`` of ``file_key`` (a ranged upload) and one of the session's slots.

        Holders of overlapping ranges, and a holder of the whole file (a plain upload), are
        asked to let go first (``took_over`` is True then); holders of other ranges of the
        same file keep theirs. ``acquire`` of the whole file takes over every range.
        """

    def try_acquire(file_key: str) -> defer.Deferred:
        """Hold ``file_key`` if nobody does (no slot, no takeover); fires with the claim or None."""

    def release(claim: IUploadClaim) -> None:
        """Let go of ``claim`` (and its slot); a newer holder waiting for it goes ahead."""

    def try_acquire_many(file_keys: list[str]) -> defer.Deferred:
        """``try_acquire`` of each key at once (a batch); fires with {key: claim or None}."""

    def release_many(claims: list[IUploadClaim]) -> None:
        """``release`` of each claim at once."""

    def wait_for_slot(session_key: str, file_key: str, limit: int) -> defer.Deferred:
        """Fires once ``acquire`` would find one of the session's slots free (2007 uploads wait,
        because their clients never read a refusal). The waiter that no longer wants the slot
        calls ``pass_slot_on``."""

    def pass_slot_on(session_key: str) -> None:
        """A woken waiter gave up: the next one waiting for a slot of ``session_key`` may go."""

    def is_held(file_key: str) -> defer.Deferred:
        """Fires with True while some holder has ``file_key`` (the sweeper leaves it alone)."""

    def join_batch_share(session_key: str, limit: int) -> defer.Deferred:
        """Take one of ``session_key``'s ``limit`` batch slots (a share apart from uploads, so stalled
        batches never take the uploads' slots); fails with ``too-many-connections``."""

    def leave_batch_share(session_key: str) -> None:
        """Give back a slot ``join_batch_share`` gave."""

    def promise(owner: Any, bytes_to_come: Callable[[], int]) -> None:
        """``owner`` still has ``bytes_to_come()`` bytes to write: disk space spoken for."""

    def withdraw(owner: Any) -> None:
        """``owner`` has nothing more to write."""

    def bytes_promised(exclude: Any = None) -> defer.Deferred:
        """Fires with the bytes all owners (but ``exclude``) still have to write."""


@implementer(IUploadClaim)
class _Claim:
    __slots__ = ("file_key", "session_key", "took_over", "request_release", "released", "range")

    def __init__(self, file_key: str, session_key: str | None, request_release: Callable[[], None],
                 byte_range: tuple[int, int] | None = None) -> None:
        self.file_key, self.session_key, self.took_over = file_key, session_key, False
        self.request_release = request_release
        self.released = defer.Deferred()
        self.range = byte_range  # a ranged upload's [start, end); None: the whole file

    def __repr__(self) -> str:
        return f"<claim of {short_key(self.file_key)}>"


@implementer(IUploadRegistry)
class InProcessUploadRegistry:
    """The registry of one server process: a few dicts, answers at once."""

    def __init__(self) -> None:
        self._claims: dict[str, _Claim] = {}
        self._range_claims: dict[str, list[_Claim]] = {}  # ranged uploads' claims, per file
        self._slots: Counter[str] = Counter()  # upload slots (PUT and ABORT) taken, per session
        self._batch_slots: Counter[str] = Counter()
        self._slot_waiters: dict[str, deque[defer.Deferred]] = {}
        self._promises: dict[Any, Callable[[], int]] = {}
        self._passes_due: Counter[str] = Counter()  # freed slots not yet handed to a waiter
        self._passing: set[str] = set()  # sessions whose hand-on loop is running

    # -- files and upload slots

    def acquire(self, file_key, session_key, limit, request_release):
        old = self._claims.get(file_key)
        if file_key in self._range_claims:  # a plain upload takes over every range of the file
            return self._take_over(file_key, None, session_key, limit, request_release)
        if self._slots[session_key] - self._replacing(old, session_key) >= limit:
            return defer.fail(FiledockError(ErrorCode.TOO_MANY_CONNECTIONS, "too many connections for this session"))
        claim = _Claim(file_key, session_key, request_release)
        self._slots[session_key] += 1
        self._claims[file_key] = claim
        if old is None:
            return defer.succeed(claim)
        claim.took_over = True
        old.request_release()
        let_go = defer.Deferred()
        old.released.addBoth(lambda result: (let_go.callback(claim), result)[1])
        return let_go

    def acquire_range(self, file_key, start, end, session_key, limit, request_release):
        return self._take_over(file_key, (start, end), session_key, limit, request_release)

    def _take_over(self, file_key: str, byte_range: tuple[int, int] | None, session_key: str, limit: int,
                   request_release: Callable[[], None]) -> defer.Deferred:
        """Claim the whole file (``byte_range`` None) or a range of it, taking over every claim it overlaps."""
        ranged = self._range_claims.get(file_key, [])
        olds = [c for c in ranged if byte_range is None or (c.range[0] < byte_range[1] and byte_range[0] < c.range[1])]
        if file_key in self._claims:
            olds.append(self._claims[file_key])
        replacing = sum(1 for c in olds if c.session_key == session_key)
        if self._slots[session_key] - replacing >= limit:
            return defer.fail(FiledockError(ErrorCode.TOO_MANY_CONNECTIONS, "too many connections for this session"))
        claim = _Claim(file_key, session_key, request_release, byte_range)
        self._slots[session_key] += 1
        self._claims.pop(file_key, None)
        kept = [c for c in ranged if c not in olds]
        if byte_range is None:
            self._claims[file_key] = claim
        else:
            kept.append(claim)
        if kept:
            self._range_claims[file_key] = kept
        else:
            self._range_claims.pop(file_key, None)
        if not olds:
            return defer.succeed(claim)
        claim.took_over = True
        for old in olds:
            old.request_release()
        return defer.DeferredList([old.released for old in olds], consumeErrors=True).addCallback(lambda _: claim)

    def try_acquire_many(self, file_keys):
        return defer.succeed({key: self._try_acquire_now(key) for key in file_keys})

    def release_many(self, claims):
        for claim in claims:
            self.release(claim)

    def try_acquire(self, file_key):
        return defer.succeed(self._try_acquire_now(file_key))

    def _try_acquire_now(self, file_key: str) -> _Claim | None:
        if file_key in self._claims or file_key in self._range_claims:
            return None
        claim = self._claims[file_key] = _Claim(file_key, None, lambda: None)
        return claim

    def release(self, claim):
        if self._claims.get(claim.file_key) is claim:
            del self._claims[claim.file_key]
        ranged = self._range_claims.get(claim.file_key)
        if ranged and claim in ranged:
            ranged.remove(claim)
            if not ranged:
                del self._range_claims[claim.file_key]
        if claim.session_key is not None:
            session = claim.session_key
            self._slots[session] -= 1
            if self._slots[session] <= 0:
                del self._slots[session]
        if not claim.released.called:
            claim.released.callback(None)
        if claim.session_key is not None:
            self.pass_slot_on(claim.session_key)

    def wait_for_slot(self, session_key, file_key, limit):
        replacing = self._replacing(self._claims.get(file_key), session_key)
        if self._slots[session_key] - replacing < limit:
            return defer.succeed(None)
        waiting = defer.Deferred()
        self._slot_waiters.setdefault(session_key, deque()).append(waiting)
        return waiting

    def pass_slot_on(self, session_key):
        # A woken waiter whose connection is gone passes the slot on at once, from inside our
        # callback: counting the pass and returning (the loop below hands it on) keeps hundreds of
        # dead waiters from nesting one call per waiter (RecursionError, connections never released).
        self._passes_due[session_key] += 1
        if session_key in self._passing:
            return  # an outer call of this session's loop is running and hands it on
        self._passing.add(session_key)
        try:
            while self._passes_due[session_key] > 0:
                waiters = self._slot_waiters.get(session_key)
                if not waiters:
                    break  # nobody waits: the slot just stays free
                waiting = waiters.popleft()
                if not waiters:
                    del self._slot_waiters[session_key]
                if waiting.called:
                    continue  # cancelled: it wants no slot
                self._passes_due[session_key] -= 1
                waiting.callback(None)
        finally:
            self._passing.discard(session_key)
            del self._passes_due[session_key]

    def is_held(self, file_key):
        return defer.succeed(file_key in self._claims or file_key in self._range_claims)

    @staticmethod
    def _replacing(old: _Claim | None, session_key: str) -> int:
        # its slot is about to free up (a batch's claim holds no upload slot)
        return int(old is not None and old.session_key == session_key)

    # -- batches

    def join_batch_share(self, session_key, limit):
        if self._batch_slots[session_key] >= limit:
            return defer.fail(FiledockError(ErrorCode.TOO_MANY_CONNECTIONS, "too many batches for this session"))
        self._batch_slots[session_key] += 1
        return defer.succeed(None)

    def leave_batch_share(self, session_key):
        self._batch_slots[session_key] -= 1
        if self._batch_slots[session_key] <= 0:
            del self._batch_slots[session_key]

    # -- disk space

    def promise(self, owner, bytes_to_come):
        self._promises[owner] = bytes_to_come

    def withdraw(self, owner):
        self._promises.pop(owner, None)

    def bytes_promised(self, exclude=None):
        return defer.succeed(self.promised_now(exclude))

    def promised_now(self, exclude: Any = None) -> int:
        """``bytes_promised`` without the Deferred, for this process's own callers."""
        return sum(to_come() for owner, to_come in self._promises.items() if owner is not exclude)

    def session_slots(self, session_key: str) -> int:
        """Upload slots ``session_key`` holds now (for tests and status)."""
        return self._slots[session_key]
