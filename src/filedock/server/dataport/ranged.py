"""PUTR: one byte range of a file, one of several connections writing the same partial.

The range is claimed in the registry (an overlapping range, or a plain upload of the
file, is taken over first), written at its offsets into the partial, and its
finished blocks (hash, CRC-32) are recorded only after an fsync. The connection
whose ``DONE`` finds every block of the file durable completes it: the digest and
CRC-32 are built from the blocks, compared with the client's, the partial renamed
into place and the file recorded complete, exactly once (one completion at a time
per file, and the blocks' records go once the file is complete). Other ranges are
answered ``DURABLE``. See docs/protocol.md, "Ranged uploads".
"""

from __future__ import annotations

import time
from dataclasses import replace

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from filedock import wire
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.authority import UploadTarget
from filedock.server.dataport.channel import IRequestChannel, Request, RequestServices
from filedock.store.model import RANGED_STAMP
from filedock.store.ranged import RangeWriter, block_count, durable_runs, file_digest, publish, resume_offset, \
    supports_ranges

log = Logger(namespace="filedock.dataport")

_completing: dict[str, defer.DeferredLock] = {}
"""One completion at a time per file in this process; a registry shared by several servers also
locks it across them (``lock_completion``)."""


class RangedUpload(Request):
    """One range of one file: resume past its durable blocks, write, checkpoint, complete or say DURABLE."""

    takes_bytes = True

    def __init__(self, services: RequestServices, channel: IRequestChannel,
                 request: wire.RangedUploadRequest) -> None:
        super().__init__(services, channel)
        self.request = request
        self.target: UploadTarget | None = None
        self.writer: RangeWriter | None = None
        self.claim = None
        self.finishing = False
        self.keep_unrecorded = True  # False once the client broke the protocol: its last bytes are not kept
        self.resumed_from = request.start
        self.started = 0.0
        self._checkpointing: defer.Deferred | None = None
        self._since_checkpoint = 0
        self._last_checkpoint = 0.0

    # -- deciding

    @defer.inlineCallbacks
    def start(self):
        s, req = self.services, self.request
        if not supports_ranges(s.blobs):
            raise FiledockError(ErrorCode.RANGES_UNSUPPORTED, "this server keeps blobs in object storage, which "
                                "takes no ranged uploads; send the file with PUT")
        target: UploadTarget = yield s.authority.authorize_upload(req.session_key, req.file_key, req.size)
        self.channel.authorized(target.job_id, req.session_key)
        self.session_key = req.session_key
        self.claim = yield s.registry.acquire_range(req.file_key, req.start, req.end, req.session_key,
                                                    s.limits.max_connections_per_session, self.let_go)
        if self._stopped():
            return
        if self.claim.took_over:  # the older holder recorded more: ask again
            target = yield s.authority.authorize_upload(req.session_key, req.file_key, req.size)
        if target.stamp != RANGED_STAMP and (target.received or target.stamp):
            # a plain upload's prefix: its block hashes are not in the record, so a ranged upload starts
            # again from 0 (the record back at 0 before a byte of the partial is overwritten)
            yield s.authority.record_discard(target)
            yield s.in_thread(s.blobs.discard, target.job_id, target.blob_name)
            target = replace(target, received=0, crc32=0, stamp=None)
        blocks = yield s.authority.range_blocks(target)
        durable = {i for i, _, _ in blocks}
        offset = resume_offset(durable, target.size, req.start, req.end)
        need = req.end - offset
        promised = yield s.registry.bytes_promised(exclude=self)
        if need > s.room(promised):
            raise FiledockError(ErrorCode.NO_SPACE, f"the server cannot hold {need} more bytes")
        s.registry.promise(self, self._bytes_to_come)
        self.writer = yield s.in_thread(RangeWriter, s.blobs, target.job_id, target.blob_name, target.size,
                                        offset, req.end)
        self.target = target
        if self._stopped():
            return
        self.resumed_from = offset
        self.started = self._last_checkpoint = time.monotonic()
        s.stats.uploads_started += 1
        if offset > req.start or durable:
            s.stats.resumes += 1
        log.info("ranged upload of {key}: range {start}-{end} from {offset}; {n} of {total} blocks durable",
                 key=short_key(req.file_key), start=req.start, end=req.end, offset=offset, n=len(durable),
                 total=block_count(target.size), event="range-start")
        self.channel.accepted_range(offset, durable_runs(durable, target.size))

    def _bytes_to_come(self) -> int:
        writer = self.writer
        if writer is None:
            return self.request.end - self.request.start
        return 0 if writer.closed else writer.end - writer.offset

    def _stopped(self) -> bool:
        return self.job_deleted or self.channel.ended()

    def let_go(self) -> None:
        """The registry asks: a newer upload overlapping this range wants it."""
        self.services.stats.takeovers += 1
        log.info("range {start}-{end} of {key} taken over by a new connection", start=self.request.start,
                 end=self.request.end, key=short_key(self.request.file_key))
        self.channel.interrupt(ErrorCode.TAKEN_OVER, "a newer connection took over this range")

    # -- receiving

    def receive(self, data: bytes | memoryview) -> None:
        try:
            self.writer.write(data)
        except FiledockError as exc:
            self.channel.refused(exc.code, exc.message)
            return
        n = len(data)
        self.services.stats.bytes_received += n
        self._since_checkpoint += n
        if self._since_checkpoint >= self.services.limits.checkpoint_bytes and self._checkpointing is None:
            self._checkpoint()

    def tick(self) -> None:
        if self.writer is not None and not self.writer.closed and not self.finishing and self._checkpointing is None \
                and time.monotonic() - self._last_checkpoint > self.services.limits.checkpoint_seconds:
            self._checkpoint()

    def _checkpoint(self) -> defer.Deferred:
        """fsync what is written, then record the blocks finished before the fsync."""
        s, writer, target = self.services, self.writer, self.target
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        blocks = writer.take_finished()

        def record(_):
            if blocks:
                return s.authority.record_range_blocks(target, blocks)

        def clear(result):
            self._checkpointing = None
            if self._since_checkpoint >= s.limits.checkpoint_bytes and not writer.closed and not self.finishing \
                    and not self.channel.ended():
                self._checkpoint()  # more arrived meanwhile than one checkpoint's worth
            return result

        d = s.in_thread(writer.sync).addCallback(record).addBoth(clear)
        self._checkpointing = d
        d.addErrback(self._checkpoint_failed)
        return d

    def _checkpoint_failed(self, failure: Failure) -> None:
        if failure.check(FiledockError):
            log.warn("checkpoint of a range of {key} failed: {error}", key=short_key(self.request.file_key),
                     error=failure.value.message)
        else:
            log.failure("range checkpoint failed", failure)

    # -- finishing

    @defer.inlineCallbacks
    def finish(self, client_digest: str | None):
        """The range is here: make it durable; if that completes the file, verify, publish, record."""
        s, req, target = self.services, self.request, self.target
        self.finishing = True
        if self._checkpointing is not None:
            yield self._checkpointing
        blocks = self.writer.take_finished()
        yield s.in_thread(self.writer.sync)
        if blocks:
            yield s.authority.record_range_blocks(target, blocks)
        self.writer.close()
        lock = _completing.setdefault(req.file_key, defer.DeferredLock())
        yield lock.acquire()
        unlock = None
        try:
            lock_shared = getattr(s.registry, "lock_completion", None)
            if lock_shared is not None:
                unlock = yield lock_shared(req.file_key)
            done = yield self._complete_if_covered(client_digest)
        finally:
            if unlock is not None:
                unlock()
            lock.release()
            if not lock.locked and not lock.waiting:
                _completing.pop(req.file_key, None)
        if done is None:
            self.outcome = "range-durable"
            self._log_outcome()
            self.channel.range_stored(req.start, req.end)
            return
        crc, digest = done
        s.stats.uploads_completed += 1
        self.outcome = "complete"
        self._log_outcome()
        self.channel.stored(target.size, crc, digest)

    @defer.inlineCallbacks
    def _complete_if_covered(self, client_digest: str | None):
        """(crc32, digest) if this call completed the file; None if blocks are still missing (or another
        range completed it: then its blocks' records are gone already)."""
        s, target = self.services, self.target
        blocks = yield s.authority.range_blocks(target)
        if len(blocks) < block_count(target.size):
            return None
        crc, digest = file_digest(blocks, target.size)
        if client_digest is not None and client_digest != digest:
            self.outcome = ErrorCode.DIGEST_MISMATCH.value
            yield s.authority.record_discard(target)  # the record first: it never claims bytes that are gone
            yield s.in_thread(s.blobs.discard, target.job_id, target.blob_name)
            raise FiledockError(ErrorCode.DIGEST_MISMATCH,
                                f"the server computed {digest}; the partial was deleted, upload again")
        try:
            yield s.in_thread(publish, s.blobs, target.job_id, target.blob_name)
        except FileNotFoundError:
            self.end_job()
            raise FiledockError(ErrorCode.GONE, "the file was deleted during the upload; nothing is kept") from None
        yield s.authority.record_complete(target, crc, digest)
        yield s.authority.record_discard(target)  # a complete file keeps its record; only its blocks' rows go
        log.info("ranged upload of {key} complete: {n} blocks, crc32={crc:08x}", key=short_key(target.file_key),
                 n=len(blocks), crc=crc, event="range-complete")
        return crc, digest

    # -- ending

    def discard_partial(self) -> None:
        self.keep_unrecorded = False  # the other ranges' blocks, recorded, stay

    @defer.inlineCallbacks
    def settle(self):
        s, writer, target = self.services, self.writer, self.target
        if writer is None or target is None:
            return
        if self._checkpointing is not None:
            yield self._checkpointing
        if self.job_deleted:
            writer.close()
            yield s.in_thread(s.blobs.forget, target.job_id, target.blob_name)
        elif not writer.closed:
            blocks = writer.take_finished() if self.keep_unrecorded else []
            try:
                yield s.in_thread(writer.sync)
            finally:
                writer.close()
            if blocks:
                yield s.authority.record_range_blocks(target, blocks)
        if self.outcome not in ("complete", "range-durable"):
            s.stats.uploads_failed[self.outcome or "disconnected"] += 1
            self._log_outcome()

    def settle_failed(self, failure: Failure) -> None:
        if failure.check(FiledockError):
            log.warn("could not record a range of {key}: {error}", error=failure.value.message,
                     key=short_key(self.request.file_key))
        else:
            log.failure("could not record the range", failure)

    def release(self) -> None:
        s = self.services
        s.registry.withdraw(self)
        if self.claim is not None:
            s.registry.release(self.claim)

    def _log_outcome(self) -> None:
        req, writer = self.request, self.writer
        elapsed = max(time.monotonic() - self.started, 1e-9) if self.started else 0.0
        sent = (writer.offset if writer else req.start) - self.resumed_from
        log.info("range {result}: key={key} range={start}-{end} from={offset} bytes={sent} seconds={secs:.3f} "
                 "rate={rate:.1f}MB/s peer={peer}", result=self.outcome or "disconnected",
                 key=short_key(req.file_key), start=req.start, end=req.end, offset=self.resumed_from, sent=sent,
                 secs=elapsed, rate=sent / max(elapsed, 1e-9) / 1e6, peer=self.channel.peer, event="range-outcome")

