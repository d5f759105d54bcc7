"""BATCH: many small files on one connection, all fsync'd, checked, published and recorded at once."""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from filedock import wire
from filedock.errors import ErrorCode, FiledockError
from filedock.server.authority import DownloadSource, IBatchAuthority
from filedock.server.dataport.channel import IRequestChannel, Request, RequestServices
from filedock.store.blobstore import BatchWriterLike

log = Logger(namespace="filedock.dataport")


class BatchUpload(Request):
    """One batch: its items stream into a ``BatchWriter``; the reply says per item stored or failed.

    A batch is all or nothing per connection: unless it completes, nothing of it is kept.
    """

    takes_bytes = True

    def __init__(self, services: RequestServices, channel: IRequestChannel, request: wire.BatchRequest) -> None:
        super().__init__(services, channel)
        self.request = request
        self.writer: BatchWriterLike | None = None
        self.job_id: str | None = None
        self.finishing = False
        self.started = 0.0
        self._joined = False
        self._room = 0  # bytes the batch may still take before the disk is asked again
        self._since_space_check = 0
        self._claims: list = []

    @defer.inlineCallbacks
    def start(self):
        s, req = self.services, self.request
        authority = IBatchAuthority(s.authority, None)
        if authority is None:
            raise FiledockError(ErrorCode.MALFORMED_HEADER, "this data port does not take batches")
        if req.count > s.limits.batch_max_files:
            raise FiledockError(ErrorCode.TOO_LARGE, f"a batch holds at most {s.limits.batch_max_files} files")
        job_id = yield authority.authorize_session(req.session_key)
        self.channel.authorized(job_id, req.session_key)
        # batches have a share of their own: stalled ones (a session key is all they need) never take
        # the slots of the session's uploads
        yield s.registry.join_batch_share(req.session_key, s.limits.max_batches_per_session)
        self.session_key, self._joined = req.session_key, True
        self.writer = s.blobs.open_batch(job_id)
        self.writer.on_drain = lambda: s.reactor.callFromThread(self.channel.resume_reading, "hashing")
        s.batch_tags.add(self.writer.tag)
        s.registry.promise(self, self._bytes_to_come)
        self._room = yield self._free_room()
        self.job_id = job_id
        if self.channel.ended():  # the session closed (or the job went) while the registry answered
            return
        self.started = time.monotonic()
        s.stats.show(self, self.describe)
        self.channel.accepted_batch()
        self.channel.expect_within(s.limits.header_timeout)  # its first item line is due like a request line

    def _bytes_to_come(self) -> int:
        return self.writer.pending_bytes

    @defer.inlineCallbacks
    def _free_room(self):
        """Bytes the batch may still take: free space less the reserve and what uploads (and
        batches, this one included) have still to write."""
        s = self.services
        promised = yield s.registry.bytes_promised()
        return s.room(promised)

    # -- items

    def item(self, item: wire.BatchItem) -> defer.Deferred | None:
        """An item line: check it against the limits and the disk, then its bytes follow.

        Returns a Deferred when the disk must be asked again (the channel waits for it)."""
        limits = self.services.limits
        if item.size > limits.batch_item_max:
            self.channel.refused(ErrorCode.TOO_LARGE, f"batch items are at most {limits.batch_item_max} bytes; "
                                                      "send larger files with PUT")
        elif self.writer.bytes + item.size > limits.batch_max_bytes:
            self.channel.refused(ErrorCode.TOO_LARGE, f"a batch holds at most {limits.batch_max_bytes} bytes")
        else:
            self._since_space_check += item.size
            if item.size > self._room or self._since_space_check >= self.SPACE_CHECK_BYTES:
                self._since_space_check = 0
                return self._free_room().addCallback(self._begin_in, item)
            self._begin(item)
        return None

    def _begin_in(self, room: int, item: wire.BatchItem) -> None:
        self._room = room
        if item.size > room:
            self.channel.refused(ErrorCode.NO_SPACE, f"the server cannot hold {item.size} more bytes")
            return
        self._begin(item)

    def _begin(self, item: wire.BatchItem) -> None:
        self._room -= item.size
        try:
            self.writer.begin(item.file_key, item.size, item.digest)
        except FiledockError as exc:
            self.channel.refused(exc.code, exc.message)
        except OSError as exc:
            self._write_failed(exc)

    def receive(self, data: bytes | memoryview) -> None:
        try:
            behind = self.writer.write(data)
        except FiledockError as exc:
            self.channel.refused(exc.code, exc.message)
            return
        except OSError as exc:
            self._write_failed(exc)
            return
        if behind:
            self.channel.pause_reading("hashing")
        self.services.stats.bytes_received += len(data)

    def _write_failed(self, exc: OSError) -> None:
        """A disk error other than a full disk: one error line, no traceback, nothing stored."""
        log.error("batch write failed: {error}", error=exc.strerror or repr(exc))
        self.channel.refused(ErrorCode.INTERNAL_ERROR, f"the server could not write the batch "
                                                       f"({exc.strerror or type(exc).__name__}); nothing was stored")

    def header_pending(self) -> bool:
        return self.writer is not None and not self.writer.entries

    # -- finishing

    @defer.inlineCallbacks
    def finish(self, client_digest: str | None):
        """All items are here: fsync them, check each, publish the good ones, record them at once."""
        s, batch = self.services, self.writer
        authority = IBatchAuthority(s.authority)
        self.finishing = True
        try:
            marks = [time.monotonic()]
            entries = yield s.in_thread(batch.seal)
            marks.append(time.monotonic())
            verdicts = yield authority.authorize_batch(self.session_key, [(e.key, e.size) for e in entries])
            lines, accepted = yield self._judge(entries, verdicts)
            for entry, target in accepted:
                if target.received:  # its partial goes when the batch publishes: the record goes to 0 first
                    yield s.authority.record_discard(target)
            marks.append(time.monotonic())
            yield s.in_thread(batch.publish, [entry for entry, _ in accepted])
            marks.append(time.monotonic())
            if accepted:
                yield authority.record_batch([(target, e.crc32, e.digest) for e, target in accepted])
            marks.append(time.monotonic())
            s.stats.uploads_completed += len(accepted)
            self.outcome = "complete"
            log.info("batch complete: {stored} of {count} files stored, {bytes} bytes, {secs:.3f}s "
                     "(receive {receive:.3f}, fsync {fsync:.3f}, check {check:.3f}, rename {rename:.3f}, "
                     "record {record:.3f})",
                     stored=len(accepted), count=len(entries), bytes=batch.bytes,
                     secs=marks[-1] - self.started, receive=marks[0] - self.started,
                     fsync=marks[1] - marks[0], check=marks[2] - marks[1], rename=marks[3] - marks[2],
                     record=marks[4] - marks[3], event="batch-outcome")
            self.channel.batch_results(lines)
        finally:
            self.finishing = False
            self._release_claims()

    @defer.inlineCallbacks
    def _judge(self, entries, verdicts):
        """Per item: the reply line; and (entry, target) for each one to publish and record."""
        lines: list[wire.ItemStored | wire.ItemFailed] = []
        accepted = []
        seen: set[str] = set()
        # every item that may be published, claimed at once (a PUT arriving now waits for us): one call,
        # which a registry shared through PostgreSQL makes one round trip instead of one per file
        candidates, firsts = [], set()
        for e in entries:
            verdict = verdicts.get(e.key)
            if (e.key not in firsts and not isinstance(verdict, (FiledockError, DownloadSource))
                    and e.client_digest == e.digest):
                candidates.append(e.key)
            firsts.add(e.key)
        claims = (yield self.services.registry.try_acquire_many(candidates)) if candidates else {}
        for e in entries:
            verdict = verdicts.get(e.key)
            if e.key in seen:
                lines.append(wire.ItemFailed(e.key, ErrorCode.CONFLICT.value, "the file is twice in the batch"))
            elif isinstance(verdict, FiledockError):
                lines.append(wire.ItemFailed(e.key, verdict.code_str, verdict.message))
            elif e.client_digest != e.digest:
                lines.append(wire.ItemFailed(e.key, ErrorCode.DIGEST_MISMATCH.value,
                                             f"the server computed {e.digest}"))
            elif isinstance(verdict, DownloadSource):  # complete already: same bytes are fine
                if verdict.digest == e.digest:
                    lines.append(wire.ItemStored(e.key, verdict.size, verdict.crc32, verdict.digest))
                else:
                    lines.append(wire.ItemFailed(e.key, ErrorCode.ALREADY_COMPLETE.value,
                                                 "the file is complete already, with other bytes"))
            else:
                claim = claims.get(e.key)
                if claim is None:
                    lines.append(wire.ItemFailed(e.key, ErrorCode.CONFLICT.value,
                                                 "an upload of this file is in progress"))
                else:
                    self._claims.append(claim)
                    e.blob = verdict.blob_name
                    accepted.append((e, verdict))
                    lines.append(wire.ItemStored(e.key, e.size, e.crc32, e.digest))
            seen.add(e.key)
        return lines, accepted

    def _release_claims(self) -> None:
        if self._claims:
            self.services.registry.release_many(self._claims)
        self._claims = []

    # -- ending

    @defer.inlineCallbacks
    def settle(self):
        if self.writer is not None and self.outcome != "complete":
            yield self.services.in_thread(self.writer.discard)  # a batch is all or nothing per connection
            self.services.stats.uploads_failed[self.outcome or "disconnected"] += 1

    def settle_failed(self, failure: Failure) -> None:
        """Settling failed: log it."""
        log.failure("could not discard the batch", failure)

    def release(self) -> None:
        s = self.services
        s.stats.hide(self)
        s.registry.withdraw(self)
        self._release_claims()
        if self.writer is not None:
            s.batch_tags.discard(self.writer.tag)
        if self._joined:
            s.registry.leave_batch_share(self.session_key)

    def describe(self) -> dict:
        """This batch in flight, for status: how many of its files and bytes have arrived."""
        b, count = self.writer, self.request.count
        return {"job": self.job_id, "name": f"batch of {count} files ({len(b.entries)} arrived)",
                "key": None, "size": sum(e.size for e in b.entries),  # what the items announced so far
                "received": b.bytes, "resumed_from": 0, "seconds": round(time.monotonic() - self.started, 3),
                "files": count, "files_arrived": len(b.entries)}
