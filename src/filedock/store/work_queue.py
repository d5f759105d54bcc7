"""Disk work off the reactor: one queue of worker threads, serial per strand, fair by bytes.

The blob store's writers hand their disk writes, hashing, file creates and fsyncs to a
``WorkQueue`` that the server creates, hands to ``BlobStore`` and stops at shutdown.

* A *strand* is one ordered stream of work (one upload's ``.part`` file, one staging
  lane of a batch): its items run one at a time, in the order they were put, so bytes
  reach a file in order without a lock per file.
* Strands share the queue's threads fairly by bytes: a thread runs about one quantum
  of a strand's work (each item says what it costs), then the strand goes to the back
  of the line behind every other strand that has work, so a fast upload cannot keep
  the threads from the others.
* ``InlineWorkQueue`` runs every item at once on the caller's thread: the same
  ordering with no threads, for unit tests and tools that want no background threads.

Flow control (how many bytes a writer may have queued) is the writers' business
(``blobs.FlowControl``): the queue only runs work.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

QUANTUM = 4 << 20
"""Bytes of one strand's work a thread does before the strand goes to the back of the line."""

DEFAULT_THREADS = max(8, os.cpu_count() or 2)
"""Worker threads of a queue when not told: hashing wants a thread per core, and creates and
fsyncs, which mostly wait for the disk, want a few more than that."""

_log = logging.getLogger(__name__)

_STOP = object()


class _Mark:
    """An item that stands for "everything put before me has run": wakes whoever waits for it."""

    __slots__ = ("_event", "_capture", "value")

    def __init__(self, capture: Callable[[], Any] | None) -> None:
        self._event = threading.Event()
        self._capture = capture
        self.value: Any = None

    def reached(self) -> None:
        if self._capture is not None:
            self.value = self._capture()
        self._event.set()

    def wait(self) -> Any:
        self._event.wait()
        return self.value


class Strand:
    """One ordered stream of work on a queue; made by ``WorkQueue.strand``.

    ``put(item, cost)`` queues an item for ``run(item)``; items run one at a time, in
    order, on one of the queue's threads (never two of a strand's items at once).
    ``cost`` is what the item counts against the strand's quantum (its bytes; a few KiB
    for a create). ``run`` records its own failures for its owner to raise: an exception
    that escapes it is logged as a bug and the strand goes on with the next item.
    """

    __slots__ = ("_queue", "_run", "quantum", "_items", "_lock", "_scheduled")

    def __init__(self, work_queue: "WorkQueue", run: Callable[[Any], None], quantum: int) -> None:
        self._queue = work_queue
        self._run = run
        self.quantum = quantum
        self._items: deque[tuple[Any, int]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False  # in the queue's line, or being run by a thread

    def put(self, item: Any, cost: int = 0) -> None:
        """Queue ``item``; it runs after everything put before it on this strand."""
        with self._lock:
            self._items.append((item, cost))
            if self._scheduled:
                return
            self._scheduled = True
        self._queue._schedule(self)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return not self._scheduled

    def wait(self, capture: Callable[[], Any] | None = None) -> Any:
        """Block until everything put before this call has run; returns ``capture()`` taken then.

        ``capture`` runs in order with the strand's items (on its thread), so it sees
        exactly the work put before the call. An idle strand costs no thread: ``capture``
        runs at once, under the strand's lock, so no item can start meanwhile.
        """
        with self._lock:
            if not self._scheduled:
                return capture() if capture is not None else None
            mark = _Mark(capture)
            self._items.append((mark, 0))
        return mark.wait()

    def _service(self, budget: int | None) -> bool:
        """On a queue thread: run items worth about ``budget`` (None: all); True if some remain."""
        items, run = self._items, self._run
        while True:
            with self._lock:
                if not items:
                    self._scheduled = False
                    return False
                if budget is not None and budget <= 0:
                    return True  # still scheduled: the caller puts us at the back of the line
                item, cost = items.popleft()
            if item.__class__ is _Mark:
                item.reached()
                continue
            try:
                run(item)
            except BaseException:  # a bug in ``run``: keep the strand and the thread going
                _log.exception("work item failed")
            if budget is not None:
                budget -= cost


class WorkQueue:
    """Worker threads shared by every writer of a blob store; created and stopped by the server.

    Threads start on demand, up to ``threads``, so a queue that never gets work costs
    none. ``stop`` lets queued work finish and joins the threads; work put after that
    runs on the caller's thread, so a writer closed late still closes.
    """

    def __init__(self, threads: int = DEFAULT_THREADS, quantum: int = QUANTUM, name: str = "filedock-work") -> None:
        if threads < 1:
            raise ValueError("a work queue needs at least one thread")
        self.size = threads
        self.quantum = quantum
        self.name = name
        self._line: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._running = 0  # threads that have not taken their stop mark
        self._lock = threading.Lock()
        self._stopping = False

    def strand(self, run: Callable[[Any], None], quantum: int | None = None) -> Strand:
        """A new ordered stream of work: ``run(item)`` for each item put, in order."""
        return Strand(self, run, self.quantum if quantum is None else quantum)

    def run_each(self, fn: Callable[[Any], None], items: Iterable[Any]) -> None:
        """``fn(item)`` for every item, as many at once as there are threads; waits for all of
        them, then raises the first error (after all ran: none is left holding a resource)."""
        errors: list[BaseException] = []

        def call(item: Any) -> None:
            try:
                fn(item)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, on the caller's thread
                errors.append(exc)

        strands = []
        for item in items:
            strand = self.strand(call)
            strand.put(item)
            strands.append(strand)
        for strand in strands:
            strand.wait()
        if errors:
            raise errors[0]

    def _schedule(self, strand: Strand) -> None:
        with self._lock:
            if self._stopping and not self._running:
                inline = True
            else:
                inline = False
                if not self._stopping and len(self._threads) < self.size:
                    thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                                              daemon=True)
                    self._threads.append(thread)
                    self._running += 1
                    thread.start()
                self._line.put(strand)
        if inline:  # stopped: nobody else will run it
            strand._service(None)

    def _work(self) -> None:
        line = self._line
        while True:
            strand = line.get()
            if strand is _STOP:
                break
            if self._stopping:
                strand._service(None)  # finish it: no thread may be left to come back to it
            elif strand._service(strand.quantum):
                line.put(strand)
        with self._lock:
            self._running -= 1
            last = not self._running
        if last:  # whatever got in line behind the stop marks
            while True:
                try:
                    strand = line.get_nowait()
                except queue.Empty:
                    return
                if strand is not _STOP:
                    strand._service(None)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Let queued work finish and end the threads (call once nothing writes any more)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            threads = list(self._threads)
        for _ in threads:
            self._line.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:  # one deadline for all: a hung disk must not hold shutdown for long
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                _log.warning("work queue thread %s still busy after %ss", thread.name, timeout)

    @property
    def stopped(self) -> bool:
        """``stop`` was called."""
        return self._stopping


class InlineWorkQueue(WorkQueue):
    """A work queue with no threads: each item runs on the caller's thread as it is put.

    Ordering per strand holds (a strand's items never run at the same time, even from
    two threads); there is nothing to share fairly and nothing ever waits in line.
    For unit tests, and tools that write little.
    """

    def __init__(self) -> None:
        super().__init__(threads=1, name="filedock-inline")

    def _schedule(self, strand: Strand) -> None:
        strand._service(None)

    def stop(self, timeout: float | None = None) -> None:
        self._stopping = True
