"""PUT (both dialects): claim the file, resume, append, checkpoint, finish to STORED."""

from __future__ import annotations

import enum
import time
from dataclasses import replace

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger

from filedock import wire
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.authority import UploadTarget
from filedock.server.dataport.channel import IRequestChannel, Request, RequestServices
from filedock.store.blobstore import PartialWriterLike, PrefixLost

log = Logger(namespace="filedock.dataport")


PAUSED = "paused"
"""The outcome of an upload whose client sent what it meant to and will send the rest later (an HTTP
chunk): its partial is kept and recorded, and it is not counted as failed."""


class PartialFate(enum.Enum):
    """What happens to an upload's partial when its channel closes."""

    KEEP = "keep"  # checkpoint it and record what it holds: a retry resumes
    DISCARD = "discard"  # record 0 first, then delete: the bytes are not wanted (bad digest, broken protocol)
    FORGET = "forget"  # the job was deleted: delete, record nothing
    ROLLBACK = "rollback"  # the last bytes failed a check (an HTTP chunk's checksum): close, record nothing;
    # the record stays where the chunk began and the next open cuts the bytes past it off


class Upload(Request):
    """One upload of one file: the same semantics whatever front end carries it.

    At every instant the record claims no byte the disk does not hold; a newer
    upload of the same file takes over (this one checkpoints, records and lets go
    first); the client hears ``stored`` only once the bytes are fsync'd, in place
    and recorded.
    """

    takes_bytes = True
    hold_checkpoints = False
    """True while bytes arrive that must be checked before they count (an HTTP chunk with a checksum):
    no checkpoint records them until the channel clears it."""

    def __init__(self, services: RequestServices, channel: IRequestChannel, request: wire.UploadRequest) -> None:
        super().__init__(services, channel)
        self.request = request
        self.target: UploadTarget | None = None
        self.writer: PartialWriterLike | None = None
        self.claim = None
        self.fate = PartialFate.KEEP
        self.finishing = False
        self.started = 0.0
        self.resumed_from = 0
        self._checkpointing: defer.Deferred | None = None
        self._since_checkpoint = 0
        self._last_checkpoint = 0.0
        self._since_space_check = 0
        self._space_needed = 0

    # -- deciding

    @defer.inlineCallbacks
    def start(self):
        s, req = self.services, self.request
        target: UploadTarget = yield s.authority.authorize_upload(req.session_key, req.file_key, req.size)
        self.channel.authorized(target.job_id, req.session_key)
        if req.legacy:
            yield self._wait_for_slot()
            if self._stopped():
                return
        self.session_key = req.session_key
        self.claim = yield s.registry.acquire(req.file_key, req.session_key, s.limits.max_connections_per_session,
                                              self.let_go)
        if self._stopped():
            return  # taken over (or the job deleted) while we waited for the older connection
        if self.claim.took_over:  # the older connection recorded more: ask again
            target = yield s.authority.authorize_upload(req.session_key, req.file_key, req.size)
        if req.legacy and target.received:
            # a 2007 client always starts at byte 0: whatever partial we held is replaced, and the record
            # goes back to 0 (durably) before a byte of it is overwritten
            yield s.authority.record_discard(target)
            target = replace(target, received=0, crc32=0, stamp=None)
        if req.legacy:
            held = 0
        elif s.blobs.remote:  # a request to the object store: never on the reactor
            held = yield s.in_thread(s.blobs.unrecorded_size, target.job_id, target.blob_name)
        else:
            held = s.blobs.unrecorded_size(target.job_id, target.blob_name)
        need = target.size - max(target.received, held)
        promised = yield s.registry.bytes_promised(exclude=self)
        if need > s.room(promised):
            raise FiledockError(ErrorCode.NO_SPACE, f"the server cannot hold {need} more bytes"
                                + (f" ({promised} are promised to uploads in progress)" if promised else ""))
        # spoken for at once, before the next yield, so concurrent resumes cannot all pass the check
        self._space_needed = need
        s.registry.promise(self, self._bytes_to_come)
        target = yield self._open_writer(target, recover=not req.legacy, inline=not (target.received or held))
        if self._stopped():
            return
        self.resumed_from = self.writer.offset
        self.started = time.monotonic()
        self._last_checkpoint = self.started
        s.stats.uploads_started += 1
        if self.resumed_from:
            s.stats.resumes += 1
        s.stats.show(self, self.describe)
        self.channel.accepted_upload(self.writer.offset)

    @defer.inlineCallbacks
    def _wait_for_slot(self):
        """A 2007 upload waits for one of its session's slots instead of being refused: its client
        never reads a reply, so a refusal would lose the upload silently (a burst of 500 lost 462)."""
        s, req = self.services, self.request
        while True:
            waiting = s.registry.wait_for_slot(req.session_key, req.file_key, s.limits.max_connections_per_session)
            if waiting.called:
                return
            yield waiting
            if self._stopped():
                s.registry.pass_slot_on(req.session_key)  # pass the free slot on
                return

    @defer.inlineCallbacks
    def _open_writer(self, target: UploadTarget, recover: bool, inline: bool):
        """Open the partial as the record says; returns the target as recorded now.

        At every instant the record claims no byte the disk does not hold: a partial
        shorter than its record is recorded back at 0 before it is rewritten, and a
        partial whose state differs from the record (a complete file never recorded, a
        prefix hashed again) is checkpointed and recorded before a byte is accepted.
        """
        s = self.services
        args = (target.job_id, target.blob_name, target.received, target.crc32, target.stamp, recover)
        try:
            if inline and not s.blobs.remote:  # a new partial is a create and an fstat: not worth a thread hop
                self.writer = s.blobs.open_partial(*args, size=target.size)
            else:  # a resume may read the partial back: off the reactor
                self.writer = yield s.in_thread(s.blobs.open_partial, *args, target.size)
        except PrefixLost as exc:
            log.warn("partial of {key} is shorter than its record ({why}): starting again from 0",
                     key=short_key(target.file_key), why=str(exc))
            yield s.authority.record_discard(target)
            target = replace(target, received=0, crc32=0, stamp=None)
            self.writer = yield s.in_thread(s.blobs.open_partial, *args[:2], 0, 0, None, False, target.size)
        self.writer.on_drain = lambda: s.reactor.callFromThread(self.channel.resume_reading, "hashing")
        self.target = target  # from here on, the clean-up closes the writer and records what it holds
        if self.writer.needs_record:
            cp = yield s.in_thread(self.writer.checkpoint)
            yield s.authority.record_progress(target, cp.offset, cp.crc32, cp.stamp)
            if cp.offset >= target.size:
                log.info("file {key} was complete on disk but not recorded: resuming at its end",
                         key=short_key(target.file_key))
            target = replace(target, received=cp.offset, crc32=cp.crc32, stamp=cp.stamp)
            self.target = target
        return target

    def _bytes_to_come(self) -> int:
        writer = self.writer
        if writer is None or self.target is None:
            return self._space_needed  # checked, the partial not open yet
        return 0 if writer.closed else self.target.size - writer.offset

    def _stopped(self) -> bool:
        return self.job_deleted or self.channel.ended()

    def let_go(self) -> None:
        """The registry asks: a newer upload of this file wants it. Its channel ends (unless it is
        finishing), this upload settles, and its ``release`` lets the newer one go ahead."""
        self.services.stats.takeovers += 1
        log.info("upload of {key} taken over by a new connection", key=short_key(self.request.file_key))
        self.channel.interrupt(ErrorCode.TAKEN_OVER, "a newer connection took over this upload")

    # -- receiving

    def receive(self, data: bytes | memoryview) -> None:
        try:
            behind = self.writer.write(data)
        except FiledockError as exc:
            self.channel.refused(exc.code, exc.message)
            return
        if behind:
            self.channel.pause_reading("hashing")
        n = len(data)
        s = self.services
        s.stats.bytes_received += n
        self._since_checkpoint += n
        self._since_space_check += n
        if self._since_space_check >= self.SPACE_CHECK_BYTES:
            self._since_space_check = 0
            if s.blobs.free_bytes() < s.limits.disk_reserve // 2:
                # something else ate the space: stop before the store has none left to record in
                self.channel.refused(ErrorCode.NO_SPACE, "the server's disk is nearly full; the partial is kept")
                return
        if self._since_checkpoint >= s.limits.checkpoint_bytes and self._checkpointing is None \
                and not self.hold_checkpoints:
            self._checkpoint()

    def tick(self) -> None:
        writer = self.writer
        if self.target is not None and time.monotonic() - self._last_checkpoint > self.services.limits.checkpoint_seconds \
                and self._checkpointing is None and writer and not writer.closed and not self.finishing \
                and not self.channel.ended() and writer.offset < self.target.size and not self.hold_checkpoints:
            self._checkpoint()

    def _checkpoint(self) -> defer.Deferred:
        """Make the bytes written so far durable and record the offset."""
        s, writer, target = self.services, self.writer, self.target
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

        def record(cp):
            return s.authority.record_progress(target, cp.offset, cp.crc32, cp.stamp)

        def clear(result):
            self._checkpointing = None
            if self._since_checkpoint >= s.limits.checkpoint_bytes and not writer.closed and not self.finishing \
                    and not self.channel.ended() and not self.hold_checkpoints:
                self._checkpoint()  # more arrived meanwhile than one checkpoint's worth
            return result

        d = s.in_thread(writer.checkpoint).addCallback(record).addBoth(clear)
        self._checkpointing = d
        d.addErrback(self._checkpoint_failed)
        return d

    def _checkpoint_failed(self, failure: Failure) -> None:
        if self.job_deleted or failure.check(FiledockError):  # a full disk or a deleted job: one line
            log.warn("checkpoint of {key} failed: {error}", key=short_key(self.target.file_key),
                     error=getattr(failure.value, "message", None) or type(failure.value).__name__)
        else:
            log.failure("checkpoint failed", failure)

    # -- finishing

    @defer.inlineCallbacks
    def finish(self, client_digest: str | None):
        """The whole body is here: seal, verify, publish, record; then answer."""
        s, writer, target = self.services, self.writer, self.target
        self.finishing = True
        try:
            if self._checkpointing is not None:
                yield self._checkpointing
            sealed_at = time.monotonic()
            try:
                crc, digest = yield s.in_thread(writer.finish, client_digest)
            except FiledockError as exc:
                if exc.code is ErrorCode.DIGEST_MISMATCH:
                    self.fate = PartialFate.DISCARD
                    self.outcome = exc.code.value
                raise
            except FileNotFoundError:  # the partial (or the job's directory) was deleted under us
                self.end_job()
                raise FiledockError(ErrorCode.GONE, "the file was deleted during the upload; nothing is kept") \
                    from None
            try:
                yield s.authority.record_complete(target, crc, digest)
            except FiledockError as exc:
                if exc.code is ErrorCode.NO_SPACE:
                    # the file is durable and in place; a retry finds it there and resumes at its end
                    log.warn("upload of {key}: the disk is full, its completion could not be recorded; "
                             "the bytes are kept", key=short_key(target.file_key))
                    raise FiledockError(ErrorCode.NO_SPACE, "the server's disk is full: the file's bytes are "
                                                            "kept, and a retry resumes at its end") from None
                if exc.code is ErrorCode.GONE:
                    self.end_job()
                raise
            s.stats.observe_durable(time.monotonic() - sealed_at)
            s.stats.uploads_completed += 1
            self.outcome = "complete"
            self._log_outcome(crc, digest)
            self.channel.stored(target.size, crc, digest)
        finally:
            self.finishing = False

    # -- ending

    def discard_partial(self) -> None:
        if self.fate is PartialFate.KEEP:
            self.fate = PartialFate.DISCARD

    def roll_back(self) -> None:
        """The bytes since the durable record failed a check: keep none of them (``PartialFate.ROLLBACK``)."""
        if self.fate is PartialFate.KEEP:
            self.fate = PartialFate.ROLLBACK

    def end_job(self) -> None:
        super().end_job()
        self.fate = PartialFate.FORGET

    @defer.inlineCallbacks
    def settle(self):
        s, writer, target = self.services, self.writer, self.target
        if writer is None or target is None:
            return
        if self._checkpointing is not None:
            yield self._checkpointing
        if self.fate is PartialFate.FORGET:  # the job was deleted: nothing to keep and no record to update
            writer.close()
            yield s.in_thread(s.blobs.forget, target.job_id, target.blob_name)
        elif self.fate is PartialFate.DISCARD:
            writer.close()
            yield s.authority.record_discard(target)  # the record first: it never claims bytes that are gone
            yield s.in_thread(s.blobs.discard, target.job_id, target.blob_name)
        elif self.fate is PartialFate.ROLLBACK:
            yield s.in_thread(writer.close)  # nothing recorded: the record is where the checked bytes began
        elif not writer.closed:
            try:
                cp = yield s.in_thread(writer.checkpoint)
            except FileNotFoundError:
                # the job's directory went while we checkpointed: its delete committed after it
                # interrupted us, so there is nothing left to keep or record
                writer.close()
                self.end_job()
            else:
                writer.close()
                yield s.authority.record_progress(target, cp.offset, cp.crc32, cp.stamp)
        if self.outcome != "complete":
            if self.outcome != PAUSED:
                s.stats.uploads_failed[self.outcome or "disconnected"] += 1
            self._log_outcome(None, None)

    def settle_failed(self, failure: Failure) -> None:
        """Settling could not record the partial: one line for the expected failures."""
        if failure.check(FiledockError):  # a full disk, a deleted file: expected, one line
            log.warn("could not record the partial of {key}: {error}", error=failure.value.message,
                     key=short_key(self.target.file_key) if self.target else "-")
        else:
            log.failure("could not record the partial", failure)

    def release(self) -> None:
        s = self.services
        s.stats.hide(self)
        s.registry.withdraw(self)
        if self.claim is not None:
            s.registry.release(self.claim)
            self.claim = None  # the claim holds our let_go: a cycle that only a full collection would free
        if self.writer is not None:
            self.writer.on_drain = None  # a closure over this upload: the same

    def _log_outcome(self, crc: int | None, digest: str | None) -> None:
        target = self.target
        elapsed = max(time.monotonic() - self.started, 1e-9)
        sent = (self.writer.offset if self.writer else 0) - self.resumed_from
        log.info("upload {result}: job={job} file={name!r} key={key} size={size} from={start} "
                 "bytes={sent} seconds={secs:.3f} rate={rate:.1f}MB/s peer={peer}",
                 result=self.outcome or "disconnected", peer=self.channel.peer, job=short_key(target.job_id), name=target.name,
                 key=short_key(target.file_key), size=target.size, start=self.resumed_from, sent=sent,
                 secs=elapsed, rate=sent / elapsed / 1e6, crc32=crc, digest=digest,
                 event="upload-outcome")

    def describe(self) -> dict:
        """This upload, for status: no keys in full."""
        t = self.target
        return {"job": t.job_id, "name": t.name, "key": short_key(t.file_key), "size": t.size,
                "received": self.writer.offset if self.writer else t.received,
                "resumed_from": self.resumed_from,
                "seconds": round(time.monotonic() - self.started, 3)}
