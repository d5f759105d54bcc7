"""``GET`` over Twisted into a ``.part``, and the driver that runs a ``DownloadAttempt`` with it:
resumed, reconnected after drops and stalls with the client's ``RetryPolicy``, verified, fsync'd and
renamed into place; a ``.part`` that is a symbolic link is refused, never followed."""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from twisted.internet import defer, threads
from twisted.internet.task import deferLater
from twisted.logger import Logger

from filedock import durability, wire
from filedock.client.model import DURABLE, SENT, VERIFIED, Cancelled, DownloadResult, ProgressCallback
from filedock.client.transfer import Connect, DownloadAttempt, Fail, Finish, Restart, Sleep
from filedock.client.twisted.exchange import RequestExchange, StallWatch
from filedock.client.twisted.streaming import OrderedHasher
from filedock.errors import FiledockError, LocalFileError

log = Logger(namespace="filedock.client")

class DownloadExchange(RequestExchange):
    """``GET`` from what the partial holds: append the body to it -> the attempt's verdict
    (``Finish``/``Fail``) once every byte is in and hashed, or ``Restart`` if the server's file
    is not the one earlier connections saw. The caller owns the open partial and the hasher
    (they outlive a connection)."""

    def __init__(self, reactor: Any, peer: str, session_key: str, file_key: str, f: BinaryIO,
                 hasher: OrderedHasher, attempt: DownloadAttempt, progress: ProgressCallback | None) -> None:
        super().__init__(reactor, peer, progress)
        self.session_key, self.file_key, self.f = session_key, file_key, f
        self.hasher, self.attempt = hasher, attempt
        self.offset = attempt.have
        self.size = 0
        self.awaiting_reply = True  # until DATA: the server may be busy (the stall watch allows REPLY_PATIENCE)

    def request(self) -> bytes:
        return self.conn.send(wire.DownloadRequest(self.session_key, self.file_key, self.offset))

    def on_event(self, event: Any) -> None:
        if isinstance(event, wire.DownloadStart):
            restart = self.attempt.started(event)
            if restart is not None:
                self.succeed(restart)
                return
            self.awaiting_reply = False
            self.size = event.size
            self.hasher.need(self.offset)
            self.report(SENT, self.offset, self.size)
        elif isinstance(event, wire.Data):
            position = self.attempt.have
            self.f.write(event.data)
            self.f.flush()  # the hashing thread reads the file back through its own handle
            self.attempt.body_received(len(event.data))
            self.hasher.passed(position, event.data)
            self.report(SENT, self.attempt.have, self.size)
        elif isinstance(event, wire.BodyComplete):
            self.settling = True
            d = self.hasher.finish(self.size)
            d.addCallback(lambda hasher: self.attempt.complete(hasher.crc32, hasher.hexdigest()))
            d.addCallbacks(self.succeed, self.fail)


def open_part(path: str) -> BinaryIO:
    """The partial download at ``path``, opened to append (made if missing); a symbolic link is refused
    (``LocalFileError``), never followed, as the blocking client refuses it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if os.path.islink(path):
            raise LocalFileError(f"{path} is a symbolic link; it is not followed") from None
        raise LocalFileError.of(exc, path) from None
    return open(fd, "ab")


async def download_file(client: Any, session_key: str, file_key: str, dest: str,
                        progress: ProgressCallback | None) -> DownloadResult:
    """``TxDataPortClient.download_file``: drive a ``DownloadAttempt`` into ``dest + ".part"``."""
    part = dest + ".part"
    report = progress or (lambda stage, done, total: None)
    peer = client.peer(file_key)
    f = open_part(part)
    hasher = OrderedHasher(client.reactor, part, fd=f.fileno())
    attempt = DownloadAttempt(os.path.basename(dest), file_key, client.policy)
    action: Any = attempt.start(os.fstat(f.fileno()).st_size)
    committed = False
    try:
        while True:
            if isinstance(action, Connect):
                exchange = DownloadExchange(client.reactor, peer, session_key, file_key, f, hasher, attempt, report)
                watch = StallWatch(client.reactor, exchange, client.stall_timeout)
                try:
                    action = await client.run(exchange)
                except FiledockError as exc:
                    action = attempt.failed(exc)
                finally:
                    watch.stop()
            elif isinstance(action, Restart):
                log.info("{peer}: the partial download is not a prefix of the server's file; starting again "
                         "from 0", peer=peer)
                hasher.stop()
                f.truncate(0)
                hasher = OrderedHasher(client.reactor, part, fd=f.fileno())
                action = attempt.restarted()
            elif isinstance(action, Sleep):
                log.info("{peer}: reconnecting in {delay:.2f}s", peer=peer, delay=action.seconds)
                await deferLater(client.reactor, action.seconds)
                action = attempt.connect()
            elif isinstance(action, Fail):
                if action.discard:  # some byte of it is wrong; start again from 0 next time
                    f.close()
                    os.unlink(part)
                raise action.error
            elif isinstance(action, Finish):
                committed = True
                await threads.deferToThreadPool(client.reactor, client.reactor.getThreadPool(), _commit, f, part,
                                                dest)
                size = action.result.size
                report(DURABLE, size, size)
                report(VERIFIED, size, size)
                return action.result
            else:
                raise AssertionError(f"unknown action {action!r}")
    except defer.CancelledError:
        raise Cancelled(f"{peer}: cancelled; the .part keeps what was received") from None
    finally:
        hasher.stop()
        if not committed:
            f.close()  # the .part keeps every byte written: a later download resumes


def _commit(f: BinaryIO, part: str, dest: str) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    durability.publish(part, dest)
