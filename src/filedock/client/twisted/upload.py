"""``PUT`` (and the zero-byte ``GET`` and ``ABORT`` an upload may need) over Twisted, and the driver
that runs an ``UploadAttempt`` with them."""

from __future__ import annotations

import os
from typing import Any, BinaryIO, Callable

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from filedock import digest, wire
from filedock.client.model import (DURABLE, SENT, VERIFIED, Cancelled, ProgressCallback, SourceStamp, SourceWatch,
                                   UploadResult)
from filedock.client.transfer import (AwaitDigest, Connect, DropPartial, Fail, Finish, QueryStored, Sleep,
                                      UploadAttempt)
from filedock.client.retry import GiveUp, RetryBudget
from filedock.client.twisted.exchange import RequestExchange, StallWatch
from filedock.client.twisted.streaming import FileStreamer, OrderedHasher
from filedock.errors import FiledockError, LocalFileError

log = Logger(namespace="filedock.client")

class LateDigest(Exception):
    """The body is sent but the local digest is not ready: the connection was closed on purpose."""


class UploadExchange(RequestExchange):
    """``PUT``: stream the file from the server's offset, then ``DONE <digest>`` -> ``wire.Stored``.

    The caller owns the open file and the hasher (they outlive a connection) and
    compares the reply with its own values. If the digest is still not ready
    ``hash_wait`` seconds after the last byte went out, the connection is closed
    (the server checkpoints everything it got) and the result fails with
    ``LateDigest``: a silent connection would hit the server's idle timeout.
    """

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str, f: BinaryIO, size: int,
                 hasher: OrderedHasher, progress: ProgressCallback | None, hash_wait: float,
                 check_source: Callable[[], None] = lambda: None, attempt: UploadAttempt | None = None) -> None:
        super().__init__(reactor, peer, progress)
        self.session_key, self.file_key, self.f, self.size = session_key, file_key, f, size
        self.hasher = hasher
        self.attempt = attempt if attempt is not None else UploadAttempt(file_key, file_key, size)
        self.check_source = check_source
        self.hash_wait = hash_wait
        self.offset: int | None = None
        self.sent = 0
        self.awaiting_reply = True  # for OFFSET, then for STORED: the stall watch allows REPLY_PATIENCE
        self.streamer: FileStreamer | None = None
        self._late: Any = None

    def request(self) -> bytes:
        return self.conn.send(wire.UploadRequest(self.session_key, self.file_key, self.size))

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.Offset):
            self._send_from(event.offset)
        elif isinstance(event, wire.Stored):
            self.succeed(event)

    def _send_from(self, offset: int) -> None:
        self.awaiting_reply = False
        self.offset = offset
        offset = self.attempt.offset(offset).offset
        self.f.seek(offset)
        self.hasher.need(offset)
        self.report(SENT, offset, self.size)
        self.streamer = FileStreamer(self.reactor, self.f, offset, self.size, self.transport, self._sent)
        d = self.streamer.done
        d.addCallback(self._body_sent)
        d.addErrback(self.fail)
        self.streamer.start()

    def _sent(self, position: int, data: bytes) -> None:
        self.sent += len(data)
        self.attempt.body_sent(len(data))
        self.hasher.passed(position, data)
        self.report(SENT, position + len(data), self.size)

    def _body_sent(self, _: None) -> None:
        d = self.hasher.finish(self.size)
        if not d.called:
            self._late = self.reactor.callLater(self.hash_wait, self.fail, LateDigest())
        d.addCallback(self._send_done)
        d.addErrback(self.fail)

    def _send_done(self, hasher: digest.ContentHasher) -> None:
        if not self.result.called:
            send_done = self.attempt.digest_ready(hasher.crc32, hasher.hexdigest())
            self.check_source()  # DONE commits what was declared: never a file that changed meanwhile
            self.awaiting_reply = True
            self.transport.write(self.conn.send(wire.Done(send_done.digest)))

    def halt(self) -> None:
        if self._late is not None and self._late.active():
            self._late.cancel()
        if self.streamer is not None:
            self.streamer.stop()


class StoredValuesExchange(RequestExchange):
    """``GET`` from the end of a complete file: its size, CRC-32 and digest as ``wire.Stored``."""

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str, size: int) -> None:
        super().__init__(reactor, peer, None)
        self.session_key, self.file_key, self.size = session_key, file_key, size

    def request(self) -> bytes:
        return self.conn.send(wire.DownloadRequest(self.session_key, self.file_key, self.size))

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.DownloadStart):
            self.succeed(wire.Stored(event.size, event.crc32, event.digest))


class AbortExchange(RequestExchange):
    """``ABORT``: the server deletes the partial."""

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str) -> None:
        super().__init__(reactor, peer, None)
        self.session_key, self.file_key = session_key, file_key

    def request(self) -> bytes:
        return self.conn.send(wire.AbortRequest(self.session_key, self.file_key))

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.Aborted):
            self.succeed(None)


async def upload_file(client: Any, session_key: str, file_key: str, path: str, progress: ProgressCallback | None,
                      name: str | None, expect: SourceStamp | None = None) -> UploadResult:
    """``TxDataPortClient.upload_file``: drive an ``UploadAttempt`` (it decides, this does the I/O)."""
    name = name if name is not None else os.path.basename(path)
    report = progress or (lambda stage, done, total: None)
    peer = client.peer(file_key)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise LocalFileError.of(exc, path) from None
    with f:
        source = SourceWatch(path, f.fileno(), name, expect)
        size = source.stamp.size
        hasher = OrderedHasher(client.reactor, path)
        attempt = UploadAttempt(name, file_key, size, client.policy)
        try:
            return await _drive(client, attempt, session_key, file_key, f, hasher, report, source)
        except defer.CancelledError:
            raise Cancelled(f"{peer}: cancelled; the server keeps what it holds durably") from None
        finally:
            hasher.stop()


async def _drive(client: Any, attempt: UploadAttempt, session_key: str, file_key: str, f: BinaryIO,
                 hasher: OrderedHasher, report: ProgressCallback, source: SourceWatch) -> UploadResult:
    peer, size = client.peer(file_key), attempt.size
    action: Any = attempt.start()
    while True:
        if isinstance(action, Connect):
            exchange = UploadExchange(client.reactor, peer, session_key, file_key, f, size, hasher, report,
                                      client.hash_wait, source.check, attempt)
            watch = StallWatch(client.reactor, exchange, client.stall_timeout)
            try:
                stored = await client.run(exchange)
            except LateDigest:
                action = attempt.digest_late()
                continue
            except FiledockError as exc:
                action = attempt.failed(exc)
                continue
            except OSError as exc:  # the local file, while streaming it
                action = attempt.failed(LocalFileError.of(exc, source.path))
                continue
            finally:
                watch.stop()
            action = await _stored(attempt, stored, hasher, report, source)
        elif isinstance(action, Sleep):
            log.info("{peer}: reconnecting in {delay:.2f}s", peer=peer, delay=action.seconds)
            await deferLater(client.reactor, action.seconds)
            action = attempt.start()
        elif isinstance(action, AwaitDigest):
            await hasher.finish(size)  # then a new connection: OFFSET <size>, nothing to send, DONE
            action = attempt.start()
        elif isinstance(action, QueryStored):
            # complete already (an earlier call, or ours with STORED lost): ask for its values
            hasher.need(size)
            report(SENT, size, size)
            stored = await _stored_values(client, peer, session_key, file_key, action.size)
            action = await _stored(attempt, stored, hasher, report, source)
        elif isinstance(action, DropPartial):
            try:  # its bytes belong to no one version: drop the partial (best effort)
                await client.abort_file(session_key, file_key)
            except FiledockError as abort:
                log.info("{peer}: could not drop the partial: {why}", peer=peer, why=abort.message)
            source.check()
            raise action.error
        elif isinstance(action, Fail):
            raise action.error
        elif isinstance(action, Finish):
            report(VERIFIED, size, size)
            return action.result
        else:
            raise AssertionError(f"unknown action {action!r}")


async def _stored_values(client: Any, peer: str, session_key: str, file_key: str, size: int) -> wire.Stored:
    """A complete file's values, asked as the blocking client asks them: each connection under the stall
    watch (a peer that never answers is dropped), failures retried as the client's ``RetryPolicy`` says."""
    budget = RetryBudget(client.policy)
    while True:
        exchange = StoredValuesExchange(client.reactor, peer, session_key, file_key, size)
        watch = StallWatch(client.reactor, exchange, client.stall_timeout)
        try:
            return await client.run(exchange)
        except FiledockError as exc:
            decision = budget.failed(exc)
            if isinstance(decision, GiveUp):
                raise decision.error from None
            log.info("{peer}: {why}; asking again in {delay:.2f}s", peer=peer, why=exc.message,
                     delay=decision.seconds)
        finally:
            watch.stop()
        await deferLater(client.reactor, decision.seconds)


async def _stored(attempt: UploadAttempt, stored: wire.Stored, hasher: OrderedHasher, report: ProgressCallback,
                  source: SourceWatch) -> Any:
    """The server made the file complete: check the local file kept still, then the verdict."""
    source.check(stored=True)
    local = await hasher.finish(attempt.size)
    report(DURABLE, attempt.size, attempt.size)
    return attempt.stored(stored) or attempt.digest_ready(local.crc32, local.hexdigest())
