"""``BATCH`` over Twisted: many small whole files on one connection, sent again after a drop."""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet import defer, interfaces, threads
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from filedock import digest, wire
from filedock.client.model import SENT, Cancelled, SourceStamp, UploadResult
from filedock.client.transfer import BatchAttempt, Connect, Fail, Sleep
from filedock.client.twisted.exchange import RequestExchange, StallWatch
from filedock.client.twisted.streaming import CHUNK_SIZE
from filedock.errors import FiledockError

log = Logger(namespace="filedock.client")

class BatchSourceChanged(Exception):
    """A file of a batch is not the version declared: the batch is closed before DONE (nothing stored)."""

    def __init__(self, key: str, change: str) -> None:
        super().__init__(change)
        self.key, self.change = key, change


def read_group(items: list[tuple[str, str, SourceStamp]]) -> list[tuple[bytes, int, str]]:
    """In a thread: each small file's bytes, CRC-32 and digest (read once, hashed once), checked against
    its stamp (key, path, stamp) before and after the read; ``BatchSourceChanged`` if it differs."""
    out = []
    for key, path, stamp in items:
        with open(path, "rb", buffering=0) as f:
            before = SourceStamp.of(os.fstat(f.fileno()))
            data = f.read()
            change = stamp.change(before) or stamp.change(SourceStamp.of(os.fstat(f.fileno())))
        if change:
            raise BatchSourceChanged(key, change)
        h = digest.ContentHasher()
        h.update(data)
        out.append((data, h.crc32, h.hexdigest()))
    return out


@implementer(interfaces.IPushProducer)
class BatchExchange(RequestExchange):
    """``BATCH``: many small whole files on one connection -> ``{file_key: ItemStored | ItemFailed}``.

    Files are read and hashed in a thread, ``GROUP_BYTES`` at a time with the next
    group read while this one is written, and written only while the transport
    takes them (it pauses us as a push producer): memory stays at about two groups.
    The attempt hears (size, crc32, digest) of every file as it is read (``item_read``).
    """

    GROUP_BYTES = 4 << 20

    def __init__(self, reactor: Any, peer: str, session_key: str, attempt: BatchAttempt,
                 report: Callable[[str, str, int, int], None]) -> None:
        super().__init__(reactor, peer, None)
        self.session_key, self.attempt, self.report_file = session_key, attempt, report
        self.files = attempt.remaining
        self.stamps = [attempt.stamps[key] for key, _, _ in self.files]
        self.sizes = [stamp.size for stamp in self.stamps]
        self.answers: dict[str, Any] = {}
        self.sent = 0
        self.awaiting_reply = False  # DONE is out: only the server's answer is missing
        self._stopped = False
        self._registered = False
        self._resume: defer.Deferred | None = None
        self._sending: defer.Deferred | None = None

    def request(self) -> bytes:
        return self.conn.send(wire.BatchRequest(self.session_key, len(self.files)))

    def cancel_message(self) -> str:
        if self.awaiting_reply:
            return ("cancelled after the whole batch was sent: the server may still store it; "
                    "run again to learn which files are complete")
        return "cancelled; nothing of this batch was stored"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.registerProducer(self, True)
        self._registered = True
        self._sending = defer.ensureDeferred(self._send_items())
        self._sending.addErrback(self.fail)

    def _unregister(self) -> None:
        # a registered (paused) producer keeps Twisted from ever closing the connection
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    def _groups(self) -> list[list[int]]:
        groups, group, size = [], [], 0
        for i, n in enumerate(self.sizes):
            if group and size + n > self.GROUP_BYTES:
                groups.append(group)
                group, size = [], 0
            group.append(i)
            size += n
        return groups + ([group] if group else [])

    def _read(self, group: list[int]) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), read_group,
                                         [(self.files[i][0], self.files[i][1], self.stamps[i]) for i in group])

    async def _send_items(self) -> None:
        groups = self._groups()
        upcoming = self._read(groups[0]) if groups else None
        for index, group in enumerate(groups):
            contents = await upcoming
            upcoming = self._read(groups[index + 1]) if index + 1 < len(groups) else None
            for i, (data, crc, hexdigest) in zip(group, contents):
                key, _, name = self.files[i]
                self.attempt.item_read(key, len(data), crc, hexdigest)
                line = self.conn.send(wire.BatchItem(key, len(data), hexdigest))
                for start in range(0, max(len(data), 1), CHUNK_SIZE):  # a slow link still shows progress
                    while self._resume is not None and not self._stopped:
                        await self._resume
                    if self._stopped or self.result.called:
                        return
                    piece = data[start:start + CHUNK_SIZE]
                    self.transport.write(line + piece if start == 0 else piece)
                    self.sent += len(piece)
                self.report_file(name, SENT, len(data), len(data))
        self._unregister()
        self.awaiting_reply = True
        self.transport.write(self.conn.send(wire.Done(None)))

    def on_event(self, event: Any) -> None:
        if isinstance(event, (wire.ItemStored, wire.ItemFailed)):
            self.answers[event.file_key] = event
        elif isinstance(event, wire.BatchEnd):
            self.succeed(self.answers)

    # -- IPushProducer: the transport's buffer is full, or has room again

    def pauseProducing(self) -> None:
        if self._resume is None:
            self._resume = defer.Deferred()

    def resumeProducing(self) -> None:
        waiting, self._resume = self._resume, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()

    def halt(self) -> None:
        self.stopProducing()
        if self.transport is not None:
            self._unregister()


async def upload_batch(client: Any, session_key: str, files: list[tuple[str, str, str]],
                       progress: Callable[[str, str, int, int], None] | None,
                       stamps: dict[str, SourceStamp] | None = None) -> list[UploadResult]:
    """``TxDataPortClient.upload_batch``: send the batch until the server answers it; a dropped or
    stalled connection sends it again as ``RetryPolicy`` allows, a changed file leaves it."""
    report = progress or (lambda name, stage, done, total: None)
    if not files:
        return []
    attempt = BatchAttempt(files, stamps, client.policy)
    missing = [(key, path) for key, path, _ in files if key not in attempt.stamps]
    found = await threads.deferToThreadPool(client.reactor, client.reactor.getThreadPool(),
                                            lambda: [SourceStamp.of(os.stat(path)) for _, path in missing])
    attempt.stamps.update((key, stamp) for (key, _), stamp in zip(missing, found))
    peer = f"{client.host}:{client.port} (batch of {len(files)} files)"
    action: Any = attempt.start()
    while action is not None:
        if isinstance(action, Connect):
            exchange = BatchExchange(client.reactor, peer, session_key, attempt, report)
            watchdog = StallWatch(client.reactor, exchange, client.stall_timeout)
            try:
                attempt.answered(await client.run(exchange))
                action = None
            except BatchSourceChanged as exc:  # closed before DONE: nothing stored; again without it
                action = attempt.source_changed(exc.key, exc.change)
            except FiledockError as exc:
                action = attempt.failed(exc)
                if isinstance(action, Sleep):
                    log.info("{peer}: {why}; sending the batch again in {delay:.2f}s", peer=peer,
                             why=exc.message, delay=action.seconds)
            finally:
                watchdog.stop()
        elif isinstance(action, Sleep):
            try:
                await deferLater(client.reactor, action.seconds)
            except defer.CancelledError:
                raise Cancelled(f"{peer}: cancelled between attempts; the server may have stored part "
                                "of it: run again to learn which files are complete") from None
            action = attempt.start()
        elif isinstance(action, Fail):
            raise action.error
    now = await threads.deferToThreadPool(client.reactor, client.reactor.getThreadPool(),
                                          lambda: {key: SourceStamp.read(path) for key, path in attempt.to_check()})
    return attempt.results(now, report)
