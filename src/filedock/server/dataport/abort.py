"""ABORT: the client gives up on a file; its partial goes, and the record says so first."""

from __future__ import annotations

from twisted.internet import defer

from filedock import wire
from filedock.errors import ErrorCode
from filedock.server.dataport.channel import IRequestChannel, Request, RequestServices


class Abort(Request):
    """One abort: claim the file like an upload (taking over one in progress), record 0, delete."""

    def __init__(self, services: RequestServices, channel: IRequestChannel, request: wire.AbortRequest) -> None:
        super().__init__(services, channel)
        self.request = request
        self.claim = None

    @defer.inlineCallbacks
    def start(self):
        s, req = self.services, self.request
        target = yield s.authority.authorize_upload(req.session_key, req.file_key, None)
        self.channel.authorized(target.job_id, req.session_key)
        self.session_key = req.session_key
        self.claim = yield s.registry.acquire(req.file_key, req.session_key, s.limits.max_connections_per_session,
                                              self.let_go)
        if self.job_deleted or self.channel.ended():
            return
        if self.claim.took_over:
            target = yield s.authority.authorize_upload(req.session_key, req.file_key, None)
        yield s.authority.record_discard(target)  # the record first: it never claims bytes that are gone
        yield s.in_thread(s.blobs.discard, target.job_id, target.blob_name)
        self.channel.accepted_abort()  # a channel that ended meanwhile says nothing more

    def let_go(self) -> None:
        """The registry asks: a newer request for this file wants it."""
        self.services.stats.takeovers += 1
        self.channel.interrupt(ErrorCode.TAKEN_OVER, "a newer connection took over this upload")

    def release(self) -> None:
        if self.claim is not None:
            self.services.registry.release(self.claim)
            self.claim = None  # the claim holds our let_go: a cycle that only a full collection would free
